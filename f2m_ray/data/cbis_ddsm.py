"""CBIS-DDSM mass ROIs: the case-description CSVs, the label policy, and DICOM path resolution.

Input
    ``mass_case_description_train_set.csv`` / ``mass_case_description_test_set.csv`` as TCIA
    publishes them (columns ``patient_id, breast_density, left or right breast, image view,
    abnormality id, abnormality type, mass shape, mass margins, assessment, pathology,
    subtlety, image file path, cropped image file path, ROI mask file path``; the test set
    spells ``breast density`` with a space, so column names are matched case-insensitively
    with ``_`` and spaces alike). ``--data`` is one CSV, or a folder: every
    ``mass_case_description_*.csv`` in it is read. The calcification CSVs have no margin and
    shape columns and are refused with a message that says so. Cells are read as text
    (``N/A`` stays ``N/A``; pandas' NaN is handled the same way where callers pass it).

Label policy (``map_margin`` / ``map_shape``; the manifest reader applies it too)
    - A value the vocabulary knows maps directly (``SPICULATED``, ``ILL_DEFINED``,
      ``ARCHITECTURAL_DISTORTION`` -> architectural-distortion; see f2m_ray.labels).
    - Missing (``N/A``, empty, NaN, None): the row is dropped, reason ``margin missing (N/A)``
      or ``shape missing (N/A)``.
    - A compound value (``ILL_DEFINED-SPICULATED``, ``LOBULATED-IRREGULAR``): with
      ``compound="most-suspicious"`` (the default) it maps to its most suspicious component
      and the mapping is counted (``ReadResult.mapped``); with ``compound="drop"`` the row is
      dropped with reason ``compound margin (policy drop): VALUE``. Suspicion order, highest
      first (BI-RADS positive predictive values):
        margins  spiculated > ill-defined > microlobulated > obscured > circumscribed
                 (obscured means the margin is hidden by tissue, not a suspicious finding,
                 so it ranks below microlobulated);
        shapes   architectural-distortion > irregular > lobulated > oval > round.
    - A value with any component outside the vocabulary (``LYMPH_NODE``,
      ``FOCAL_ASYMMETRIC_DENSITY``, ``ASYMMETRIC_BREAST_TISSUE``, also inside compounds such
      as ``OVAL-LYMPH_NODE``): dropped, reason ``shape outside the vocabulary: VALUE``.
      These are not masses, and a lymph node labelled "oval" would teach the model a
      benign node as an oval mass.
    The margin is checked before the shape; a row counts once, under its first reason.

Path resolution (``DicomIndex.resolve``)
    The CSV's path cells look like ``CASE/<StudyInstanceUID>/<SeriesInstanceUID>/000000.dcm``
    (some end in a stray newline, stripped here), where CASE is e.g.
    ``Mass-Training_P_00001_LEFT_CC_1`` (ROI crop and mask) or ``Mass-Training_P_00001_LEFT_CC``
    (the full mammogram). The NBIA Data Retriever does not write those UID folders: it
    writes ``.../CBIS-DDSM/CASE/<study date>-<study description>-<last 5 digits of the study
    UID>/<series number>-<series description>-<last 5 digits of the series UID>/1-1.dcm``
    (series number ``1`` or ``1.000000`` depending on the retriever version), with crop and
    mask either in separate series (``cropped images``, ``ROI mask images``) or both in one
    ``ROI mask images`` series as ``1-1.dcm`` and ``1-2.dcm``, in either order. So:

    1. The whole download is listed once (one recursive listing; on S3 a few paged
       requests). A file belongs to the first folder on its path whose name is a case id
       (``(Mass|Calc)-(Training|Test)_P_<n>_(LEFT|RIGHT)_(CC|MLO)[_<k>]``), at any depth:
       ``ROOT/CASE``, ``ROOT/CBIS-DDSM/CASE``, ``ROOT/manifest-<id>/CBIS-DDSM/CASE``...
       Image files only (``.dcm``, ``.png``, ``.jpg``, ``.tif``).
    2. The CSV cell's path below CASE exists as written (the old UID layout): that file.
    3. Otherwise the series folders under CASE whose name ends in ``-<last 5 digits of the
       series UID>`` (narrowed to the study folder ending in the study UID's last 5 digits
       where one does): their files are the candidates.
    4. Otherwise the series whose description names the wanted role (``cropped images``,
       ``ROI mask images``, ``full mammogram images``; a crop may also sit in the ``ROI mask
       images`` series), else every image file under CASE.
    The reader's worker then decides among candidates by content, as public CBIS-DDSM
    loaders do (the ``1-1``/``1-2`` order is not reliable): the ROI mask is binary (two
    values) and as large as the full mammogram; the crop is the smallest non-binary
    candidate; the full image the largest non-binary one. A case folder that is not in the
    download drops the row, reason ``case folder not found``.

ROI ids are the case folder names (``Mass-Training_P_00001_LEFT_CC_1``); the split is by
``patient_id`` (both views and every abnormality of a patient share a split).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field

from f2m_ray.errors import F2MError, first_line
from f2m_ray.labels import MARGINS, SHAPES, UnknownLabelError, canonical_margin, canonical_shape
from f2m_ray.storage import filesystem, is_remote, join

COMPOUND_POLICIES = ("most-suspicious", "drop")
MARGIN_SUSPICION = ("spiculated", "ill-defined", "microlobulated", "obscured", "circumscribed")
SHAPE_SUSPICION = ("architectural-distortion", "irregular", "lobulated", "oval", "round")
MISSING_VALUES = {"", "N/A", "NA", "NAN", "NONE", "NULL", "-"}
CSV_GLOB_PREFIX = "mass_case_description_"
IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
CASE_PATTERN = re.compile(r"^(mass|calc)-(training|test)_p_\d+_(left|right)_(cc|mlo)(_\d+)?$", re.IGNORECASE)
CASE_NOT_FOUND = "case folder not found"

# Normalized column names (lower case, '_' and runs of spaces -> one space).
PATIENT = "patient id"
MARGIN = "mass margins"
SHAPE = "mass shape"
CROPPED_PATH = "cropped image file path"
MASK_PATH = "roi mask file path"
IMAGE_PATH = "image file path"
ROI_SOURCES = ("cropped", "mask")
REQUIRED_COLUMNS = {
    "cropped": (PATIENT, SHAPE, MARGIN, CROPPED_PATH),
    "mask": (PATIENT, SHAPE, MARGIN, IMAGE_PATH, MASK_PATH),
}
# How the CSV spells them, for messages.
DISPLAY_NAMES = {
    PATIENT: "patient_id",
    MARGIN: "mass margins",
    SHAPE: "mass shape",
    CROPPED_PATH: "cropped image file path",
    MASK_PATH: "ROI mask file path",
    IMAGE_PATH: "image file path",
}
ROLE_SERIES = {"crop": "cropped images", "mask": "roi mask images", "full": "full mammogram images"}


# ---------------------------------------------------------------- labels


def is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return str(value).strip().upper() in MISSING_VALUES


def _components(value: str, canonical) -> list[str] | None:
    """Split a '-'-joined value into known names, or None. Names may contain '-' themselves
    ('ill-defined', 'architectural-distortion'), so every split is tried, longest names first."""
    parts = [p for p in str(value).strip().replace("_", "-").split("-") if p]

    def segment(i: int) -> list[str] | None:
        if i == len(parts):
            return []
        for k in range(min(3, len(parts) - i), 0, -1):
            try:
                name = canonical("-".join(parts[i : i + k]))
            except UnknownLabelError:
                continue
            rest = segment(i + k)
            if rest is not None:
                return [name, *rest]
        return None

    return segment(0)


def _map(value, kind: str, canonical, valid: tuple[str, ...], order: tuple[str, ...], compound: str):
    """-> (class id, None, mapping note or None) or (None, drop reason, None)."""
    if compound not in COMPOUND_POLICIES:
        raise F2MError(f"unknown compound-label policy {compound!r}; valid: {', '.join(COMPOUND_POLICIES)}")
    if is_missing(value):
        return None, f"{kind} missing (N/A)", None
    text = " ".join(str(value).split())
    try:
        return valid.index(canonical(text)), None, None
    except UnknownLabelError:
        pass
    names = _components(text, canonical)
    if not names:
        return None, f"{kind} outside the vocabulary: {text}", None
    if compound == "drop":
        return None, f"compound {kind} (policy drop): {text}", None
    chosen = min(set(names), key=order.index)
    return valid.index(chosen), None, f"{kind} {text} -> {chosen}"


def map_margin(value, compound: str = "most-suspicious"):
    """A CSV margin cell -> (margin id, None, mapping note | None) or (None, drop reason, None)."""
    return _map(value, "margin", canonical_margin, MARGINS, MARGIN_SUSPICION, compound)


def map_shape(value, compound: str = "most-suspicious"):
    """A CSV shape cell -> (shape id, None, mapping note | None) or (None, drop reason, None)."""
    return _map(value, "shape", canonical_shape, SHAPES, SHAPE_SUSPICION, compound)


# ---------------------------------------------------------------- CSV


def _normalize_column(name: str) -> str:
    return " ".join(str(name).strip().lower().replace("_", " ").split())


def csv_files(path: str) -> list[str]:
    """The CSVs that `path` names: itself, or every mass_case_description_*.csv in a folder."""
    fs, inner = filesystem(path)
    if not fs.exists(inner):
        raise F2MError(f"data path does not exist: {path}")
    if not fs.isdir(inner):
        return [path]
    names = sorted(
        p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(inner, detail=False)
    )
    found = [join(path, n) for n in names if n.lower().startswith(CSV_GLOB_PREFIX) and n.lower().endswith(".csv")]
    if not found:
        raise F2MError(f"no {CSV_GLOB_PREFIX}*.csv in {path} (the CBIS-DDSM mass case-description CSVs)")
    return found


def is_cbis_csv(raw_head: bytes) -> bool:
    """True if a CSV's header line has the CBIS-DDSM mass columns."""
    first = raw_head.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    columns = {_normalize_column(c.strip('"')) for c in first.split(",")}
    return MARGIN in columns and SHAPE in columns


def read_case_rows(path: str, roi_source: str = "cropped") -> list[dict[str, str]]:
    """The rows of one CBIS-DDSM mass CSV, keyed by normalized column names; F2MError for file-level problems."""
    import pandas as pd

    fs, inner = filesystem(path)
    if not fs.exists(inner):
        raise F2MError(f"data path does not exist: {path}")
    with fs.open(inner, "rb") as handle:
        raw = handle.read()
    if not raw.strip():
        raise F2MError(f"CSV {path} is empty")
    try:
        # All text, and N/A stays the text 'N/A' (is_missing handles it); quoted cells may
        # hold the stray newlines that some path cells end in.
        frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise F2MError(f"cannot read CSV {path}: {first_line(err)}") from None
    columns = {_normalize_column(c): c for c in frame.columns}
    missing = [DISPLAY_NAMES[c] for c in REQUIRED_COLUMNS[roi_source] if c not in columns]
    if missing:
        hint = ""
        if "calc type" in columns:
            hint = " (a calcification CSV? only the mass CSVs carry margin and shape labels)"
        raise F2MError(f"CSV {path} is missing column(s): {', '.join(missing)}{hint}")
    frame = frame.rename(columns={orig: norm for norm, orig in columns.items()})
    return frame.to_dict("records")


# ---------------------------------------------------------------- paths


def _split_cell(cell) -> list[str]:
    return [p for p in str(cell).strip().replace("\\", "/").split("/") if p.strip()]


def case_id(cell) -> str:
    """The case folder a CSV path cell points into (its first path part)."""
    parts = _split_cell(cell)
    return parts[0].strip() if parts else ""


@dataclass
class DicomIndex:
    """Every image file of a CBIS-DDSM download, grouped by case folder (one listing)."""

    root: str
    # case folder name -> {path parts below the case folder: full path (local or URL)}
    cases: dict[str, dict[tuple[str, ...], str]] = field(default_factory=dict)

    @classmethod
    def build(cls, root: str) -> "DicomIndex":
        fs, inner = filesystem(root)
        if not fs.exists(inner):
            raise F2MError(f"image folder does not exist: {root}")
        if not fs.isdir(inner):
            raise F2MError(f"image folder is not a folder: {root}")
        index = cls(root)
        base = inner.rstrip("/")
        remote = is_remote(root)
        for found in sorted(fs.find(inner)):
            if not found.lower().endswith(IMAGE_SUFFIXES):
                continue
            rel = found[len(base) :].lstrip("/").split("/")
            for depth, part in enumerate(rel[:-1]):
                if CASE_PATTERN.match(part):
                    below = tuple(rel[depth + 1 :])
                    full = fs.unstrip_protocol(found) if remote else found
                    index.cases.setdefault(part, {}).setdefault(below, full)
                    break
        return index

    def resolve(self, cell, role: str) -> tuple[list[str], str | None]:
        """A CSV path cell -> (candidate files, None) or ([], drop reason); see the module docstring."""
        parts = [p.strip() for p in _split_cell(cell)]
        if not parts:
            return [], f"{role} path missing"
        files = self.cases.get(parts[0])
        if not files:
            return [], CASE_NOT_FOUND
        below = tuple(parts[1:])
        if below in files:  # the UID layout, as written in the CSV
            return [files[below]], None
        entries = [(rel, full) for rel, full in files.items() if len(rel) >= 2]
        if len(parts) >= 4:
            study_tail, series_tail = parts[1][-5:], parts[2][-5:]
            series = [(rel, full) for rel, full in entries if rel[-2].endswith("-" + series_tail)]
            in_study = [(rel, full) for rel, full in series if len(rel) >= 3 and rel[-3].endswith("-" + study_tail)]
            chosen = in_study or series
            if chosen:
                return [full for _, full in chosen], None
        wanted = ROLE_SERIES[role]
        described = [full for rel, full in entries if wanted in rel[-2].lower()]
        if not described and role == "crop":
            described = [full for rel, full in entries if ROLE_SERIES["mask"] in rel[-2].lower()]
        if described:
            return described, None
        return list(files.values()), None
