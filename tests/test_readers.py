"""Readers end to end on Ray: phantoms, manifests (local and on the loopback S3 server), CBIS-DDSM.

Fixtures are built in the real formats (tests/test_cbis_ddsm.py: CBIS-DDSM CSV and DICOM tree).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from f2m_ray.core import images
from f2m_ray.errors import F2MError
from f2m_ray.labels import MARGINS, SHAPES
from f2m_ray.data.readers import read_labeled
from f2m_ray.data.rows import ROW_COLUMNS, split_by_patient
from test_cbis_ddsm import (
    CROP_MARGIN, EXPECTED_CATEGORIES, EXPECTED_DROPS, EXPECTED_MAPPED, MASS_RADIUS, write_cbis_fixture, write_dicom,
)

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cbis_csv(tmp_path_factory) -> Path:
    return write_cbis_fixture(tmp_path_factory.mktemp("cbis"))


def _rows(result) -> dict[str, np.ndarray]:
    return result.dataset.take_batch(10_000, batch_format="numpy")


def _category_counts(batch) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m, s in zip(batch["margin"], batch["shape"]):
        name = f"{MARGINS[m]}-{SHAPES[s]}"
        counts[name] = counts.get(name, 0) + 1
    return counts


# ---------------------------------------------------------------- phantoms


def test_phantom_source_keeps_the_contract(ray_local):
    result = read_labeled("phantom:40", seed=3)
    batch = _rows(result)
    assert tuple(batch) == ROW_COLUMNS
    assert batch["image"].shape == (40, 64, 64) and batch["image"].dtype == np.float32
    assert batch["margin"].dtype == np.int64 and batch["shape"].dtype == np.int64
    assert result.rows == 40 and sum(result.per_category.values()) == 40
    assert _category_counts(batch) == result.per_category
    assert sum(result.split_rows.values()) == 40
    assert result.split_rows.get("val", 0) == int(np.sum(batch["split"] == "val"))


# ---------------------------------------------------------------- CBIS-DDSM


def test_cbis_ddsm_counts_drops_and_pixels(ray_local, cbis_csv):
    result = read_labeled(str(cbis_csv), val_fraction=0.3)  # auto-detected from the CSV header
    assert result.format == "cbis-ddsm"
    assert result.per_category == EXPECTED_CATEGORIES
    assert result.rows == sum(EXPECTED_CATEGORIES.values()) == 9
    assert result.dropped == EXPECTED_DROPS
    assert result.mapped == EXPECTED_MAPPED
    assert "1-1.dcm" in result.examples["unreadable DICOM (truncated or corrupt)"]
    batch = _rows(result)
    assert tuple(batch) == ROW_COLUMNS and _category_counts(batch) == EXPECTED_CATEGORIES
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (9, 64, 64)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    # Crops, not masks: a mask would come out as two values; the percentile window spans the range.
    for image in batch["image"]:
        assert len(np.unique(image)) > 100 and image.min() < -0.9 and image.max() > 0.9
    # Sizes before resizing: the archive's crops are the mask box plus margins.
    side = 2 * MASS_RADIUS + 1
    assert result.original_sizes.tolist() == [[side + 2 * CROP_MARGIN, side + 3 * CROP_MARGIN - 1]] * 9
    # The crop stored as 1-2.dcm (after its mask) is the one decoded, by the documented rules.
    swapped = "Mass-Training_P_00004_RIGHT_CC_1"
    row = list(batch["roi_id"]).index(swapped)
    source = batch["source"][row]
    assert source.endswith("1-2.dcm")
    expected = images.model_image(images.decode(Path(source).read_bytes(), source))
    np.testing.assert_allclose(batch["image"][row], expected, atol=1e-6)
    assert MARGINS[batch["margin"][row]] == "spiculated"  # ILL_DEFINED-SPICULATED


def test_cbis_ddsm_split_is_by_patient_and_reproducible(ray_local, cbis_csv):
    first = _rows(read_labeled(str(cbis_csv), val_fraction=0.3, seed=5))
    again = _rows(read_labeled(str(cbis_csv), val_fraction=0.3, seed=5))
    split_of = dict(zip(first["roi_id"], first["split"]))
    assert split_of == dict(zip(again["roi_id"], again["split"]))
    by_patient: dict[str, set] = {}
    for patient, split in zip(first["patient_id"], first["split"]):
        by_patient.setdefault(patient, set()).add(split)
    assert all(len(splits) == 1 for splits in by_patient.values())  # no patient in both splits
    assert len(by_patient) == 7
    # every ROI of a patient shares its split, and both splits are used
    assert all(split_of[r] == next(iter(by_patient[p])) for r, p in zip(first["roi_id"], first["patient_id"]))
    assert set(split_of.values()) == {"train", "val"}
    # The rule itself: round(0.3 * 8 patients) = 2 val patients, a pure function of (ids, seed).
    patients = [f"P_{i:05d}" for i in (1, 4, 5, 6, 9, 10, 12, 13)]
    chosen = split_by_patient(patients, 0.3, 5)
    assert sorted(chosen.values()).count("val") == 2
    assert chosen == split_by_patient(list(reversed(patients)), 0.3, 5)
    assert len({tuple(sorted(split_by_patient(patients, 0.3, s).items())) for s in range(6)}) > 1
    assert {p: chosen[p] for p in by_patient} == {p: next(iter(s)) for p, s in by_patient.items()}


def test_cbis_ddsm_mask_source_and_compound_policy(ray_local, cbis_csv):
    masked = read_labeled(str(cbis_csv), roi_source="mask")
    # The truncated file is a crop: cutting around the mask from the full image still works.
    assert masked.rows == 10 and "unreadable DICOM (truncated or corrupt)" not in masked.dropped
    side = round((2 * MASS_RADIUS + 1) * (1 + 2 * images.DEFAULT_MASK_MARGIN))
    assert masked.original_sizes.tolist() == [[side, side]] * 10
    batch = _rows(masked)
    # The mass (bright disc) sits in the middle of every ROI.
    centre, corner = batch["image"][:, 28:36, 28:36].mean(), batch["image"][:, :6, :6].mean()
    assert centre > 0.5 and corner < -0.3
    strict = read_labeled(str(cbis_csv), compound="drop")
    assert strict.rows == 7
    assert strict.dropped["compound margin (policy drop): ILL_DEFINED-SPICULATED"] == 1
    assert strict.dropped["compound shape (policy drop): LOBULATED-IRREGULAR"] == 1
    assert strict.mapped == {}


# ---------------------------------------------------------------- manifests


def _png16(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def _gradient(k: int, height: int = 48, width: int = 80) -> np.ndarray:
    return (np.linspace(2000, 60000, height * width).reshape(height, width) + 37 * k).astype(np.uint16)


def test_manifest_on_s3_with_16_bit_png_and_dicom(ray_local, s3_bucket, tmp_path):
    import s3fs

    from f2m_ray.storage import s3_endpoint

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint()})
    prefix = s3_bucket[len("s3://"):] + "/set"
    rows = [("id", "path", "margin", "shape", "patient_id")]
    for k in range(4):
        fs.pipe(f"{prefix}/images/roi{k}.png", _png16(_gradient(k)))
        rows.append((f"png{k}", f"images/roi{k}.png", "SPICULATED", "IRREGULAR", f"patient{k // 2}"))
    write_dicom(tmp_path / "roi.dcm", np.linspace(0, 4095, 60 * 30).reshape(60, 30).astype(np.uint16), 12, "x")
    fs.put(str(tmp_path / "roi.dcm"), f"{prefix}/images/roi.dcm")
    rows.append(("dicom", f"{s3_bucket}/set/images/roi.dcm", "circumscribed", "oval", "patient9"))  # absolute URL
    fs.pipe(f"{prefix}/images/notes.png", b"not an image at all")
    rows.append(("text", "images/notes.png", "circumscribed", "oval", "patient8"))
    rows.append(("gone", "images/missing.png", "circumscribed", "oval", "patient7"))
    rows.append(("both", "images/roi0.png", "ILL_DEFINED-SPICULATED", "ROUND", "patient6"))
    rows.append(("odd", "images/roi1.png", "FUZZY", "ROUND", "patient5"))
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    fs.pipe(f"{prefix}/manifest.csv", buffer.getvalue().encode())

    result = read_labeled(f"{s3_bucket}/set", val_fraction=0.25)  # a folder holding manifest.csv
    assert result.format == "manifest"
    assert result.per_category == {"spiculated-irregular": 4, "circumscribed-oval": 1, "spiculated-round": 1}
    assert result.dropped == {
        "margin outside the vocabulary: FUZZY": 1,
        images.NOT_AN_IMAGE: 1,
        images.MISSING_FILE: 1,
    }
    assert result.mapped == {"margin ILL_DEFINED-SPICULATED -> spiculated": 1}
    batch = _rows(result)
    by_id = {rid: i for i, rid in enumerate(batch["roi_id"])}
    # 16-bit PNG: percentile window over the ROI, aspect kept (80 x 48 -> 64 x 38, padded).
    png = batch["image"][by_id["png2"]]
    expected = images.model_image(images.Pixels(_gradient(2), 16))
    np.testing.assert_allclose(png, expected, atol=1e-6)
    assert png.min() < -0.98 and png.max() > 0.98  # the window's ends, blurred by the resize
    assert np.all(png[:12] == png[0, 0]) and np.all(png[-12:] == png[-1, -1])  # padded bands
    dicom = batch["image"][by_id["dicom"]]
    assert -1.0 <= dicom.min() < -0.95 and 0.95 < dicom.max() <= 1.0
    assert result.original_sizes[by_id["dicom"]].tolist() == [60, 30]
    assert batch["source"][by_id["dicom"]] == f"{s3_bucket}/set/images/roi.dcm"


def test_cbis_ddsm_download_on_s3(ray_local, s3_bucket, cbis_csv):
    import s3fs

    from f2m_ray.storage import s3_endpoint

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint()})
    fs.put(str(cbis_csv.parent) + "/", s3_bucket[len("s3://"):] + "/cbis/", recursive=True)
    result = read_labeled(f"{s3_bucket}/cbis/{cbis_csv.name}", val_fraction=0.3)
    assert result.per_category == EXPECTED_CATEGORIES and result.dropped == EXPECTED_DROPS
    assert all(s.startswith(f"{s3_bucket}/cbis/manifest-") for s in _rows(result)["source"])


def test_phantoms_manifest_round_trips_exactly(ray_local, tmp_path):
    from f2m_ray.data.phantom_files import write_phantoms

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    write_phantoms(tmp_path / "ph", 12, seed=1)
    result = read_labeled(str(tmp_path / "ph"), seed=1)
    batch = _rows(result)
    assert result.rows == 12 and result.dropped == {}
    # The same table as Parquet reads the same rows.
    pq.write_table(pacsv.read_csv(tmp_path / "ph" / "manifest.csv"), tmp_path / "ph" / "set.parquet")
    from_parquet = _rows(read_labeled(str(tmp_path / "ph" / "set.parquet"), seed=1))
    np.testing.assert_array_equal(from_parquet["image"], batch["image"])
    assert list(from_parquet["split"]) == list(batch["split"])
    for roi_id, image, source in zip(batch["roi_id"], batch["image"], batch["source"]):
        png = np.asarray(Image.open(source))
        np.testing.assert_array_equal(image, png.astype(np.float32) / 127.5 - 1.0)  # 8-bit: fixed map
        assert source.endswith(f"{roi_id.rsplit('-', 1)[-1]}.png")


def test_file_level_problems_are_one_clear_error(tmp_path):
    with pytest.raises(F2MError, match="data path does not exist"):
        read_labeled(str(tmp_path / "nope.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(F2MError, match="is empty"):
        read_labeled(str(tmp_path / "empty.csv"))
    (tmp_path / "cols.csv").write_text("path,label\na.png,x\n")
    with pytest.raises(F2MError, match=r"missing column\(s\): margin, shape$"):
        read_labeled(str(tmp_path / "cols.csv"))
    (tmp_path / "labels.csv").write_text("path,margin,shape\na.png,wobbly,round\nb.png,N/A,oval\n")
    with pytest.raises(F2MError, match=r"no usable rows .*margin outside the vocabulary: wobbly x1.*margin missing"):
        read_labeled(str(tmp_path / "labels.csv"))
    (tmp_path / "header.csv").write_text("path,margin,shape\n")
    with pytest.raises(F2MError, match="the manifest has no rows"):
        read_labeled(str(tmp_path / "header.csv"))
    with pytest.raises(F2MError, match=r"missing column\(s\): path, margin, shape \(a CBIS-DDSM case-description CSV"):
        read_labeled(str(write_cbis_fixture(tmp_path / "cbis")), fmt="manifest")
    with pytest.raises(F2MError, match="unknown data format"):
        read_labeled("phantom", fmt="dicom")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(F2MError, match="no manifest.csv or manifest.parquet or mass_case_description"):
        read_labeled(str(tmp_path / "empty_dir"))


def test_nothing_usable_after_decoding_is_an_error(ray_local, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "manifest.csv").write_text("path,margin,shape\nmissing.png,spiculated,round\nbad.png,spiculated,round\n")
    with pytest.raises(F2MError, match=r"nothing usable in manifest .*(missing file x1.*not an image|not an image.*missing file x1)"):
        read_labeled(str(tmp_path / "manifest.csv"))


# ---------------------------------------------------------------- commands


def run_data_check(*args: str):
    """`f2m-ray data check ...` in this process (sharing the session's Ray), as the console script runs it."""
    from click.testing import CliRunner

    from f2m_ray_cli.main import _register, cli

    _register()
    return CliRunner().invoke(cli, ["data", "check", *args])


def test_data_check_command(ray_local, cbis_csv, tmp_path):
    sheet = tmp_path / "sheet.png"
    result = run_data_check("--data", str(cbis_csv.parent), "--sheet", str(sheet))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "usable ROIs: 9 of 15 rows (6 dropped)" in out
    assert "spiculated-irregular                    3" in out
    assert "shape outside the vocabulary: LYMPH_NODE" in out and "case folder not found" in out
    assert "margin ILL_DEFINED-SPICULATED -> spiculated  x1" in out
    assert "height min 41  median 41  max 41" in out
    with Image.open(sheet) as img:
        assert img.size[1] == len(EXPECTED_CATEGORIES) * 66 + 2  # one 64-pixel row per category
    bad = tmp_path / "labels.csv"
    bad.write_text("path,margin,shape\na.png,wobbly,round\n")
    failed = run_data_check("--data", str(bad), "--no-sheet")
    assert failed.exit_code == 1 and (failed.exception is None or isinstance(failed.exception, SystemExit))
    assert [line for line in failed.stderr.splitlines() if line.strip()] == [
        f"Error: no usable rows in {bad} (dropped: margin outside the vocabulary: wobbly x1)"
    ]

