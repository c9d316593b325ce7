"""`f2m-ray export`: a synthetic dataset as an image folder or WebDataset shards (local or s3://)."""

from __future__ import annotations

import click

from f2m_ray.runtime.stop import on_stop
from f2m_ray_cli.main import cli, command_again


@cli.command("export")
@click.argument("path")
@click.option("--format", "fmt", required=True, type=click.Choice(["imagefolder", "webdataset"]),
              help="imagefolder: DIR/CATEGORY/SAMPLE_ID.png plus DIR/metadata.csv (Hugging Face imagefolder, "
                   "torchvision ImageFolder); webdataset: DIR/shard-NNNNNN.tar of KEY.png + KEY.json.")
@click.option("--out", required=True, metavar="DIR", help="Output folder: a local path or s3://bucket/prefix.")
@click.option("--shard-size", type=int, default=None, metavar="N",
              help="Masses per tar shard (webdataset only) [default: 10000].")
@click.option("--resume", is_flag=True, help="Finish an interrupted export in --out, keeping its complete files.")
@click.option("--overwrite", is_flag=True, help="Replace a previous export in --out.")
def export(path, fmt, out, shard_size, resume, overwrite) -> None:
    """Write the finished synthetic dataset at PATH as an image folder or WebDataset shards."""
    from f2m_ray.export import export_dataset

    on_stop(lambda: _kept(out))
    summary = export_dataset(path, fmt, out, shard_size=shard_size, overwrite=overwrite, resume=resume,
                             progress=lambda line: click.echo(line, err=True))
    kept = f"; kept {summary.kept_units} of {summary.units} units already complete" if summary.kept_units else ""
    files = "1 file" if summary.written_files == 1 else f"{summary.written_files} files"
    click.echo(f"exported {summary.masses} masses as {fmt} to {out}: {files} written, "
               f"{summary.bytes_written / 1e6:.1f} MB, {summary.seconds:.1f} s{kept}")
    click.echo(f"finished: {summary.marker}")


def _kept(out: str) -> str:
    """What a stopped export leaves in `out`, and the command that finishes it."""
    from f2m_ray.export import EXPORT_RUN_NAME
    from f2m_ray.storage import filesystem, join

    fs, root = filesystem(out)
    if not fs.exists(join(root, EXPORT_RUN_NAME)):
        return f"nothing was written to {out}; run the same command again"
    return (f"the files finished so far are kept in {out}; "
            f"finish the export with: {command_again('--resume', drop=('--overwrite',))}")
