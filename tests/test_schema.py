"""The Parquet schemas: columns, Hugging Face metadata, PNG round trip, whole-file writes."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from f2m_ray import schema
from f2m_ray.core.images import to_model_range, to_uint8


def test_synthetic_columns_and_types():
    s = schema.SYNTHETIC_SCHEMA
    assert s.names[:3] == ["sample_id", "sample_index", "image"]
    assert s.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert s.field("seed_ids").type == pa.list_(pa.string())
    assert s.field("weights").type == pa.list_(pa.float64())
    # Every column is described for Hugging Face `datasets`, and the image as an Image.
    assert list(schema.HF_FEATURES) == s.names
    assert schema.HF_FEATURES["image"] == {"_type": "Image"}


def _hf_arrow_type(feature):
    """The Arrow type `datasets` gives a feature (Image, Value, Sequence of Value)."""
    if feature["_type"] == "Image":
        return pa.struct({"bytes": pa.binary(), "path": pa.string()})
    if feature["_type"] == "Sequence":
        return pa.list_(_hf_arrow_type(feature["feature"]))
    return pa.type_for_alias(feature["dtype"])


def test_hf_datasets_would_keep_every_declared_feature():
    # `datasets.Features.from_arrow_schema` uses the metadata's feature for a column only
    # when the field it would write itself (nullable, same type) equals the file's field.
    for field in schema.SYNTHETIC_SCHEMA:
        assert pa.field(field.name, _hf_arrow_type(schema.HF_FEATURES[field.name])) == field, field.name


def test_file_metadata_carries_version_and_hf_features():
    meta = schema.synthetic_metadata({"model_id": "abc", "run": {"seed": 3}})
    ours = json.loads(meta[schema.METADATA_KEY])
    assert ours == {"schema_version": schema.SCHEMA_VERSION, "model_id": "abc", "run": {"seed": 3}}
    hf = json.loads(meta[b"huggingface"])
    assert hf["info"]["features"]["seed_ids"] == {"feature": {"dtype": "string", "_type": "Value"},
                                                  "length": -1, "_type": "Sequence"}


def test_png_round_trip_and_model_range():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(64, 64), dtype=np.uint8)
    data = schema.png_bytes(pixels)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(schema.decode_png(data), pixels)
    # to_uint8 inverts the readers' uint8 -> [-1, 1] mapping exactly, and clips.
    np.testing.assert_array_equal(to_uint8(to_model_range(pixels)), pixels)
    np.testing.assert_array_equal(to_uint8(np.array([-3.0, 3.0])), [0, 255])


def _table(n=5):
    images = schema.image_column([b"x" * i for i in range(n)], [f"{i}.png" for i in range(n)])
    return pa.table({"image": images, "i": pa.array(range(n))})


def test_write_table_local_leaves_only_the_file(tmp_path):
    path = tmp_path / "a" / "b.parquet"
    size = schema.write_table(_table(), str(path), row_group_size=2)
    assert os.listdir(path.parent) == ["b.parquet"] and size == path.stat().st_size
    read = pq.read_table(path)
    assert read.num_rows == 5 and pq.ParquetFile(path).metadata.num_row_groups == 3
    assert read.column("image").combine_chunks().field("bytes").to_pylist()[3] == b"xxx"


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "c.parquet"
    with pytest.raises(AttributeError):
        schema.write_table("not a table", str(path))  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


@pytest.mark.s3
def test_write_table_s3_one_object_no_marker(s3_bucket):
    import boto3

    schema.write_table(_table(), f"{s3_bucket}/deep/prefix/t.parquet")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket[5:])["Contents"]]
    assert keys == ["deep/prefix/t.parquet"]  # no "deep/" or "deep/prefix/" directory markers
    body = client.get_object(Bucket=s3_bucket[5:], Key=keys[0])["Body"].read()
    assert pq.read_table(pa.BufferReader(body)).num_rows == 5
    assert schema.read_schema(f"{s3_bucket}/deep/prefix/t.parquet").names == ["image", "i"]
