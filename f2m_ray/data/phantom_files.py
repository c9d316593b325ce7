"""`f2m-ray phantoms`: phantom masses on disk as a manifest source (PNG files + manifest.csv), written in
parallel, deterministic per seed, never into a folder holding anything else; and the contact sheet.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from f2m_ray.errors import F2MError
from f2m_ray.labels import Category

from f2m_ray.data.phantom import DEFAULT_CATEGORIES, _to_uint8, phantom_category, phantom_rng, render_phantom


MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("id", "path", "margin", "shape", "patient_id")
IMAGES_DIR = "images"
_PARALLEL_MIN = 600  # below this many phantoms a process pool costs more than it saves
# ---------------------------------------------------------------- writing


def _phantom_id(index: int) -> str:
    return f"phantom-{index:06d}"


def _image_name(index: int) -> str:
    return f"{index:06d}.png"


def _write_range(images_dir: str, seed: int, categories: tuple, lo: int, hi: int) -> int:
    """Render and write phantoms lo .. hi - 1 (a worker's share; also the serial path)."""
    folder = Path(images_dir)
    for index in range(lo, hi):
        category = phantom_category(index, categories)
        image = _to_uint8(render_phantom(category, phantom_rng(seed, index)))
        Image.fromarray(image, mode="L").save(folder / _image_name(index), optimize=False)
    return hi - lo


def _prepare_output(out: Path, overwrite: bool) -> Path:
    """Create OUT/images, refusing a non-empty OUT unless overwrite; returns images dir."""
    if out.exists() and not out.is_dir():
        raise F2MError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise F2MError(f"output folder {out} is not empty; pass --overwrite to replace its phantoms")
        # Unmark the folder as finished first, then drop only files this tool writes.
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        old_images = out / IMAGES_DIR
        if old_images.is_dir():
            for png in old_images.glob("*.png"):
                if png.stem.isdigit():
                    png.unlink()
    images = out / IMAGES_DIR
    try:
        images.mkdir(parents=True, exist_ok=True)
        probe = images / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise F2MError(f"cannot write to output folder {out}: {err.strerror or err}") from None
    return images


def _check_preview(preview: str | os.PathLike | None) -> Path | None:
    if preview is None:
        return None
    path = Path(preview)
    if path.suffix.lower() != ".png":
        raise F2MError(f"preview {path} must be a .png file")
    if not path.parent.is_dir():
        raise F2MError(f"preview folder {path.parent} does not exist")
    return path


def write_phantoms(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    categories: Sequence[Category] | None = None,
    preview: str | os.PathLike | None = None,
    overwrite: bool = False,
    workers: int | None = None,
) -> Path:
    """Write ``n`` phantoms as OUT/images/NNNNNN.png plus OUT/manifest.csv; returns the manifest.

    The manifest (``id,path,margin,shape,patient_id``, paths relative to it) is
    written last and atomically, so a folder without one is unfinished. The output
    does not depend on ``workers`` (default: a process per CPU for large ``n``).
    With ``preview``, also writes a contact sheet of up to 8 phantoms per category.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise F2MError(f"the number of phantoms must be a positive integer, got {n}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise F2MError(f"the seed must be an integer >= 0, got {seed}")
    cats = tuple(categories) if categories else DEFAULT_CATEGORIES
    preview_path = _check_preview(preview)
    out = Path(out_dir)
    images = _prepare_output(out, overwrite)

    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if n >= _PARALLEL_MIN else 1
    workers = max(1, min(int(workers), n))
    if workers == 1:
        _write_range(str(images), int(seed), cats, 0, n)
    else:
        # Contiguous index ranges, a few per worker for load balance.
        bounds = np.linspace(0, n, 4 * workers + 1).astype(int)
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [
                pool.submit(_write_range, str(images), int(seed), cats, int(lo), int(hi))
                for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo
            ]
            for future in futures:
                future.result()

    manifest = out / MANIFEST_NAME
    tmp = out / f".{MANIFEST_NAME}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for index in range(n):
            category = phantom_category(index, cats)
            pid = _phantom_id(index)
            writer.writerow(
                (pid, f"{IMAGES_DIR}/{_image_name(index)}", category.margin, category.shape, pid)
            )
    os.replace(tmp, manifest)

    if preview_path is not None:
        per_category: dict[str, list[np.ndarray]] = {}
        for k, category in enumerate(cats):
            indices = range(k, min(n, k + 8 * len(cats)), len(cats))
            per_category[category.name] = [
                np.asarray(Image.open(images / _image_name(i))) for i in indices
            ]
        contact_sheet(per_category, preview_path)
    return manifest


def contact_sheet(images_by_category: dict[str, list[np.ndarray]], path: str | os.PathLike) -> Path:
    """Save a grid: one row per category, its name at the left, its images to the right.

    Images are uint8 or float in [0, 1], all the same size.
    """
    rows = [(name, list(imgs)) for name, imgs in images_by_category.items()]
    if not rows:
        raise F2MError("contact sheet: no images to show")
    sample = next((imgs[0] for _, imgs in rows if imgs), None)
    tile = sample.shape[0] if sample is not None else 64
    gap = 2
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    label_width = int(max(measure.textlength(name, font=font) for name, _ in rows)) + 10
    columns = max(1, max(len(imgs) for _, imgs in rows))
    width = label_width + columns * (tile + gap)
    height = len(rows) * (tile + gap) + gap
    sheet = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(sheet)
    for r, (name, imgs) in enumerate(rows):
        top = gap + r * (tile + gap)
        draw.text((4, top + tile // 2 - 5), name, fill=255, font=font)
        for c, img in enumerate(imgs):
            arr = np.asarray(img)
            if arr.dtype != np.uint8:
                arr = _to_uint8(arr.astype(np.float32))
            sheet.paste(Image.fromarray(arr, mode="L"), (label_width + c * (tile + gap), top))
    path = Path(path)
    try:
        sheet.save(path)
    except OSError as err:
        raise F2MError(f"cannot write preview {path}: {err.strerror or err}") from None
    return path
