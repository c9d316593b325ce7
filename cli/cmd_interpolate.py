"""`f2m-ray interpolate`: the paper's Fig. 3 (two seeds) and Fig. 4 (three seeds) as PNG grids."""

from __future__ import annotations

import click

from f2m_ray_cli.main import cli


@cli.command("interpolate")
@click.option("--model", required=True, metavar="CKPT", help="Checkpoint dir or run folder (latest checkpoint).")
@click.option("--seeds", required=True, metavar="A,B[,C]", help="Two or three roi ids from the feature bank.")
@click.option("--steps", type=int, default=8, show_default=True,
              help="Images along the line (2 seeds) or per triangle side (3 seeds), ends included.")
@click.option("--bank", default=None, help="Feature bank [default: CKPT/feature_bank.parquet].")
@click.option("--out", required=True, help="Figure path (.png, local or s3://).")
def interpolate(model, seeds, steps, bank, out) -> None:
    """Decode equidistant mixes of two seeds, or a barycentric grid over three."""
    from f2m_ray.synth.interpolate import write_interpolation

    result = write_interpolation(model, seeds.split(","), out, steps=steps, bank=bank)
    kind = "line (Fig. 3)" if len(result.seed_ids) == 2 else "triangle (Fig. 4)"
    click.echo(f"wrote a {kind} of {len(result.images)} decoded mixes of {', '.join(result.seed_ids)}: {out}")
