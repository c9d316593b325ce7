"""Reading synthetic datasets back: manifest checks, torch Dataset, inspect helpers."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from f2m_ray.errors import F2MError
from f2m_ray.schema import MANIFEST_NAME, decode_png
from f2m_ray.synth.driver import synthesize
from f2m_ray.synth.plan import SynthesisConfig
from f2m_ray.synthetic import (
    SyntheticTorchDataset,
    inspect_dataset,
    read_manifest,
    read_table,
    sample_images,
    synthetic_files,
)
from test_synthesize import CATEGORY, OTHER


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, trained_model):
    """40 + 40 masses of the trained fixture model written in this process (the same actor code, no Ray)."""
    out = tmp_path_factory.mktemp("synthetic") / "dataset"
    config = SynthesisConfig(categories=(CATEGORY, OTHER), n=40, out=str(out), model=trained_model, rows_per_file=25, k=5)
    synthesize(config, report=None, use_ray=False)
    return out


def test_files_come_from_the_manifest(dataset):
    files = synthetic_files(str(dataset))
    assert [f.rsplit("/", 3)[-3:] for f in files] == [
        ["data", CATEGORY, "part-000000-000024.parquet"], ["data", CATEGORY, "part-000025-000039.parquet"],
        ["data", OTHER, "part-000000-000024.parquet"], ["data", OTHER, "part-000025-000039.parquet"]]
    (dataset / "data" / CATEGORY / "stray.parquet").write_bytes(b"ignored: not in the manifest")
    assert read_table(str(dataset)).num_rows == 80


def test_torch_dataset_decodes_png_to_model_range(dataset):
    data = SyntheticTorchDataset(str(dataset))
    table = read_table(str(dataset), ["image", "margin_id", "shape_id"])
    assert len(data) == 80
    image, margin, shape = data[45]
    pixels = decode_png(table.column("image")[45]["bytes"].as_py())
    torch.testing.assert_close(image, torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0)[None])
    assert (margin, shape) == (table.column("margin_id")[45].as_py(), table.column("shape_id")[45].as_py())
    assert len(SyntheticTorchDataset(str(dataset), categories=[OTHER])) == 40
    # the spellings the command line accepts; an unknown name or a category the dataset lacks is an error, not 0 rows
    alias = SyntheticTorchDataset(str(dataset), categories=[CATEGORY.replace("spiculated", "spiculate").upper()])
    assert len(alias) == 40 and set(alias.margin_ids.tolist()) == {4}
    with pytest.raises(F2MError, match="unknown category 'spiky'"):
        SyntheticTorchDataset(str(dataset), categories=["spiky"])
    with pytest.raises(F2MError, match="holds no masses of obscured-round; it holds circumscribed-oval, spiculated-irregular"):
        SyntheticTorchDataset(str(dataset), categories=[OTHER, "obscured-round"])
    with pytest.raises(IndexError):
        data[80]


def test_the_ray_dataset_gives_decoded_images_as_torch_batches(dataset, ray_local):
    from f2m_ray.synthetic import open_synthetic

    torch_data = SyntheticTorchDataset(str(dataset))
    expected = {(torch_data.margin_ids[i], torch_data.shape_ids[i], torch_data[i][0].numpy().tobytes()) for i in range(80)}
    batches = list(open_synthetic(str(dataset), decode_images=True).iter_torch_batches(batch_size=32))
    assert sorted(batches[0]) == ["image", "margin_id", "shape_id"]
    images = torch.cat([b["image"] for b in batches])
    assert images.shape == (80, 64, 64) and images.dtype == torch.float32 and -1 <= images.min() < images.max() <= 1
    got = {(m, s, img[None].numpy().tobytes()) for b in batches for m, s, img in zip(b["margin_id"].tolist(),
                                                                                  b["shape_id"].tolist(), b["image"])}
    assert got == expected  # every mass once, the same pixels and labels as the torch Dataset
    raw = open_synthetic(str(dataset), columns=["sample_id", "category"])
    assert raw.count() == 80 and sorted(raw.schema().names) == ["category", "sample_id"]
    # One category, in a spelling the command line accepts; unknown or absent ones are errors, never 0 rows.
    alias = open_synthetic(str(dataset), columns=["category"], categories=[CATEGORY.replace("spiculated", "spiculate").upper()])
    assert {row["category"] for row in alias.take_all()} == {CATEGORY} and alias.count() == 40
    with pytest.raises(F2MError, match="unknown category 'spiky'"):
        open_synthetic(str(dataset), categories=["spiky"])
    with pytest.raises(F2MError, match="holds no masses of obscured-round; it holds circumscribed-oval, spiculated-irregular"):
        open_synthetic(str(dataset), categories=["obscured-round"])


def test_inspect_counts_and_sheet_images(dataset):
    info = inspect_dataset(str(dataset))
    assert info["counts"] == {CATEGORY: 40, OTHER: 40} and info["rows"] == 80 and info["files"] == 4
    assert info["schema_version"] == 3 and info["arguments"]["k"] == 5
    images = sample_images(str(dataset), per_category=3)
    assert sorted(images) == sorted([CATEGORY, OTHER]) and images[OTHER][0].shape == (64, 64)
    assert images[OTHER][0].dtype == np.uint8


def test_unfinished_and_foreign_folders_refused(dataset, tmp_path):
    manifest = json.loads((dataset / MANIFEST_NAME).read_text())
    (tmp_path / "_run.json").write_text("{}")
    with pytest.raises(F2MError, match="unfinished synthetic dataset.*--resume"):
        read_manifest(str(tmp_path))
    with pytest.raises(F2MError, match="not a synthetic dataset: no _manifest.json"):
        read_manifest(str(tmp_path / "elsewhere"))
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**manifest, "schema_version": 7}))
    with pytest.raises(F2MError, match="schema version 7"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text("{")
    with pytest.raises(F2MError, match="not valid JSON"):
        read_manifest(str(tmp_path))


def test_damaged_dataset_detected(dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    (copy / "data" / OTHER / "part-000025-000039.parquet").unlink()
    with pytest.raises(F2MError, match="damaged: .*part-000025-000039.parquet is listed in the manifest but missing"):
        inspect_dataset(str(copy))


def _as_version_2(dataset, folder):
    """A copy of `dataset` in the version-2 layout: the Parquet at OUT/CATEGORY/, no data/ folder."""
    shutil.copytree(dataset, folder, ignore=shutil.ignore_patterns("stray.parquet"))  # left by another test
    for category in os.listdir(folder / "data"):
        (folder / "data" / category).rename(folder / category)
    (folder / "data").rmdir()
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["schema_version"] = 2
    for record in manifest["files"]:
        record["path"] = record["path"].removeprefix("data/")
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    run = json.loads((folder / "_run.json").read_text())
    run["fingerprint"]["schema_version"] = 2
    (folder / "_run.json").write_text(json.dumps(run))
    return folder


def test_a_version_2_dataset_is_still_read_and_overwritten_not_resumed(dataset, tmp_path, trained_model):
    old = _as_version_2(dataset, tmp_path / "v2")
    assert read_table(str(old)).num_rows == 80 and len(SyntheticTorchDataset(str(old), categories=[OTHER])) == 40
    info = inspect_dataset(str(old))
    assert info["schema_version"] == 2 and info["counts"] == {CATEGORY: 40, OTHER: 40}
    assert any("version-2 layout" in note for note in info["notes"])
    base = dict(categories=(CATEGORY, OTHER), n=40, out=str(old), model=trained_model, rows_per_file=25, k=5)
    with pytest.raises(F2MError, match="holds a run of schema version 2 .this f2m-ray writes version 3.; .*--overwrite"):
        synthesize(SynthesisConfig(**base, resume=True), report=None, use_ray=False)
    synthesize(SynthesisConfig(**base, overwrite=True), report=None, use_ray=False)
    assert sorted(os.listdir(old)) == ["README.md", "_manifest.json", "_run.json", "croissant.json", "data"]
    assert read_table(str(old)).equals(read_table(str(dataset)))


def test_a_newer_schema_is_refused_with_the_upgrade_hint(dataset, tmp_path):
    newer = tmp_path / "v9"
    shutil.copytree(dataset, newer)
    manifest = json.loads((newer / MANIFEST_NAME).read_text())
    (newer / MANIFEST_NAME).write_text(json.dumps({**manifest, "schema_version": 9}))
    with pytest.raises(F2MError, match="has schema version 9; this f2m-ray reads versions 2 and 3; upgrade f2m-ray"):
        read_manifest(str(newer))
