"""`f2m-ray model-info [CKPT]`: what a checkpoint holds, without running anything."""

from __future__ import annotations

import click

from f2m_ray_cli.main import cli


@cli.command("model-info")
@click.argument("checkpoint", required=False)
@click.option("--storage", default=None, metavar="PATH|s3://...",
              help="Where to look for the newest finished run when CHECKPOINT is not given "
                   "[default: $F2M_STORAGE, else ./f2m-runs].")
def model_info(checkpoint: str | None, storage: str | None) -> None:
    """Print a checkpoint's preset, epoch, step and model id (local path or s3://), and its model card.

    CHECKPOINT may be 'pretrained' (the shipped model); without it, the model `synthesize`
    would use: the newest finished run under --storage, else the shipped model.
    """
    from f2m_ray.checkpoint import find_checkpoint, read_metadata  # imports torch: only when used
    from f2m_ray.model_choice import default_model, model_card
    from f2m_ray.pretrained import named_model

    why = None
    if checkpoint is None:
        choice = default_model(storage)
        checkpoint, why = choice.checkpoint, choice.why
    path = find_checkpoint(named_model(checkpoint))
    meta = read_metadata(path)
    model = meta["preset"]["model"]
    click.echo(f"checkpoint   {path}" + (f"  ({why})" if why else ""))
    click.echo(f"preset       {meta['preset']['name']}  (feature_dim {model['feature_dim']})")
    click.echo(f"epoch, step  {meta['epoch']}, {meta['step']}")
    click.echo(f"model id     {meta['model_id']}")
    click.echo(f"written by   f2m-ray {meta['tool_version']}")
    export = meta.get("export")
    if export:
        click.echo(f"export       generator only, {export.get('weights_dtype')} weights "
                   f"(from model {export.get('from_model_id')}): synthesizes and encodes, does not resume training")
    card = model_card(path)
    if card:
        click.echo("")
        click.echo(card.rstrip())
