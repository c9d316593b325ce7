"""`f2m-ray data check`: read a labeled ROI source the way training will, and say what came in."""

from __future__ import annotations

import click
import numpy as np

from f2m_ray.errors import F2MError
from f2m_ray_cli.main import cli

SHEET_PER_CATEGORY = 8


@cli.group("data")
def data() -> None:
    """Inspect labeled ROI sources (manifests, CBIS-DDSM, phantoms)."""


@data.command("check")
@click.option("--data", "source", required=True,
              help="A manifest (CSV/Parquet, or a folder with manifest.csv), a CBIS-DDSM mass CSV "
              "or its folder, or phantom[:N]; local or s3://.")
@click.option("--format", "fmt", type=click.Choice(["auto", "manifest", "cbis-ddsm", "phantom"]),
              default="auto", show_default=True, help="Source format (auto: by the path and CSV header).")
@click.option("--roi-source", type=click.Choice(["cropped", "mask"]), default="cropped", show_default=True,
              help="cropped: the ROI image as is; mask: a square around the ROI mask, cut from the full image.")
@click.option("--compound", type=click.Choice(["most-suspicious", "drop"]), default="most-suspicious",
              show_default=True, help="Compound labels (ILL_DEFINED-SPICULATED): map to the most suspicious part, or drop.")
@click.option("--window", type=click.Choice(["auto", "percentile", "bits"]), default="auto", show_default=True,
              help="12/16-bit windowing: auto = fixed for 8-bit, per-ROI 0.5-99.5 percentiles otherwise.")
@click.option("--mask-margin", type=float, default=0.2, show_default=True,
              help="--roi-source mask: tissue kept around the mask box, per side, as a fraction of its larger side.")
@click.option("--image-root", default=None, help="CBIS-DDSM: the DICOM download's folder [default: the CSV's folder].")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Patients held out for validation.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the patient split.")
@click.option("--sheet", type=click.Path(dir_okay=False), default="data-check.png", show_default=True,
              help=f"Contact sheet PNG: up to {SHEET_PER_CATEGORY} ROIs per category, as the model sees them.")
@click.option("--no-sheet", is_flag=True, help="Do not write the contact sheet.")
@click.option("--dry-run", is_flag=True, help="Print the resolved options and exit.")
def check(source: str, fmt: str, roi_source: str, compound: str, window: str, mask_margin: float,
          image_root: str | None, val_fraction: float, seed: int, sheet: str, no_sheet: bool, dry_run: bool) -> None:
    """Read everything, then print rows per category, what was dropped and why, and image
    sizes, and write a contact sheet. Exit status 1 when nothing usable is left."""
    options = {
        "data": source, "format": fmt, "roi_source": roi_source, "compound": compound, "window": window,
        "mask_margin": mask_margin, "image_root": image_root, "val_fraction": val_fraction, "seed": seed,
        "sheet": None if no_sheet else sheet,
    }
    if dry_run:
        for key, value in options.items():
            click.echo(f"{key:13s} {value}")
        return
    from f2m_ray.data.readers import read_labeled
    from f2m_ray.runtime.console import quiet_ray_data

    result = read_labeled(
        source, fmt, val_fraction, seed, roi_source=roi_source, compound=compound, window=window,
        mask_margin=mask_margin, image_root=image_root,
    )
    for line in report_lines(result):
        click.echo(line)
    if not no_sheet:
        quiet_ray_data()
        written = write_sheet(result, sheet)
        click.echo(f"contact sheet: {written}")


def report_lines(result) -> list[str]:
    """The human-readable summary of a ReadResult."""
    dropped = sum(result.dropped.values())
    lines = [
        f"source: {result.description}",
        f"usable ROIs: {result.rows} of {result.rows + dropped} rows ({dropped} dropped)",
        "rows per category:",
    ]
    width = max((len(name) for name in result.per_category), default=10)
    for name, count in sorted(result.per_category.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {name:{width}s}  {count:6d}")
    if result.mapped:
        lines.append("compound labels mapped (most suspicious component):")
        for note, count in sorted(result.mapped.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {note}  x{count}")
    if dropped:
        lines.append(f"dropped ({dropped}):")
        for reason, count in sorted(result.dropped.items(), key=lambda kv: (-kv[1], kv[0])):
            example = result.examples.get(reason)
            lines.append(f"  {count:6d}  {reason}" + (f"  (e.g. {example})" if example else ""))
    splits = ", ".join(
        f"{split} {result.split_rows.get(split, 0)} ROIs / {result.split_patients.get(split, 0)} patients"
        for split in ("train", "val")
    )
    lines.append(f"split by patient: {splits}")
    sizes = result.original_sizes
    if sizes is not None and len(sizes):
        lines.append("original ROI size before resizing to 64x64 (pixels):")
        for axis, name in ((0, "height"), (1, "width")):
            values = sizes[:, axis]
            lines.append(
                f"  {name:6s} min {values.min()}  median {int(np.median(values))}  max {values.max()}  "
                f"mean {values.mean():.0f}"
            )
        aspect = sizes[:, 1] / np.maximum(sizes[:, 0], 1)
        upsampled = int(np.count_nonzero(sizes.max(axis=1) < 64))
        lines.append(f"  aspect w/h min {aspect.min():.2f}  median {np.median(aspect):.2f}  max {aspect.max():.2f}; "
                     f"{upsampled} ROI(s) smaller than 64 on the longer side (upsampled)")
    return lines


def write_sheet(result, path: str) -> str:
    """Up to SHEET_PER_CATEGORY ROIs per category (model range mapped to grey), via phantom.contact_sheet."""
    from f2m_ray.labels import MARGINS, SHAPES
    from f2m_ray.data.phantom_files import contact_sheet

    wanted = set(result.per_category)
    chosen: dict[str, list[np.ndarray]] = {name: [] for name in sorted(wanted)}
    for batch in result.dataset.select_columns(["image", "margin", "shape"]).iter_batches(
        batch_format="numpy", batch_size=256
    ):
        for image, m, s in zip(batch["image"], batch["margin"], batch["shape"]):
            bucket = chosen.setdefault(f"{MARGINS[int(m)]}-{SHAPES[int(s)]}", [])
            if len(bucket) < SHEET_PER_CATEGORY:
                bucket.append((np.asarray(image, dtype=np.float32) + 1.0) / 2.0)
        if all(len(v) >= SHEET_PER_CATEGORY for v in chosen.values()):
            break
    chosen = {name: imgs for name, imgs in chosen.items() if imgs}
    if not chosen:
        raise F2MError("contact sheet: no images to show")
    return str(contact_sheet(chosen, path))
