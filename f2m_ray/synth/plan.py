"""What a synthesis run is, validated before any work: `SynthesisConfig` (the command's options) ->
`resolve` -> `ResolvedRun` (model, bank, categories, shards, and the fingerprint its bytes depend on).

No Ray here: `--dry-run` and every check that needs no cluster run from this module.
"""


from __future__ import annotations

import math

from dataclasses import dataclass, field, replace
from typing import Any


from f2m_ray import __version__
from f2m_ray.errors import F2MError
from f2m_ray.bank import SEED_SPLITS, FeatureBank, default_bank_path, load_feature_bank
from f2m_ray.labels import Category, all_categories, parse_categories
from f2m_ray.core.mixing import DEFAULT_SCHEME, Scheme, grid_units, scheme
from f2m_ray.pretrained import DEFAULT_OUT, named_model
from f2m_ray.schema import DATA_DIR, SCHEMA_VERSION
from f2m_ray.storage import is_remote, probe_storage
from f2m_ray.checkpoint import ResolvedModel, load_generator, resolve_model
from f2m_ray.model_choice import default_model
from f2m_ray.judge_model import load_judge


RUN_NAME = "_run.json"  # the run's arguments, written first (resume checks them)
RUN_FORMAT = "f2m-ray-synthetic-run"
MANIFEST_FORMAT = "f2m-ray-synthetic"

PRECISIONS = ("auto", "fp32", "bf16")
EXECUTORS = ("auto", "ray", "in-process")
MAX_MASSES = 10**9  # per category and run: 100,000 files of 10,000 rows

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
    precision: str = "auto"  # decode precision: "fp32", "bf16" (autocast), or "auto" = bf16 on GPU, fp32 on CPU
    workers: int | None = None  # actor pool size; default one per GPU, else one per core
    # Where the shards run: "ray" (a Ray Data actor pool), "in-process" (the same actor code in this
    # process), or "auto": in this process when the work is shorter than starting Ray would take
    # (f2m_ray.synth.driver.choose_executor). The bytes are the same either way.
    executor: str = "auto"
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
    model: ResolvedModel  # found and checked once, on the driver
    scheme: Scheme
    out_dir: str  # config.out, absolute (resolved on the driver: actors run in other folders)
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
    provenance: dict[str, Any] | None = None  # what data the model and the bank's seeds came from (card, Croissant)

    @property
    def checkpoint(self) -> str:
        return self.model.path

    @property
    def attempts(self) -> int:
        """Candidates a sample may try: max_attempts under a guard, else 1."""
        return self.config.max_attempts if self.guarded else 1

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
            # Only when chosen: a default run's fingerprint (and --resume of older runs) stays as it was.
            **({"precision": c.precision} if c.precision != "auto" else {}),
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
            f"precision   {c.precision}" + (" (bf16 on GPU, fp32 on CPU)" if c.precision == "auto" else ""),
            f"files       {len(self.shards)} of up to {c.rows_per_file} rows; decode batch {c.batch_size}",
            f"executor    {c.executor}" + (" (this process when the work is shorter than starting Ray; else Ray)"
                                           if c.executor == "auto" else ""),
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
    if c.precision not in PRECISIONS:
        raise F2MError(f"--precision must be one of {', '.join(PRECISIONS)}, got {c.precision!r}")
    if c.n <= 0:
        raise F2MError(f"--n must be a positive number of masses per category, got {c.n}")
    if c.n > MAX_MASSES:
        raise F2MError(f"--n {c.n} is more than the {MAX_MASSES:,} masses per category one run makes; "
                       f"split it into runs with different --seed")
    if c.k < 2:
        raise F2MError(f"--k must be at least 2 (K seeds are mixed per sample), got {c.k}")
    if not math.isfinite(c.alpha) or c.alpha <= 0:
        raise F2MError(f"--alpha must be a number > 0, got {c.alpha}")
    if c.seed < 0:
        raise F2MError(f"--seed must be >= 0, got {c.seed}")
    if c.rows_per_file <= 0:
        raise F2MError(f"--rows-per-file must be positive, got {c.rows_per_file}")
    if c.batch_size <= 0:
        raise F2MError(f"--batch-size must be positive, got {c.batch_size}")
    if c.workers is not None and c.workers <= 0:
        raise F2MError(f"--workers must be positive, got {c.workers}")
    if c.executor not in EXECUTORS:
        raise F2MError(f"--executor must be one of {', '.join(EXECUTORS)}, got {c.executor!r}")
    if c.workers is not None and c.executor == "in-process":
        raise F2MError("--workers sizes a Ray actor pool; it does not go with --executor in-process")
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

    grid_units(c.step)


def _found(model: str) -> ResolvedModel:
    """The checkpoint `model` names, found once; its path made absolute (actors run in other folders)."""
    found = resolve_model(model)
    return ResolvedModel(absolute(found.path), found.meta)


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers may run elsewhere); URLs unchanged."""
    import os

    return path if is_remote(path) else os.path.abspath(path)


def _categories(names: tuple[str, ...], bank: FeatureBank, seed_split: str, notes: list[str]) -> list[Category]:
    def mixable() -> list[Category]:  # "all": the bank's categories with 2 or more seeds
        found = [c for c in all_categories() if len(bank.pool(c, seed_split)) >= 2]
        single = [c.name for c in all_categories() if len(bank.pool(c, seed_split)) == 1]
        if single:
            notes.append(f"'all' skips {', '.join(single)}: a single seed cannot be mixed")
        if not found:
            raise F2MError(f"the bank {bank.path} has no category with 2 or more seeds")
        return found

    return parse_categories(names, mixable, " in the bank")


def shard_name(category: str, start: int, stop: int, n: int) -> str:
    """``data/CATEGORY/part-000000-009999.parquet``: the inclusive sample range, zero-padded."""
    width = max(6, len(str(n - 1)))
    return f"{DATA_DIR}/{category}/part-{start:0{width}d}-{stop - 1:0{width}d}.parquet"


def resolve(config: SynthesisConfig) -> ResolvedRun:
    """Validate a run without starting Ray: paths, model, bank, categories, shards."""
    c = config = with_scheme_defaults(config)
    _check_numbers(c)
    model, model_source = (named_model(c.model), "named by --model") if c.model else (None, "named by the bank")
    for path, what in ((c.out, "output"), (model, "model"), (c.bank, "feature bank"), (c.judge, "judge")):
        if path:
            probe_storage(path, what)
    if not model and not c.bank:
        choice = default_model(c.storage)  # the newest finished run, else the shipped model
        model, model_source = choice.checkpoint, choice.why
    # The model is found once here (the actors get it found), its weights loaded once (a corrupt
    # model.pt is one line here, not in an actor), then its bank.
    resolved = _found(model) if model else None
    if resolved is not None:
        load_generator(resolved)
    bank_path = absolute(c.bank or default_bank_path(resolved.path))
    bank = load_feature_bank(bank_path)
    if resolved is None:
        named = bank.metadata.get("checkpoint")
        if not named:
            raise F2MError(f"the bank {bank_path} does not name its checkpoint; pass --model CKPT")
        named = named_model(named)
        probe_storage(named, "model")
        resolved = _found(named)
        load_generator(resolved)
    meta = resolved.meta
    if meta.get("vocabulary") != bank.vocabulary:
        raise F2MError(f"the model {resolved.path} and the bank {bank_path} use different BI-RADS vocabularies")
    if meta["model_id"] != bank.model_id:
        raise F2MError(
            f"the bank {bank_path} was encoded by model {bank.model_id}, not by {resolved.path} "
            f"(model {meta['model_id']}); run `f2m-ray encode --model {resolved.path}`"
        )
    feature_dim = int(meta["preset"]["model"]["feature_dim"])
    if bank.feature_dim != feature_dim:
        raise F2MError(f"the bank has {bank.feature_dim}-d features, the model expects {feature_dim}-d")
    judge_path, judge_id = _judge(c.judge, int(meta["preset"]["model"]["image_size"])) if c.judge else (None, None)
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
    notes += _few_seeds_notes(plans, c.k, c.seed_split)
    shards = tuple(
        Shard(p.category.name, start, min(start + c.rows_per_file, c.n), shard_name(p.category.name, start, min(start + c.rows_per_file, c.n), c.n))
        for p in plans
        for start in range(0, c.n, c.rows_per_file)
    )
    return ResolvedRun(
        config=c,
        model=resolved,
        scheme=scheme(c.mixing),
        out_dir=absolute(c.out) if c.out else "",
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
        provenance=_provenance(meta, bank),
    )


def _provenance(meta: dict[str, Any], bank) -> dict[str, Any]:
    """The data behind a run: what the model was trained on and which ROIs the bank's seeds are."""
    recipe = (meta.get("export") or {}).get("recipe") or {}
    trained_on = (meta.get("extra") or {}).get("data") or recipe.get("data")
    return {
        "model_training_data": trained_on,
        "seed_data": bank.metadata.get("data"),
        "seed_data_description": bank.metadata.get("data_description"),
        "seed_rows": bank.metadata.get("rows"),
    }


def _judge(path: str, model_size: int) -> tuple[str, str]:
    """(absolute path, judge id) of a judge whose weights load and that reads the model's image size."""
    judge_path = absolute(path)
    judge = load_judge(judge_path)  # format, vocabulary and weights checked: a broken judge is one line here
    judge_size = int(judge.config.image_size)
    if judge_size != model_size:
        raise F2MError(f"the judge {path} reads {judge_size}x{judge_size} images, the model makes {model_size}x{model_size}")
    return judge_path, judge.judge_id


def _few_seeds_notes(plans: list[CategoryPlan], k: int, seed_split: str) -> list[str]:
    """What to tell the user about categories with fewer seeds than K: one note each, or one for all."""
    few = [p for p in plans if p.pool_size < k]
    where = "" if seed_split == "all" else " in the training split"
    if 0 < len(few) <= 3:
        return [f"{p.category.name} has only {p.pool_size} seeds{where}, fewer than K={k}: "
                f"each sample mixes all {p.pool_size}" for p in few]
    if few:
        sizes = sorted(p.pool_size for p in few)
        return [f"{len(few)} categories have fewer seeds{where} than K={k} ({sizes[0]} to {sizes[-1]}): "
                f"their samples mix all seeds they have"]
    return []
