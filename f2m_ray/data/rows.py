"""What every labeled source becomes: rows of ROW_COLUMNS, a ReadResult that says what was left out and
why (Drops), and the train/val split by patient that training, the bank and evaluation share.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np


from f2m_ray.core import images


IMAGE_SIZE = images.MODEL_SIZE
ROW_COLUMNS = ("roi_id", "image", "margin", "shape", "patient_id", "split", "source")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "val"}


@dataclass
class ReadResult:
    """A labeled dataset and what was left out on the way in."""

    dataset: "object"  # ray.data.Dataset with ROW_COLUMNS
    rows: int  # usable rows in `dataset`
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out
    description: str = ""
    per_category: dict[str, int] = field(default_factory=dict)  # 'margin-shape' -> usable rows
    split_rows: dict[str, int] = field(default_factory=dict)  # 'train'/'val' -> usable rows
    split_patients: dict[str, int] = field(default_factory=dict)  # 'train'/'val' -> patients
    mapped: dict[str, int] = field(default_factory=dict)  # 'margin A-B -> b' -> rows (compound labels)
    original_sizes: "np.ndarray | None" = None  # (rows, 2) int64: height, width before resizing
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one affected path or value
    format: str = ""


# ---------------------------------------------------------------- split


def assign_split(patient_ids: list[str], val_fraction: float, seed: int) -> list[str]:
    """'val' for a reproducible `val_fraction` of patients (hashing (seed, patient)), else 'train'.

    Each id independently (used for phantoms, rendered in parallel)."""
    out = []
    for pid in patient_ids:
        u = int.from_bytes(_patient_hash(seed, pid)[:8], "little") / 2**64
        out.append("val" if u < val_fraction else "train")
    return out


def _patient_hash(seed: int, patient: str) -> bytes:
    return hashlib.sha256(f"{seed}:{patient}".encode()).digest()


def split_by_patient(patient_ids: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """patient -> 'train'/'val': the lowest-hashing round(val_fraction * n) patients are val."""
    patients = sorted(set(patient_ids))
    n = len(patients)
    k = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    else:
        k = min(k, max(n - 1, 0))
    ranked = sorted(patients, key=lambda p: _patient_hash(seed, p))
    val = set(ranked[:k])
    return {p: ("val" if p in val else "train") for p in patients}


# ---------------------------------------------------------------- tables


class Drops:
    """Counts of rows left out, by reason, with one example each."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, str] = {}

    def add(self, reason: str, example: str = "", n: int = 1) -> None:
        self.counts[reason] += n
        if example and reason not in self.examples:
            self.examples[reason] = example
