"""Category synthesis (paper 3.4, Fig. 5) as a sharded Ray Data job into Parquet.

    shards (category, [start, stop))  --Ray Data, actor pool-->  OUT/CATEGORY/part-START-END.parquet
      per sample i:  plan (K seeds of C, weights on the step grid)  ->  mix (scheme)  ->  decode  ->  PNG

One Ray Data operator does all the work: each actor loads the generator and the bank
once, and for each shard it plans, mixes, decodes, encodes PNGs and writes the shard's
Parquet file itself. Images never travel through Ray's object store; only a small
record per file (and a progress record every few hundred rows) comes back to the
driver. Fusing the stages in one actor is what lets the pipeline keep up with a
plain single-process loop on a 2-core machine (benchmarks/synthesis_throughput.py).

Determinism: sample i's plan is ``mixing.plan_sample(run_seed, category.id, i, ...)``
over the category's bank rows sorted by roi_id; decoding runs in eval mode in
fixed-size batches aligned on absolute sample indices (the last one padded), so
seed ids, weights and image bytes depend only on (model, bank, category, mixing scheme,
run seed, i) and the decode batch size, never on the number of actors, blocks, retries or resumes.

Output safety: files are named by the sample range they hold and appear complete or
not at all (f2m_ray.schema.write_table), so a retried or resumed shard replaces or
skips its file instead of adding a duplicate. ``_run.json`` (the run's arguments) is
written first and ``_manifest.json`` last: a dataset without a manifest is unfinished.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np

from f2m_ray import __version__
from f2m_ray.dataset_card import CARD_NAME, card_text, is_our_card
from f2m_ray.errors import F2MError, first_line
from f2m_ray.bank import (
    SEED_SPLITS,
    ActorPlan,
    FeatureBank,
    default_bank_path,
    load_feature_bank,
    plan_actors,
    prepare_torch,
    worker_error,
    worker_runtime_env,
)
from f2m_ray.labels import Category, UnknownLabelError, parse_category
from f2m_ray.core.mixing import DEFAULT_SCHEME, mix_rows, scheme
from f2m_ray.pretrained import DEFAULT_OUT
from f2m_ray.schema import (
    HF_FEATURES,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SYNTHETIC_SCHEMA,
    image_column,
    png_bytes,
    synthetic_metadata,
    to_uint8,
    write_table,
)
from f2m_ray.storage import filesystem, is_remote, join, storage_options

RUN_NAME = "_run.json"  # the run's arguments, written first (resume checks them)
RUN_FORMAT = "f2m-ray-synthetic-run"
MANIFEST_FORMAT = "f2m-ray-synthetic"
ROW_GROUP_ROWS = 1000  # ~4 MB of PNGs per row group: readers can stream a file
PROGRESS_ROWS = 512  # actors report progress about this often (rounded to decode batches)
REPORT_SECONDS = 5.0  # the driver prints at most one progress line this often


@dataclass(frozen=True)
class SynthesisConfig:
    """What `f2m-ray synthesize` was asked to do."""

    categories: tuple[str, ...]  # category names (any accepted spelling) or ("all",)
    n: int  # masses per category
    out: str = DEFAULT_OUT  # output folder, local or s3://
    model: str | None = None  # checkpoint (dir or run folder) or "pretrained[:NAME]"; default: see resolve()
    bank: str | None = None  # feature bank; default: <checkpoint>/feature_bank.parquet
    storage: str | None = None  # where to look for the newest finished run (f2m_ray.pretrained.default_storage)
    mixing: str = DEFAULT_SCHEME  # mixing scheme (f2m_ray.core.mixing.SCHEMES)
    k: int | None = None  # seeds mixed per sample; default: the scheme's (paper 3.4: 20)
    step: float = 0.05  # weight grid (paper 3.4)
    alpha: float | None = None  # Dirichlet concentration; default: the scheme's (1 = uniform over grid compositions)
    seed: int = 0  # run seed
    rows_per_file: int = 10_000  # samples per Parquet file (the unit of work and of resume)
    batch_size: int = 64  # decode batch (fixed: part of what determines the bytes)
    seed_split: str = "all"  # seeds from "all" labeled ROIs or only the "train" split
    workers: int | None = None  # actor pool size; default one per GPU, else one per core
    resume: bool = False  # finish a run in `out`, skipping its finished files
    overwrite: bool = False  # replace an existing synthetic dataset in `out`
    judge: str | None = None  # judge (f2m-ray judge train) that scores label_confidence
    min_label_confidence: float | None = None  # guard: reject candidates the judge scores below this
    min_seed_distance: float | None = None  # guard: reject candidates this close (RMS pixels) to a seed
    max_attempts: int = 10  # candidates (sub-seeds) a sample tries before keeping its best one


@dataclass(frozen=True)
class Shard:
    """One output file: samples [start, stop) of one category."""

    category: str
    start: int
    stop: int
    path: str  # relative to the output folder

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class CategoryPlan:
    category: Category
    pool_size: int  # seeds available
    k_used: int  # seeds mixed per sample: min(k, pool_size)


@dataclass(frozen=True)
class ResolvedRun:
    """A validated run: paths, ids, categories and shards."""

    config: SynthesisConfig
    checkpoint: str
    bank_path: str
    model_id: str
    bank_id: str
    preset: dict[str, Any]
    categories: tuple[CategoryPlan, ...]
    shards: tuple[Shard, ...]
    notes: tuple[str, ...]  # things the user should know (fewer seeds than K, ...)
    judge_path: str | None = None
    judge_id: str | None = None
    model_source: str = "named by --model"  # how the model was chosen (printed with it)

    def fingerprint(self) -> dict[str, Any]:
        """Everything the output's bytes depend on: resume refuses a run that differs."""
        c = self.config
        return {
            "format": RUN_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "tool_version": __version__,
            "model_id": self.model_id,
            "bank_id": self.bank_id,
            "categories": [p.category.name for p in self.categories],
            "n": c.n,
            "mixing": c.mixing,
            "k": c.k,
            "step": c.step,
            "alpha": c.alpha,
            "seed": c.seed,
            "rows_per_file": c.rows_per_file,
            "batch_size": c.batch_size,
            "seed_split": c.seed_split,
            "judge_id": self.judge_id,
            "min_label_confidence": c.min_label_confidence,
            "min_seed_distance": c.min_seed_distance,
            "max_attempts": c.max_attempts if self.guarded else None,
        }

    @property
    def guarded(self) -> bool:
        """True when a guard can reject candidates."""
        return self.config.min_label_confidence is not None or self.config.min_seed_distance is not None

    def describe(self) -> list[str]:
        c = self.config
        lines = [
            f"model       {self.checkpoint}  (id {self.model_id}, preset {self.preset.get('name')}; {self.model_source})",
            f"bank        {self.bank_path}  (id {self.bank_id}, seeds from {c.seed_split} ROIs)",
            f"out         {c.out}",
            f"mixing      {c.mixing}: {scheme(c.mixing).summary}",
            f"per sample  K={c.k} seeds, weights on a {c.step:g} grid, alpha {c.alpha:g}, run seed {c.seed}",
            f"files       {len(self.shards)} of up to {c.rows_per_file} rows; decode batch {c.batch_size}",
        ]
        if self.judge_path:
            lines.append(f"judge       {self.judge_path}  (id {self.judge_id}): scores label_confidence")
        guards = [f"label confidence >= {c.min_label_confidence:g}"] if c.min_label_confidence is not None else []
        if c.min_seed_distance is not None:
            guards.append(f"RMS pixel distance to the nearest real ROI of the seed split >= {c.min_seed_distance:g}")
        if guards:
            lines.append(f"guards      {' and '.join(guards)}; up to {c.max_attempts} candidates per mass")
        for p in self.categories:
            lines.append(f"category    {p.category.name}: {c.n} masses from {p.pool_size} seeds (K used {p.k_used})")
        lines += [f"note        {n}" for n in self.notes]
        return lines


@dataclass(frozen=True)
class SynthesisSummary:
    out: str
    rows: int  # rows in the finished dataset
    files: int  # files in the finished dataset
    written_rows: int  # rows written by this run (the rest were already there)
    written_files: int
    seconds: float
    manifest: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    guards: dict[str, Any] | None = None  # totals of the manifest's guards section, when a guard was set

    @property
    def masses_per_second(self) -> float:
        return self.written_rows / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------- validation


def with_scheme_defaults(c: SynthesisConfig) -> SynthesisConfig:
    """The config with K and alpha filled in from its mixing scheme where not given."""
    s = scheme(c.mixing)
    return replace(c, k=s.k if c.k is None else c.k, alpha=s.alpha if c.alpha is None else c.alpha)


def _check_numbers(c: SynthesisConfig) -> None:
    if c.n <= 0:
        raise F2MError(f"--n must be a positive number of masses per category, got {c.n}")
    if c.k < 2:
        raise F2MError(f"--k must be at least 2 (K seeds are mixed per sample), got {c.k}")
    if c.alpha <= 0:
        raise F2MError(f"--alpha must be > 0, got {c.alpha}")
    if c.seed < 0:
        raise F2MError(f"--seed must be >= 0, got {c.seed}")
    if c.rows_per_file <= 0:
        raise F2MError(f"--rows-per-file must be positive, got {c.rows_per_file}")
    if c.batch_size <= 0:
        raise F2MError(f"--batch-size must be positive, got {c.batch_size}")
    if c.workers is not None and c.workers <= 0:
        raise F2MError(f"--workers must be positive, got {c.workers}")
    if c.seed_split not in SEED_SPLITS:
        raise F2MError(f"unknown seed split {c.seed_split!r}; valid: {', '.join(SEED_SPLITS)}")
    if c.resume and c.overwrite:
        raise F2MError("--resume and --overwrite exclude each other")
    if not c.categories:
        raise F2MError("name at least one --category (or 'all')")
    if c.max_attempts < 1:
        raise F2MError(f"--max-attempts must be at least 1, got {c.max_attempts}")
    if c.min_label_confidence is not None:
        if not 0 < c.min_label_confidence <= 1:
            raise F2MError(f"--min-label-confidence is a probability in (0, 1], got {c.min_label_confidence}")
        if not c.judge:
            raise F2MError("--min-label-confidence needs a judge to score the masses: add --judge JUDGE")
    if c.min_seed_distance is not None and not c.min_seed_distance > 0:
        raise F2MError(f"--min-seed-distance must be > 0 (RMS pixel distance, images in [-1, 1]), got {c.min_seed_distance}")
    from f2m_ray.core.mixing import grid_units

    grid_units(c.step)


def quick_s3(path: str):
    """An s3fs filesystem for `path` that fails fast (one attempt, short timeouts)."""
    import s3fs

    options = storage_options(path)
    options["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 1}}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.retries = 1
    return fs


def probe_storage(path: str, what: str) -> None:
    """Fail early, in one line, when an s3:// path is unreachable or refused."""
    if not str(path).startswith("s3://"):
        return
    fs = quick_s3(path)
    bucket = path[len("s3://"):].split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)  # one request, whatever the bucket holds
    except FileNotFoundError:
        raise F2MError(f"{what} {path}: bucket {bucket!r} does not exist") from None
    except PermissionError as err:
        raise F2MError(f"{what} {path}: S3 refused access ({first_line(err)}); check the credentials") from None
    except Exception as err:  # botocore's connection errors are not OSErrors
        from f2m_ray.storage import s3_endpoint

        endpoint = s3_endpoint() or "the default AWS endpoint"
        raise F2MError(f"{what} {path}: cannot reach S3 at {endpoint} ({first_line(err)})") from None


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers may run elsewhere); URLs unchanged."""
    import os

    return path if is_remote(path) else os.path.abspath(path)


def _categories(names: tuple[str, ...], bank: FeatureBank, seed_split: str, notes: list[str]) -> list[Category]:
    chosen: list[Category] = []
    for name in names:
        if str(name).strip().lower() == "all":
            from f2m_ray.labels import all_categories

            found = [c for c in all_categories() if len(bank.pool(c, seed_split)) >= 2]
            single = [c.name for c in all_categories() if len(bank.pool(c, seed_split)) == 1]
            if single:
                notes.append(f"'all' skips {', '.join(single)}: a single seed cannot be mixed")
            if not found:
                raise F2MError(f"the bank {bank.path} has no category with 2 or more seeds")
        else:
            try:
                found = [parse_category(name)]
            except UnknownLabelError as err:
                raise F2MError(f"{err}; or 'all' for every category in the bank") from None
        chosen.extend(c for c in found if c not in chosen)
    return chosen


def shard_name(category: str, start: int, stop: int, n: int) -> str:
    """``CATEGORY/part-000000-009999.parquet``: the inclusive sample range, zero-padded."""
    width = max(6, len(str(n - 1)))
    return f"{category}/part-{start:0{width}d}-{stop - 1:0{width}d}.parquet"


def resolve(config: SynthesisConfig) -> ResolvedRun:
    """Validate a run without starting Ray: paths, model, bank, categories, shards."""
    from f2m_ray.checkpoint import find_checkpoint, read_metadata

    from f2m_ray.pretrained import default_model, named_model

    c = config = with_scheme_defaults(config)
    _check_numbers(c)
    model, model_source = (named_model(c.model), "named by --model") if c.model else (None, "named by the bank")
    for path, what in ((c.out, "output"), (model, "model"), (c.bank, "feature bank"), (c.judge, "judge")):
        if path:
            probe_storage(path, what)
    if not model and not c.bank:
        choice = default_model(c.storage)  # the newest finished run, else the shipped model
        model, model_source = choice.checkpoint, choice.why
    checkpoint = absolute(find_checkpoint(model)) if model else None
    bank_path = absolute(c.bank or default_bank_path(checkpoint))
    bank = load_feature_bank(bank_path)
    if checkpoint is None:
        checkpoint = bank.metadata.get("checkpoint")
        if not checkpoint:
            raise F2MError(f"the bank {bank_path} does not name its checkpoint; pass --model CKPT")
        checkpoint = named_model(checkpoint)
        probe_storage(checkpoint, "model")
        checkpoint = absolute(find_checkpoint(checkpoint))
    meta = read_metadata(checkpoint)
    if meta.get("vocabulary") != bank.vocabulary:
        raise F2MError(f"the model {checkpoint} and the bank {bank_path} use different BI-RADS vocabularies")
    if meta["model_id"] != bank.model_id:
        raise F2MError(
            f"the bank {bank_path} was encoded by model {bank.model_id}, not by {checkpoint} "
            f"(model {meta['model_id']}); run `f2m-ray encode --model {checkpoint}`"
        )
    feature_dim = int(meta["preset"]["model"]["feature_dim"])
    if bank.feature_dim != feature_dim:
        raise F2MError(f"the bank has {bank.feature_dim}-d features, the model expects {feature_dim}-d")
    judge_path = judge_id = None
    if c.judge:
        from f2m_ray.evaluation.judge import read_judge_metadata

        judge_path = absolute(c.judge)
        judge_meta = read_judge_metadata(judge_path)  # format and vocabulary checked
        judge_size = int(judge_meta.get("config", {}).get("image_size", 64))
        model_size = int(meta["preset"]["model"]["image_size"])
        if judge_size != model_size:
            raise F2MError(f"the judge {c.judge} reads {judge_size}x{judge_size} images, the model makes {model_size}x{model_size}")
        judge_id = str(judge_meta.get("judge_id", ""))
    plans: list[CategoryPlan] = []
    notes: list[str] = []
    for category in _categories(c.categories, bank, c.seed_split, notes):
        pool = len(bank.pool(category, c.seed_split))
        where = "" if c.seed_split == "all" else " in the training split"
        if pool < 2:
            raise F2MError(
                f"category {category.name} has {pool} seed(s){where} in the bank {bank_path}; "
                f"mixing needs at least 2 (bank categories: {', '.join(f'{k} ({v})' for k, v in bank.counts().items())})"
            )
        plans.append(CategoryPlan(category, pool, min(c.k, pool)))
    few = [p for p in plans if p.pool_size < c.k]
    where = "" if c.seed_split == "all" else " in the training split"
    if 0 < len(few) <= 3:
        notes += [f"{p.category.name} has only {p.pool_size} seeds{where}, fewer than K={c.k}: "
                  f"each sample mixes all {p.pool_size}" for p in few]
    elif few:
        sizes = sorted(p.pool_size for p in few)
        notes.append(f"{len(few)} categories have fewer seeds{where} than K={c.k} ({sizes[0]} to {sizes[-1]}): "
                     f"their samples mix all seeds they have")
    shards = tuple(
        Shard(p.category.name, start, min(start + c.rows_per_file, c.n), shard_name(p.category.name, start, min(start + c.rows_per_file, c.n), c.n))
        for p in plans
        for start in range(0, c.n, c.rows_per_file)
    )
    return ResolvedRun(
        config=c,
        checkpoint=checkpoint,
        bank_path=bank_path,
        model_id=str(meta["model_id"]),
        bank_id=bank.bank_id,
        preset=meta["preset"],
        categories=tuple(plans),
        shards=shards,
        notes=tuple(notes),
        judge_path=judge_path,
        judge_id=judge_id,
        model_source=model_source,
    )


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
    ours = {RUN_NAME, MANIFEST_NAME}
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
            raise F2MError(f"output {c.out} also holds {len(foreign)} files that are not part of a synthetic dataset "
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


def _dataset_file(name: str) -> bool:
    """Whether a path under --out is one a synthetic run writes: its JSON files and card, CATEGORY/part-*.parquet, temp files."""
    if name in (RUN_NAME, MANIFEST_NAME, CARD_NAME):
        return True
    parts = name.split("/")
    if len(parts) != 2:
        return False
    base = parts[1]
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


# ---------------------------------------------------------------- the actor


class ShardSynthesizer:
    """Ray Data actor: loads the model and bank once; turns a shard into a Parquet file."""

    def __init__(self, spec: dict[str, Any]):
        from f2m_ray.checkpoint import load_generator

        self.spec = spec
        prepare_torch(spec["torch_threads"], spec["device"])
        self.device = spec["device"]
        self.generator, meta = load_generator(spec["checkpoint"], self.device)
        if meta["model_id"] != spec["model_id"]:
            raise F2MError(f"the checkpoint {spec['checkpoint']} changed during the run")
        self.bank = load_feature_bank(spec["bank"], with_images=True)
        if self.bank.bank_id != spec["bank_id"]:
            raise F2MError(f"the feature bank {spec['bank']} changed during the run")
        self.judge = None
        if spec.get("judge"):
            from f2m_ray.evaluation.judge import load_judge

            loaded = load_judge(spec["judge"])
            if loaded.judge_id != spec["judge_id"]:
                raise F2MError(f"the judge {spec['judge']} changed during the run")
            self.judge = loaded.model.to(self.device).eval()
        self.pools: dict[str, np.ndarray] = {}  # category -> bank rows of its seeds, roi_id order
        self.centroids: dict[str, np.ndarray | None] = {}  # category -> mean seed feature (variance-preserving)
        variance_preserving = scheme(spec["mixing"]).variance_preserving
        for name in spec["categories"]:
            pool = self.pools[name] = self.bank.pool(parse_category(name), spec["seed_split"])
            self.centroids[name] = pool_centroid(self.bank.features, pool) if variance_preserving else None
        # nearest_seed_distance: to every real ROI of the seed split, of any category (a mass may
        # come closest to a patient's ROI of another category), as evaluate's memorization measures.
        self.seed_pixels = SeedPixels.of(self.bank, self.bank.seed_rows(spec["seed_split"]))
        self.metadata_base = {
            "tool_version": __version__,
            "model_id": spec["model_id"],
            "bank_id": spec["bank_id"],
            "model_config": spec["preset"],
            "run": spec["fingerprint"],
        }

    def __call__(self, batch: dict[str, np.ndarray]):
        for category, start, stop, path in zip(batch["category"], batch["start"], batch["stop"], batch["path"]):
            yield from self.synthesize_shard(str(category), int(start), int(stop), str(path))

    def synthesize_shard(self, category_name: str, start: int, stop: int, relative_path: str):
        """Yield progress records, then one record naming the written file."""
        spec = self.spec
        category = parse_category(category_name)
        pool = self.pools[category_name]
        batch_size = spec["batch_size"]
        columns: dict[str, list] = {k: [] for k in COLUMNS}
        reported = 0
        begin = start
        while begin < stop:
            end = min(stop, (begin // batch_size + 1) * batch_size)  # decode batches aligned on absolute indices
            self._decode_batch(category, pool, begin, end, columns)
            begin = end
            if begin - start - reported >= PROGRESS_ROWS and begin < stop:
                yield _record(category_name, start, stop, begin - start - reported)
                reported = begin - start
        guard = guard_counts(columns)
        table = self._table(category, start, stop, columns, guard)
        size = write_table(table, join(spec["out"], relative_path), row_group_size=ROW_GROUP_ROWS)
        yield _record(category_name, start, stop, stop - start - reported, relative_path, size, guard)

    def _decode_batch(self, category: Category, pool: np.ndarray, begin: int, end: int, columns: dict[str, list]) -> None:
        """Samples [begin, end): candidate 0 for each, then further sub-seeds for those a guard rejects."""
        spec = self.spec
        n = end - begin
        best = self._candidates(category, pool, np.arange(begin, end), 0)
        shortfall = self._shortfall(best)  # (n,), 0 = every guard passed
        attempt = np.zeros(n, dtype=np.int32)
        tried = np.ones(n, dtype=np.int32)
        for a in range(1, spec.get("max_attempts", 1)):
            pending = np.flatnonzero(shortfall > 0)
            if len(pending) == 0:
                break
            candidate = self._candidates(category, pool, begin + pending, a)
            gap = self._shortfall(candidate)
            tried[pending] += 1
            better = gap < shortfall[pending]  # the first candidate wins ties: a pure function of i
            for key, values in candidate.items():
                best[key][pending[better]] = values[better]
            shortfall[pending[better]] = gap[better]
            attempt[pending[better]] = a
        columns["png"].extend(png_bytes(p) for p in best["pixels"])
        for rows, weights in zip(best["rows"], best["weights"]):  # only the seeds that carry weight
            carried = weights > 0
            columns["seed_ids"].append(self.bank.roi_id[rows[carried]].tolist())
            columns["weights"].append(weights[carried].tolist())
        columns["distance"].extend(best["distance"].tolist())
        columns["confidence"].extend(best["confidence"].tolist())
        columns["attempt"].extend(attempt.tolist())
        columns["passed"].extend((shortfall == 0).tolist())
        columns["tried"].extend(tried.tolist())

    def _candidates(self, category: Category, pool: np.ndarray, indices: np.ndarray, attempt: int) -> dict[str, np.ndarray]:
        """Plan, mix, decode and score candidate `attempt` of samples `indices` (at most one decode batch)."""
        import torch

        from f2m_ray.core.mixing import plan_sample
        from f2m_ray.data.readers import to_model_range

        spec = self.spec
        b = len(indices)
        plans = [
            plan_sample(spec["seed"], category.id, int(index), len(pool), spec["k"], spec["step"], spec["alpha"], attempt)
            for index in indices
        ]
        rows = np.stack([pool[p.seed_positions] for p in plans])  # (b, K) bank rows
        weights = np.stack([p.weights for p in plans])  # (b, K), each row on the grid, sum 1
        # Always a full decode batch (zero-padded): a sample's bytes must not depend on its batch-mates.
        mixed = np.zeros((spec["batch_size"], self.bank.feature_dim), dtype=np.float32)  # (B, D)
        mixed[:b] = mix_rows(self.bank.features[rows], weights, self.centroids[category.name], len(pool))
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
            images = self.generator.decode(torch.from_numpy(mixed).to(self.device))  # (B, 1, 64, 64)
        pixels = to_uint8(images.float().cpu().numpy()[:, 0])  # (B, 64, 64) uint8, as stored
        confidence = np.full(b, np.nan, dtype=np.float32)
        if self.judge is not None:  # scores the stored 8-bit image, as a reader of the PNG gets it
            confidence = self._label_confidence(to_model_range(pixels), category)[:b]
        return {
            "rows": rows,
            "weights": weights,
            "pixels": pixels[:b],
            "distance": self.seed_pixels.nearest(pixels[:b]),
            "confidence": confidence,
        }

    def _label_confidence(self, images: np.ndarray, category: Category) -> np.ndarray:
        """p(margin | x) * p(shape | x) from the judge for a full (B, 64, 64) batch."""
        import torch

        with torch.inference_mode():
            h = self.judge.features(torch.from_numpy(images).to(self.device))
            margin = torch.softmax(self.judge.margin_head(h).float(), dim=1)[:, category.margin_id]
            shape = torch.softmax(self.judge.shape_head(h).float(), dim=1)[:, category.shape_id]
        return (margin * shape).cpu().numpy().astype(np.float32)

    def _shortfall(self, candidate: dict[str, np.ndarray]) -> np.ndarray:
        """How far each candidate falls short of the guards, each in its own relative units; 0 = accepted."""
        spec = self.spec
        gap = np.zeros(len(candidate["rows"]), dtype=np.float64)
        if spec.get("min_label_confidence") is not None:
            p = float(spec["min_label_confidence"])
            gap += np.maximum(0.0, p - candidate["confidence"].astype(np.float64)) / p
        if spec.get("min_seed_distance") is not None:
            d = float(spec["min_seed_distance"])
            gap += np.maximum(0.0, d - candidate["distance"].astype(np.float64)) / d
        return gap

    def _table(self, category: Category, start: int, stop: int, columns: dict[str, list], guard: dict[str, int]):
        import pyarrow as pa

        spec = self.spec
        n = stop - start
        ids = [f"{category.name}-{i:09d}" for i in range(start, stop)]
        distance = np.asarray(columns["distance"], dtype=np.float32)
        confidence = np.asarray(columns["confidence"], dtype=np.float32)
        metadata = synthetic_metadata(
            {**self.metadata_base, "category": category.name, "sample_range": [start, stop], "guard": guard}
        )
        schema = SYNTHETIC_SCHEMA.with_metadata(metadata)
        return pa.Table.from_arrays(
            [
                pa.array(ids, pa.string()),
                pa.array(np.arange(start, stop, dtype=np.int64)),
                image_column(columns["png"], [f"{i}.png" for i in ids]),
                pa.array(np.full(n, 64, dtype=np.int32)),
                pa.array(np.full(n, 64, dtype=np.int32)),
                pa.array([category.margin] * n, pa.string()),
                pa.array([category.shape] * n, pa.string()),
                pa.array([category.name] * n, pa.string()),
                pa.array(np.full(n, category.margin_id, dtype=np.int64)),
                pa.array(np.full(n, category.shape_id, dtype=np.int64)),
                pa.array(columns["seed_ids"], pa.list_(pa.string())),
                pa.array(columns["weights"], pa.list_(pa.float64())),
                pa.array([spec["model_id"]] * n, pa.string()),
                pa.array([spec["bank_id"]] * n, pa.string()),
                pa.array(np.full(n, spec["seed"], dtype=np.int64)),
                pa.array(confidence, pa.float32(), mask=np.isnan(confidence)),
                pa.array(distance, pa.float32()),
                pa.array(np.asarray(columns["attempt"], dtype=np.int32)),
                pa.array(np.asarray(columns["passed"], dtype=bool)),
            ],
            schema=schema,
        )


def pool_centroid(features: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """The category centroid of the variance-preserving mix: mean seed feature, (D,) float64.

    A fixed-order float64 sum over the pool (roi_id order), the same in every actor.
    """
    return np.add.reduce(features[pool].astype(np.float64), axis=0) / len(pool)


@dataclass(frozen=True)
class SeedPixels:
    """The seed split's real images (8-bit, every category), for the RMS pixel distance to the nearest one.

    Pixels are whole numbers 0..255 held in float64, so every dot product below is an exact
    integer (4096 * 255**2 is far below 2**53) whatever the summation order: the distance, and
    with it a guard's verdict, is the same on any machine, thread count or batch. The product
    runs in torch, on the actor's torch threads: numpy's BLAS would start a second thread pool
    whose idle spinning slows the decoder down by a fifth on 2 cores.
    """

    seeds_t: Any  # torch (H*W, T) float64, whole numbers 0..255
    norms: Any  # torch (T,) squared L2 norms (exact)

    @classmethod
    def of(cls, bank: FeatureBank, rows: np.ndarray) -> "SeedPixels":
        import torch

        from f2m_ray.schema import decode_png

        images = np.stack([decode_png(bank.images[r]) for r in rows]).reshape(len(rows), -1).astype(np.float64)
        seeds = torch.from_numpy(images)
        return cls(seeds.T.contiguous(), (seeds * seeds).sum(dim=1))

    def nearest(self, pixels: np.ndarray) -> np.ndarray:
        """(b, H, W) uint8 images -> (b,) float32 RMS difference to the nearest seed-split ROI, in [-1, 1] units.

        The same measure as `metrics.nearest_rms_pixel_distances` on images in f2m-ray's
        [-1, 1] range (0 for an exact copy). The seed split is never empty (`resolve` refuses that).
        """
        import torch

        b = len(pixels)
        x = torch.from_numpy(pixels.reshape(b, -1).astype(np.float64))
        squared = (x * x).sum(dim=1)[:, None] - 2.0 * (x @ self.seeds_t) + self.norms[None, :]  # exact integers
        nearest = squared.min(dim=1).values.clamp(min=0.0).numpy()
        return (np.sqrt(nearest / x.shape[1]) / 127.5).astype(np.float32)  # 8-bit -> [-1, 1] units


GUARD_KEYS = ("candidates", "rejected", "unmet")
COLUMNS = ("png", "seed_ids", "weights", "distance", "confidence", "attempt", "passed", "tried")


def guard_counts(columns: dict[str, list]) -> dict[str, int]:
    """Per-file guard statistics: candidates tried, rejected, and masses that passed no candidate."""
    samples = len(columns["attempt"])
    candidates = int(sum(columns["tried"]))
    return {
        "samples": samples,
        "candidates": candidates,
        "rejected": candidates - int(sum(columns["passed"])),  # every candidate not kept as passing
        "unmet": int(samples - sum(columns["passed"])),
    }


def _record(category: str, start: int, stop: int, rows: int, path: str = "", size: int = 0,
            guard: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    guard = guard or {}
    return {
        "candidates": np.array([guard.get("candidates", 0)], dtype=np.int64),
        "rejected": np.array([guard.get("rejected", 0)], dtype=np.int64),
        "unmet": np.array([guard.get("unmet", 0)], dtype=np.int64),
        "category": np.array([category]),
        "start": np.array([start], dtype=np.int64),
        "stop": np.array([stop], dtype=np.int64),
        "rows": np.array([rows], dtype=np.int64),
        "path": np.array([path]),
        "bytes": np.array([size], dtype=np.int64),
    }


# ---------------------------------------------------------------- the driver


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _Progress:
    """Collects the actors' records: finished files, rows done, throttled progress lines."""

    def __init__(self, run: ResolvedRun, files: dict[str, dict[str, Any]], report, on_file):
        self.run, self.files, self.report, self.on_file = run, files, report, on_file
        self.total = sum(s.rows for s in run.shards)
        self.done_before = sum(r["rows"] for r in files.values())
        self.new_rows = 0
        self.start = time.perf_counter()
        self.last_report = self.start

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for i in range(len(batch["rows"])):
            self.new_rows += int(batch["rows"][i])
            path = str(batch["path"][i])
            if path:
                start, stop = int(batch["start"][i]), int(batch["stop"][i])
                record = {"path": path, "category": str(batch["category"][i]), "start": start, "stop": stop,
                          "rows": stop - start, "bytes": int(batch["bytes"][i]),
                          "guard": {k: int(batch[k][i]) for k in GUARD_KEYS}}
                self.files[path] = record
                if self.on_file:
                    self.on_file(record)
        now = time.perf_counter()
        if now - self.last_report >= REPORT_SECONDS:
            self.last_report = now
            self.report(self.line(now - self.start))

    def line(self, seconds: float) -> str:
        rows = min(self.total, self.done_before + self.new_rows)
        rate = self.new_rows / seconds if seconds > 0 else 0.0
        eta = (self.total - rows) / rate if rate > 0 else math.inf
        return (
            f"{rows}/{self.total} masses ({100 * rows / self.total:.0f}%), {len(self.files)}/{len(self.run.shards)} "
            f"files, {rate:.0f} masses/s, eta {_duration(eta) if math.isfinite(eta) else '?'}"
        )


def actor_spec(run: ResolvedRun, actors: ActorPlan) -> dict[str, Any]:
    """Everything a ShardSynthesizer needs, as plain data (it travels to Ray workers)."""
    c = run.config
    return {
        "checkpoint": run.checkpoint,
        "bank": run.bank_path,
        "model_id": run.model_id,
        "bank_id": run.bank_id,
        "preset": run.preset,
        "fingerprint": run.fingerprint(),
        "categories": [p.category.name for p in run.categories],
        "out": absolute(c.out),  # actors may run in another working directory
        "seed": c.seed,
        "mixing": c.mixing,
        "k": c.k,
        "step": c.step,
        "alpha": c.alpha,
        "batch_size": c.batch_size,
        "seed_split": c.seed_split,
        "torch_threads": actors.torch_threads,
        "device": actors.device,
        "judge": run.judge_path,
        "judge_id": run.judge_id,
        "min_label_confidence": c.min_label_confidence,
        "min_seed_distance": c.min_seed_distance,
        "max_attempts": c.max_attempts if run.guarded else 1,
    }


RAY_DATA_SETTINGS = {
    "enable_progress_bars": False,  # our own progress lines instead (one per REPORT_SECONDS)
    "print_on_execution_start": False,
    # Every record an actor yields becomes its own (tiny) block, so that progress within a
    # shard reaches the driver while the shard runs instead of when it ends.
    "target_max_block_size": 1,
}


class _DropRecords:
    """A logging filter: drops INFO chatter, and warnings that only echo our own settings."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 and "Progress bars disabled" not in record.getMessage()


def _quiet_ray_data() -> None:
    """Ray Data's per-dataset banners would interleave with our progress lines.

    Ray Data re-applies its logging config for every dataset, so levels set on its
    loggers do not last; a filter on the two loggers that print the banners does.
    """
    import logging

    for name in ("ray.data._internal.execution.streaming_executor", "ray.data._internal.progress"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) for f in log.filters):
            log.addFilter(_DropRecords())


def _run_on_ray(run: ResolvedRun, todo: list[Shard], progress: _Progress) -> None:
    """The shards through one Ray Data operator: an actor pool of ShardSynthesizers."""
    import ray

    from f2m_ray.runtime.cluster import ensure_ray

    ensure_ray()
    _quiet_ray_data()
    actors = plan_actors(len(todo), run.config.workers)
    progress.report(
        f"synthesizing {sum(s.rows for s in todo)} masses in {len(todo)} files with {actors.actors} actor(s) x "
        f"{actors.torch_threads} torch thread(s) on {actors.device}"
        + (f"; {len(progress.files)} files already done" if progress.files else "")
    )
    # A dataset copies the current DataContext when it is made: change it for ours only.
    context = ray.data.DataContext.get_current()
    saved = {name: getattr(context, name) for name in RAY_DATA_SETTINGS}
    for name, value in RAY_DATA_SETTINGS.items():
        setattr(context, name, value)
    try:
        shards = ray.data.from_items(
            [{"category": s.category, "start": s.start, "stop": s.stop, "path": s.path} for s in todo],
            override_num_blocks=len(todo),  # one shard per block: any actor can take any shard
        )
    finally:
        for name, value in saved.items():
            setattr(context, name, value)
    results = shards.map_batches(
        ShardSynthesizer,
        fn_constructor_kwargs={"spec": actor_spec(run, actors)},
        batch_size=1,
        # One shard in flight per actor: a queued shard would wait behind a busy actor while another idles.
        compute=ray.data.ActorPoolStrategy(size=actors.actors, max_tasks_in_flight_per_actor=1),
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus,
        runtime_env=worker_runtime_env(),
    )
    try:
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            progress.add(batch)
    except (F2MError, KeyboardInterrupt):
        raise
    except Exception as err:  # Ray wraps what failed in an actor
        raise F2MError(
            f"synthesis failed: {worker_error(err)}; {len(progress.files)} finished files are kept, "
            f"run again with --resume once fixed"
        ) from None


def _run_in_process(run: ResolvedRun, todo: list[Shard], progress: _Progress) -> None:
    """The same work in this process, shard after shard (small runs, tests, benchmarks)."""
    import torch

    from f2m_ray.bank import local_cores

    gpu = torch.cuda.is_available()
    actors = ActorPlan(actors=1, torch_threads=local_cores(), num_cpus=0, num_gpus=1 if gpu else 0)
    progress.report(
        f"synthesizing {sum(s.rows for s in todo)} masses in {len(todo)} files in this process on {actors.device}"
    )
    synthesizer = ShardSynthesizer(actor_spec(run, actors))
    for shard in todo:
        for record in synthesizer.synthesize_shard(shard.category, shard.start, shard.stop, shard.path):
            progress.add(record)


def synthesize(
    config: SynthesisConfig,
    report: Callable[[str], None] | None = _stderr,
    on_file: Callable[[dict[str, Any]], None] | None = None,
    use_ray: bool = True,
) -> SynthesisSummary:
    """Run the synthesis; `report` gets human progress lines, `on_file` each finished file.

    ``use_ray=False`` runs the same actor code in this process, one shard after another.
    """
    report = report or (lambda line: None)
    run = resolve(config)
    finished = prepare_output(run)
    report(f"model: {run.checkpoint} (id {run.model_id}; {run.model_source})")
    for note in run.notes:
        report(f"note: {note}")
    files = {
        s.path: {"path": s.path, "category": s.category, "start": s.start, "stop": s.stop, "rows": s.rows,
                 "bytes": finished[s.path]}
        for s in run.shards
        if s.path in finished
    }
    if files:
        _verify_finished(run, list(files.values()))  # and reads their guard counts
    todo = [s for s in run.shards if s.path not in finished]
    progress = _Progress(run, files, report, on_file)
    if todo:
        (_run_on_ray if use_ray else _run_in_process)(run, todo, progress)
    seconds = time.perf_counter() - progress.start
    missing = [s.path for s in run.shards if s.path not in files]
    if missing:
        raise F2MError(f"{len(missing)} files were not written (e.g. {missing[0]}); run again with --resume")
    manifest = write_manifest(run, [files[s.path] for s in run.shards], seconds)
    guards = guard_summary([files[s.path]["guard"] for s in run.shards]) if run.guarded else None
    return SynthesisSummary(
        out=config.out,
        rows=progress.total,
        files=len(run.shards),
        written_rows=sum(s.rows for s in todo),
        written_files=len(todo),
        seconds=seconds,
        manifest=manifest,
        notes=run.notes,
        guards=guards,
    )


def _verify_finished(run: ResolvedRun, records: list[dict[str, Any]]) -> None:
    """A file kept by --resume must hold exactly its range, from this run's arguments."""
    import pyarrow.parquet as pq

    from f2m_ray.schema import METADATA_KEY, read_json_metadata
    from f2m_ray.storage import arrow_filesystem

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
        "guards": guards,
        "arguments": _arguments(run),
        "fingerprint": run.fingerprint(),
        "files": files,
    }
    fs, root = filesystem(run.config.out)
    if not fs.exists(join(root, CARD_NAME)) or _our_card(fs, root):  # never over a user's own README.md
        _write_file(run.config.out, CARD_NAME, card_text(manifest, HF_FEATURES).encode())
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
