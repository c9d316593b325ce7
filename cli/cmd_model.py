"""`f2m-ray model-info CKPT`: what a checkpoint holds, without running anything."""

from __future__ import annotations

import click

from f2m_ray_cli.main import cli


@cli.command("model-info")
@click.argument("checkpoint")
def model_info(checkpoint: str) -> None:
    """Print a checkpoint's preset, epoch, step and model id (local path or s3://)."""
    from f2m_ray.checkpoint import find_checkpoint, read_metadata  # imports torch: only when used

    path = find_checkpoint(checkpoint)
    meta = read_metadata(path)
    model = meta["preset"]["model"]
    click.echo(f"checkpoint   {path}")
    click.echo(f"preset       {meta['preset']['name']}  (feature_dim {model['feature_dim']})")
    click.echo(f"epoch, step  {meta['epoch']}, {meta['step']}")
    click.echo(f"model id     {meta['model_id']}")
    click.echo(f"written by   f2m-ray {meta['tool_version']}")
