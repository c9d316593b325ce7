"""Labeled ROIs in: every source becomes one Ray Dataset of model-ready rows.

Row contract (what `train`, `encode` and `evaluate` consume):

    roi_id      str      unique id of the ROI
    image       float32  (64, 64) in [-1, 1]
    margin      int64    margin id (f2m_ray.labels.MARGINS)
    shape       int64    shape id (f2m_ray.labels.SHAPES)
    patient_id  str      rows of one patient share a split
    split       str      "train" or "val" (by patient, reproducible from a seed)
    source      str      where the ROI came from (file path or "phantom")

Sources (``fmt``; ``auto`` picks by looking at ``data``):
    ``phantom``    ``phantom`` / ``phantom:N``: procedural phantoms rendered in parallel (no
                   files; lazy, the default for training).
    ``manifest``   a CSV or Parquet table (a file, or a folder holding ``manifest.csv`` or
                   ``manifest.parquet``), local or ``s3://``, with columns ``path, margin,
                   shape`` and optional ``id, split, patient_id, mask_path``. Relative paths
                   resolve against the manifest's folder. Images: PNG/JPEG/TIFF (8 or 16
                   bit) or DICOM. This is what ``f2m-ray phantoms`` writes.
    ``cbis-ddsm``  the CBIS-DDSM mass case-description CSVs plus the DICOM download
                   (f2m_ray.data.cbis_ddsm: label policy and path resolution).

Labels go through one policy for both file formats (f2m_ray.data.cbis_ddsm.map_margin/map_shape:
compound values map to their most suspicious component or are dropped, N/A and values
outside the vocabulary are dropped); every dropped row is counted under its reason.

ROI source (``roi_source``): ``cropped`` decodes the ROI image as it is (the manifest's
``path``, CBIS-DDSM's cropped image); ``mask`` crops a square around the ROI mask from the
full image with a margin (the manifest's ``mask_path`` over ``path``; CBIS-DDSM's ROI mask
over the full mammogram). Then the windowing and resize rules of f2m_ray.core.images.

Split: by patient (rows without a patient id are their own patient). The val patients are
the ``round(val_fraction * patients)`` ones (at least one when there are two or more
patients and val_fraction > 0, never all) whose sha256(seed:patient) ranks lowest:
reproducible from the seed, independent of row order, and a patient keeps its split when
others are added. A manifest's ``split`` column wins where it says train or val (``test``
and ``validation`` count as val). Phantoms are one patient each and split by the same hash
against val_fraction (each phantom independently, so rendering needs no global view).

Reading: the table (paths and labels) is parsed on the driver; images are decoded in
parallel by Ray Data tasks, and the decoded 64x64 rows are materialized in the object
store (never in the driver), so that per-row problems (missing file, truncated DICOM,
non-image file, empty mask) are counted in ``ReadResult.dropped`` before training starts.
File-level problems (no such path, empty CSV, missing columns) and "nothing usable left"
raise F2MError with one line.
"""

from __future__ import annotations

import io
import os
from collections import Counter

import numpy as np

from f2m_ray.data import cbis_ddsm

from f2m_ray.core import images
from f2m_ray.errors import F2MError, first_line
from f2m_ray.storage import filesystem, is_remote, join
from f2m_ray.data.decode import DecodeOptions, HEADER_BYTES, decode, drop_summary
from f2m_ray.data.rows import IMAGE_SIZE, ReadResult, SPLIT_ALIASES, Drops, assign_split
from f2m_ray.data.phantom import DEFAULT_CATEGORIES, generate_phantoms, phantom_category
from f2m_ray.runtime.cluster import ensure_ray


PHANTOM_DEFAULT_N = 2000
FORMATS = ("auto", "manifest", "cbis-ddsm", "phantom")
MANIFEST_NAMES = ("manifest.csv", "manifest.parquet")
# ---------------------------------------------------------------- entry point


def read_labeled(
    data: str = "phantom",
    fmt: str = "auto",
    val_fraction: float = 0.1,
    seed: int = 0,
    *,
    roi_source: str = "cropped",
    compound: str = "most-suspicious",
    window: str = "auto",
    mask_margin: float = images.DEFAULT_MASK_MARGIN,
    image_root: str | None = None,
) -> ReadResult:
    """Open a labeled ROI source as a Ray Dataset with ROW_COLUMNS (see the module docstring).

    roi_source: 'cropped' | 'mask'; compound: 'most-suspicious' | 'drop' (compound labels);
    window: 'auto' | 'percentile' | 'bits'; mask_margin: context per side around the mask
    box, as a fraction of its larger side; image_root: CBIS-DDSM only, where the DICOM
    download lies (default: the CSV's folder).
    """
    if fmt not in FORMATS:
        raise F2MError(f"unknown data format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    # Relative paths mean the command's working directory; Ray's decode tasks run in another one.
    if not (data == "phantom" or str(data).startswith("phantom:") or is_remote(data)):
        data = os.path.abspath(os.path.expanduser(data))
    if image_root and not is_remote(image_root):
        image_root = os.path.abspath(os.path.expanduser(image_root))
    if not 0.0 <= val_fraction < 1.0:
        raise F2MError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if seed < 0:
        raise F2MError(f"seed must be >= 0, got {seed}")
    if roi_source not in cbis_ddsm.ROI_SOURCES:
        raise F2MError(f"unknown ROI source {roi_source!r}; valid: {', '.join(cbis_ddsm.ROI_SOURCES)}")
    if compound not in cbis_ddsm.COMPOUND_POLICIES:
        raise F2MError(f"unknown compound-label policy {compound!r}; valid: {', '.join(cbis_ddsm.COMPOUND_POLICIES)}")
    if window not in images.WINDOW_RULES:
        raise F2MError(f"unknown window rule {window!r}; valid: {', '.join(images.WINDOW_RULES)}")
    if not 0.0 <= mask_margin <= 2.0:
        raise F2MError(f"mask_margin must be in [0, 2], got {mask_margin}")
    data = str(data)
    is_phantom = data == "phantom" or data.startswith("phantom:")
    if fmt == "phantom" or (fmt == "auto" and is_phantom):
        if not is_phantom:
            raise F2MError(f"format phantom takes data 'phantom' or 'phantom:N', got {data!r}")
        n = PHANTOM_DEFAULT_N
        if ":" in data:
            try:
                n = int(data.split(":", 1)[1])
            except ValueError:
                raise F2MError(f"bad phantom source {data!r}; use phantom or phantom:N") from None
        return read_phantoms(n, seed=seed, val_fraction=val_fraction)
    options = DecodeOptions(roi_source=roi_source, window=window, mask_margin=mask_margin)
    if fmt == "auto":
        fmt = detect_format(data)
    if fmt == "cbis-ddsm":
        return read_cbis_ddsm(data, val_fraction, seed, options, compound, image_root)
    return read_manifest(data, val_fraction, seed, options, compound)


def detect_format(data: str) -> str:
    """'manifest' or 'cbis-ddsm' for a path, by its name and the CSV header."""
    fs, inner = filesystem(data)
    if not fs.exists(inner):
        raise F2MError(f"data path does not exist: {data}")
    if fs.isdir(inner):
        names = {p.rstrip("/").rsplit("/", 1)[-1].lower() for p in fs.ls(inner, detail=False)}
        if names & set(MANIFEST_NAMES):
            return "manifest"
        if any(n.startswith(cbis_ddsm.CSV_GLOB_PREFIX) and n.endswith(".csv") for n in names):
            return "cbis-ddsm"
        raise F2MError(
            f"no {' or '.join(MANIFEST_NAMES)} or {cbis_ddsm.CSV_GLOB_PREFIX}*.csv in {data}; "
            "pass a manifest or CSV file, or --format"
        )
    if inner.lower().endswith(".parquet"):
        return "manifest"
    with fs.open(inner, "rb") as handle:
        head = handle.read(HEADER_BYTES)
    return "cbis-ddsm" if cbis_ddsm.is_cbis_csv(head) else "manifest"


# ---------------------------------------------------------------- phantoms


def read_phantoms(n: int, seed: int = 0, val_fraction: float = 0.1) -> ReadResult:
    """Phantoms 0 .. n-1 of `seed`, rendered in parallel by Ray Data (one patient per phantom)."""
    import ray

    if n < 2:
        raise F2MError(f"need at least 2 phantoms, got {n}")
    ensure_ray()

    def render(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        rows = list(generate_phantoms(int(ids[-1]) + 1, seed, DEFAULT_CATEGORIES, start=int(ids[0])))
        roi_ids = [f"phantom-{i:06d}" for i, _, _ in rows]
        return {
            "roi_id": np.array(roi_ids, dtype=object),
            "image": np.stack([images.to_model_range(img) for _, img, _ in rows]),
            "margin": np.array([c.margin_id for _, _, c in rows], dtype=np.int64),
            "shape": np.array([c.shape_id for _, _, c in rows], dtype=np.int64),
            "patient_id": np.array(roi_ids, dtype=object),
            "split": np.array(assign_split(roi_ids, val_fraction, seed), dtype=object),
            "source": np.array(["phantom"] * len(rows), dtype=object),
        }

    dataset = ray.data.range(n, override_num_blocks=max(1, min(16, n // 250))).map_batches(render, batch_size=250)
    # The summary needs no rendering: categories take turns, splits hash the ids.
    splits = Counter(assign_split([f"phantom-{i:06d}" for i in range(n)], val_fraction, seed))
    per_category = Counter(phantom_category(i, DEFAULT_CATEGORIES).name for i in range(n))
    return ReadResult(
        dataset, n, {}, f"{n} phantoms (seed {seed}, {len(DEFAULT_CATEGORIES)} categories)",
        per_category=dict(per_category), split_rows=dict(splits), split_patients=dict(splits),
        original_sizes=np.full((n, 2), IMAGE_SIZE, dtype=np.int64), format="phantom",
    )


def _map_labels(margin_value, shape_value, compound: str, drops: Drops, mapped: Counter, example: str):
    """(margin id, shape id) or None (counted in drops); the margin is checked first."""
    m, reason, note_m = cbis_ddsm.map_margin(margin_value, compound)
    if reason:
        drops.add(reason, example)
        return None
    s, reason, note_s = cbis_ddsm.map_shape(shape_value, compound)
    if reason:
        drops.add(reason, example)
        return None
    for note in (note_m, note_s):
        if note:
            mapped[note] += 1
    return m, s


def _read_manifest_table(path: str):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, inner = filesystem(path)
    if not fs.exists(inner):
        raise F2MError(f"data path does not exist: {path}")
    if fs.isdir(inner):
        for name in MANIFEST_NAMES:
            if fs.exists(inner.rstrip("/") + "/" + name):
                path, inner = join(path, name), inner.rstrip("/") + "/" + name
                break
        else:
            raise F2MError(f"no {' or '.join(MANIFEST_NAMES)} in {path}")
    with fs.open(inner, "rb") as handle:
        raw = handle.read()
    if not raw.strip():
        raise F2MError(f"manifest {path} is empty")
    try:
        if path.lower().endswith(".parquet"):
            return pq.read_table(io.BytesIO(raw)), path
        return pacsv.read_csv(
            io.BytesIO(raw),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
        ), path
    except Exception as err:  # pyarrow raises ArrowInvalid and friends for malformed files
        raise F2MError(f"cannot read manifest {path}: {first_line(err)}") from None


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def read_manifest(
    path: str,
    val_fraction: float = 0.1,
    seed: int = 0,
    options: DecodeOptions = DecodeOptions(),
    compound: str = "most-suspicious",
) -> ReadResult:
    """A manifest of labeled ROI images: relative paths resolve against the manifest's folder."""
    table, manifest_path = _read_manifest_table(path)
    required = ["path", "margin", "shape"] + (["mask_path"] if options.roi_source == "mask" else [])
    missing = [c for c in required if c not in table.column_names]
    if missing:
        hint = ""
        if {"mass margins", "mass shape"} <= {" ".join(c.lower().replace("_", " ").split()) for c in table.column_names}:
            hint = " (a CBIS-DDSM case-description CSV: use --format cbis-ddsm or auto)"
        raise F2MError(f"manifest {manifest_path} is missing column(s): {', '.join(missing)}{hint}")
    base = manifest_path.rsplit("/", 1)[0] if "/" in manifest_path else "."
    columns = {c: table.column(c).to_pylist() for c in table.column_names}
    n = table.num_rows
    drops, mapped, seen = Drops(), Counter(), set()

    def resolve(rel: str) -> str:
        return rel if (is_remote(rel) or os.path.isabs(rel)) else join(base, rel)

    jobs = []
    for i in range(n):
        rel = _text(columns["path"][i])
        roi_id = _text(columns["id"][i]) if "id" in columns else ""
        roi_id = roi_id or f"roi-{i:06d}"
        example = f"row {i + 1} ({rel or roi_id})"
        if roi_id in seen:
            drops.add("duplicate id", example)
            continue
        labels = _map_labels(columns["margin"][i], columns["shape"][i], compound, drops, mapped, example)
        if labels is None:
            continue
        if not rel:
            drops.add("path missing", example)
            continue
        seen.add(roi_id)
        patient = _text(columns["patient_id"][i]) if "patient_id" in columns else ""
        stated = SPLIT_ALIASES.get(_text(columns["split"][i]).lower(), "") if "split" in columns else ""
        mask = _text(columns["mask_path"][i]) if "mask_path" in columns else ""
        if options.roi_source == "mask":
            if not mask:
                drops.add("mask path missing", example)
                continue
            crop_files, mask_files, image_files = "", resolve(mask), resolve(rel)
        else:
            crop_files, mask_files, image_files = resolve(rel), "", ""
        jobs.append({
            "roi_id": roi_id, "margin": labels[0], "shape": labels[1],
            "patient_id": patient or roi_id, "split": stated,
            "crop_files": crop_files, "mask_files": mask_files, "image_files": image_files,
        })
    if not jobs:
        detail = drop_summary(drops.counts) if drops.counts else "the manifest has no rows"
        raise F2MError(f"no usable rows in {manifest_path} ({detail})")
    return decode(jobs, drops, mapped, val_fraction, seed, options, f"manifest {manifest_path}", "manifest")


def read_cbis_ddsm(
    path: str,
    val_fraction: float = 0.1,
    seed: int = 0,
    options: DecodeOptions = DecodeOptions(),
    compound: str = "most-suspicious",
    image_root: str | None = None,
) -> ReadResult:
    """CBIS-DDSM mass CSV(s) plus the DICOM download (f2m_ray.data.cbis_ddsm)."""
    csvs = cbis_ddsm.csv_files(path)
    rows: list[tuple[str, int, dict]] = []  # (CSV, data row number in it, row)
    for csv_path in csvs:
        rows.extend(
            (csv_path, number, r)
            for number, r in enumerate(cbis_ddsm.read_case_rows(csv_path, options.roi_source), start=1)
        )
    if not rows:
        raise F2MError(f"no rows in {', '.join(csvs)} (header only)")
    if image_root is None:
        fs, inner = filesystem(path)
        image_root = path if fs.isdir(inner) else (path.rsplit("/", 1)[0] if "/" in path else ".")
    index = cbis_ddsm.DicomIndex.build(image_root)
    drops, mapped, seen = Drops(), Counter(), set()
    jobs = []
    for csv_path, number, row in rows:
        crop_cell = row.get(cbis_ddsm.CROPPED_PATH, "")
        roi_id = cbis_ddsm.case_id(crop_cell if options.roi_source == "cropped" else row[cbis_ddsm.MASK_PATH])
        example = f"{csv_path.rsplit('/', 1)[-1]} row {number} ({roi_id or 'no path'})"
        if not roi_id:
            drops.add("ROI path missing", example)
            continue
        if roi_id in seen:
            drops.add("duplicate ROI (same case folder twice)", example)
            continue
        labels = _map_labels(row[cbis_ddsm.MARGIN], row[cbis_ddsm.SHAPE], compound, drops, mapped, example)
        if labels is None:
            continue
        files: dict[str, str] = {"crop_files": "", "mask_files": "", "image_files": ""}
        wanted = (
            [("crop_files", crop_cell, "crop")]
            if options.roi_source == "cropped"
            else [("mask_files", row[cbis_ddsm.MASK_PATH], "mask"), ("image_files", row[cbis_ddsm.IMAGE_PATH], "full")]
        )
        problem = None
        for key, cell, role in wanted:
            candidates, problem = index.resolve(cell, role)
            if problem:
                drops.add(problem, f"{example}: {cbis_ddsm.case_id(cell)}")
                break
            files[key] = "\n".join(candidates)
        if problem:
            continue
        seen.add(roi_id)
        patient = _text(row.get(cbis_ddsm.PATIENT, "")) or roi_id
        jobs.append({"roi_id": roi_id, "margin": labels[0], "shape": labels[1],
                     "patient_id": patient, "split": "", **files})
    where = ", ".join(csvs)
    if not jobs:
        hint = ""
        if not index.cases:
            hint = f"; no CBIS-DDSM case folders (like Mass-Training_P_00001_LEFT_CC_1) under {image_root}"
        raise F2MError(f"no usable rows in {where} ({drop_summary(drops.counts)}{hint})")
    return decode(jobs, drops, mapped, val_fraction, seed, options, f"CBIS-DDSM {where}", "cbis-ddsm")
