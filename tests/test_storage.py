import pyarrow as pa
import pyarrow.parquet as pq

from f2m_ray import storage


def test_local_paths(tmp_path):
    fs, path = storage.filesystem(str(tmp_path / "a"))
    fs.makedirs(path)
    assert (tmp_path / "a").is_dir()
    assert storage.join(str(tmp_path), "x", "y") == str(tmp_path / "x" / "y")
    assert storage.join("s3://bucket/pre/", "/x", "y") == "s3://bucket/pre/x/y"
    assert storage.is_remote("s3://b/k") and not storage.is_remote(str(tmp_path))


def test_s3_round_trip_through_fsspec_and_arrow(s3_bucket):
    url = f"{s3_bucket}/dir/file.txt"
    fs, path = storage.filesystem(url)
    with fs.open(path, "w") as f:
        f.write("hello")
    assert fs.cat(path) == b"hello"
    afs, apath = storage.arrow_filesystem(f"{s3_bucket}/t.parquet")
    with afs.open_output_stream(apath) as stream:
        pq.write_table(pa.table({"x": [1, 2, 3]}), stream)
    assert pq.read_table(apath, filesystem=afs).column("x").to_pylist() == [1, 2, 3]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(s3_bucket.removeprefix("s3://"))) == ["dir", "t.parquet"]
