"""`f2m-ray train`: data-parallel GAN training on Ray Train (local Ray or a cluster)."""

from __future__ import annotations

import shlex

import click

from f2m_ray.runtime.stop import on_stop
from f2m_ray_cli.main import cli, command_again


@cli.command("train")
@click.option("--data", default=None, metavar="SOURCE",
              help="phantom | phantom:N | manifest PATH or s3://... [default: phantom, 2000 fresh phantoms]")
@click.option("--format", "data_format", default=None, metavar="FMT",
              help="Data format passed to the reader [default: auto].")
@click.option("--preset", default=None, metavar="NAME", help="paper | small | tiny [default: small].")
@click.option("--workers", type=int, default=None, help="Training workers [default: one per GPU, else 2].")
@click.option("--gpu/--no-gpu", "use_gpu", default=None, help="Train on GPUs [default: if the cluster has them].")
@click.option("--epochs", type=int, default=None, help="Train up to this epoch (a resumed run continues to it).")
@click.option("--batch-size", type=int, default=None, help="Global batch, split over the workers.")
@click.option("--seed", type=int, default=None, help="Seeds the data split, initial weights and augmentation.")
@click.option("--storage", default=None, metavar="PATH|s3://...",
              help="Where run folders go [default: $F2M_STORAGE, else ./f2m-runs]; S3 endpoint from AWS_ENDPOINT_URL.")
@click.option("--name", default=None, help="Run name; the same --name and --storage resume the run "
              "[default: PRESET-DATE-TIME].")
@click.option("--checkpoint-every", type=int, default=None, help="Epochs between checkpoints.")
@click.option("--keep-checkpoints", type=int, default=None, help="Keep the last K checkpoints.")
@click.option("--sample-every", type=int, default=None, help="Epochs between sample grids.")
@click.option("--max-failures", type=int, default=None,
              help="Restarts from the last checkpoint after a lost worker [default: 2].")
@click.option("--bank/--no-bank", "feature_bank", default=None,
              help="Build the feature bank beside the final checkpoint [default: yes].")
@click.option("--mix-weight", "mix_weight", type=float, default=None, metavar="W",
              help="Training for mixes: weight of D's and G's terms on decoded same-category mixes "
                   "(0 = the paper's eq. 3-5) [default: the preset's].")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="TOML or YAML file: preset = NAME, [train], [loss] and [run] tables; flags win over it.")
@click.option("--dry-run", is_flag=True, help="Print the resolved configuration and exit (Ray is not started).")
def train(data, data_format, preset, workers, use_gpu, epochs, batch_size, seed, storage, name,
          checkpoint_every, keep_checkpoints, sample_every, max_failures, feature_bank, mix_weight, config_file, dry_run) -> None:
    """Train Feature2Mass on Ray Train: DDP workers, checkpoints into --storage, resumable by --name."""
    from f2m_ray.train.options import describe_run, resolve_run

    train_overrides = {
        "epochs": epochs, "batch_size": batch_size, "seed": seed, "checkpoint_every": checkpoint_every,
        "keep_checkpoints": keep_checkpoints, "sample_every": sample_every,
    }
    run_overrides = {
        "data": data, "data_format": data_format, "workers": workers, "use_gpu": use_gpu, "storage": storage,
        "name": name, "max_failures": max_failures, "feature_bank": feature_bank,
    }
    resolved_preset, options = resolve_run(config_file, preset, train_overrides, run_overrides,
                                           {"lambda_mix": mix_weight})
    if dry_run:
        click.echo(describe_run(resolved_preset, options))
        return

    from f2m_ray.runtime.cluster import ensure_ray
    from f2m_ray.runtime.console import quiet_ray_data
    from f2m_ray.train.driver import train as run_training

    on_stop(lambda: _kept(options))
    # train() checks storage and a resumed run's preset first, then starts Ray through this
    # callback: actors' logs stay off the console, since the command prints its own epoch lines.
    summary = run_training(
        resolved_preset, options, echo=click.echo,
        start_ray=lambda: (ensure_ray(), quiet_ray_data()),
    )
    if summary.metrics:
        click.echo(f"done: epoch {summary.end_epoch}, run folder {summary.run_dir}")


def _kept(options) -> str:
    """What a stopped training run keeps, and the command that resumes it (the same --name and --storage)."""
    from f2m_ray.train.options import existing_checkpoint

    again = command_again()
    for flag, value in (("--name", options.name), ("--storage", options.storage)):
        if flag not in again.split():
            again += f" {flag} {shlex.quote(value)}"
    previous = existing_checkpoint(options.run_dir)
    if previous is None:
        return f"no checkpoint yet in {options.run_dir}; the same command starts it again: {again}"
    return f"checkpoint epoch {int(previous['epoch'])} kept in {options.run_dir}; resume with: {again}"
