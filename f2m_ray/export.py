"""A finished synthetic dataset in the layouts other training stacks read (local or s3://, both ends).

``imagefolder``: ``DIR/CATEGORY/SAMPLE_ID.png`` (the PNG bytes stored in the Parquet, not re-encoded;
a folder per class, as torchvision's ``ImageFolder`` expects) and ``DIR/metadata.csv`` (``file_name``
relative to DIR, then the scalar label columns), which ``datasets.load_dataset("imagefolder",
data_dir=DIR)`` reads. Work unit: one Parquet file of the dataset (its PNGs); a PNG is complete when
it is there with the stored size.

``webdataset``: ``DIR/shard-000000.tar``, ... of ``shard_size`` masses each: ``KEY.png`` and
``KEY.json`` (every column but the image) per mass, KEY the sample id, keys unique and sorted
across shards. Work unit: one shard, complete when its tar is there.

Every file is written whole or not at all (a hidden temporary name renamed into place locally, one
upload on S3). ``_export_run.json`` is written first (what is being exported, checked by
``resume``), ``_export.json`` last: an export without it is unfinished.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from f2m_ray import __version__
from f2m_ray.errors import F2MError, first_line
from f2m_ray.storage import arrow_filesystem, filesystem, is_remote, join
from f2m_ray.synthetic_files import read_manifest

EXPORT_FORMATS = ("imagefolder", "webdataset")
EXPORT_FORMAT = "f2m-ray-export"  # the `format` field of both JSON files
EXPORT_VERSION = 1  # bump on any change to the exported layout
EXPORT_NAME = "_export.json"  # written last: the export is finished
EXPORT_RUN_NAME = "_export_run.json"  # written first: what is being exported (checked by resume)
METADATA_NAME = "metadata.csv"
DEFAULT_SHARD_SIZE = 10_000  # about 40 MB of tar per shard for 64x64 masses
# metadata.csv: the scalar columns of a synthetic row (the seed_ids/weights lists are in the webdataset JSON)
METADATA_COLUMNS = ("sample_id", "sample_index", "category", "margin", "shape", "margin_id", "shape_id",
                    "height", "width", "model_id", "bank_id", "run_seed", "label_confidence",
                    "nearest_seed_distance", "attempt", "guards_passed")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")  # file names and webdataset keys: no '/', '.', or '..'
_SHARD = re.compile(r"shard-\d{6}\.tar\Z")


@dataclass
class ExportSummary:
    format: str
    dataset: str
    out: str
    masses: int
    counts: dict[str, int]
    files: int  # data files of the export (PNGs and metadata.csv, or tar shards)
    written_files: int  # of those, written by this call
    bytes_written: int
    units: int  # dataset files (imagefolder) or shards (webdataset)
    kept_units: int  # units found complete and left as they were (resume)
    seconds: float
    marker: str  # the path of _export.json
    shards: list[dict[str, Any]] = field(default_factory=list)


def export_dataset(path: str, fmt: str, out: str, *, shard_size: int | None = None, overwrite: bool = False,
                   resume: bool = False, progress: Callable[[str], None] | None = None) -> ExportSummary:
    """Export the finished synthetic dataset at `path` to `out` as `fmt` ("imagefolder" or "webdataset").

    Exactly the dataset's rows, found through its manifest. A non-empty `out` is refused unless
    `resume` (finish an export of the same dataset and format there, keeping its complete units)
    or `overwrite` (replace a previous export; never a folder holding anything else).
    `progress` gets one line per finished unit.
    """
    started = time.perf_counter()
    say = progress or (lambda line: None)
    if fmt not in EXPORT_FORMATS:
        raise F2MError(f"unknown export format {fmt!r}; choose {' or '.join(EXPORT_FORMATS)}")
    if overwrite and resume:
        raise F2MError("use --resume or --overwrite, not both")
    if shard_size is not None and fmt != "webdataset":
        raise F2MError("--shard-size applies to --format webdataset only")
    shard_size = DEFAULT_SHARD_SIZE if shard_size is None else shard_size
    if shard_size < 1:
        raise F2MError(f"--shard-size must be a positive number of masses, not {shard_size}")
    manifest = read_manifest(path)  # an unfinished or foreign dataset stops here, before --out is touched
    records = sorted(manifest["files"], key=lambda r: (r["category"], int(r["start"])))  # sample-id order
    if not records:
        raise F2MError(f"{path} lists no files")
    target = _Target(out)
    if target.same_place(path):
        raise F2MError(f"--out {out} is the dataset itself; export to another folder")
    fingerprint = _fingerprint(manifest, fmt, shard_size if fmt == "webdataset" else None)
    existing = _prepare(target, fingerprint, overwrite, resume)
    target.write_bytes(EXPORT_RUN_NAME, _json({
        "format": EXPORT_FORMAT, "fingerprint": fingerprint, "dataset": _where(path), "tool_version": __version__,
        "started": _now()}))
    if fmt == "imagefolder":
        result = _imagefolder(path, records, target, existing, say)
    else:
        result = _webdataset(path, records, target, existing, shard_size, _mtime(manifest), say)
    seconds = time.perf_counter() - started
    counts: dict[str, int] = {}
    for record in records:
        counts[record["category"]] = counts.get(record["category"], 0) + int(record["rows"])
    marker = {
        "format": EXPORT_FORMAT,
        "export_format": fmt,
        "export_version": EXPORT_VERSION,
        "tool_version": __version__,
        "dataset": _where(path),
        "dataset_id": fingerprint["dataset_id"],
        "model_id": manifest.get("model_id"),
        "bank_id": manifest.get("bank_id"),
        "schema_version": manifest.get("schema_version"),
        "masses": sum(counts.values()),
        "counts": counts,
        "files": result["files"],
        **({"shard_size": shard_size, "shards": result["shards"]} if fmt == "webdataset" else
           {"metadata": METADATA_NAME, "metadata_columns": ["file_name", *METADATA_COLUMNS]}),
        "fingerprint": fingerprint,
        "finished": _now(),
    }
    if counts != manifest.get("counts", counts) or result["masses"] != sum(counts.values()):
        raise F2MError(f"{path} is damaged: its files hold {counts}, the manifest says {manifest.get('counts')}")
    target.write_bytes(EXPORT_NAME, _json(marker))  # last: the export is finished
    return ExportSummary(format=fmt, dataset=path, out=out, masses=result["masses"], counts=counts,
                         files=result["files"], written_files=result["written_files"],
                         bytes_written=result["bytes"], units=result["units"], kept_units=result["kept_units"],
                         seconds=seconds, marker=join(out, EXPORT_NAME), shards=result.get("shards", []))


# ---------------------------------------------------------------- imagefolder


def _imagefolder(path: str, records: list[dict], target: "_Target", existing: dict[str, int],
                 say: Callable[[str], None]) -> dict[str, Any]:
    """One unit per dataset file: its PNGs; metadata.csv from every unit's labels, in the same order."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    seen: set[str] = set()
    written = total_bytes = kept_units = masses = 0
    with target.staged(METADATA_NAME) as staging:
        writer = None
        for number, record in enumerate(records, 1):
            table = _read_unit(path, record)
            ids, categories = table.column("sample_id").to_pylist(), table.column("category").to_pylist()
            _check_names(path, record, ids, categories, seen)
            names = [f"{category}/{sample}.png" for category, sample in zip(categories, ids)]
            pngs = table.column("image").combine_chunks().field("bytes").to_pylist()
            todo = [(name, png) for name, png in zip(names, pngs) if existing.get(name) != len(png)]
            target.write_many(todo)
            labels = table.select(list(METADATA_COLUMNS))
            labels = labels.add_column(0, "file_name", pa.array(names, pa.string()))
            if writer is None:
                writer = pacsv.CSVWriter(staging, labels.schema)
            writer.write_table(labels)
            masses += len(names)
            written += len(todo)
            total_bytes += sum(len(png) for _, png in todo)
            kept_units += not todo
            kept = len(names) - len(todo)
            state = (f"{len(todo)} PNGs written" + (f", {kept} kept" if kept else "") if todo
                     else f"{kept} PNGs kept (already complete)")
            say(f"[{number}/{len(records)}] {record['path']}: {state} ({masses} masses so far)")
        writer.close()
        staging.flush()
        total_bytes += staging.tell()
    return {"masses": masses, "files": masses + 1, "written_files": written + 1, "bytes": total_bytes,
            "units": len(records), "kept_units": kept_units}


# ---------------------------------------------------------------- webdataset


def _webdataset(path: str, records: list[dict], target: "_Target", existing: dict[str, int], shard_size: int,
                mtime: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Shard k holds masses [k * shard_size, (k + 1) * shard_size) of the dataset in sample-id order."""
    total = sum(int(r["rows"]) for r in records)
    bounds, offset = [], 0  # (first row, end row, record) of each dataset file in the global order
    for record in records:
        bounds.append((offset, offset + int(record["rows"]), record))
        offset += int(record["rows"])
    count = -(-total // shard_size)
    shards, seen = [], set()
    written = total_bytes = kept_units = 0
    cache: dict[str, Any] = {}
    last_key = ""
    for k in range(count):
        lo, hi = k * shard_size, min((k + 1) * shard_size, total)
        name = f"shard-{k:06d}.tar"
        shards.append({"path": name, "masses": hi - lo})
        if existing.get(name, 0) > 0 and existing[name] % tarfile.RECORDSIZE == 0:  # a cut tar is never whole records
            kept_units += 1
            say(f"[{k + 1}/{count}] {name}: {hi - lo} masses kept (already complete)")
            continue
        pieces = []
        for first, end, record in bounds:
            if end <= lo or first >= hi:
                continue
            if cache.get("path") != record["path"]:  # consecutive shards share at most one file: keep the last
                table = _read_unit(path, record)
                _check_names(path, record, table.column("sample_id").to_pylist(),
                             table.column("category").to_pylist(), seen)
                cache = {"path": record["path"], "table": table}
            pieces.append(cache["table"].slice(max(lo, first) - first, min(hi, end) - max(lo, first)))
        with target.staged(name) as staging:
            last_key = _write_tar(staging, pieces, mtime, last_key, path)
            staging.flush()
            size = staging.tell()
        written += 1
        total_bytes += size
        say(f"[{k + 1}/{count}] {name}: {hi - lo} masses, {size / 1e6:.1f} MB")
    return {"masses": total, "files": count, "written_files": written, "bytes": total_bytes, "units": count,
            "kept_units": kept_units, "shards": shards}


def _write_tar(sink, pieces: list, mtime: int, previous_key: str, path: str) -> str:
    """KEY.png and KEY.json per mass into `sink`, with fixed metadata: the same rows give the same bytes."""
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for piece in pieces:
            images = piece.column("image").combine_chunks().field("bytes").to_pylist()
            labels = piece.drop_columns(["image"]).to_pylist()
            for png, row in zip(images, labels):
                key = row["sample_id"]
                if key <= previous_key:
                    raise F2MError(f"{path}: sample ids are not in order ({previous_key} before {key})")
                previous_key = key
                for suffix, data in ((".png", png), (".json", _json(row, compact=True))):
                    info = tarfile.TarInfo(key + suffix)
                    info.size, info.mtime, info.mode = len(data), mtime, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
    return previous_key


# ---------------------------------------------------------------- reading the dataset


def _read_unit(path: str, record: dict):
    """One Parquet file of the dataset, sorted by sample id, checked against its manifest record."""
    import pyarrow.parquet as pq

    fs, inner = arrow_filesystem(join(path, record["path"]))
    try:
        with fs.open_input_file(inner) as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise F2MError(f"{path} is damaged: {record['path']} is listed in the manifest but missing") from None
    except OSError as err:
        raise F2MError(f"{path}: cannot read {record['path']} ({first_line(err)})") from None
    if table.num_rows != int(record["rows"]):
        raise F2MError(f"{path} is damaged: {record['path']} holds {table.num_rows} masses, the manifest says {record['rows']}")
    missing = [c for c in ("image", "sample_id", *METADATA_COLUMNS) if c not in table.column_names]
    if missing:
        raise F2MError(f"{path}: {record['path']} has no column {missing[0]}; not a synthetic dataset file")
    return table.sort_by("sample_id")


def _check_names(path: str, record: dict, ids: list, categories: list, seen: set[str]) -> None:
    """Sample ids and categories become file names and keys: plain, and each sample id once in the dataset."""
    for value in (*set(categories), *ids):
        if not isinstance(value, str) or not _SAFE_NAME.match(value):
            raise F2MError(f"{path}: {record['path']} holds {value!r}, not usable as a file name")
    before = len(seen)
    seen.update(ids)
    if len(seen) != before + len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1 or i in seen)
        raise F2MError(f"{path}: sample id {duplicate} appears more than once")


def _fingerprint(manifest: dict, fmt: str, shard_size: int | None) -> dict[str, Any]:
    """What an export depends on: the dataset's identity (not where it lies), the format, the shard size."""
    files = [{k: r.get(k) for k in ("path", "category", "start", "stop", "rows", "bytes")} for r in manifest["files"]]
    identity = {k: manifest.get(k) for k in ("model_id", "bank_id", "schema_version", "fingerprint")}
    digest = hashlib.sha256(json.dumps({**identity, "files": files}, sort_keys=True).encode()).hexdigest()[:16]
    return {"format": EXPORT_FORMAT, "export_version": EXPORT_VERSION, "export_format": fmt,
            "dataset_id": digest, "shard_size": shard_size}


def _mtime(manifest: dict) -> int:
    """The tar members' time: when the dataset was finished (fixed for a dataset)."""
    try:
        return int(datetime.fromisoformat(str(manifest.get("finished"))).timestamp())
    except ValueError:
        return 0


# ---------------------------------------------------------------- the output folder


def _prepare(target: "_Target", fingerprint: dict, overwrite: bool, resume: bool) -> dict[str, int]:
    """Check `out` against --resume/--overwrite; returns {relative path: size} of what may be kept."""
    files = target.list()
    if not files:
        return {}
    out = target.out
    if not resume and not overwrite:
        held = "1 file" if len(files) == 1 else f"{len(files)} files"
        raise F2MError(f"output {out} is not empty ({held}); use --resume to finish an export there, "
                       f"--overwrite to replace a previous export, or another --out")
    stored = _stored_fingerprint(target, files)
    if stored is None:
        if resume:
            raise F2MError(f"cannot resume in {out}: it is not an f2m-ray export (no {EXPORT_RUN_NAME} there)")
        raise F2MError(f"output {out} is not empty and is not an f2m-ray export; refusing to overwrite it")
    if overwrite:
        foreign = sorted(name for name in files if not _export_file(name))
        if foreign:
            held = "1 file that is" if len(foreign) == 1 else f"{len(foreign)} files that are"
            raise F2MError(f"output {out} also holds {held} not part of an export (e.g. {foreign[0]}); "
                           f"refusing to overwrite it: move them or use another --out")
        target.remove(EXPORT_NAME)  # first: a half-replaced export must not look finished
        target.remove_all()
        return {}
    differ = [k for k in fingerprint if stored.get(k) != fingerprint[k]]
    if differ:
        what = ", ".join(f"{k} {stored.get(k)!r} there vs {fingerprint[k]!r} now" for k in differ)
        raise F2MError(f"cannot resume in {out}: it holds another export ({what}); use --overwrite or another --out")
    target.remove(EXPORT_NAME)  # unfinished again until every unit is checked
    for name in files:
        if _temporary(name):  # leftovers of a killed local export are never data
            target.remove(name)
    return {name: size for name, size in files.items() if not _temporary(name)}


def _stored_fingerprint(target: "_Target", files: dict[str, int]) -> dict | None:
    for name in (EXPORT_RUN_NAME, EXPORT_NAME):
        if name not in files:
            continue
        try:
            content = json.loads(target.read_bytes(name))
        except (OSError, ValueError):
            continue
        if isinstance(content, dict) and content.get("format") == EXPORT_FORMAT and isinstance(content.get("fingerprint"), dict):
            return content["fingerprint"]
    return None


def _temporary(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".") and ".tmp-" in base


def _export_file(name: str) -> bool:
    """Whether a path under --out is one an export writes."""
    parts = name.split("/")
    if _temporary(name) and len(parts) <= 2:
        return True
    if len(parts) == 1:
        return name in (EXPORT_NAME, EXPORT_RUN_NAME, METADATA_NAME) or bool(_SHARD.match(name))
    return len(parts) == 2 and _SAFE_NAME.match(parts[0]) is not None and parts[1].endswith(".png")


class _Target:
    """The output folder: whole-file writes (hidden temp + rename locally, one upload on S3)."""

    def __init__(self, out: str):
        self.out = out
        self.remote = is_remote(out)
        self.fs, root = filesystem(out)
        self.root = root.rstrip("/") if self.remote else os.path.abspath(out)

    def same_place(self, path: str) -> bool:
        if is_remote(path) != self.remote:
            return False
        other = filesystem(path)[1].rstrip("/") if self.remote else os.path.abspath(path)
        return other == self.root

    def path(self, name: str) -> str:
        return join(self.root, name) if self.remote else os.path.join(self.root, *name.split("/"))

    def list(self) -> dict[str, int]:
        fs, root = self.fs, self.root
        try:
            fs.invalidate_cache()
            if not fs.exists(root):
                return {}
            if not fs.isdir(root):
                raise F2MError(f"output {self.out} is a file, expected a folder")
            found = fs.find(root, detail=True)
        except PermissionError as err:
            raise F2MError(f"output {self.out}: access refused ({first_line(err)})") from None
        prefix = root.rstrip("/") + "/"
        return {p[len(prefix):] if p.startswith(prefix) else p: int(info.get("size") or 0) for p, info in found.items()}

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open(self.path(name), "rb") as f:
            return f.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        self.write_many([(name, data)])

    def write_many(self, items: list[tuple[str, bytes]]) -> None:
        if not items:
            return
        try:
            if self.remote:
                self.fs.pipe({self.path(name): data for name, data in items})  # concurrent single PUTs
                return
            folders = set()
            for name, data in items:
                final = self.path(name)
                folder = os.path.dirname(final)
                if folder not in folders:
                    os.makedirs(folder, exist_ok=True)
                    folders.add(folder)
                temporary = os.path.join(folder, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:8]}")
                try:
                    with open(temporary, "wb") as f:
                        f.write(data)
                    os.replace(temporary, final)
                finally:
                    if os.path.exists(temporary):
                        os.remove(temporary)
        except PermissionError as err:
            raise F2MError(f"output {self.out}: writing refused ({first_line(err)})") from None

    def staged(self, name: str) -> "_Staged":
        return _Staged(self, name)

    def remove(self, name: str) -> None:
        try:
            self.fs.rm(self.path(name))
        except FileNotFoundError:
            pass

    def remove_all(self) -> None:
        self.fs.rm(self.root, recursive=True)
        self.fs.invalidate_cache()


class _Staged:
    """A file written to a temporary name and put in place only when the block ends without an error."""

    def __init__(self, target: _Target, name: str):
        self.target, self.name = target, name

    def __enter__(self):
        if self.target.remote:
            handle, self.temporary = tempfile.mkstemp(prefix="f2m-export-", suffix=".tmp")
            os.close(handle)
        else:
            final = self.target.path(self.name)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            self.temporary = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:8]}")
        self.file = open(self.temporary, "wb")
        return self.file

    def __exit__(self, kind, value, traceback) -> None:
        self.file.close()
        try:
            if kind is None:
                if self.target.remote:
                    self.target.fs.put_file(self.temporary, self.target.path(self.name))  # appears once uploaded
                else:
                    os.replace(self.temporary, self.target.path(self.name))
        except PermissionError as err:
            raise F2MError(f"output {self.target.out}: writing refused ({first_line(err)})") from None
        finally:
            if os.path.exists(self.temporary):
                os.remove(self.temporary)


def _json(value: Any, compact: bool = False) -> bytes:
    if compact:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    return json.dumps(value, indent=2).encode()


def _where(path: str) -> str:
    return str(path) if is_remote(path) else os.path.abspath(path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
