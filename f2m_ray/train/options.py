"""What a training run is, before Ray starts: flags over config file over preset -> (Preset, RunOptions),
checked; the storage it writes to, and the checkpoint a run with that name already has.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any


from f2m_ray.checkpoint import find_checkpoint, read_metadata
from f2m_ray.config import Preset, TrainConfig, get_preset, load_config_file
from f2m_ray.errors import F2MError
from f2m_ray.pretrained import DEFAULT_STORAGE, default_storage
from f2m_ray.runtime.errors import ray_error_line
from f2m_ray.storage import filesystem, is_remote, join


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class RunOptions:
    """Where and how to run (the preset says what to train)."""

    data: str = "phantom"  # phantom | phantom:N | manifest PATH or s3:// URL
    data_format: str = "auto"  # passed to f2m_ray.data.readers.read_labeled
    workers: int | None = None  # training workers; None: one per GPU, else 2 CPU workers
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    storage: str = DEFAULT_STORAGE  # local folder or s3:// URL; the run folder is storage/name
    name: str = ""  # run name; the same name and storage resume the run ("" = preset + time)
    max_failures: int = 2  # worker-group restarts from the last checkpoint before giving up
    feature_bank: bool = True  # build the feature bank beside the final checkpoint

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise F2MError(f"--workers must be >= 1, got {self.workers}")
        if self.max_failures < 0:
            raise F2MError(f"--max-failures must be >= 0, got {self.max_failures}")
        if not self.storage:
            raise F2MError("--storage must not be empty")
        if self.name and ("/" in self.name or self.name in (".", "..")):
            raise F2MError(f"--name must be a plain folder name, got {self.name!r}")

    @property
    def run_dir(self) -> str:
        return join(self.storage, self.name)


_CONFIG_SECTIONS = ("preset", "train", "loss", "run")


def _on_the_driver(options: RunOptions) -> RunOptions:
    """Local paths made absolute against the command's working directory: a Ray worker runs elsewhere."""
    storage = options.storage if is_remote(options.storage) else os.path.abspath(os.path.expanduser(options.storage))
    data = options.data
    if not (data == "phantom" or data.startswith("phantom:") or is_remote(data)):
        data = os.path.abspath(os.path.expanduser(data))
    return replace(options, storage=storage, data=data)


def resolve_run(
    config_file: str | None = None,
    preset_name: str | None = None,
    train_overrides: dict[str, Any] | None = None,
    run_overrides: dict[str, Any] | None = None,
    loss_overrides: dict[str, Any] | None = None,
) -> tuple[Preset, RunOptions]:
    """Flags over config file over preset defaults -> (Preset, RunOptions).

    A config file (TOML, or YAML with PyYAML) holds ``preset = "small"`` and the tables
    ``[train]`` (TrainConfig fields), ``[loss]`` (LossConfig fields) and ``[run]`` (RunOptions
    fields). ``None`` in the overrides means "not given".
    """
    file_data: dict[str, Any] = load_config_file(config_file) if config_file else {}
    unknown = sorted(set(file_data) - set(_CONFIG_SECTIONS))
    if unknown:
        raise F2MError(f"unknown key(s) in {config_file}: {', '.join(unknown)}; known: {', '.join(_CONFIG_SECTIONS)}")
    for section in ("train", "loss", "run"):
        if not isinstance(file_data.get(section, {}), dict):
            raise F2MError(f"[{section}] in {config_file} must be a table of settings")
    preset = get_preset(preset_name or str(file_data.get("preset", "small")))
    train_changes = {**file_data.get("train", {}), **{k: v for k, v in (train_overrides or {}).items() if v is not None}}
    preset = preset.with_train(**train_changes)
    loss_changes = {**file_data.get("loss", {}), **{k: v for k, v in (loss_overrides or {}).items() if v is not None}}
    if loss_changes:
        preset = preset.with_loss(**loss_changes)
    if preset.loss.lambda_mix < 0:
        raise F2MError(f"--mix-weight (lambda_mix) must be >= 0, got {preset.loss.lambda_mix}")
    run_values = {**file_data.get("run", {}), **{k: v for k, v in (run_overrides or {}).items() if v is not None}}
    run_values.setdefault("storage", default_storage())  # $F2M_STORAGE, else ./f2m-runs
    known = {f.name for f in fields(RunOptions)}
    bad = sorted(set(run_values) - known)
    if bad:
        raise F2MError(f"unknown run option(s): {', '.join(bad)}; known: {', '.join(sorted(known))}")
    options = _on_the_driver(RunOptions(**run_values))
    if not options.name:
        options = replace(options, name=f"{preset.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_train_config(preset.train, options)
    return preset, options


def check_train_config(cfg: TrainConfig, options: RunOptions) -> None:
    if cfg.epochs < 1:
        raise F2MError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise F2MError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise F2MError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    for name in ("checkpoint_every", "keep_checkpoints", "sample_every"):
        if getattr(cfg, name) < 1:
            raise F2MError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.crop_padding < 0 or cfg.crop_padding >= 32:
        raise F2MError(f"crop_padding must be in [0, 32), got {cfg.crop_padding}")
    if options.workers is not None and cfg.batch_size % options.workers:
        raise F2MError(
            f"global batch {cfg.batch_size} does not split evenly over {options.workers} workers; "
            f"use a --batch-size that is a multiple of {options.workers}"
        )
    if options.workers is not None and cfg.batch_size < options.workers:
        raise F2MError(f"global batch {cfg.batch_size} is smaller than --workers {options.workers}")


def describe_run(preset: Preset, options: RunOptions) -> str:
    """The resolved configuration, as `--dry-run` prints it."""
    model = preset.model
    workers = options.workers if options.workers is not None else "auto (one per GPU, else 2 CPU workers)"
    gpu = {None: "auto (GPUs if the cluster has them)", True: "yes", False: "no"}[options.use_gpu]
    train = ", ".join(f"{k}={v}" for k, v in asdict(preset.train).items())
    loss = ", ".join(f"{k}={v}" for k, v in asdict(preset.loss).items())
    return "\n".join(
        [
            f"preset    {preset.name} (feature_dim {model.feature_dim}, encoder {list(model.encoder_channels)}, "
            f"discriminator {list(model.disc_channels)})",
            f"train     {train}",
            f"loss      {loss}",
            f"data      {options.data} (format {options.data_format})",
            f"storage   {options.storage}",
            f"run       {options.run_dir} (re-running with --name {options.name} resumes it)",
            f"workers   {workers}",
            f"gpu       {gpu}",
            f"failures  up to {options.max_failures} restarts from the last checkpoint",
            f"bank      {'feature bank beside the final checkpoint' if options.feature_bank else 'skipped (--no-bank)'}",
        ]
    )


def check_storage(options: RunOptions) -> None:
    """Fail early (before Ray starts) when the run folder cannot be written."""
    run_dir = options.run_dir
    probe = join(run_dir, f".f2m-write-probe-{os.getpid()}")
    fs, inner = filesystem(probe)
    try:
        if not is_remote(run_dir):
            fs.makedirs(filesystem(run_dir)[1], exist_ok=True)
        with fs.open(inner, "wb") as f:
            f.write(b"ok")
        fs.rm(inner)
    except F2MError:
        raise
    except Exception as err:  # OSError locally; botocore/s3fs errors (PermissionError, FileNotFoundError) on S3
        reason = getattr(err, "strerror", None) or ray_error_line(err)
        raise F2MError(f"cannot write to storage {options.storage}: {reason}") from None


def fresh_listing(path: str) -> None:
    """Drop fsspec's cached directory listings: Ray Train and other processes write the run folder."""
    fs, _ = filesystem(path)
    fs.invalidate_cache()


def existing_checkpoint(run_dir: str) -> dict[str, Any] | None:
    """The latest checkpoint's metadata in a run folder, or None for a new run."""
    fresh_listing(run_dir)
    fs, inner = filesystem(run_dir)
    if not fs.exists(inner):
        return None
    try:
        path = find_checkpoint(run_dir)
    except F2MError:
        return None  # a run folder without checkpoints yet (stopped before its first one)
    meta = read_metadata(path)
    meta["path"] = path
    return meta
