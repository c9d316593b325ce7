"""`f2m-ray phantoms`: write labeled procedural phantom masses (no data download needed)."""

from __future__ import annotations

import time

import click

from f2m_ray.errors import F2MError
from f2m_ray.labels import parse_categories
from f2m_ray_cli.main import cli


def _categories(names: tuple[str, ...]):
    """--category values -> Categories (None = the library default), duplicates dropped."""
    return parse_categories(names) if names else None


@cli.command("phantoms")
@click.option("--n", "n", type=int, required=True, help="Number of phantoms to write.")
@click.option("--out", "out", required=True, type=click.Path(), help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Run seed (>= 0).")
@click.option(
    "--category", "category_names", multiple=True, metavar="C",
    help="MARGIN-SHAPE, repeatable; 'all' adds architectural distortion "
    "[default: 5 margins x 4 mass shapes].",
)
@click.option("--preview", type=click.Path(), default=None,
              help="Also write a contact sheet PNG (8 phantoms per category).")
@click.option("--overwrite", is_flag=True, help="Replace phantoms in a non-empty --out.")
def phantoms(n: int, out: str, seed: int, category_names: tuple[str, ...],
             preview: str | None, overwrite: bool) -> None:
    """Write N procedural phantom ROIs as OUT/images/*.png plus OUT/manifest.csv."""
    from f2m_ray.data import phantom, phantom_files

    if n <= 0:
        raise F2MError(f"--n must be a positive integer, got {n}")
    if seed < 0:
        raise F2MError(f"--seed must be >= 0, got {seed}")
    categories = _categories(category_names) or list(phantom.DEFAULT_CATEGORIES)
    if tuple(categories) == phantom.DEFAULT_CATEGORIES:
        described = "the 20 default categories (5 margins x 4 mass shapes)"
    else:
        described = f"{len(categories)} categories ({', '.join(c.name for c in categories)})"
    start = time.perf_counter()
    manifest = phantom_files.write_phantoms(
        out, n, seed=seed, categories=categories, preview=preview, overwrite=overwrite
    )
    seconds = time.perf_counter() - start
    click.echo(f"wrote {n} phantoms of {described} in {seconds:.1f} s")
    click.echo(f"manifest: {manifest}")
    if preview:
        click.echo(f"preview: {preview}")
