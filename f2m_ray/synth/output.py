"""The output folder of a synthesis run: what may be there before it (--resume, --overwrite),
`_run.json` first, the dataset card and `_manifest.json` last, and nothing else touched.
"""


from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any


from f2m_ray import __version__
from f2m_ray.croissant import CROISSANT_NAME, croissant
from f2m_ray.dataset_card import CARD_NAME, card_text, is_our_card
from f2m_ray.errors import F2MError, first_line
from f2m_ray.schema import DATA_DIR, HF_FEATURES, MANIFEST_NAME, METADATA_KEY, SCHEMA_VERSION, read_json_metadata
from f2m_ray.storage import arrow_filesystem, filesystem, is_remote, join
from f2m_ray.synth.actor import GUARD_KEYS
from f2m_ray.synth.plan import MANIFEST_FORMAT, RUN_FORMAT, RUN_NAME, ResolvedRun


# ---------------------------------------------------------------- the output folder


def _relative(root: str, path: str) -> str:
    return path[len(root):].lstrip("/") if path.startswith(root) else path


def _list_files(out: str) -> tuple[Any, str, dict[str, int]]:
    """(fs, root, {relative path: size}) of everything under `out`."""
    fs, root = filesystem(out)
    root = root.rstrip("/")
    fs.invalidate_cache()
    try:
        if not fs.exists(root):
            return fs, root, {}
        if not fs.isdir(root):
            raise F2MError(f"output {out} is a file, expected a folder")
        found = fs.find(root, detail=True)
    except PermissionError as err:
        raise F2MError(f"output {out}: access refused ({first_line(err)})") from None
    return fs, root, {_relative(root, p): int(info.get("size") or 0) for p, info in found.items()}


def prepare_output(run: ResolvedRun) -> dict[str, int]:
    """Check `out` against --resume/--overwrite, write _run.json; returns finished files {path: size}."""
    c = run.config
    fs, root, files = _list_files(c.out)
    if files and not c.resume:
        if not c.overwrite:
            raise F2MError(
                f"output {c.out} is not empty ({len(files)} files); use --resume to finish the run there, "
                f"--overwrite to replace it, or another --out"
            )
        if not _is_synthetic_run(fs, root, files):
            raise F2MError(f"output {c.out} is not empty and is not an f2m-ray synthetic dataset; refusing to overwrite it")
        foreign = sorted(name for name in files if not _dataset_file(name) or (name == CARD_NAME and not _our_card(fs, root)))
        if foreign:
            held = "1 file that is" if len(foreign) == 1 else f"{len(foreign)} files that are"
            raise F2MError(f"output {c.out} also holds {held} not part of a synthetic dataset "
                           f"(e.g. {foreign[0]}); refusing to overwrite it: move them or use another --out")
        _remove(fs, join(root, MANIFEST_NAME))  # first: a half-replaced dataset must not look finished
        fs.rm(root, recursive=True)
        fs.invalidate_cache()
        files = {}
    if files and c.resume:
        if RUN_NAME not in files:
            raise F2MError(f"cannot resume in {c.out}: no {RUN_NAME} there (not an f2m-ray synthetic run)")
        with fs.open(join(root, RUN_NAME), "r") as f:
            stored = json.load(f).get("fingerprint", {})
        wanted = run.fingerprint()
        if stored.get("schema_version") != wanted["schema_version"]:
            raise F2MError(f"cannot resume in {c.out}: it holds a run of schema version {stored.get('schema_version')} "
                           f"(this f2m-ray writes version {wanted['schema_version']}); finish it with the f2m-ray that "
                           f"started it, or start over with --overwrite")
        differ = [k for k in wanted if stored.get(k) != wanted[k]]
        if differ:
            what = ", ".join(f"{k} {stored.get(k)!r} there vs {wanted[k]!r} now" for k in differ)
            raise F2MError(f"cannot resume in {c.out}: it holds another run ({what})")
        _remove(fs, join(root, MANIFEST_NAME))
    expected = {s.path for s in run.shards}
    for name in files:  # leftovers of a killed local run (hidden temp files) are never data
        if name.rsplit("/", 1)[-1].startswith(".") and ".tmp-" in name:
            _remove(fs, join(root, name))
    record = {
        "fingerprint": run.fingerprint(),
        "arguments": _arguments(run),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_file(c.out, RUN_NAME, json.dumps(record, indent=2).encode())
    return {name: size for name, size in files.items() if name in expected and size > 0}


def finished_files(out: str) -> int | None:
    """Finished Parquet files of the run in `out` (None when the run wrote nothing there yet)."""
    fs, root, files = _list_files(out)
    if RUN_NAME not in files:
        return None
    return sum(1 for name in files if _dataset_file(name) and name.endswith(".parquet")
               and not name.rsplit("/", 1)[-1].startswith("."))


def _dataset_file(name: str) -> bool:
    """Whether a path under --out is one a synthetic run writes: its JSON files and card, the Parquet files
    (data/CATEGORY/part-*.parquet; CATEGORY/part-*.parquet in a version-2 dataset), temp files."""
    if name in (RUN_NAME, MANIFEST_NAME, CARD_NAME, CROISSANT_NAME):
        return True
    if name.startswith(".") and ".tmp-" in name:
        return True
    parts = name.split("/")
    if not (len(parts) == 3 and parts[0] == DATA_DIR) and len(parts) != 2:
        return False
    base = parts[-1]
    return (base.startswith("part-") and base.endswith(".parquet")) or (base.startswith(".") and ".tmp-" in base)


def _our_card(fs, root: str) -> bool:
    """Whether OUT/README.md is the dataset card a run wrote (not a user's own README)."""
    try:
        with fs.open(join(root, CARD_NAME), "r", encoding="utf-8") as f:
            return is_our_card(f.read())
    except (OSError, UnicodeDecodeError):
        return False


def _is_synthetic_run(fs, root: str, files: dict[str, int]) -> bool:
    """True when --out holds a _run.json or _manifest.json that f2m-ray wrote (checked by its format field)."""
    for name, key, expected in ((RUN_NAME, "fingerprint", RUN_FORMAT), (MANIFEST_NAME, None, MANIFEST_FORMAT)):
        if name not in files:
            continue
        try:
            with fs.open(join(root, name), "r") as f:
                content = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(content, dict):
            inner = content.get(key) if key else content
            if isinstance(inner, dict) and inner.get("format") == expected:
                return True
    return False


def _remove(fs, path: str) -> None:
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


def _arguments(run: ResolvedRun) -> dict[str, Any]:
    args = asdict(run.config)
    args["categories"] = [p.category.name for p in run.categories]
    args["model"] = run.checkpoint
    args["bank"] = run.bank_path
    args["judge"] = run.judge_path
    return args


def verify_finished(run: ResolvedRun, records: list[dict[str, Any]]) -> None:
    """A file kept by --resume must hold exactly its range, from this run's arguments."""
    import pyarrow.parquet as pq

    wanted = run.fingerprint()
    for record in records:
        path = join(run.config.out, record["path"])
        fs, inner = arrow_filesystem(path)
        try:
            with fs.open_input_file(inner) as f:
                parquet = pq.ParquetFile(f)
                rows = parquet.metadata.num_rows
                meta = read_json_metadata(parquet.schema_arrow, METADATA_KEY, path)
        except F2MError:
            raise
        except Exception as err:  # a truncated or foreign file
            raise F2MError(f"cannot resume: {path} is not a readable shard ({first_line(err)}); use --overwrite") from None
        if rows != record["rows"] or meta.get("run") != wanted or meta.get("sample_range") != [record["start"], record["stop"]]:
            raise F2MError(f"cannot resume: {path} does not hold samples {record['start']}..{record['stop'] - 1} of this run")
        record["guard"] = {k: int(meta.get("guard", {}).get(k, 0)) for k in GUARD_KEYS}


def write_manifest(run: ResolvedRun, files: list[dict[str, Any]], seconds: float) -> str:
    """The last file written: a reader treats a dataset without it as unfinished."""
    counts: dict[str, int] = {}
    for record in files:
        counts[record["category"]] = counts.get(record["category"], 0) + record["rows"]
    c = run.config
    guards = {
        "judge_id": run.judge_id,
        "min_label_confidence": c.min_label_confidence,
        "min_seed_distance": c.min_seed_distance,
        "max_attempts": c.max_attempts if run.guarded else 1,
        "total": guard_summary([r["guard"] for r in files]),
        "per_category": {
            name: guard_summary([r["guard"] for r in files if r["category"] == name]) for name in counts
        },
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "tool_version": __version__,
        "model_id": run.model_id,
        "bank_id": run.bank_id,
        "preset": run.preset.get("name"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "rows": sum(counts.values()),
        "counts": counts,
        "notes": list(run.notes),
        "provenance": run.provenance or {},
        "guards": guards,
        "arguments": _arguments(run),
        "fingerprint": run.fingerprint(),
        "files": files,
    }
    fs, root = filesystem(run.config.out)
    if not fs.exists(join(root, CARD_NAME)) or _our_card(fs, root):  # never over a user's own README.md
        _write_file(run.config.out, CARD_NAME, card_text(manifest, HF_FEATURES).encode())
    _write_file(run.config.out, CROISSANT_NAME, json.dumps(croissant(manifest), indent=2).encode())
    _write_file(run.config.out, MANIFEST_NAME, json.dumps(manifest, indent=2).encode())  # last: the dataset is finished
    return join(run.config.out, MANIFEST_NAME)


def guard_summary(counts: list[dict[str, int]]) -> dict[str, Any]:
    """Candidates, rejections and unmet masses summed over files, with the rejection rate."""
    total = {k: sum(int(c.get(k, 0)) for c in counts) for k in GUARD_KEYS}
    total["rejection_rate"] = round(total["rejected"] / total["candidates"], 6) if total["candidates"] else 0.0
    return total


def _write_file(out: str, name: str, data: bytes) -> None:
    """Write OUT/NAME whole or not at all (temp file + rename locally; one PUT on S3)."""
    import os
    import uuid

    try:
        if is_remote(out):
            fs, root = filesystem(out)
            fs.pipe_file(join(root, name), data)
            return
        os.makedirs(out, exist_ok=True)
        temporary = os.path.join(out, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, os.path.join(out, name))
    except PermissionError as err:
        raise F2MError(f"output {out}: writing refused ({first_line(err)})") from None
