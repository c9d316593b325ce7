"""CBIS-DDSM: label policy, the case-description CSV, and path resolution against the download layout.

`write_cbis_fixture` builds a small CBIS-DDSM download in the real formats (CSV with the real
header and awkward values, DICOM written with pydicom in the NBIA retriever's folder layout);
tests/test_readers.py reads it end to end.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from f2m_ray.data import cbis_ddsm
from f2m_ray.data.cbis_ddsm import DicomIndex, map_margin, map_shape, read_case_rows
from f2m_ray.errors import F2MError
from f2m_ray.labels import MARGINS, SHAPES

HEADER = [
    "patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
    "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
    "image file path", "cropped image file path", "ROI mask file path",
]
UID_ROOT = "1.3.6.1.4.1.9590.100.1.2."

# (patient, side, view, shape, margins, layout, bits, note)
# layout: 'separate' = crop and mask in their own series; 'together' = both in one
# 'ROI mask images' series, crop as 1-1.dcm; 'swapped' = the same with the crop as 1-2.dcm;
# 'absent' = the case is not in the download.
CASES = [
    ("P_00001", "LEFT", "CC", "IRREGULAR", "SPICULATED", "separate", 16, ""),
    ("P_00001", "LEFT", "MLO", "IRREGULAR", "SPICULATED", "together", 12, ""),
    ("P_00004", "RIGHT", "CC", "IRREGULAR", "ILL_DEFINED-SPICULATED", "swapped", 16, ""),
    ("P_00005", "LEFT", "CC", "OVAL", "CIRCUMSCRIBED", "separate", 16, ""),
    ("P_00006", "LEFT", "CC", "LOBULATED-IRREGULAR", "CIRCUMSCRIBED", "together", 12, ""),
    ("P_00007", "RIGHT", "MLO", "IRREGULAR", "N/A", "separate", 16, ""),
    ("P_00008", "LEFT", "CC", "LYMPH_NODE", "CIRCUMSCRIBED", "separate", 16, ""),
    ("P_00009", "LEFT", "CC", "ARCHITECTURAL_DISTORTION", "OBSCURED", "swapped", 16, ""),
    ("P_00010", "LEFT", "CC", "ROUND", "ILL_DEFINED", "separate", 16, "truncated crop"),
    ("P_00011", "LEFT", "CC", "ROUND", "ILL_DEFINED", "absent", 16, ""),
    ("P_00012", "LEFT", "CC", "OVAL", "CIRCUMSCRIBED", "separate", 12, ""),
    ("P_00013", "RIGHT", "CC", "ROUND", "ILL_DEFINED", "together", 16, ""),
    ("P_00013", "RIGHT", "MLO", "ROUND", "ILL_DEFINED", "separate", 16, ""),
    ("P_00014", "LEFT", "CC", "N/A", "MICROLOBULATED", "separate", 16, ""),
    ("P_00015", "LEFT", "MLO", "FOCAL_ASYMMETRIC_DENSITY", "ILL_DEFINED", "separate", 16, ""),
]
# What reading the fixture must give (cropped ROIs, compound labels -> most suspicious).
EXPECTED_CATEGORIES = {
    "spiculated-irregular": 3,
    "circumscribed-oval": 2,
    "circumscribed-irregular": 1,
    "obscured-architectural-distortion": 1,
    "ill-defined-round": 2,
}
EXPECTED_DROPS = {
    "margin missing (N/A)": 1,
    "shape missing (N/A)": 1,
    "shape outside the vocabulary: LYMPH_NODE": 1,
    "shape outside the vocabulary: FOCAL_ASYMMETRIC_DENSITY": 1,
    "case folder not found": 1,
    "unreadable DICOM (truncated or corrupt)": 1,
}
EXPECTED_MAPPED = {
    "margin ILL_DEFINED-SPICULATED -> spiculated": 1,
    "shape LOBULATED-IRREGULAR -> irregular": 1,
}
FULL_SIZE = (180, 140)  # full mammogram (rows, columns): small, but larger than any crop
MASS_RADIUS = 14
CROP_MARGIN = 6  # the archive's crops: the mask's box plus some tissue


def _uid(k: int) -> str:
    return f"{UID_ROOT}{7000000 + k}{k:05d}"  # the last 5 digits identify the folder


def write_dicom(path: Path, pixels: np.ndarray, bits: int, description: str) -> None:
    """An uncompressed MONOCHROME2 DICOM as the archive's (16-bit words, `bits` stored)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.SeriesDescription = description
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16 if bits > 8 else np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def mass_image(k: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(full image, mask) with one bright disc; values use the whole `bits` range."""
    rng = np.random.default_rng(k)
    rows, cols = FULL_SIZE
    cy, cx = 50 + 7 * k % 80, 40 + 5 * k % 60
    yy, xx = np.mgrid[:rows, :cols]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= MASS_RADIUS**2
    top = (1 << bits) - 1
    image = 0.3 * top + 0.05 * top * rng.standard_normal(FULL_SIZE) + 0.4 * top * disc
    return np.clip(image, 0, top).astype(np.uint16), (disc * 255).astype(np.uint8)


def _crop_of(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return image[ys.min() - CROP_MARGIN : ys.max() + CROP_MARGIN + 1, xs.min() - CROP_MARGIN : xs.max() + 2 * CROP_MARGIN]


def write_cbis_fixture(root: Path, newline_cells: bool = True) -> Path:
    """A CBIS-DDSM mass-training download under `root`; returns the CSV's path.

    The DICOM tree sits at root/manifest-1700000000/CBIS-DDSM/<case>/... as the NBIA
    retriever writes it; the CSV (root/mass_case_description_train_set.csv) has the real
    header, UID paths, and stray newlines at the end of some path cells.
    """
    tree = root / "manifest-1700000000" / "CBIS-DDSM"
    rows = []
    for k, (patient, side, view, shape, margins, layout, bits, note) in enumerate(CASES, start=1):
        full_case = f"Mass-Training_{patient}_{side}_{view}"
        roi_case = f"{full_case}_1"
        study_full, series_full = _uid(100 + k), _uid(200 + k)
        study_roi, series_crop, series_mask = _uid(300 + k), _uid(400 + k), _uid(500 + k)
        if layout != "separate":
            series_crop = series_mask  # crop and mask are files of one series
        image, mask = mass_image(k, bits)
        crop = _crop_of(image, mask)
        if layout != "absent":
            date = "07-20-2016" if k % 2 else "09-08-2017"
            number = "1.000000" if k % 2 else "1"  # both retriever versions' series names
            full_dir = tree / full_case / f"{date}-DDSM-{study_full[-5:]}" / f"{number}-full mammogram images-{series_full[-5:]}"
            write_dicom(full_dir / "1-1.dcm", image, bits, "full mammogram images")
            roi_study = tree / roi_case / f"{date}-DDSM-{study_roi[-5:]}"
            if layout == "separate":
                crop_file = roi_study / f"{number}-cropped images-{series_crop[-5:]}" / "1-1.dcm"
                mask_file = roi_study / f"{number}-ROI mask images-{series_mask[-5:]}" / "1-1.dcm"
            else:
                series_dir = roi_study / f"{number}-ROI mask images-{series_mask[-5:]}"
                crop_file, mask_file = series_dir / "1-1.dcm", series_dir / "1-2.dcm"
                if layout == "swapped":
                    crop_file, mask_file = mask_file, crop_file
            write_dicom(crop_file, crop, bits, "cropped images" if layout == "separate" else "ROI mask images")
            write_dicom(mask_file, mask, 8, "ROI mask images")
            if note == "truncated crop":
                data = crop_file.read_bytes()
                crop_file.write_bytes(data[: len(data) // 2])
        tail = "\n" if newline_cells and k % 3 == 0 else ""
        rows.append([
            patient, "3", side, view, "1", "mass", shape, margins, "4", "MALIGNANT", "4",
            f"{full_case}/{study_full}/{series_full}/000000.dcm",
            f"{roi_case}/{study_roi}/{series_crop}/000000.dcm{tail}",
            f"{roi_case}/{study_roi}/{series_mask}/00000{1 if layout != 'separate' else 0}.dcm\n",
        ])
    csv_path = root / "mass_case_description_train_set.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return csv_path


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "value, expected, compound",
    [
        ("SPICULATED", "spiculated", False),
        ("ILL_DEFINED", "ill-defined", False),
        ("ill-defined", "ill-defined", False),
        ("ILL_DEFINED-SPICULATED", "spiculated", True),
        ("CIRCUMSCRIBED-ILL_DEFINED", "ill-defined", True),
        ("CIRCUMSCRIBED-OBSCURED", "obscured", True),
        ("OBSCURED-MICROLOBULATED", "microlobulated", True),
        ("CIRCUMSCRIBED-MICROLOBULATED-ILL_DEFINED", "ill-defined", True),
        ("ill-defined-spiculated", "spiculated", True),
    ],
)
def test_margin_policy_maps_to_most_suspicious(value, expected, compound):
    margin, reason, note = map_margin(value)
    assert reason is None
    assert MARGINS[margin] == expected
    # Compound values are mapped and say so; single values map silently (nothing to say).
    assert note == (f"margin {value} -> {expected}" if compound else None)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("OVAL", "oval"),
        ("LOBULATED-IRREGULAR", "irregular"),
        ("ROUND-OVAL", "oval"),
        ("LOBULATED-OVAL", "lobulated"),
        ("ARCHITECTURAL_DISTORTION", "architectural-distortion"),
        ("IRREGULAR-ARCHITECTURAL_DISTORTION", "architectural-distortion"),
    ],
)
def test_shape_policy(value, expected):
    shape, reason, _ = map_shape(value)
    assert reason is None and SHAPES[shape] == expected


@pytest.mark.parametrize(
    "value, reason",
    [
        ("N/A", "shape missing (N/A)"),
        (float("nan"), "shape missing (N/A)"),
        (None, "shape missing (N/A)"),
        ("  ", "shape missing (N/A)"),
        ("LYMPH_NODE", "shape outside the vocabulary: LYMPH_NODE"),
        ("OVAL-LYMPH_NODE", "shape outside the vocabulary: OVAL-LYMPH_NODE"),
        ("ASYMMETRIC_BREAST_TISSUE", "shape outside the vocabulary: ASYMMETRIC_BREAST_TISSUE"),
        ("FOCAL_ASYMMETRIC_DENSITY", "shape outside the vocabulary: FOCAL_ASYMMETRIC_DENSITY"),
    ],
)
def test_shape_drops_are_named(value, reason):
    assert map_shape(value) == (None, reason, None)


def test_compound_drop_policy_names_the_value():
    assert map_margin("ILL_DEFINED-SPICULATED", "drop") == (
        None, "compound margin (policy drop): ILL_DEFINED-SPICULATED", None)
    # Single values are unaffected by the policy.
    assert map_margin("SPICULATED", "drop")[0] == MARGINS.index("spiculated")
    with pytest.raises(F2MError, match="compound-label policy"):
        map_margin("SPICULATED", "keep-all")


# ---------------------------------------------------------------- CSV


def test_case_csv_keeps_awkward_cells(tmp_path):
    csv_path = write_cbis_fixture(tmp_path)
    rows = read_case_rows(str(csv_path))
    assert len(rows) == len(CASES)
    assert [r[cbis_ddsm.MARGIN] for r in rows][5] == "N/A"  # text, not NaN
    # Stray newlines live inside the quoted cells; the case id ignores them.
    assert rows[2][cbis_ddsm.CROPPED_PATH].endswith(".dcm\n")
    assert cbis_ddsm.case_id(rows[2][cbis_ddsm.CROPPED_PATH]) == "Mass-Training_P_00004_RIGHT_CC_1"


def test_case_csv_test_set_spelling_and_missing_columns(tmp_path):
    # The test-set CSV writes 'breast density' with a space: matched all the same.
    good = tmp_path / "mass_case_description_test_set.csv"
    header = [h.replace("breast_density", "breast density") for h in HEADER]
    good.write_text(",".join(header) + "\n" + ",".join(["P_1"] + ["x"] * (len(header) - 1)) + "\n")
    assert len(read_case_rows(str(good))) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,mass shape,image file path\nP_1,OVAL,a/b/c/d.dcm\n")
    with pytest.raises(F2MError, match=r"missing column\(s\): mass margins, cropped image file path$"):
        read_case_rows(str(bad))
    with pytest.raises(F2MError, match="ROI mask file path"):
        read_case_rows(str(bad), roi_source="mask")
    calc = tmp_path / "calc.csv"
    calc.write_text("patient_id,calc type,calc distribution,cropped image file path\nP_1,A,B,c\n")
    with pytest.raises(F2MError, match="calcification CSV"):
        read_case_rows(str(calc))


def test_case_csv_file_level_errors(tmp_path):
    empty = tmp_path / "mass_case_description_train_set.csv"
    empty.write_text("")
    with pytest.raises(F2MError, match="is empty"):
        read_case_rows(str(empty))
    with pytest.raises(F2MError, match="does not exist"):
        read_case_rows(str(tmp_path / "nope.csv"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(F2MError, match=r"no mass_case_description_\*\.csv"):
        cbis_ddsm.csv_files(str(tmp_path / "sub"))
    assert cbis_ddsm.csv_files(str(tmp_path)) == [str(empty)]


# ---------------------------------------------------------------- paths


def test_index_finds_cases_at_any_depth(tmp_path):
    write_cbis_fixture(tmp_path)
    index = DicomIndex.build(str(tmp_path))
    present = [c for c in CASES if c[5] != "absent"]
    # One full-image case folder per (patient, side, view) and one ROI case folder each.
    assert len(index.cases) == 2 * len(present)
    roi = index.cases["Mass-Training_P_00001_LEFT_CC_1"]
    assert sorted(len(parts) for parts in roi) == [3, 3]  # study / series / file


def test_resolve_by_uid_suffix_and_series(tmp_path):
    csv_path = write_cbis_fixture(tmp_path)
    rows = read_case_rows(str(csv_path))
    index = DicomIndex.build(str(tmp_path))
    by_case = {cbis_ddsm.case_id(r[cbis_ddsm.CROPPED_PATH]): r for r in rows}

    def resolve(case, column, role):
        return index.resolve(by_case[case][column], role)

    # Separate series: the crop's series UID picks exactly the 'cropped images' file.
    files, problem = resolve("Mass-Training_P_00001_LEFT_CC_1", cbis_ddsm.CROPPED_PATH, "crop")
    assert problem is None and len(files) == 1 and "cropped images" in files[0]
    files, _ = resolve("Mass-Training_P_00001_LEFT_CC_1", cbis_ddsm.MASK_PATH, "mask")
    assert len(files) == 1 and "ROI mask images" in files[0]
    # Crop and mask in one series: both files are candidates; the worker decides by content.
    files, _ = resolve("Mass-Training_P_00004_RIGHT_CC_1", cbis_ddsm.CROPPED_PATH, "crop")
    assert sorted(Path(f).name for f in files) == ["1-1.dcm", "1-2.dcm"]
    # Full mammogram: the case folder without the abnormality suffix.
    files, _ = resolve("Mass-Training_P_00001_LEFT_CC_1", cbis_ddsm.IMAGE_PATH, "full")
    assert len(files) == 1 and "full mammogram images" in files[0] and "_LEFT_CC/" in files[0]
    assert resolve("Mass-Training_P_00011_LEFT_CC_1", cbis_ddsm.CROPPED_PATH, "crop") == ([], "case folder not found")


def test_resolve_verbatim_uid_layout_and_description_fallback(tmp_path):
    # The old layout (the CSV's UID folders, as written) resolves as is.
    cell = f"Mass-Test_P_00002_LEFT_CC_1/{_uid(1)}/{_uid(2)}/000000.dcm"
    target = tmp_path / cell
    write_dicom(target, np.full((8, 8), 100, np.uint16), 16, "cropped images")
    # A case whose folder names carry no UID digits: found by series description.
    other = tmp_path / "Mass-Test_P_00003_LEFT_CC_1" / "study" / "1-cropped images-abcde" / "1-1.dcm"
    write_dicom(other, np.full((8, 8), 100, np.uint16), 16, "cropped images")
    index = DicomIndex.build(str(tmp_path))
    assert index.resolve(cell + "\n", "crop") == ([str(target)], None)
    files, _ = index.resolve(f"Mass-Test_P_00003_LEFT_CC_1/{_uid(3)}/{_uid(4)}/000000.dcm", "crop")
    assert files == [str(other)]
    with pytest.raises(F2MError, match="does not exist"):
        DicomIndex.build(str(tmp_path / "missing"))
