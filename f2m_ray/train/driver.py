"""`f2m-ray train`: data-parallel Feature2Mass training on Ray Train (the only module that imports ray.train).

    driver                                   each worker (TorchTrainer, one per GPU or CPU slot)
    ------                                   ----------------------------------------------
    check options, storage, resume preset    rebuild Preset from a dict, seed, build G, D1, D2
    start/join Ray, check cluster resources  resume from ray.train.get_checkpoint() if any
    read + materialize data, split by        DDP (broadcast_buffers=False), Adam x 2
      the `split` column, check categories   for each epoch: shard of "train" -> augment -> steps
    TorchTrainer.fit()  <- per-epoch lines    average BN buffers, all-reduce losses
    feature bank beside the final checkpoint rank 0: D label accuracy on real "val", metrics.jsonl,
                                               loss curve, sample grid, checkpoint; all ranks report

Resume is Ray Train V2's: running again with the same run name and storage picks up the
latest reported checkpoint, and the epoch counter continues from the one stored in it.

Why the settings are what they are:
- ``broadcast_buffers=False``: D runs two forwards (real, then fake) before one backward;
  DDP's default buffer broadcast rewrites BatchNorm's running stats in place between them
  and autograd refuses the backward. BatchNorm buffers are instead averaged over ranks
  once per epoch, so every rank (and the checkpoint) holds the same eval-mode statistics.
- D's forward in the generator phase runs under ``no_sync``: those D gradients are thrown
  away (zeroed before D's next step), so all-reducing them would be wasted bandwidth.
- Evaluation (rank 0) runs under ``no_grad`` on the unwrapped G in eval mode and on copies
  of D1/D2: nothing it does can change parameters, buffers or the DDP reducer's state, so
  ranks cannot drift through it.
- The training split is materialized before ``fit()``: phantoms are not re-rendered every
  epoch, and no Ray Data task has to run (and wait for a CPU slot) while the training
  workers hold theirs.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

import numpy as np
import torch

from f2m_ray.core.augment import augment
from f2m_ray.checkpoint import find_checkpoint, load_checkpoint, read_metadata, save_checkpoint
from f2m_ray.config import Preset, TrainConfig, get_preset, load_config_file
from f2m_ray.errors import F2MError
from f2m_ray.labels import MARGINS, SHAPES, Category
from f2m_ray.core.networks import build_networks
from f2m_ray.pretrained import DEFAULT_STORAGE, default_storage
from f2m_ray.runtime.cluster import quiet_train_reports
from f2m_ray.core.step import Feature2MassStep, make_optimizers, to_model_batch, unwrap
from f2m_ray.storage import arrow_filesystem, filesystem, is_remote, join
from f2m_ray.train.report import (
    LOSS_CURVE_FILE,
    SAMPLES_DIR,
    format_epoch_line,
    format_restart_line,
    loss_curve_png,
    read_metrics,
    sample_grid_png,
    start_event,
    write_bytes,
    write_metrics,
)

SAMPLES_PER_CATEGORY = 4  # real ROIs per category row of the sample grid
VAL_BATCH = 512  # held-out rows per evaluation batch (D is evaluated with batch statistics)
CHECKPOINT_PREFIX = "checkpoint_epoch_"
FEATURE_BANK_MODULE = "f2m_ray.bank"
# Environment variables the workers need to reach the same S3 endpoint as the driver.
_FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "F2M_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)


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
    _check_train_config(preset.train, options)
    return preset, options


def _check_train_config(cfg: TrainConfig, options: RunOptions) -> None:
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


def state_checksum(*modules: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, bytes): equal iff the states are equal."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in unwrap(module).state_dict().items():
            t = tensor.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:
                t = t.float()
            digest.update(name.encode())
            digest.update(str(t.dtype).encode())
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def evaluate_real(generator, d_margin, d_shape, batches, device, autocast_bf16: bool = False) -> dict[str, Any]:
    """D1/D2 label accuracy and G's L1 reconstruction on real held-out ROIs (no gradients).

    G runs in eval mode (running statistics, as encoding and synthesis will use it). D1 and
    D2 run on copies in train mode, i.e. with the statistics of the real batch: that is
    how D sees real images during training, whereas D's running statistics are mostly those
    of fake batches (two of D's three forwards per step). The copies keep the trained nets'
    buffers untouched.
    """
    g = unwrap(generator)
    g_was_training = g.training
    g.eval()
    d_nets = [copy.deepcopy(unwrap(d)).train() for d in (d_margin, d_shape)]
    total = correct_margin = correct_shape = 0
    l1_sum = 0.0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    try:
        for batch in batches:
            images, margins, shapes = to_model_batch(batch, device)
            if images.shape[0] < 2:
                continue  # batch statistics need two images
            with autocast:
                _, margin_logits = d_nets[0](images)
                _, shape_logits = d_nets[1](images)
                recon = g(images, margins, shapes)
            correct_margin += int((margin_logits.argmax(1) == margins).sum())
            correct_shape += int((shape_logits.argmax(1) == shapes).sum())
            l1_sum += float((recon.float() - images).abs().mean(dim=(1, 2, 3)).sum())
            total += images.shape[0]
    finally:
        g.train(g_was_training)
    if total == 0:
        return {"val_rows": 0, "val_margin_accuracy": None, "val_shape_accuracy": None, "val_l1": None}
    return {
        "val_rows": total,
        "val_margin_accuracy": correct_margin / total,
        "val_shape_accuracy": correct_shape / total,
        "val_l1": l1_sum / total,
    }


def threads_per_worker(workers_on_node: int) -> int:
    """Torch threads for one CPU worker: the node's cores shared out, never oversubscribed."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers_on_node))


# ---------------------------------------------------------------- the worker


def checkpoint_dir_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{epoch:06d}"


def same_model(stored: Preset, asked: Preset) -> bool:
    """A run can only be resumed with the preset (name, model and loss) it was started with."""
    return stored.name == asked.name and stored.model == asked.model and stored.loss == asked.loss


def preset_mismatch_message(run_dir: str, stored: Preset, asked: Preset) -> str:
    if stored.name != asked.name:
        return (
            f"run {run_dir} was trained with preset {stored.name!r}; refusing to resume it with "
            f"preset {asked.name!r} (use --preset {stored.name}, or another --name for a new run)"
        )
    return (
        f"run {run_dir} was trained with a different {stored.name!r} model or loss configuration; "
        f"refusing to resume it (use another --name for a new run)"
    )


def _seed_for(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:6], "little")


def _average_buffers(modules, world: int) -> None:
    """Average floating buffers (BatchNorm running stats) over ranks; ints (batch counts) agree already."""
    import torch.distributed as dist

    for module in modules:
        for buffer in unwrap(module).buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(world)


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop (config is plain data: rebuilt into dataclasses here)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    worker_start = time.time()
    quiet_train_reports()
    # Ray's prepare_model warns that broadcast_buffers is deprecated in favour of
    # forward_sync_buffers, which would still sync buffers at init; we mean broadcast_buffers=False.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    preset = Preset.from_dict(config["preset"])
    cfg = preset.train
    run_dir: str = config["run_dir"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    bf16 = bool(on_gpu and cfg.bf16)
    threads = None
    if not on_gpu:
        threads = threads_per_worker(context.get_local_world_size())
        torch.set_num_threads(threads)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    generator, d_margin, d_shape = build_networks(preset.model)
    start_epoch, step, optim_state = 0, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            loaded = load_checkpoint(directory, with_optimizer=True)
        if not same_model(loaded.preset, preset):
            raise F2MError(preset_mismatch_message(run_dir, loaded.preset, preset))
        for net, key in ((generator, "generator"), (d_margin, "d_margin"), (d_shape, "d_shape")):
            net.load_state_dict(loaded.model_state[key])
        start_epoch, step, optim_state = loaded.epoch, loaded.step, loaded.optim_state

    ddp = {"broadcast_buffers": False}
    generator = ray.train.torch.prepare_model(generator, parallel_strategy_kwargs=ddp)
    d_margin = ray.train.torch.prepare_model(d_margin, parallel_strategy_kwargs=ddp)
    d_shape = ray.train.torch.prepare_model(d_shape, parallel_strategy_kwargs=ddp)
    optimizer_g, optimizer_d = make_optimizers(generator, d_margin, d_shape, cfg)
    if optim_state:  # after the move to the device: Adam's state follows its parameters' device
        optimizer_g.load_state_dict(optim_state["generator"])
        optimizer_d.load_state_dict(optim_state["discriminators"])
    augment_rng = torch.Generator()
    train_step = Feature2MassStep(generator, d_margin, d_shape, optimizer_g, optimizer_d, preset.loss, bf16,
                                  d_augment=cfg.d_augment, augment_generator=augment_rng,
                                  mix_generator=torch.Generator().manual_seed(cfg.seed * 1009 + rank))

    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")  # not split: rank 0 evaluates all of it
    per_worker = cfg.batch_size // world
    history: list[dict] = []
    if rank == 0:
        # Epochs after the checkpoint we resume from were logged by an attempt that died: drop them.
        logged = read_metrics(run_dir, events=True)
        history = [row for row in logged if row.get("epoch", 0) <= start_epoch]  # start/restart rows stay
        history.append(start_event(logged, config["session"], start_epoch, config["max_failures"], time.time()))
        write_metrics(run_dir, history)
    samples = config["samples"]

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        augment_rng.manual_seed(_seed_for(cfg.seed, epoch, rank))
        epoch_start = time.time()
        sums = torch.zeros(len(train_step.metric_names), dtype=torch.float64, device=device)
        batches = 0
        batch_iter = train_shard.iter_torch_batches(
            batch_size=per_worker,
            drop_last=True,  # equal-size shards and equal step counts on every rank
            local_shuffle_buffer_size=config["shuffle_buffer"],
            local_shuffle_seed=_seed_for(cfg.seed, epoch, rank, 1),
            device=device,
        )
        for batch in batch_iter:
            images, margins, shapes = to_model_batch(batch, device)
            images = augment(images, flips=cfg.flips, crop_padding=cfg.crop_padding, generator=augment_rng)
            losses = train_step(images, margins, shapes)
            sums += torch.stack([losses[k].double().to(device) for k in train_step.metric_names])
            batches += 1
            step += 1
        train_seconds = time.time() - epoch_start
        counts = torch.tensor([batches], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            _average_buffers((generator, d_margin, d_shape), world)
        means = (sums / counts.clamp(min=1)).tolist()
        checksum = state_checksum(generator, d_margin, d_shape)
        checksums = [checksum]
        if world > 1:
            checksums = [None] * world
            dist.all_gather_object(checksums, checksum)

        metrics: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "images": int(counts.item()) * per_worker,
            "train_seconds": train_seconds,
            "images_per_second": int(counts.item()) * per_worker / max(train_seconds, 1e-9),
            **dict(zip(train_step.metric_names, means)),
            "world_size": world,
            "threads_per_worker": threads,
            "device": device.type,
            "rank_checksums": checksums,
            "worker_start_time": worker_start,
            "epoch_start_time": epoch_start,
        }
        final = epoch == cfg.epochs
        save_now = final or epoch % cfg.checkpoint_every == 0
        with tempfile.TemporaryDirectory(prefix="f2m-ckpt-") as local_dir:
            ray_checkpoint = None
            if rank == 0:
                batches_val = val_data.iter_torch_batches(batch_size=VAL_BATCH, device=device)
                metrics.update(evaluate_real(generator, d_margin, d_shape, batches_val, device, bf16))
                if final or epoch % cfg.sample_every == 0:
                    _write_sample_grid(run_dir, epoch, generator, samples, device)
                metrics["checkpoint"] = checkpoint_dir_name(epoch) if save_now else None
                metrics["time"] = time.time()
                history.append(metrics)
                write_metrics(run_dir, history)
                epochs_so_far = [row for row in history if "epoch" in row]
                write_bytes(join(run_dir, LOSS_CURVE_FILE), loss_curve_png(epochs_so_far, config["chance"]))
                if save_now:
                    save_checkpoint(
                        local_dir, preset, generator, d_margin, d_shape, epoch, step,
                        optimizers={"generator": optimizer_g, "discriminators": optimizer_d},
                        extra={"run": os.path.basename(run_dir.rstrip("/")), "data": config["data"],
                               "world_size": world, "train_rows": config["train_rows"]},
                    )
                    ray_checkpoint = ray.train.Checkpoint.from_directory(local_dir)
            ray.train.report(
                metrics,
                checkpoint=ray_checkpoint,
                checkpoint_dir_name=checkpoint_dir_name(epoch) if save_now else None,
            )


@torch.no_grad()
def _write_sample_grid(run_dir: str, epoch: int, generator, samples: dict[str, Any], device) -> None:
    """Real vs reconstruction, one row per category (rank 0, eval mode, unwrapped G)."""
    if not samples["labels"]:
        return
    net = unwrap(generator)
    was_training = net.training
    net.eval()
    try:
        images = torch.as_tensor(samples["images"]).unsqueeze(1).to(device)
        margins = torch.as_tensor(samples["margins"]).to(device)
        shapes = torch.as_tensor(samples["shapes"]).to(device)
        recon = net(images, margins, shapes).float().squeeze(1).cpu().numpy()
    finally:
        net.train(was_training)
    png = sample_grid_png(samples["images"], recon, samples["labels"], SAMPLES_PER_CATEGORY)
    write_bytes(join(run_dir, SAMPLES_DIR, f"epoch_{epoch:06d}.png"), png)


# ---------------------------------------------------------------- the driver


@dataclass
class PreparedData:
    """The training inputs, materialized in the object store, and what the driver learned about them."""

    train: Any  # ray.data.Dataset: image, margin, shape
    val: Any  # ray.data.Dataset: image, margin, shape
    train_rows: int
    val_rows: int
    categories: dict[str, tuple[int, int]]  # category name -> (train rows, val rows)
    samples: dict[str, Any]  # the sample-grid inputs (numpy arrays and row labels)
    description: str
    chance: dict[str, float] = field(default_factory=dict)  # 1 / classes present, per head
    dropped: dict[str, int] = field(default_factory=dict)  # the reader's reasons -> rows left out


@dataclass
class TrainSummary:
    run_dir: str
    name: str
    start_epoch: int
    end_epoch: int
    final_checkpoint: str | None
    metrics: dict[str, Any] | None
    feature_bank: str | None
    startup_seconds: float | None = None  # fit() called -> first epoch started (Ray's fixed cost)


def _first_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    # Ray's task errors put the remote traceback first; the exception's own message is last.
    lines = [line for line in text if line.strip() and not line.startswith((" ", "Traceback", "\t"))]
    return (lines[-1] if lines else type(cause).__name__)[:300]


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
        reason = getattr(err, "strerror", None) or _first_line(err)
        raise F2MError(f"cannot write to storage {options.storage}: {reason}") from None


def _fresh_listing(path: str) -> None:
    """Drop fsspec's cached directory listings: Ray Train and other processes write the run folder."""
    fs, _ = filesystem(path)
    fs.invalidate_cache()


def existing_checkpoint(run_dir: str) -> dict[str, Any] | None:
    """The latest checkpoint's metadata in a run folder, or None for a new run."""
    _fresh_listing(run_dir)
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


def check_resources(workers: int, use_gpu: bool, resources: dict[str, float]) -> None:
    """Refuse (one line) a worker count the cluster cannot hold, instead of waiting forever."""
    if use_gpu:
        gpus = int(resources.get("GPU", 0))
        if workers > gpus:
            raise F2MError(f"--workers {workers} needs {workers} GPUs but the Ray cluster has {gpus}")
    cpus = resources.get("CPU", 0)
    needed = workers * cpu_per_worker(use_gpu)
    if needed > cpus:
        most = int(cpus // cpu_per_worker(use_gpu))
        raise F2MError(
            f"--workers {workers} needs {needed:g} CPU slots but the Ray cluster has {cpus:g} "
            f"(use --workers {most} or fewer)"
        )


def cpu_per_worker(use_gpu: bool) -> float:
    # One logical slot each: with local Ray's oversubscribed slots (2 per core) there are
    # slots left for Ray Data, and on a GPU node the worker needs one core to feed its GPU.
    return 1.0


def prepare_data(preset: Preset, options: RunOptions) -> PreparedData:
    """Read the labeled ROIs once, split by the `split` column, refuse unusable data (one line)."""
    import ray

    from f2m_ray.data.readers import read_labeled

    cfg = preset.train
    read = read_labeled(options.data, options.data_format, cfg.val_fraction, cfg.seed)
    try:
        dataset = read.dataset.materialize()
        counts: dict[tuple[int, int, str], int] = {}
        for batch in dataset.select_columns(["margin", "shape", "split"]).iter_batches(batch_format="numpy", batch_size=4096):
            for m, s, sp in zip(batch["margin"], batch["shape"], batch["split"]):
                key = (int(m), int(s), str(sp))
                counts[key] = counts.get(key, 0) + 1
    except F2MError:
        raise
    except Exception as err:  # decoding failures surface here, wrapped by Ray
        raise F2MError(f"cannot read the training data {options.data}: {_first_line(err)}") from None
    total = sum(counts.values())
    if total == 0:
        raise F2MError(f"the dataset {options.data} is empty: no labeled ROIs to train on")
    per_category: dict[tuple[int, int], list[int]] = {}
    for (m, s, sp), n in counts.items():
        entry = per_category.setdefault((m, s), [0, 0])
        entry[0 if sp == "train" else 1] += n
    train_rows = sum(v[0] for v in per_category.values())
    val_rows = sum(v[1] for v in per_category.values())
    if train_rows == 0:
        raise F2MError(f"the dataset {options.data} has no rows in the train split ({val_rows} in val)")
    names = {key: Category(MARGINS[key[0]], SHAPES[key[1]]).name for key in per_category}
    missing = sorted(names[k] for k, (n_train, _) in per_category.items() if n_train == 0)
    if missing:
        raise F2MError(
            f"category {missing[0]} has no samples in the train split"
            + (f" ({len(missing) - 1} more: {', '.join(missing[1:4])})" if len(missing) > 1 else "")
            + "; lower val_fraction, change the seed or drop its rows"
        )
    if train_rows < cfg.batch_size:
        raise F2MError(
            f"the train split has {train_rows} rows, fewer than one global batch of {cfg.batch_size}; "
            f"lower --batch-size or add data"
        )
    from ray.data.expressions import col

    train = dataset.filter(expr=col("split") == "train").select_columns(["image", "margin", "shape"]).materialize()
    val = dataset.filter(expr=col("split") == "val").select_columns(["image", "margin", "shape"]).materialize()
    samples = _collect_samples(dataset, sorted(per_category))
    margins_present = {m for m, _ in per_category}
    shapes_present = {s for _, s in per_category}
    return PreparedData(
        train=train,
        val=val,
        train_rows=train_rows,
        val_rows=val_rows,
        categories={names[k]: tuple(v) for k, v in sorted(per_category.items())},
        samples=samples,
        description=read.description,
        chance={"margin": 1 / len(margins_present), "shape": 1 / len(shapes_present)},
        dropped=dict(read.dropped),
    )


def _collect_samples(dataset, keys: list[tuple[int, int]]) -> dict[str, Any]:
    """Up to SAMPLES_PER_CATEGORY real ROIs per category (val first: held out), repeated to fill a row."""
    chosen: dict[tuple[int, int], dict[str, list]] = {k: {"val": [], "train": []} for k in keys}
    for batch in dataset.select_columns(["image", "margin", "shape", "split"]).iter_batches(batch_format="numpy", batch_size=1024):
        for image, m, s, sp in zip(batch["image"], batch["margin"], batch["shape"], batch["split"]):
            bucket = chosen[(int(m), int(s))]["val" if sp == "val" else "train"]
            if len(bucket) < SAMPLES_PER_CATEGORY:
                bucket.append(image)
        if all(len(v["val"]) >= SAMPLES_PER_CATEGORY for v in chosen.values()):
            break
    images, margins, shapes, labels = [], [], [], []
    for key in keys:
        pool = (chosen[key]["val"] + chosen[key]["train"])[:SAMPLES_PER_CATEGORY]
        pool = [pool[i % len(pool)] for i in range(SAMPLES_PER_CATEGORY)]
        images.extend(pool)
        margins.extend([key[0]] * SAMPLES_PER_CATEGORY)
        shapes.extend([key[1]] * SAMPLES_PER_CATEGORY)
        labels.append(Category(MARGINS[key[0]], SHAPES[key[1]]).name)
    return {
        "images": np.stack(images).astype(np.float32) if images else np.zeros((0, 64, 64), np.float32),
        "margins": np.array(margins, dtype=np.int64),
        "shapes": np.array(shapes, dtype=np.int64),
        "labels": labels,
    }


class _MetricsTail:
    """Prints each new epoch line of the run's metrics.jsonl on the driver while fit() runs.

    The driver prints rather than rank 0 so that the lines are plain (no Ray actor prefix)
    and also appear under `ray job submit`, wherever the workers run.
    """

    def __init__(self, run_dir: str, total_epochs: int, after_epoch: int, echo: Callable[[str], None],
                 session: str = ""):
        self.run_dir, self.total_epochs, self.last_epoch, self.echo = run_dir, total_epochs, after_epoch, echo
        self.session, self.restarts_seen = session, 0
        self.first_epoch_start: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_MetricsTail":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.poll()

    def poll(self) -> None:
        try:
            rows = read_metrics(self.run_dir, events=True)
        except Exception:  # a half-written file or a transient S3 error: try again next second
            return
        restarts = [r for r in rows if r.get("event") == "restart" and r.get("session") == self.session]
        for event in restarts[self.restarts_seen:]:
            self.echo(format_restart_line(event))
            self.last_epoch = min(self.last_epoch, int(event["from_epoch"]))  # the epochs after it run again
        self.restarts_seen = len(restarts)
        if restarts:  # epochs logged by the attempt that died, before its restart row, are not news
            rows = rows[max(i for i, r in enumerate(rows) if r is restarts[-1]):]
        for row in rows:
            if "epoch" not in row:
                continue
            epoch = row["epoch"]
            if epoch > self.last_epoch:
                if self.first_epoch_start is None:
                    self.first_epoch_start = row.get("epoch_start_time")
                self.last_epoch = epoch
                self.echo(format_epoch_line(row, self.total_epochs))


def _unwrap_training_error(err: Exception) -> Exception:
    """The first worker's own exception inside Ray Train's error, if there is one."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank in sorted(failures):
        inner = failures[rank]
        cause = getattr(inner, "cause", None) or inner
        return cause
    controller = getattr(err, "controller_failure", None)
    return controller or err


def _worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}


def _storage_args(storage: str) -> dict[str, Any]:
    if is_remote(storage):
        pa_fs, inner = arrow_filesystem(storage)
        return {"storage_path": inner, "storage_filesystem": pa_fs}
    return {"storage_path": os.path.abspath(storage)}


def feature_bank_available() -> bool:
    import importlib.util

    return importlib.util.find_spec(FEATURE_BANK_MODULE) is not None


def quiet_console() -> None:
    """For commands that print their own progress: no Ray Data progress bars or execution banners."""
    import logging

    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


def train(
    preset: Preset,
    options: RunOptions,
    echo: Callable[[str], None] = print,
    start_ray: Callable[[], Any] | None = None,
) -> TrainSummary:
    """Train (or resume) the run options.run_dir on Ray Train; returns where everything landed.

    Checks that need no cluster (options, storage, the stored preset of a resumed run) come
    first; `start_ray` (default ``ensure_ray``) is called only after they pass.
    """
    from f2m_ray.runtime.cluster import ensure_ray

    cfg = preset.train
    _check_train_config(cfg, options)
    if not options.name:
        raise F2MError("a run needs a name (RunOptions.name)")
    run_dir = options.run_dir
    check_storage(options)
    previous = existing_checkpoint(run_dir)
    start_epoch = 0
    if previous is not None:
        stored = Preset.from_dict(previous["preset"])
        if not same_model(stored, preset):
            raise F2MError(preset_mismatch_message(run_dir, stored, preset))
        start_epoch = int(previous["epoch"])
        if start_epoch >= cfg.epochs:
            echo(f"run {run_dir} is already at epoch {start_epoch} (asked for --epochs {cfg.epochs}); nothing to train")
            bank = _maybe_feature_bank(previous["path"], preset, options, echo)
            return TrainSummary(run_dir, options.name, start_epoch, start_epoch, previous["path"], None, bank)
        echo(f"resuming run {run_dir} from epoch {start_epoch} ({previous['path']})")
    else:
        echo(f"new run {run_dir}")

    (start_ray or ensure_ray)()
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = dict(ray.cluster_resources())
    use_gpu = options.use_gpu if options.use_gpu is not None else resources.get("GPU", 0) >= 1
    if options.use_gpu and resources.get("GPU", 0) < 1:
        raise F2MError("--gpu asked for, but the Ray cluster has no GPUs (run with --no-gpu)")
    workers = options.workers or (int(resources.get("GPU", 0)) if use_gpu else 2)
    if cfg.batch_size % workers:
        raise F2MError(
            f"global batch {cfg.batch_size} does not split evenly over {workers} workers; "
            f"use a --batch-size that is a multiple of {workers}"
        )
    check_resources(workers, use_gpu, resources)

    data = prepare_data(preset, options)
    echo(
        f"data: {data.description}: {data.train_rows} train / {data.val_rows} val rows, "
        f"{len(data.categories)} categories"
    )
    if data.dropped:
        echo("left out by the reader: " + ", ".join(f"{reason} x{n}" for reason, n in sorted(data.dropped.items())))
    per_worker = cfg.batch_size // workers
    if data.train_rows // workers < per_worker:
        raise F2MError(
            f"each of {workers} workers gets {data.train_rows // workers} train rows, fewer than its batch of "
            f"{per_worker}; lower --workers or --batch-size"
        )
    device = "GPU" if use_gpu else "CPU"
    echo(
        f"training: preset {preset.name}, {workers} {device} worker(s), global batch {cfg.batch_size} "
        f"({per_worker} per worker), epochs {start_epoch + 1}..{cfg.epochs}"
    )
    worker_config = {
        "preset": preset.to_dict(),
        "run_dir": run_dir,
        "data": options.data,
        "train_rows": data.train_rows,
        "samples": data.samples,
        "chance": data.chance,
        "shuffle_buffer": max(per_worker, min(2048, data.train_rows // workers)),
        "session": uuid.uuid4().hex,  # tells a restart of this call's workers from an earlier call's start
        "max_failures": options.max_failures,
    }
    resources_per_worker = {"CPU": cpu_per_worker(use_gpu)}
    if use_gpu:
        resources_per_worker["GPU"] = 1
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=worker_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker
        ),
        run_config=ray.train.RunConfig(
            name=options.name,
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": _worker_env()},
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            **_storage_args(options.storage),
        ),
        datasets={"train": data.train, "val": data.val},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    fit_start = time.time()
    with _MetricsTail(run_dir, cfg.epochs, start_epoch, echo, worker_config["session"]) as tail:
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            inner = _unwrap_training_error(err)
            if isinstance(inner, F2MError):
                raise F2MError(str(inner)) from None
            _fresh_listing(run_dir)
            last = existing_checkpoint(run_dir)
            where = (f"the last checkpoint is {last['path']} (epoch {last['epoch']}): the same command resumes from it"
                     if last else "no checkpoint was written")
            raise F2MError(f"training failed after {tail.restarts_seen} of {options.max_failures} restarts: "
                           f"{type(inner).__name__}: {_first_line(inner)}; {where}") from None
    startup = (tail.first_epoch_start - fit_start) if tail.first_epoch_start else None
    _fresh_listing(run_dir)
    final = find_checkpoint(run_dir)
    echo(f"final checkpoint: {final}")
    echo(f"metrics: {join(run_dir, 'metrics.jsonl')}  loss curve: {join(run_dir, LOSS_CURVE_FILE)}")
    bank = _maybe_feature_bank(final, preset, options, echo)
    metrics = dict(result.metrics) if result.metrics else None
    end_epoch = int(metrics["epoch"]) if metrics else cfg.epochs
    return TrainSummary(run_dir, options.name, start_epoch, end_epoch, final, metrics, bank, startup)


def _maybe_feature_bank(checkpoint: str, preset: Preset, options: RunOptions, echo) -> str | None:
    """Encode the labeled ROIs with the final checkpoint so that `synthesize --model RUN` needs nothing else."""
    if not options.feature_bank:
        return None
    if not feature_bank_available():
        echo("feature bank: skipped (f2m_ray.bank is not installed in this version)")
        return None
    import importlib

    module = importlib.import_module(FEATURE_BANK_MODULE)
    out = module.build_feature_bank(checkpoint, options.data, fmt=options.data_format, seed=preset.train.seed)
    echo(f"feature bank: {out}")
    return out


def run_summary_json(summary: TrainSummary) -> str:
    return json.dumps(asdict(summary), default=str, indent=2)
