"""One Ray Train worker of a GAN run (see f2m_ray.train.driver for the whole picture): resume, DDP,
epochs of Feature2MassStep, and on rank 0 the evaluation, metrics, pictures and checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import torch

from f2m_ray.core.augment import augment
from f2m_ray.core.mass_metrics import score_probe
from f2m_ray.checkpoint import AVERAGE_KEY, load_checkpoint, save_checkpoint
from f2m_ray.config import Preset
from f2m_ray.errors import F2MError
from f2m_ray.core.networks import build_networks
from f2m_ray.runtime.console import quiet_train_reports
from f2m_ray.runtime.trainer import threads_per_worker
from f2m_ray.core.step import Feature2MassStep, WeightAverage, make_optimizers, to_model_batch, unwrap
from f2m_ray.storage import join
from f2m_ray.train.report import LOSS_CURVE_FILE, SAMPLES_DIR, loss_curve_png, read_metrics, sample_grid_png, start_event, write_bytes, write_metrics
from f2m_ray.train.data import SAMPLES_PER_CATEGORY


VAL_BATCH = 512  # held-out rows per evaluation batch (D is evaluated with batch statistics)
CHECKPOINT_PREFIX = "checkpoint_epoch_"
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


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop (config is plain data: rebuilt into dataclasses here)."""
    import ray.train
    import ray.train.torch

    worker_start = time.time()
    quiet_train_reports()
    # Ray's prepare_model warns that broadcast_buffers is deprecated in favour of
    # forward_sync_buffers, which would still sync buffers at init; we mean broadcast_buffers=False.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    preset = Preset.from_dict(config["preset"])
    cfg = preset.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    bf16 = bool(device.type == "cuda" and cfg.bf16)
    threads = None
    if device.type != "cuda":
        threads = threads_per_worker(context.get_local_world_size())
        torch.set_num_threads(threads)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    nets = build_networks(preset.model)
    start_epoch, step, optim_state, average_state = _resume(nets, preset, config["run_dir"])
    nets, optimizers, train_step, augment_rng = _prepare(nets, preset, optim_state, average_state, bf16, rank)
    history = _start_history(config, start_epoch) if rank == 0 else []
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")  # not split: rank 0 evaluates all of it
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        metrics, step = _train_epoch(epoch, step, nets, train_step, augment_rng, train_shard, config, rank, world,
                                     device)
        metrics.update(world_size=world, threads_per_worker=threads, device=device.type, worker_start_time=worker_start)
        _end_epoch(epoch, step, metrics, history, nets, optimizers, val_data, preset, config, rank, world, bf16,
                   device, train_step.average)


def _resume(nets, preset: Preset, run_dir: str):
    """Load Ray Train's checkpoint into `nets` if there is one: (epoch, step, optimizer state, G's average)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0, None, None
    with checkpoint.as_directory() as directory:
        loaded = load_checkpoint(directory, with_optimizer=True)
    if not same_model(loaded.preset, preset):
        raise F2MError(preset_mismatch_message(run_dir, loaded.preset, preset))
    for net, key in zip(nets, ("generator", "d_margin", "d_shape")):
        net.load_state_dict(loaded.model_state[key])
    return loaded.epoch, loaded.step, loaded.optim_state, loaded.model_state.get(AVERAGE_KEY)


def _prepare(nets, preset: Preset, optim_state, average_state, bf16: bool, rank: int):
    """DDP-wrapped nets, their optimizers (with resumed state), the GAN step (with G's weight average when
    TrainConfig.ema_kimg asks for one) and its augmentation RNG."""
    import ray.train.torch

    cfg = preset.train
    ddp = {"broadcast_buffers": False}
    nets = tuple(ray.train.torch.prepare_model(net, parallel_strategy_kwargs=ddp) for net in nets)
    optimizer_g, optimizer_d = make_optimizers(*nets, cfg)
    if optim_state:  # after the move to the device: Adam's state follows its parameters' device
        optimizer_g.load_state_dict(optim_state["generator"])
        optimizer_d.load_state_dict(optim_state["discriminators"])
    augment_rng = torch.Generator()
    average = None
    if cfg.ema_kimg > 0:
        average = WeightAverage(nets[0], cfg.ema_kimg * 1000, cfg.batch_size)
        if average_state:  # else it starts from the (resumed) live weights
            average.module.load_state_dict(average_state)
    train_step = Feature2MassStep(*nets, optimizer_g, optimizer_d, preset.loss, bf16,
                                  d_augment=cfg.d_augment, augment_generator=augment_rng,
                                  mix_generator=torch.Generator().manual_seed(cfg.seed * 1009 + rank),
                                  average=average)
    return nets, (optimizer_g, optimizer_d), train_step, augment_rng


def _start_history(config: dict[str, Any], start_epoch: int) -> list[dict]:
    """Rank 0's metrics so far, with this start's row (a restart is counted within the `train` call)."""
    # Epochs after the checkpoint we resume from were logged by an attempt that died: drop them.
    logged = read_metrics(config["run_dir"], events=True)
    history = [row for row in logged if row.get("epoch", 0) <= start_epoch]  # start/restart rows stay
    history.append(start_event(logged, config["session"], start_epoch, config["max_failures"], time.time()))
    write_metrics(config["run_dir"], history)
    return history


def _train_epoch(epoch: int, step: int, nets, train_step, augment_rng, train_shard, config, rank: int, world: int,
                 device):
    """One epoch of GAN steps on this rank's shard; the losses averaged over ranks: (metrics, step)."""
    import torch.distributed as dist

    cfg = Preset.from_dict(config["preset"]).train

    augment_rng.manual_seed(_seed_for(cfg.seed, epoch, rank))
    epoch_start = time.time()
    sums = torch.zeros(len(train_step.metric_names), dtype=torch.float64, device=device)
    batches = 0
    batch_iter = train_shard.iter_torch_batches(
        batch_size=cfg.batch_size // world,
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
        _average_buffers(nets, world)
        if train_step.average is not None:
            train_step.average.copy_buffers(nets[0])
    means = (sums / counts.clamp(min=1)).tolist()
    checksums = [state_checksum(*nets)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, checksums[0])
        checksums = gathered
    images_seen = int(counts.item()) * (cfg.batch_size // world)
    return {
        "epoch": epoch,
        "step": step,
        "images": images_seen,
        "train_seconds": train_seconds,
        "images_per_second": images_seen / max(train_seconds, 1e-9),
        **dict(zip(train_step.metric_names, means)),
        "rank_checksums": checksums,
        "epoch_start_time": epoch_start,
    }, step


def _end_epoch(epoch: int, step: int, metrics: dict[str, Any], history: list[dict], nets, optimizers, val_data,
               preset: Preset, config: dict[str, Any], rank: int, world: int, bf16: bool, device,
               average: WeightAverage | None = None) -> None:
    """Rank 0: evaluation, metrics.jsonl, loss curve, sample grid, checkpoint. Every rank: ray.train.report."""
    import ray.train

    cfg, run_dir = preset.train, config["run_dir"]
    final = epoch == cfg.epochs
    save_now = final or epoch % cfg.checkpoint_every == 0
    with tempfile.TemporaryDirectory(prefix="f2m-ckpt-") as local_dir:
        ray_checkpoint = None
        if rank == 0:
            generator, d_margin, d_shape = nets
            batches_val = val_data.iter_torch_batches(batch_size=VAL_BATCH, device=device)
            metrics.update(evaluate_real(generator, d_margin, d_shape, batches_val, device, bf16))
            if final or epoch % cfg.sample_every == 0:
                drawing = average.module if average is not None else generator  # what synthesis will use
                _write_sample_grid(run_dir, epoch, drawing, config["samples"], device)
                if config.get("mass_probe"):
                    metrics.update(probe_masses(drawing, config["mass_probe"], device))
            metrics["checkpoint"] = checkpoint_dir_name(epoch) if save_now else None
            metrics["time"] = time.time()
            history.append(metrics)
            write_metrics(run_dir, history)
            epochs_so_far = [row for row in history if "epoch" in row]
            write_bytes(join(run_dir, LOSS_CURVE_FILE), loss_curve_png(epochs_so_far, config["chance"]))
            if save_now:
                save_checkpoint(
                    local_dir, preset, generator, d_margin, d_shape, epoch, step,
                    optimizers={"generator": optimizers[0], "discriminators": optimizers[1]},
                    extra={"run": os.path.basename(run_dir.rstrip("/")), "data": config["data"],
                           "world_size": world, "train_rows": config["train_rows"]},
                    generator_average=average.module if average is not None else None,
                )
                ray_checkpoint = ray.train.Checkpoint.from_directory(local_dir)
        ray.train.report(
            metrics,
            checkpoint=ray_checkpoint,
            checkpoint_dir_name=checkpoint_dir_name(epoch) if save_now else None,
        )


@torch.no_grad()
def probe_masses(generator, probe: dict[str, Any], device) -> dict[str, float]:
    """Mass fidelity and identity of G's reconstructions of held-out phantoms (f2m_ray.data.phantom.mass_probe),
    per category then averaged: whether G draws the mass it is given or a category template."""
    net = unwrap(generator)
    was_training = net.training
    net.eval()
    try:
        recon = net(torch.as_tensor(probe["images"]).unsqueeze(1).to(device),
                    torch.as_tensor(probe["margins"]).to(device),
                    torch.as_tensor(probe["shapes"]).to(device)).float().squeeze(1).cpu().numpy()
    finally:
        net.train(was_training)
    scores = list(score_probe(probe, recon).values())
    return {"mass_fidelity": float(np.mean([m.fidelity for m in scores])),
            "mass_identity": float(np.mean([m.identity for m in scores]))}


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
