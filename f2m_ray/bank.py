"""The feature bank: every labeled ROI encoded once with its own labels (paper 2.2, 3.3).

    bank = { (roi_id, margin, shape, split, source, image, v = enc([I, E1(m), E2(s)])) }

Which ROIs: every labeled ROI of the source, train and val splits alike (the paper
draws its seeds from all labeled masses); the ``split`` column records which split
each ROI had in training (same val fraction and seed as the checkpoint's run), so
that synthesis can restrict seeds to the training split (``seed_split="train"``) and
the nearest-seed distance is measured against training ROIs of the category only.

Ray Data maps the labeled rows (f2m_ray.data.readers) through an actor pool whose actors
load the checkpoint once and encode in eval mode. The bank is small (a few thousand
rows of ``feature_dim`` floats), so the driver gathers it, sorts it by roi_id and
writes one Parquet file with its metadata (f2m_ray.schema). Never pickle.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from f2m_ray import __version__
from f2m_ray.errors import F2MError, first_line
from f2m_ray.labels import MARGINS, SHAPES, Category, check_vocabulary, vocabulary
from f2m_ray.schema import BANK_FORMAT, BANK_METADATA_KEY, BANK_SCHEMA_VERSION, bank_schema, image_column, read_json_metadata, write_table
from f2m_ray.storage import arrow_filesystem, join

BANK_FILE = "feature_bank.parquet"
SEED_SPLITS = ("all", "train")


# ---------------------------------------------------------------- resources


# ---------------------------------------------------------------- the bank


@dataclass(frozen=True)
class FeatureBank:
    """A loaded feature bank; rows sorted by roi_id."""

    path: str
    roi_id: np.ndarray  # (N,) str
    margin: np.ndarray  # (N,) int64 margin ids
    shape: np.ndarray  # (N,) int64 shape ids
    split: np.ndarray  # (N,) str: "train" / "val"
    source: np.ndarray  # (N,) str
    features: np.ndarray  # (N, D) float32
    model_id: str  # the generator that encoded it
    bank_id: str  # hash of (roi ids, labels, features)
    vocabulary: dict[str, list[str]]
    metadata: dict[str, Any] = field(default_factory=dict)
    images: list[bytes] | None = None  # (N,) PNG bytes when loaded with_images

    def __len__(self) -> int:
        return len(self.roi_id)

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def pool(self, category: Category, seed_split: str = "all") -> np.ndarray:
        """Row positions of the category's seeds, in roi_id order: (P,) int64."""
        rows = self.seed_rows(seed_split)
        return rows[(self.margin[rows] == category.margin_id) & (self.shape[rows] == category.shape_id)]

    def seed_rows(self, seed_split: str = "all") -> np.ndarray:
        """Row positions of every ROI of the seed split, all categories: (R,) int64."""
        if seed_split not in SEED_SPLITS:
            raise F2MError(f"unknown seed split {seed_split!r}; valid: {', '.join(SEED_SPLITS)}")
        return self.train_rows() if seed_split == "train" else np.arange(len(self.roi_id), dtype=np.int64)

    def train_rows(self) -> np.ndarray:
        """Row positions of the training split: (T,) int64."""
        return np.flatnonzero(self.split == "train").astype(np.int64)

    def row_of(self, roi_id: str) -> int:
        position = int(np.searchsorted(self.roi_id, roi_id))
        if position >= len(self.roi_id) or self.roi_id[position] != roi_id:
            examples = ", ".join(map(str, self.roi_id[:3]))
            raise F2MError(f"unknown seed id {roi_id!r}: the bank {self.path} has {len(self)} ROIs (e.g. {examples})")
        return position

    def counts(self) -> dict[str, int]:
        """Rows per category name."""
        out: dict[str, int] = {}
        for m, s in zip(self.margin, self.shape):
            name = f"{MARGINS[m]}-{SHAPES[s]}"
            out[name] = out.get(name, 0) + 1
        return dict(sorted(out.items()))


def bank_hash(roi_id: np.ndarray, margin: np.ndarray, shape: np.ndarray, features: np.ndarray) -> str:
    """What a synthetic sample depends on from the bank: ids, labels and features, in order."""
    digest = hashlib.sha256()
    digest.update("\0".join(map(str, roi_id)).encode())
    digest.update(np.ascontiguousarray(margin, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(shape, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(features, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def default_bank_path(checkpoint_path: str) -> str:
    """Where `f2m-ray train` and `f2m-ray encode` put the bank: beside the checkpoint."""
    return join(checkpoint_path, BANK_FILE)


def write_feature_bank(
    out: str,
    roi_id: np.ndarray,
    margin: np.ndarray,
    shape: np.ndarray,
    split: np.ndarray,
    patient_id: np.ndarray,
    source: np.ndarray,
    png: list[bytes],
    features: np.ndarray,
    model_id: str,
    info: dict[str, Any] | None = None,
) -> str:
    """Sort by roi_id, check, and write one bank file with its metadata."""
    import json

    import pyarrow as pa

    order = np.argsort(roi_id, kind="stable")
    roi_id, margin, shape, split = roi_id[order], margin[order], shape[order], split[order]
    patient_id, source, features = patient_id[order], source[order], features[order]
    png = [png[i] for i in order]
    duplicated = roi_id[1:][roi_id[1:] == roi_id[:-1]]
    if len(duplicated):
        raise F2MError(f"duplicate roi ids in the labeled data (e.g. {duplicated[0]!r}): ids must be unique")
    if not np.all(np.isfinite(features)):
        raise F2MError("the encoder produced non-finite features: the checkpoint is broken")
    feature_dim = int(features.shape[1])
    categories = [f"{MARGINS[m]}-{SHAPES[s]}" for m, s in zip(margin, shape)]
    bank_id = bank_hash(roi_id, margin, shape, features)
    counts: dict[str, int] = {}
    for name in categories:
        counts[name] = counts.get(name, 0) + 1
    metadata = {
        "format": BANK_FORMAT,
        "schema_version": BANK_SCHEMA_VERSION,
        "tool_version": __version__,
        "model_id": model_id,
        "bank_id": bank_id,
        "feature_dim": feature_dim,
        "rows": int(len(roi_id)),
        "vocabulary": vocabulary(),
        "counts": dict(sorted(counts.items())),
        "splits": {s: int(np.sum(split == s)) for s in sorted(set(split.tolist()))},
        **(info or {}),
    }
    schema = bank_schema(feature_dim).with_metadata({BANK_METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    table = pa.Table.from_arrays(
        [
            pa.array(roi_id.tolist(), pa.string()),
            pa.array([MARGINS[m] for m in margin], pa.string()),
            pa.array([SHAPES[s] for s in shape], pa.string()),
            pa.array(categories, pa.string()),
            pa.array(margin, pa.int64()),
            pa.array(shape, pa.int64()),
            pa.array(split.tolist(), pa.string()),
            pa.array(patient_id.tolist(), pa.string()),
            pa.array(source.tolist(), pa.string()),
            image_column(png, [f"{r}.png" for r in roi_id]),
            pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), pa.float32()), feature_dim),
        ],
        schema=schema,
    )
    try:
        write_table(table, out)
    except OSError as err:
        raise F2MError(f"cannot write feature bank to {out}: {err.strerror or err}") from None
    return out


def load_feature_bank(path: str, with_images: bool = False) -> FeatureBank:
    """Read a bank (local or s3://); refuses foreign files and other vocabularies."""
    import pyarrow.parquet as pq

    fs, inner = arrow_filesystem(path)
    columns = ["roi_id", "margin_id", "shape_id", "split", "source", "feature"] + (["image"] if with_images else [])
    try:
        with fs.open_input_file(inner) as f:
            table = pq.read_table(f, columns=columns)
    except FileNotFoundError:
        raise F2MError(f"no feature bank at {path} (run `f2m-ray encode --model CKPT` first)") from None
    except OSError as err:
        raise F2MError(f"cannot read feature bank {path}: {first_line(err)}") from None
    except Exception as err:  # pyarrow raises ArrowInvalid for non-Parquet files
        raise F2MError(f"not a feature bank: {path} ({first_line(err)})") from None
    meta = read_json_metadata(table.schema, BANK_METADATA_KEY, f"feature bank {path}")
    if meta.get("format") != BANK_FORMAT:
        raise F2MError(f"not a feature bank: {path} has format {meta.get('format')!r}")
    if meta.get("schema_version") != BANK_SCHEMA_VERSION:
        raise F2MError(
            f"feature bank schema version {meta.get('schema_version')} in {path} is not supported "
            f"(this f2m-ray {__version__} reads version {BANK_SCHEMA_VERSION})"
        )
    check_vocabulary(meta.get("vocabulary", {}), f"feature bank {path}")
    feature_column = table.column("feature").combine_chunks()
    dim = feature_column.type.list_size
    features = feature_column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
    roi_id = np.array(table.column("roi_id").to_pylist(), dtype=str)
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad):
        raise F2MError(f"feature bank {path} holds non-finite features in {len(bad)} row(s) (e.g. {roi_id[bad[0]]}); "
                       f"encode it again with `f2m-ray encode`")
    margin = table.column("margin_id").to_numpy().astype(np.int64)
    shape = table.column("shape_id").to_numpy().astype(np.int64)
    images = None
    if with_images:
        images = table.column("image").combine_chunks().field("bytes").to_pylist()
    return FeatureBank(
        path=path,
        roi_id=roi_id,
        margin=margin,
        shape=shape,
        split=np.array(table.column("split").to_pylist(), dtype=str),
        source=np.array(table.column("source").to_pylist(), dtype=str),
        features=features,
        model_id=str(meta.get("model_id")),
        bank_id=bank_hash(roi_id, margin, shape, features),
        vocabulary=meta["vocabulary"],
        metadata=meta,
        images=images,
    )
