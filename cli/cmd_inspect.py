"""`f2m-ray inspect`: what a synthetic dataset holds, and a contact sheet."""

from __future__ import annotations

import click

from f2m_ray_cli.main import cli


@cli.command("inspect")
@click.argument("path")
@click.option("--sheet", default=None, type=click.Path(), help="Also write a contact sheet PNG (local path).")
@click.option("--per-category", type=int, default=8, show_default=True, help="Masses per category on the sheet.")
def inspect(path, sheet, per_category) -> None:
    """Counts per category, schema version, model id; checks the files against the manifest."""
    from f2m_ray.synthetic import inspect_dataset, sample_images

    info = inspect_dataset(path)
    click.echo(f"dataset         {info['path']}")
    click.echo(f"schema version  {info['schema_version']}  (written by f2m-ray {info['tool_version']})")
    click.echo(f"model id        {info['model_id']}  (preset {info['preset']}, bank {info['bank_id']})")
    click.echo(f"masses          {info['rows']} in {info['files']} files, {info['bytes'] / 1e6:.1f} MB")
    arguments = info["arguments"]
    click.echo(f"run             mixing {arguments.get('mixing', 'paper')}, K={arguments.get('k')}, step {arguments.get('step')}, alpha {arguments.get('alpha')}, "
               f"seed {arguments.get('seed')}")
    for name, count in sorted(info["counts"].items()):
        click.echo(f"  {name:40s} {count}")
    for note in info["notes"]:
        click.echo(f"note: {note}")
    if sheet:
        from f2m_ray.data.phantom_files import contact_sheet

        contact_sheet(sample_images(path, per_category), sheet)
        click.echo(f"sheet: {sheet}")
