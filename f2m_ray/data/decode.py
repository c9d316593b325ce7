"""Files -> 64x64 rows in Ray Data tasks: each ROI read (local or s3://), decoded, windowed, cropped and
resized by f2m_ray.core.images; a file that cannot be used is counted with its reason, never fatal.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np


from f2m_ray.core import images
from f2m_ray.errors import F2MError
from f2m_ray.labels import MARGINS, SHAPES
from f2m_ray.runtime.console import quiet_ray_data
from f2m_ray.runtime.env import worker_runtime_env
from f2m_ray.storage import filesystem, is_remote
from f2m_ray.data.rows import IMAGE_SIZE, ROW_COLUMNS, ReadResult, Drops, split_by_patient
from f2m_ray.runtime.cluster import ensure_ray


DECODE_BATCH = 8  # rows per decode call: full mammograms are tens of MB each
MAX_DECODE_BLOCKS = 64
HEADER_BYTES = 1 << 16  # enough for a DICOM header or an image header
@dataclass(frozen=True)
class DecodeOptions:
    """How decode tasks turn files into 64x64 rows (travels to Ray tasks as a dict)."""

    roi_source: str = "cropped"  # 'cropped': the ROI image as is; 'mask': crop around the mask
    window: str = "auto"  # windowing rule, f2m_ray.core.images
    mask_margin: float = images.DEFAULT_MASK_MARGIN  # context around the mask box, per side
    size: int = IMAGE_SIZE  # output side in pixels


# ---------------------------------------------------------------- decoding in Ray Data


def drop_summary(counts: dict) -> str:
    return "dropped: " + ", ".join(f"{reason} x{n}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def decode(jobs, drops: Drops, mapped: Counter, val_fraction, seed, options: DecodeOptions,
            what: str, fmt: str) -> ReadResult:
    import ray

    split_of = split_by_patient([j["patient_id"] for j in jobs], val_fraction, seed)
    for job in jobs:
        job["split"] = job["split"] or split_of[job["patient_id"]]
    ensure_ray()
    option_dict = asdict(options)

    def decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        opts = DecodeOptions(**option_dict)
        n = len(batch["roi_id"])
        out_images = np.zeros((n, opts.size, opts.size), dtype=np.float32)
        problems, sources = [""] * n, [""] * n
        sizes = np.zeros((n, 2), dtype=np.int64)
        for i in range(n):
            try:
                image, source, size = _load_roi(
                    str(batch["crop_files"][i]), str(batch["mask_files"][i]), str(batch["image_files"][i]), opts
                )
                out_images[i], sources[i], sizes[i] = image, source, size
            except images.ImageProblem as err:
                problems[i] = err.reason
                sources[i] = _first(batch["crop_files"][i] or batch["mask_files"][i])
            except Exception as err:  # one bad file must not stop the run: count it
                problems[i] = f"unreadable image ({type(err).__name__})"
                sources[i] = _first(batch["crop_files"][i] or batch["mask_files"][i])
        return {
            "roi_id": batch["roi_id"],
            "image": out_images,
            "margin": batch["margin"].astype(np.int64),
            "shape": batch["shape"].astype(np.int64),
            "patient_id": batch["patient_id"],
            "split": batch["split"],
            "source": np.array(sources, dtype=object),
            "problem": np.array(problems, dtype=object),
            "height": sizes[:, 0],
            "width": sizes[:, 1],
        }

    def keep_usable(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["problem"] == ""
        return {c: batch[c][ok] for c in ROW_COLUMNS}

    # Enough blocks to keep every CPU busy on large sets, not a task per row on small ones.
    blocks = max(1, min(-(-len(jobs) // DECODE_BATCH), MAX_DECODE_BLOCKS))
    quiet_ray_data()
    decoded = (
        ray.data.from_items(jobs, override_num_blocks=blocks)
        .map_batches(decode_batch, batch_size=DECODE_BATCH, batch_format="numpy",
                     runtime_env=worker_runtime_env())  # the driver's S3 settings, for remote files
        .materialize()
    )
    meta = decoded.select_columns(
        ["roi_id", "margin", "shape", "patient_id", "split", "source", "problem", "height", "width"]
    ).to_pandas()
    for reason, source in zip(meta["problem"], meta["source"]):
        if reason:
            drops.add(reason, str(source))
    usable = meta[meta["problem"] == ""]
    if usable.empty:
        raise F2MError(f"nothing usable in {what} ({drop_summary(drops.counts)})")
    if len(usable) == len(meta):  # nothing to filter: a projection of the materialized blocks
        dataset = decoded.select_columns(list(ROW_COLUMNS))
    else:
        dataset = decoded.map_batches(keep_usable, batch_format="numpy").materialize()
    categories = Counter(f"{MARGINS[m]}-{SHAPES[s]}" for m, s in zip(usable["margin"], usable["shape"]))
    split_rows = Counter(usable["split"])
    split_patients = Counter(usable.drop_duplicates(["patient_id", "split"])["split"])
    n = len(usable)
    return ReadResult(
        dataset, n, dict(drops.counts),
        f"{n} ROIs from {what}" + (f" ({sum(drops.counts.values())} rows dropped)" if drops.counts else ""),
        per_category=dict(sorted(categories.items())), split_rows=dict(split_rows),
        split_patients=dict(split_patients), mapped=dict(mapped),
        original_sizes=usable[["height", "width"]].to_numpy(dtype=np.int64),
        examples=dict(drops.examples), format=fmt,
    )


def _first(files) -> str:
    return str(files).split("\n", 1)[0]


# ---------------------------------------------------------------- one ROI (runs in Ray tasks)


def _read(path: str, head_only: bool = False) -> bytes:
    fs, inner = filesystem(path)
    try:
        with fs.open(inner, "rb", **({"block_size": HEADER_BYTES} if head_only and is_remote(path) else {})) as handle:
            return handle.read(HEADER_BYTES) if head_only else handle.read()
    except FileNotFoundError:
        raise images.ImageProblem(images.MISSING_FILE, path) from None
    except IsADirectoryError:
        raise images.ImageProblem(images.NOT_AN_IMAGE, path) from None


def _by_area(paths: list[str], largest_first: bool) -> list[str]:
    """Candidates ordered by pixel area from their headers (files without a readable header last)."""
    if len(paths) < 2:
        return paths
    areas = []
    for p in paths:
        size = images.header_size(_read(p, head_only=True), p)
        areas.append(size[0] * size[1] if size else None)
    known = sorted((a, i) for i, a in enumerate(areas) if a is not None)
    if largest_first:
        known.reverse()
    return [paths[i] for _, i in known] + [p for p, a in zip(paths, areas) if a is None]


def _pick(files: str, role: str) -> tuple[str, images.Pixels]:
    """The candidate that plays `role` ('crop', 'mask' or 'full') and its pixels, by content:
    a mask is binary; the crop is the smallest non-binary image, the full image the largest."""
    candidates = [p for p in files.split("\n") if p]
    for path in _by_area(candidates, largest_first=role != "crop"):
        pixels = images.decode(_read(path), path)
        if images.is_binary(pixels.array) == (role == "mask"):
            return path, pixels
    raise images.ImageProblem({"crop": images.ONLY_MASKS, "mask": images.NO_MASK, "full": images.NO_FULL_IMAGE}[role])


def _load_roi(crop_files: str, mask_files: str, image_files: str, opts: DecodeOptions):
    """-> (image float32 (size, size) in [-1, 1], source path, (height, width) before resizing)."""
    if opts.roi_source == "cropped":
        candidates = [p for p in crop_files.split("\n") if p]
        if len(candidates) == 1:  # one named file: whatever it holds is the ROI
            path = candidates[0]
            pixels = images.decode(_read(path), path)
        else:
            path, pixels = _pick(crop_files, "crop")
    else:
        mask_path, mask = _pick(mask_files, "mask")
        path, pixels = _pick(image_files, "full")
        if mask.array.shape != pixels.array.shape:
            raise images.ImageProblem(images.MASK_SIZE_MISMATCH, f"{mask.array.shape} vs {pixels.array.shape}")
        top, left, side = images.mask_window(mask.array, opts.mask_margin)
        pixels = images.Pixels(images.crop_window(pixels.array, top, left, side), pixels.bits, pixels.description)
    height, width = pixels.array.shape
    return images.model_image(pixels, opts.window, opts.size), path, (height, width)
