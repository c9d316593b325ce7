"""`export`: a synthetic dataset as an image folder or WebDataset shards; resume, refusals, S3."""

import csv
import io
import json
import os
import shutil
import tarfile

import pytest
from click.testing import CliRunner

from f2m_ray.errors import F2MError
from f2m_ray.export import EXPORT_NAME, EXPORT_RUN_NAME, METADATA_COLUMNS, export_dataset
from f2m_ray.schema import MANIFEST_NAME
from f2m_ray.synth.driver import synthesize
from f2m_ray.synth.plan import SynthesisConfig
from f2m_ray.synthetic import read_table
from f2m_ray_cli.main import _register, cli
from test_synthesize import CATEGORY, OTHER

COUNTS = {CATEGORY: 40, OTHER: 30}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, trained_model):
    """40 + 30 masses in 4 Parquet files, written in this process (no Ray)."""
    out = tmp_path_factory.mktemp("synthetic") / "dataset"
    config = SynthesisConfig(categories=(CATEGORY, OTHER), n=40, out=str(out), model=trained_model, rows_per_file=25, k=5)
    synthesize(config, report=None, use_ray=False)
    _drop_rows(out, OTHER, 30)
    return out


def _drop_rows(out, category, keep):
    """Keep the first `keep` masses of `category` (its second file shortened): categories of unequal size."""
    import pyarrow.parquet as pq

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for record in manifest["files"]:
        if record["category"] == category and record["start"] < keep < record["stop"]:
            path = out / record["path"]
            pq.write_table(pq.read_table(path).slice(0, keep - record["start"]), path)
            record.update(stop=keep, rows=keep - record["start"], bytes=path.stat().st_size)
    manifest["counts"][category] = keep
    manifest["rows"] = sum(manifest["counts"].values())
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="module")
def rows(dataset):
    """sample_id -> the dataset's row (image bytes under `png`)."""
    table = read_table(str(dataset))
    result = {}
    for row in table.to_pylist():
        row["png"] = row.pop("image")["bytes"]
        result[row["sample_id"]] = row
    assert len(result) == 70
    return result


def files_of(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def invoke(*args):
    _register()
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------- imagefolder


@pytest.fixture(scope="module")
def imagefolder(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "imagefolder"
    result = invoke("export", str(dataset), "--format", "imagefolder", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out, result


def test_imagefolder_holds_every_mass_once_as_the_stored_png(imagefolder, rows):
    out, result = imagefolder
    # torchvision's ImageFolder layout: a folder per class at the root, nothing but PNGs in them
    assert sorted(e.name for e in os.scandir(out) if e.is_dir()) == sorted(COUNTS)
    assert sorted(e.name for e in os.scandir(out) if e.is_file()) == [EXPORT_NAME, EXPORT_RUN_NAME, "metadata.csv"]
    for category, count in COUNTS.items():
        names = sorted(os.listdir(out / category))
        assert len(names) == count and all(name.endswith(".png") and not name.startswith(".") for name in names)
        for name in names:
            sample = name.removesuffix(".png")
            assert rows[sample]["category"] == category
            assert (out / category / name).read_bytes() == rows[sample]["png"]  # the stored bytes, not re-encoded
    marker = json.loads((out / EXPORT_NAME).read_text())
    assert marker["format"] == "f2m-ray-export" and marker["export_format"] == "imagefolder"
    assert marker["counts"] == COUNTS and marker["masses"] == 70 and marker["files"] == 71
    assert marker["model_id"] == next(iter(rows.values()))["model_id"]
    assert "exported 70 masses as imagefolder" in result.stdout and "71 files written" in result.stdout
    progress = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(progress) == 4 and progress[-1].startswith("[4/4] data/") and "(70 masses so far)" in progress[-1]


def test_imagefolder_metadata_matches_the_rows(imagefolder, rows):
    out, _ = imagefolder
    with open(out / "metadata.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 70 and list(table[0]) == ["file_name", *METADATA_COLUMNS]
    assert len({r["sample_id"] for r in table}) == 70
    for record in table:
        row = rows[record["sample_id"]]
        assert record["file_name"] == f"{row['category']}/{row['sample_id']}.png"
        assert (out / record["file_name"]).read_bytes() == row["png"]
        for column in ("category", "margin", "shape", "model_id", "bank_id"):
            assert record[column] == row[column]
        for column in ("margin_id", "shape_id", "sample_index", "run_seed", "attempt"):
            assert int(record[column]) == row[column]
        assert float(record["nearest_seed_distance"]) == pytest.approx(row["nearest_seed_distance"], rel=1e-6)
        assert record["label_confidence"] == "" and row["label_confidence"] is None


def test_hugging_face_imagefolder_reads_it(imagefolder, rows, tmp_path):
    import datasets

    out, _ = imagefolder
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == 70 and type(loaded.features["image"]).__name__ == "Image"
    counts = {}
    for item in loaded:
        row = rows[item["sample_id"]]
        assert (item["category"], item["margin_id"], item["shape_id"]) == (row["category"], row["margin_id"], row["shape_id"])
        assert item["image"].size == (64, 64) and item["image"].mode == "L"
        counts[item["category"]] = counts.get(item["category"], 0) + 1
    assert counts == COUNTS


# ---------------------------------------------------------------- webdataset


def read_shards(folder) -> list[list[tarfile.TarInfo]]:
    shards = []
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".tar")):
        with tarfile.open(folder / name) as tar:
            shards.append([(m, tar.extractfile(m).read()) for m in tar.getmembers()])
    return shards


def test_webdataset_shards_hold_two_members_per_mass_in_key_order(dataset, rows, tmp_path):
    out = tmp_path / "wds"
    summary = export_dataset(str(dataset), "webdataset", str(out), shard_size=32)
    assert sorted(os.listdir(out)) == [EXPORT_NAME, EXPORT_RUN_NAME, "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert summary.masses == 70 and summary.written_files == 3 and summary.counts == COUNTS
    shards = read_shards(out)
    assert [len(s) for s in shards] == [64, 64, 12]  # 32, 32 and 6 masses, two members each
    keys = []
    for shard in shards:
        for (png, png_bytes), (label, label_bytes) in zip(shard[::2], shard[1::2]):
            key = png.name.removesuffix(".png")
            assert png.name == f"{key}.png" and label.name == f"{key}.json" and png.isfile()
            assert png_bytes == rows[key]["png"]
            labels = json.loads(label_bytes)
            expected = {k: v for k, v in rows[key].items() if k != "png"}
            assert labels.keys() == expected.keys()
            assert all(labels[k] == pytest.approx(v) if isinstance(v, float) else labels[k] == v for k, v in expected.items())
            keys.append(key)
    assert keys == sorted(rows) and len(set(keys)) == 70  # unique, sorted across shards, exactly the dataset
    marker = json.loads((out / EXPORT_NAME).read_text())
    assert marker["shards"] == [{"path": "shard-000000.tar", "masses": 32}, {"path": "shard-000001.tar", "masses": 32},
                                {"path": "shard-000002.tar", "masses": 6}]
    # the `datasets` webdataset loader takes the shards as they are
    import datasets

    loaded = datasets.load_dataset("webdataset", data_files=sorted(str(p) for p in out.glob("*.tar")), split="train",
                                   cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == 70 and loaded[40]["json"]["category"] == rows[loaded[40]["__key__"]]["category"]


# ---------------------------------------------------------------- resume and overwrite


class Killed(KeyboardInterrupt):
    pass


def _killed_after(units: int):
    seen = []

    def progress(line):
        seen.append(line)
        if len(seen) == units:
            raise Killed()

    return progress


@pytest.mark.parametrize("fmt, shard_size", [("webdataset", 20), ("imagefolder", None)])
def test_a_killed_export_resumes_to_the_same_bytes(dataset, tmp_path, fmt, shard_size):
    clean = tmp_path / "clean"
    export_dataset(str(dataset), fmt, str(clean), shard_size=shard_size)
    expected = files_of(clean)
    out = tmp_path / "out"
    with pytest.raises(Killed):
        export_dataset(str(dataset), fmt, str(out), shard_size=shard_size, progress=_killed_after(2))
    left = files_of(out)
    assert EXPORT_NAME not in left and "metadata.csv" not in left  # nothing that looks finished
    assert not any(name.rsplit("/", 1)[-1].startswith(".") for name in left)  # no temporary files left behind
    assert all(expected[name] == data for name, data in left.items() if name != EXPORT_RUN_NAME)
    with pytest.raises(F2MError, match="is not empty .*use --resume to finish an export there, --overwrite"):
        export_dataset(str(dataset), fmt, str(out), shard_size=shard_size)
    lines = []
    summary = export_dataset(str(dataset), fmt, str(out), shard_size=shard_size, resume=True, progress=lines.append)
    assert summary.kept_units == 2 and sum("kept (already complete)" in line for line in lines) == 2
    assert _data(files_of(out)) == _data(expected)
    # a finished unit taken away (and a temporary file left as a kill leaves it): resume puts back the same bytes
    victim = "shard-000001.tar" if fmt == "webdataset" else f"{OTHER}/{OTHER}-{7:09d}.png"
    (out / victim).unlink()
    (out / os.path.dirname(victim) / f".{os.path.basename(victim)}.tmp-1234abcd").write_bytes(b"half")
    cut = "shard-000002.tar" if fmt == "webdataset" else f"{CATEGORY}/{CATEGORY}-{31:09d}.png"
    (out / cut).write_bytes((out / cut).read_bytes()[:1000])  # damaged from outside: not whole, so not kept
    summary = export_dataset(str(dataset), fmt, str(out), shard_size=shard_size, resume=True)
    assert summary.written_files == (2 if fmt == "webdataset" else 3)  # those two (plus metadata.csv, always rewritten)
    assert _data(files_of(out)) == _data(expected)
    assert json.loads((out / EXPORT_NAME).read_text())["masses"] == 70


def _data(files: dict[str, bytes]) -> dict[str, bytes]:
    """The exported files, without the two JSON files (they hold times)."""
    return {name: data for name, data in files.items() if name not in (EXPORT_NAME, EXPORT_RUN_NAME)}


def test_resume_refuses_another_export_and_overwrite_replaces_only_an_export(dataset, tmp_path):
    out = tmp_path / "out"
    export_dataset(str(dataset), "imagefolder", str(out))
    with pytest.raises(F2MError, match="cannot resume in .*: it holds another export "
                                       r"\(export_format 'imagefolder' there vs 'webdataset' now, shard_size None there vs 10000 now\)"):
        export_dataset(str(dataset), "webdataset", str(out), resume=True)
    summary = export_dataset(str(dataset), "webdataset", str(out), overwrite=True)
    assert sorted(os.listdir(out)) == [EXPORT_NAME, EXPORT_RUN_NAME, "shard-000000.tar"] and summary.masses == 70
    (out / "notes.txt").write_text("mine")
    with pytest.raises(F2MError, match=r"also holds 1 file that is not part of an export \(e.g. notes.txt\); refusing"):
        export_dataset(str(dataset), "webdataset", str(out), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / EXPORT_NAME).exists()
    again = export_dataset(str(dataset), "webdataset", str(out), resume=True)  # finished already: all kept
    assert again.kept_units == again.units == 1 and again.written_files == 0


# ---------------------------------------------------------------- the command line's refusals


def test_refusals_are_one_line(dataset, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    common = [str(dataset), "--format", "imagefolder"]
    assert_one_line_error(invoke("export", *common, "--out", str(busy)),
                          f"output {busy} is not empty (1 file); use --resume to finish an export there")
    assert_one_line_error(invoke("export", *common, "--out", str(busy), "--overwrite"),
                          f"output {busy} is not empty and is not an f2m-ray export; refusing to overwrite it")
    assert_one_line_error(invoke("export", *common, "--out", str(busy), "--resume"),
                          f"cannot resume in {busy}: it is not an f2m-ray export")
    assert sorted(os.listdir(busy)) == ["notes.txt"] and (busy / "notes.txt").read_text() == "mine"
    # an unfinished dataset (no manifest yet) and a folder that is no dataset
    unfinished = tmp_path / "unfinished"
    shutil.copytree(dataset, unfinished)
    (unfinished / MANIFEST_NAME).unlink()
    assert_one_line_error(invoke("export", str(unfinished), "--format", "webdataset", "--out", str(tmp_path / "o")),
                          f"{unfinished} is an unfinished synthetic dataset (no _manifest.json)")
    assert_one_line_error(invoke("export", str(busy), "--format", "webdataset", "--out", str(tmp_path / "o")),
                          f"{busy} is not a synthetic dataset: no _manifest.json there")
    assert not (tmp_path / "o").exists()
    assert_one_line_error(invoke("export", *common, "--out", str(tmp_path / "o"), "--shard-size", "5"),
                          "--shard-size applies to --format webdataset only")
    assert_one_line_error(invoke("export", *common, "--out", str(dataset), "--overwrite"), "is the dataset itself")
    damaged = tmp_path / "damaged"
    shutil.copytree(dataset, damaged)
    (damaged / "data" / OTHER / "part-000025-000039.parquet").unlink()
    assert_one_line_error(invoke("export", str(damaged), "--format", "webdataset", "--out", str(tmp_path / "d")),
                          "is damaged: data/circumscribed-oval/part-000025-000039.parquet is listed in the manifest but missing")


def test_a_subprocess_gets_one_line_and_no_traceback(dataset, tmp_path):
    from test_cli import assert_one_line_error as one_line, run_cli

    (tmp_path / "_run.json").write_text("{}")
    one_line(run_cli("export", str(tmp_path), "--format", "imagefolder", "--out", str(tmp_path / "o")),
             "is an unfinished synthetic dataset")


# ---------------------------------------------------------------- S3


@pytest.mark.s3
def test_s3_to_s3_in_both_formats(dataset, rows, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    source = f"{s3_bucket}/synthetic"
    fs.put(str(dataset) + "/", source[5:] + "/", recursive=True)
    images = f"{s3_bucket}/exports/imagefolder"
    result = invoke("export", source, "--format", "imagefolder", "--out", images)
    assert result.exit_code == 0, result.output
    keys = sorted(fs.find(images[5:]))
    prefix = images[5:] + "/"
    for category, count in COUNTS.items():
        pngs = [k for k in keys if k.startswith(f"{prefix}{category}/") and k.endswith(".png")]
        assert len(pngs) == count
    assert len(keys) == 70 + 3  # the PNGs, metadata.csv and the two JSON files: no directory markers, no temporaries
    sample = f"{OTHER}-{29:09d}"
    assert fs.cat_file(f"{prefix}{OTHER}/{sample}.png") == rows[sample]["png"]
    table = list(csv.DictReader(io.StringIO(fs.cat_file(prefix + "metadata.csv").decode())))
    assert len(table) == 70 and {r["sample_id"] for r in table} == set(rows)
    shards = f"{s3_bucket}/exports/wds"
    summary = export_dataset(source, "webdataset", shards, shard_size=50)
    assert summary.masses == 70 and summary.counts == COUNTS
    assert sorted(k.rsplit("/", 1)[-1] for k in fs.find(shards[5:])) == [EXPORT_NAME, EXPORT_RUN_NAME, "shard-000000.tar",
                                                                         "shard-000001.tar"]
    members = []
    for name in ("shard-000000.tar", "shard-000001.tar"):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"{shards[5:]}/{name}"))) as tar:
            members += tar.getnames()
    assert len(members) == 140 and members[::2] == [f"{k}.png" for k in sorted(rows)]
    fs.rm(f"{shards[5:]}/shard-000001.tar")
    again = export_dataset(source, "webdataset", shards, shard_size=50, resume=True)
    assert again.kept_units == 1 and again.written_files == 1 and fs.exists(f"{shards[5:]}/shard-000001.tar")
    with pytest.raises(F2MError, match="is not empty"):
        export_dataset(source, "webdataset", shards, shard_size=50)
