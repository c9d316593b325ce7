"""Labeled ROIs in: every source becomes one Ray Dataset of model-ready rows.

Row contract (what `train`, `encode` and `evaluate` consume):

    roi_id      str      unique id of the ROI
    image       float32  (64, 64) in [-1, 1]
    margin      int64    margin id (f2m_ray.labels.MARGINS)
    shape       int64    shape id (f2m_ray.labels.SHAPES)
    patient_id  str      rows of one patient share a split
    split       str      "train" or "val" (by patient, reproducible from a seed)
    source      str      where the ROI came from (file path or "phantom")

Sources:
    ``phantom`` / ``phantom:N``  procedural phantoms rendered in parallel (no files)
    PATH or s3://...              a manifest (CSV or Parquet): path, margin, shape[, id, split, patient_id]

The manifest table (paths and labels) is read on the driver; images are decoded in
parallel by Ray Data, so the image set is never held by the driver.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import numpy as np

from f2m_ray.errors import F2MError
from f2m_ray.labels import UnknownLabelError, canonical_margin, canonical_shape, margin_id, shape_id
from f2m_ray.storage import filesystem, is_remote, join

IMAGE_SIZE = 64
PHANTOM_DEFAULT_N = 2000
ROW_COLUMNS = ("roi_id", "image", "margin", "shape", "patient_id", "split", "source")


@dataclass
class ReadResult:
    """A labeled dataset and what was left out on the way in."""

    dataset: "object"  # ray.data.Dataset with ROW_COLUMNS
    rows: int  # rows kept (before image decoding problems, which are counted by the decoder)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    description: str = ""


def assign_split(patient_ids: list[str], val_fraction: float, seed: int) -> list[str]:
    """'val' for a reproducible `val_fraction` of patients (hashing (seed, patient)), else 'train'."""
    out = []
    for pid in patient_ids:
        digest = hashlib.sha256(f"{seed}:{pid}".encode()).digest()
        u = int.from_bytes(digest[:8], "little") / 2**64
        out.append("val" if u < val_fraction else "train")
    return out


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0


def read_labeled(data: str = "phantom", fmt: str = "auto", val_fraction: float = 0.1, seed: int = 0) -> ReadResult:
    """Open a labeled ROI source as a Ray Dataset with ROW_COLUMNS."""
    if data == "phantom" or data.startswith("phantom:"):
        n = PHANTOM_DEFAULT_N
        if ":" in data:
            try:
                n = int(data.split(":", 1)[1])
            except ValueError:
                raise F2MError(f"bad phantom source {data!r}; use phantom or phantom:N") from None
        return read_phantoms(n, seed=seed, val_fraction=val_fraction)
    if fmt not in ("auto", "manifest"):
        raise F2MError(f"unknown data format {fmt!r}; valid formats: auto, manifest")
    return read_manifest(data, val_fraction=val_fraction, seed=seed)


def read_phantoms(n: int, seed: int = 0, val_fraction: float = 0.1) -> ReadResult:
    """Phantoms 0 .. n-1 of `seed`, rendered in parallel by Ray Data (one patient per phantom)."""
    import ray

    from f2m_ray.phantom import DEFAULT_CATEGORIES

    if n < 2:
        raise F2MError(f"need at least 2 phantoms, got {n}")

    def render(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from f2m_ray.phantom import generate_phantoms

        ids = batch["id"]
        rows = list(generate_phantoms(int(ids[-1]) + 1, seed, DEFAULT_CATEGORIES, start=int(ids[0])))
        roi_ids = [f"phantom-{i:06d}" for i, _, _ in rows]
        return {
            "roi_id": np.array(roi_ids, dtype=object),
            "image": np.stack([to_model_range(img) for _, img, _ in rows]),
            "margin": np.array([c.margin_id for _, _, c in rows], dtype=np.int64),
            "shape": np.array([c.shape_id for _, _, c in rows], dtype=np.int64),
            "patient_id": np.array(roi_ids, dtype=object),
            "split": np.array(assign_split(roi_ids, val_fraction, seed), dtype=object),
            "source": np.array(["phantom"] * len(rows), dtype=object),
        }

    dataset = ray.data.range(n, override_num_blocks=max(1, min(16, n // 250))).map_batches(render, batch_size=250)
    return ReadResult(dataset, n, {}, f"{n} phantoms (seed {seed}, {len(DEFAULT_CATEGORIES)} categories)")


def _read_table(path: str):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, inner = filesystem(path)
    if not fs.exists(inner):
        raise F2MError(f"data path does not exist: {path}")
    if fs.isdir(inner):
        inner = join(inner, "manifest.csv") if not is_remote(path) else inner.rstrip("/") + "/manifest.csv"
        path = join(path, "manifest.csv")
        if not fs.exists(inner):
            raise F2MError(f"no manifest.csv in {path.rsplit('/', 1)[0]}")
    with fs.open(inner, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".parquet"):
            return pq.read_table(io.BytesIO(raw)), path
        return pacsv.read_csv(io.BytesIO(raw), convert_options=pacsv.ConvertOptions(strings_can_be_null=False)), path
    except Exception as err:  # pyarrow raises ArrowInvalid and friends for malformed files
        raise F2MError(f"cannot read manifest {path}: {str(err).splitlines()[0]}") from None


def read_manifest(path: str, val_fraction: float = 0.1, seed: int = 0) -> ReadResult:
    """A manifest of labeled ROI images: relative paths resolve against the manifest's folder."""
    import ray

    table, manifest_path = _read_table(path)
    missing = [c for c in ("path", "margin", "shape") if c not in table.column_names]
    if missing:
        raise F2MError(f"manifest {manifest_path} is missing column(s): {', '.join(missing)}")
    base = manifest_path.rsplit("/", 1)[0] if "/" in manifest_path else "."
    cols = {c: [str(v) if v is not None else "" for v in table.column(c).to_pylist()] for c in table.column_names}
    n = table.num_rows
    ids = cols.get("id") or [f"roi-{i:06d}" for i in range(n)]
    patients = cols.get("patient_id") or ids
    dropped: dict[str, int] = {}
    keep = []
    for i in range(n):
        try:
            m, s = margin_id(cols["margin"][i]), shape_id(cols["shape"][i])
        except UnknownLabelError:
            reason = f"unknown label {cols['margin'][i]}/{cols['shape'][i]}"
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        rel = cols["path"][i].strip()
        full = rel if (is_remote(rel) or rel.startswith("/")) else join(base, rel)
        keep.append((ids[i], full, m, s, patients[i], (cols.get("split") or [""] * n)[i].strip().lower()))
    if not keep:
        raise F2MError(f"no usable rows in {manifest_path} (dropped: {dropped or 'empty manifest'})")
    # An explicit split column wins where it says train or val; other rows split by patient.
    hashed = assign_split([k[4] for k in keep], val_fraction, seed)
    split_values = [k[5] if k[5] in ("train", "val") else h for k, h in zip(keep, hashed)]
    items = [
        {"roi_id": rid, "path": p, "margin": m, "shape": s, "patient_id": pid, "split": sp}
        for (rid, p, m, s, pid, _), sp in zip(keep, split_values)
    ]
    dataset = ray.data.from_items(items).map_batches(_decode_images, batch_size=256)
    return ReadResult(dataset, len(items), dropped, f"{len(items)} ROIs from {manifest_path}")


def _decode_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from PIL import Image

    images = []
    for p in batch["path"]:
        fs, inner = filesystem(str(p))
        with fs.open(inner, "rb") as f:
            img = Image.open(io.BytesIO(f.read())).convert("L")
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        images.append(to_model_range(np.asarray(img)))
    return {
        "roi_id": batch["roi_id"],
        "image": np.stack(images),
        "margin": batch["margin"].astype(np.int64),
        "shape": batch["shape"].astype(np.int64),
        "patient_id": batch["patient_id"],
        "split": batch["split"],
        "source": batch["path"],
    }
