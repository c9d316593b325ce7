"""The Parquet schemas: synthetic-mass rows and feature-bank rows, in one place.

Synthetic dataset (``f2m-ray synthesize``), one row per mass:

    column                 type                          meaning
    sample_id              string                        ``CATEGORY-NNNNNNNNN``, unique in the dataset
    sample_index           int64                         i: the sample's index within its category
    image                  struct<bytes: binary,         8-bit grayscale PNG; the Hugging Face
                                  path: string>          ``datasets`` Image layout (path = file name)
    height, width          int32                         image size in pixels (64)
    margin, shape          string                        BI-RADS names (f2m_ray.labels)
    category               string                        ``MARGIN-SHAPE``
    margin_id, shape_id    int64                         class ids (f2m_ray.labels.MARGINS/SHAPES)
    seed_ids               list<string>                  roi ids of the mixed bank features (weight > 0)
    weights                list<float64>                 their weights (step grid, > 0, sum 1), same order
    model_id               string                        hash of the generator's weights
    bank_id                string                        hash of the feature bank's ids and features
    run_seed               int64                         the run seed
    label_confidence       float32, nullable             the judge's p(margin | x) * p(shape | x) for the
                                                         target labels (null when run without --judge)
    nearest_seed_distance  float32                       RMS pixel difference (images in [-1, 1]) to the
                                                         nearest real ROI of the seed split, any
                                                         category; 0 = a copy
    attempt                int32                         which candidate (sub-seed) of sample i was kept;
                                                         0 unless a guard rejected earlier ones
    guards_passed          bool                          the kept candidate passed every guard set (false
                                                         only when none of --max-attempts did)

File-level metadata (key ``f2m_ray``, JSON): schema version, tool version, model id, bank id,
model config, run arguments, category and the sample range [start, stop) the file holds.
Key ``huggingface`` carries the ``datasets`` feature description so that the ``image``
column loads as an Image.

Feature bank (``f2m-ray encode``), one row per labeled ROI, sorted by roi_id:

    roi_id                 string
    margin, shape, category string
    margin_id, shape_id    int64
    split                  string      "train" or "val" (as in training)
    patient_id, source     string
    image                  struct<bytes, path>   the ROI as the encoder saw it (64x64 PNG)
    feature                fixed_size_list<float32>[feature_dim]

File-level metadata (key ``f2m_ray_bank``, JSON): format, schema version, tool version,
model id, bank id, feature_dim, vocabulary, data description.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa

from f2m_ray.errors import F2MError
from f2m_ray.core.images import to_model_range
from f2m_ray.storage import arrow_filesystem, filesystem, is_remote

SCHEMA_VERSION = 3  # synthetic datasets; bump on any change a reader could notice
# Version 3 moved the Parquet files from OUT/CATEGORY/ to OUT/DATA_DIR/CATEGORY/ (the rows are those of
# version 2), so that OUT/data reads with any Parquet reader's plain one-liner beside the card at OUT/README.md.
READABLE_SCHEMA_VERSIONS = (2, 3)
DATA_DIR = "data"
BANK_SCHEMA_VERSION = 1
METADATA_KEY = b"f2m_ray"
BANK_METADATA_KEY = b"f2m_ray_bank"
HF_METADATA_KEY = b"huggingface"
BANK_FORMAT = "f2m-ray-feature-bank"
MANIFEST_NAME = "_manifest.json"  # leading underscore: pyarrow.dataset and Ray skip it
PNG_COMPRESS_LEVEL = 1  # zlib level: 64x64 masses barely shrink further, level 1 is ~3x faster than 6

IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

# Every column is nullable in the Arrow sense (only label_confidence ever holds nulls):
# `datasets` only honours its metadata for fields whose type *and* nullability
# match what it would write itself, and it writes nullable fields.
SYNTHETIC_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("sample_index", pa.int64()),
        pa.field("image", IMAGE_TYPE),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("margin", pa.string()),
        pa.field("shape", pa.string()),
        pa.field("category", pa.string()),
        pa.field("margin_id", pa.int64()),
        pa.field("shape_id", pa.int64()),
        pa.field("seed_ids", pa.list_(pa.string())),
        pa.field("weights", pa.list_(pa.float64())),
        pa.field("model_id", pa.string()),
        pa.field("bank_id", pa.string()),
        pa.field("run_seed", pa.int64()),
        pa.field("label_confidence", pa.float32()),
        pa.field("nearest_seed_distance", pa.float32()),
        pa.field("attempt", pa.int32()),
        pa.field("guards_passed", pa.bool_()),
    ]
)


def _hf_feature(arrow_type: pa.DataType) -> dict[str, Any]:
    """The `datasets` feature of one column: the image struct as an Image, lists as Sequence."""
    if arrow_type == IMAGE_TYPE:
        return {"_type": "Image"}
    if pa.types.is_list(arrow_type):
        # "Sequence" with an explicit length: read by old and new `datasets` alike.
        return {"feature": _hf_feature(arrow_type.value_type), "length": -1, "_type": "Sequence"}
    names = {pa.float32(): "float32", pa.float64(): "float64"}  # Arrow prints these "float", "double"
    return {"dtype": names.get(arrow_type, str(arrow_type)), "_type": "Value"}


# What `datasets` writes under b"huggingface" (``{"info": {"features": ...}}``), derived from
# the Arrow schema so that the two cannot drift apart.
HF_FEATURES: dict[str, Any] = {field.name: _hf_feature(field.type) for field in SYNTHETIC_SCHEMA}


def bank_schema(feature_dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("roi_id", pa.string(), nullable=False),
            pa.field("margin", pa.string(), nullable=False),
            pa.field("shape", pa.string(), nullable=False),
            pa.field("category", pa.string(), nullable=False),
            pa.field("margin_id", pa.int64(), nullable=False),
            pa.field("shape_id", pa.int64(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("patient_id", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("image", IMAGE_TYPE, nullable=False),
            pa.field("feature", pa.list_(pa.float32(), feature_dim), nullable=False),
        ]
    )


def synthetic_metadata(info: dict[str, Any]) -> dict[bytes, bytes]:
    """File-level metadata for one synthetic shard: ours plus the `datasets` features."""
    ours = {"schema_version": SCHEMA_VERSION, **info}
    return {
        METADATA_KEY: json.dumps(ours, sort_keys=True).encode(),
        HF_METADATA_KEY: json.dumps({"info": {"features": HF_FEATURES}}).encode(),
    }


def read_json_metadata(schema: pa.Schema, key: bytes, what: str) -> dict[str, Any]:
    """Decode one JSON metadata entry of a Parquet schema, or refuse naming the file."""
    raw = (schema.metadata or {}).get(key)
    if raw is None:
        raise F2MError(f"{what} has no {key.decode()} metadata: not written by f2m-ray")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise F2MError(f"{what} has corrupt {key.decode()} metadata") from None


def png_bytes(image: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """One (H, W) uint8 image -> 8-bit grayscale PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def decoded_images(table: pa.Table) -> dict[str, np.ndarray]:
    """Rows -> numpy columns with ``image`` as (N, H, W) float32 in [-1, 1] (f2m-ray's model range)."""
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names if name != "image"}

    png = table.column("image").combine_chunks().field("bytes").to_pylist()
    return {"image": to_model_range(np.stack([decode_png(data) for data in png])), **columns}


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W) uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L"))


def image_column(png: list[bytes], names: list[str]) -> pa.StructArray:
    """PNG bytes plus file names -> the HF Image struct column."""
    return pa.StructArray.from_arrays(
        [pa.array(png, type=pa.binary()), pa.array(names, type=pa.string())],
        fields=list(IMAGE_TYPE),
    )


def write_table(table: pa.Table, path: str, row_group_size: int | None = None) -> int:
    """Write one complete Parquet file (local or s3://); returns its size in bytes.

    A reader never sees a partial file: the file is serialized in memory first; locally it
    goes to a hidden temporary name in the same folder and is renamed, on S3 it is one
    PUT (an object only appears once its upload completes, and a failed or killed upload
    leaves nothing behind).
    """
    import os
    import uuid

    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size)
    data = sink.getvalue().to_pybytes()
    if is_remote(path):
        fs, inner = filesystem(path)
        fs.pipe_file(inner, data)
        return len(data)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, os.path.join(folder, name))
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return len(data)


def read_schema(path: str) -> pa.Schema:
    """The schema (with metadata) of one Parquet file, local or s3://."""
    import pyarrow.parquet as pq

    fs, inner = arrow_filesystem(path)
    with fs.open_input_file(inner) as f:
        return pq.read_schema(f)
