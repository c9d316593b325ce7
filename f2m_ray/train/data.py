"""The training data, read once on the driver: labeled ROIs materialized, split by their `split`
column, checked per category, with the real ROIs the sample grids show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from f2m_ray.config import Preset
from f2m_ray.errors import F2MError
from f2m_ray.labels import MARGINS, SHAPES, Category
from f2m_ray.runtime.errors import ray_error_line
from f2m_ray.train.options import RunOptions
from f2m_ray.data.readers import read_labeled


SAMPLES_PER_CATEGORY = 4  # real ROIs per category row of the sample grid
@dataclass
class PreparedData:
    """The training inputs, materialized in the object store, and what the driver learned about them."""

    train: Any  # ray.data.Dataset: image, margin, shape
    val: Any  # ray.data.Dataset: image, margin, shape
    train_rows: int
    val_rows: int
    categories: dict[str, tuple[int, int]]  # category name -> (train rows, val rows)
    samples: dict[str, Any]  # the sample-grid inputs (numpy arrays and row labels)
    description: str
    chance: dict[str, float] = field(default_factory=dict)  # 1 / classes present, per head
    dropped: dict[str, int] = field(default_factory=dict)  # the reader's reasons -> rows left out


def prepare_data(preset: Preset, options: RunOptions) -> PreparedData:
    """Read the labeled ROIs once, split by the `split` column, refuse unusable data (one line)."""

    cfg = preset.train
    read = read_labeled(options.data, options.data_format, cfg.val_fraction, cfg.seed)
    try:
        dataset = read.dataset.materialize()
        counts: dict[tuple[int, int, str], int] = {}
        for batch in dataset.select_columns(["margin", "shape", "split"]).iter_batches(batch_format="numpy", batch_size=4096):
            for m, s, sp in zip(batch["margin"], batch["shape"], batch["split"]):
                key = (int(m), int(s), str(sp))
                counts[key] = counts.get(key, 0) + 1
    except F2MError:
        raise
    except Exception as err:  # decoding failures surface here, wrapped by Ray
        raise F2MError(f"cannot read the training data {options.data}: {ray_error_line(err)}") from None
    total = sum(counts.values())
    if total == 0:
        raise F2MError(f"the dataset {options.data} is empty: no labeled ROIs to train on")
    per_category: dict[tuple[int, int], list[int]] = {}
    for (m, s, sp), n in counts.items():
        entry = per_category.setdefault((m, s), [0, 0])
        entry[0 if sp == "train" else 1] += n
    train_rows = sum(v[0] for v in per_category.values())
    val_rows = sum(v[1] for v in per_category.values())
    if train_rows == 0:
        raise F2MError(f"the dataset {options.data} has no rows in the train split ({val_rows} in val)")
    names = {key: Category(MARGINS[key[0]], SHAPES[key[1]]).name for key in per_category}
    missing = sorted(names[k] for k, (n_train, _) in per_category.items() if n_train == 0)
    if missing:
        raise F2MError(
            f"category {missing[0]} has no samples in the train split"
            + (f" ({len(missing) - 1} more: {', '.join(missing[1:4])})" if len(missing) > 1 else "")
            + "; lower val_fraction, change the seed or drop its rows"
        )
    if train_rows < cfg.batch_size:
        raise F2MError(
            f"the train split has {train_rows} rows, fewer than one global batch of {cfg.batch_size}; "
            f"lower --batch-size or add data"
        )
    from ray.data.expressions import col

    train = dataset.filter(expr=col("split") == "train").select_columns(["image", "margin", "shape"]).materialize()
    val = dataset.filter(expr=col("split") == "val").select_columns(["image", "margin", "shape"]).materialize()
    samples = _collect_samples(dataset, sorted(per_category))
    margins_present = {m for m, _ in per_category}
    shapes_present = {s for _, s in per_category}
    return PreparedData(
        train=train,
        val=val,
        train_rows=train_rows,
        val_rows=val_rows,
        categories={names[k]: tuple(v) for k, v in sorted(per_category.items())},
        samples=samples,
        description=read.description,
        chance={"margin": 1 / len(margins_present), "shape": 1 / len(shapes_present)},
        dropped=dict(read.dropped),
    )


def _collect_samples(dataset, keys: list[tuple[int, int]]) -> dict[str, Any]:
    """Up to SAMPLES_PER_CATEGORY real ROIs per category (val first: held out), repeated to fill a row."""
    chosen: dict[tuple[int, int], dict[str, list]] = {k: {"val": [], "train": []} for k in keys}
    for batch in dataset.select_columns(["image", "margin", "shape", "split"]).iter_batches(batch_format="numpy", batch_size=1024):
        for image, m, s, sp in zip(batch["image"], batch["margin"], batch["shape"], batch["split"]):
            bucket = chosen[(int(m), int(s))]["val" if sp == "val" else "train"]
            if len(bucket) < SAMPLES_PER_CATEGORY:
                bucket.append(image)
        if all(len(v["val"]) >= SAMPLES_PER_CATEGORY for v in chosen.values()):
            break
    images, margins, shapes, labels = [], [], [], []
    for key in keys:
        pool = (chosen[key]["val"] + chosen[key]["train"])[:SAMPLES_PER_CATEGORY]
        pool = [pool[i % len(pool)] for i in range(SAMPLES_PER_CATEGORY)]
        images.extend(pool)
        margins.extend([key[0]] * SAMPLES_PER_CATEGORY)
        shapes.extend([key[1]] * SAMPLES_PER_CATEGORY)
        labels.append(Category(MARGINS[key[0]], SHAPES[key[1]]).name)
    return {
        "images": np.stack(images).astype(np.float32) if images else np.zeros((0, 64, 64), np.float32),
        "margins": np.array(margins, dtype=np.int64),
        "shapes": np.array(shapes, dtype=np.int64),
        "labels": labels,
    }
