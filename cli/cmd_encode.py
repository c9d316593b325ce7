"""`f2m-ray encode`: the feature bank (every labeled ROI through the encoder) as Parquet."""

from __future__ import annotations

import time

import click

from f2m_ray.runtime.stop import on_stop
from f2m_ray_cli.main import cli


@cli.command("encode")
@click.option("--model", required=True, metavar="CKPT", help="Checkpoint dir or run folder (latest checkpoint).")
@click.option("--data", default="phantom", show_default=True,
              help="Labeled ROIs: phantom, phantom:N, or a manifest CSV/Parquet (local or s3://).")
@click.option("--format", "fmt", default="auto", show_default=True, help="Data format.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Data seed (phantoms and the train/val split): use the training run's.")
@click.option("--val-fraction", type=float, default=None,
              help="Validation share by patient [default: the checkpoint's].")
@click.option("--out", default=None, help="Bank file [default: CKPT/feature_bank.parquet].")
@click.option("--workers", type=int, default=None, help="Encoder actors [default: 1, or one per GPU].")
@click.option("--dry-run", is_flag=True, help="Print the resolved options and exit.")
def encode(model, data, fmt, seed, val_fraction, out, workers, dry_run) -> None:
    """Encode every labeled ROI with its own labels and write the feature bank."""
    from f2m_ray.checkpoint import find_checkpoint, read_metadata
    from f2m_ray.bank import default_bank_path, load_feature_bank
    from f2m_ray.encode import build_feature_bank

    checkpoint = find_checkpoint(model)
    if dry_run:
        meta = read_metadata(checkpoint)
        fraction = val_fraction if val_fraction is not None else meta["preset"]["train"]["val_fraction"]
        click.echo(f"model         {checkpoint}  (id {meta['model_id']}, preset {meta['preset']['name']})")
        click.echo(f"data          {data}  (format {fmt}, seed {seed}, val fraction {fraction})")
        click.echo(f"out           {out or default_bank_path(checkpoint)}")
        return
    target = out or default_bank_path(checkpoint)
    on_stop(lambda: f"nothing written ({target} is written whole once every ROI is encoded, and what was "
                    f"there before is untouched); run the same command again")
    start = time.perf_counter()
    path = build_feature_bank(checkpoint, data=data, out=out, fmt=fmt, seed=seed, val_fraction=val_fraction,
                              workers=workers)
    bank = load_feature_bank(path)
    seconds = time.perf_counter() - start
    splits = bank.metadata.get("splits", {})
    click.echo(
        f"encoded {len(bank)} ROIs ({', '.join(f'{v} {k}' for k, v in splits.items())}) into "
        f"{bank.feature_dim}-d features in {seconds:.1f} s"
    )
    for name, count in bank.counts().items():
        click.echo(f"  {name:40s} {count}")
    click.echo(f"bank: {path}  (id {bank.bank_id})")
