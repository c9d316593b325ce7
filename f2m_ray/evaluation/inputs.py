"""What `f2m-ray evaluate` compares: the synthetic dataset as arrays, and the real rows split into those the
GAN or the seeds have seen and those held out from both (and from the judge).
"""

from __future__ import annotations

from collections.abc import Callable

from dataclasses import dataclass
from typing import Any

import numpy as np

from f2m_ray.errors import F2MError, first_line
from f2m_ray.core.images import to_model_range
from f2m_ray.schema import decode_png
from f2m_ray.synthetic_files import read_manifest, read_table
from f2m_ray.bank import load_feature_bank


Progress = Callable[[str, int, int], None]  # (stage, done, total)

SYNTHETIC_COLUMNS = ["image", "height", "width", "margin_id", "shape_id", "category", "seed_ids"]
# ---------------------------------------------------------------- inputs


@dataclass
class SyntheticArrays:
    images: np.ndarray  # (N, H, W) float32 in [-1, 1]
    margin: np.ndarray  # (N,) int64 target margin ids
    shape: np.ndarray  # (N,) int64 target shape ids
    category: np.ndarray  # (N,) str
    seed_ids: set[str]  # every ROI id used as a seed
    manifest: dict[str, Any]


def read_synthetic(path: str, progress: Progress | None = None) -> SyntheticArrays:
    """Decode a finished synthetic dataset (refused without its manifest) into arrays."""
    manifest = read_manifest(path)
    try:
        table = read_table(path, columns=SYNTHETIC_COLUMNS)
    except F2MError:
        raise
    except Exception as err:  # pyarrow: a listed file missing, foreign or lacking a column
        raise F2MError(f"cannot read synthetic dataset {path}: {first_line(err)}") from None
    sizes = set(zip(table.column("height").to_pylist(), table.column("width").to_pylist()))
    if len(sizes) > 1:
        raise F2MError(f"synthetic dataset {path} mixes image sizes {sorted(sizes)}")
    png = table.column("image").combine_chunks().field("bytes").to_pylist()
    if not png:
        raise F2MError(f"synthetic dataset {path} holds no masses")
    images = []
    for i, data in enumerate(png):
        images.append(to_model_range(decode_png(data)))
        if progress and ((i + 1) % 1000 == 0 or i + 1 == len(png)):
            progress("decoding synthetic masses", i + 1, len(png))
    decoded_sizes = {im.shape for im in images}
    if len(decoded_sizes) > 1 or decoded_sizes != {tuple(next(iter(sizes)))}:
        raise F2MError(f"synthetic dataset {path}: PNG sizes {sorted(decoded_sizes)} differ from its height/width columns")
    seed_ids = set()
    for ids in table.column("seed_ids").to_pylist():
        seed_ids.update(ids or [])
    return SyntheticArrays(
        images=np.stack(images),
        margin=table.column("margin_id").to_numpy().astype(np.int64),
        shape=table.column("shape_id").to_numpy().astype(np.int64),
        category=np.array(table.column("category").to_pylist(), dtype=str),
        seed_ids=seed_ids,
        manifest=manifest,
    )


def check_sizes(synthetic_shape: tuple[int, ...], real_shape: tuple[int, ...], judge_size: int | None) -> None:
    """Refuse comparisons across image sizes (one line)."""
    syn, real = tuple(synthetic_shape[-2:]), tuple(real_shape[-2:])
    if syn != real:
        raise F2MError(
            f"synthetic masses are {syn[0]}x{syn[1]} pixels but the real ones are {real[0]}x{real[1]}: "
            f"evaluate compares images of one size"
        )
    if judge_size is not None and (judge_size, judge_size) != real:
        raise F2MError(f"the judge takes {judge_size}x{judge_size} images but the masses are {real[0]}x{real[1]}")


def gan_training_ids(manifest: dict[str, Any]) -> tuple[set[str] | None, str]:
    """The roi ids the GAN trained on, from the feature bank the manifest names: (ids or None, where from)."""
    bank = (manifest.get("arguments") or {}).get("bank")
    if not bank:
        return None, "split rule (the manifest names no feature bank)"
    try:
        loaded = load_feature_bank(str(bank))
    except F2MError as err:
        return None, f"split rule (feature bank unreadable: {err})"
    return set(loaded.roi_id[loaded.split == "train"].tolist()), f"feature bank {bank}"


def split_real(real_all, seed_ids: set[str], gan_train_ids: set[str] | None, judge=None) -> tuple[np.ndarray, np.ndarray]:
    """(seen, held out) masks over `real_all`: seen = what the GAN trained on (None: split "train")
    plus every seed a synthetic mass was mixed from; held out = seen by neither them nor the judge."""
    in_training_split = real_all.split == "train"
    gan_seen = in_training_split if gan_train_ids is None else np.isin(real_all.roi_id, list(gan_train_ids))
    seen_mask = gan_seen | np.isin(real_all.roi_id, list(seed_ids))
    if judge is not None and judge.train_ids is not None:
        judge_seen = np.isin(real_all.roi_id, list(judge.train_ids))
    else:
        judge_seen = in_training_split  # a judge trained here, or one without recorded ids, used the split
    return seen_mask, ~seen_mask & ~judge_seen
