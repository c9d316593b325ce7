"""Training throughput: Ray Train (N DDP workers) vs a plain single-process PyTorch loop.

Both do the same work per step (f2m_ray.core.step.Feature2MassStep: D1 + D2 then G, with the
paper's augmentation) on the same training rows (the train split of the same phantoms),
with the same preset and global batch, and the same total torch threads (the plain loop
uses all cores; each of the N CPU workers uses cores / N). Steady state = every epoch
after the first; Ray's fixed start-up cost (fit() called -> first epoch starts, plus the
first epoch's extra time) is reported on its own line. The plain loop runs before and
after Ray, so that load from other processes shows up as a spread rather than a bias.

    python benchmarks/train_throughput.py                       # small preset, 1000 phantoms, 3 epochs
    python benchmarks/train_throughput.py --preset tiny --data phantom:400
    python benchmarks/train_throughput.py --plain-only --device cuda --preset paper   # GPU, no Ray
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from f2m_ray.core.augment import augment
from f2m_ray.config import get_preset
from f2m_ray.core.networks import build_networks
from f2m_ray.data.phantom import generate_phantoms
from f2m_ray.data.phantom import DEFAULT_CATEGORIES
from f2m_ray.core.images import to_model_range
from f2m_ray.data.rows import assign_split
from f2m_ray.core.step import Feature2MassStep, make_optimizers
from f2m_ray.runtime.trainer import threads_per_worker
from synthesis_throughput import matmul_peak


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


@dataclass
class EpochTiming:
    epoch: int
    steps: int
    images: int
    seconds: float  # the training loop only (no evaluation, no checkpoint)
    losses: dict


def phantom_train_rows(n: int, seed: int, val_fraction: float):
    """The train split of phantoms 0..n-1, as `read_labeled('phantom:N')` splits them."""
    rows = list(generate_phantoms(n, seed, DEFAULT_CATEGORIES))
    ids = [f"phantom-{i:06d}" for i, _, _ in rows]
    keep = [r for r, split in zip(rows, assign_split(ids, val_fraction, seed)) if split == "train"]
    images = np.stack([to_model_range(img) for _, img, _ in keep])  # (N, 64, 64)
    margins = np.array([c.margin_id for _, _, c in keep], dtype=np.int64)
    shapes = np.array([c.shape_id for _, _, c in keep], dtype=np.int64)
    return images, margins, shapes


def plain_loop(preset, images, margins, shapes, epochs: int, threads: int, device: str, bf16: bool,
               batch: int | None = None) -> list[EpochTiming]:
    """The same steps as a Ray Train worker, in one process, one global batch per step (or `batch`)."""
    cfg = preset.train
    if device == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    generator, d_margin, d_shape = (net.to(device) for net in build_networks(preset.model))
    optimizer_g, optimizer_d = make_optimizers(generator, d_margin, d_shape, cfg)
    rng = torch.Generator().manual_seed(cfg.seed)
    step = Feature2MassStep(generator, d_margin, d_shape, optimizer_g, optimizer_d, preset.loss,
                            autocast_bf16=bf16 and device == "cuda", d_augment=cfg.d_augment, augment_generator=rng)
    order_rng = np.random.default_rng(cfg.seed)
    batch = batch or cfg.batch_size
    timings = []
    for epoch in range(1, epochs + 1):
        order = order_rng.permutation(len(images))
        sums: dict[str, float] = {}
        start = time.perf_counter()
        steps = 0
        for lo in range(0, len(order) - batch + 1, batch):  # drop_last, like the workers
            idx = order[lo : lo + batch]
            x = torch.from_numpy(images[idx]).to(device).unsqueeze(1)
            m = torch.from_numpy(margins[idx]).to(device)
            s = torch.from_numpy(shapes[idx]).to(device)
            x = augment(x, flips=cfg.flips, crop_padding=cfg.crop_padding, generator=rng)
            losses = step(x, m, s)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v  # tensors: no sync per step
            steps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        timings.append(EpochTiming(epoch, steps, steps * batch, seconds,
                                   {k: float(v) / max(steps, 1) for k, v in sums.items()}))
    return timings


def step_flops(preset, batch: int = 8) -> float:
    """FLOPs of one Feature2MassStep per image (D1 + D2 then G, forward and backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    nets = build_networks(preset.model)
    step = Feature2MassStep(*nets, *make_optimizers(*nets, preset.train), preset.loss, d_augment=preset.train.d_augment,
                            augment_generator=torch.Generator().manual_seed(0))
    images = torch.rand(batch, 1, 64, 64) * 2 - 1
    labels = torch.zeros(batch, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter:
        step(images, labels, labels)
    return counter.get_total_flops() / batch


def steady(timings: list[EpochTiming]) -> float:
    later = timings[1:] or timings
    return sum(t.images for t in later) / sum(t.seconds for t in later)


def ray_run(preset, data: str, epochs: int, workers: int):
    """f2m_ray.train.driver.train on local Ray; per-epoch timings from the run's metrics.jsonl."""
    from f2m_ray.runtime.cluster import ensure_ray
    from f2m_ray.runtime.console import quiet_ray_data
    from f2m_ray.train.driver import train
    from f2m_ray.train.options import RunOptions
    from f2m_ray.train.report import read_metrics

    with tempfile.TemporaryDirectory(prefix="f2m-bench-") as storage:
        options = RunOptions(data=data, workers=workers, use_gpu=False, storage=storage, name="bench",
                             feature_bank=False)
        summary = train(preset.with_train(epochs=epochs, sample_every=10**6, checkpoint_every=10**6), options,
                        echo=lambda line: print("  ray |", line),
                        start_ray=lambda: (ensure_ray(), quiet_ray_data()))
        rows = read_metrics(os.path.join(storage, "bench"))
    timings = [EpochTiming(r["epoch"], r["step"] - (rows[i - 1]["step"] if i else 0), r["images"],
                           r["train_seconds"], {}) for i, r in enumerate(rows)]
    # per epoch: wall time (epoch start to the next epoch's start) minus the training loop, i.e.
    # evaluation, metrics, pictures, checkpoint and the report barrier; known for all but the last
    extras = [b["epoch_start_time"] - a["epoch_start_time"] - a["train_seconds"] for a, b in zip(rows, rows[1:])]
    return summary, timings, extras


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--data", default="phantom:1000", help="phantom:N")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measurement (the first is warm-up)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-bf16", action="store_true", help="fp32 on GPU")
    parser.add_argument("--plain-only", action="store_true", help="skip Ray (e.g. on a machine without it)")
    parser.add_argument("--no-single-thread", action="store_true",
                        help="skip the reference: one process, one thread, one worker's batch (x workers = ideal)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    preset = get_preset(args.preset)
    n = int(args.data.split(":", 1)[1]) if ":" in args.data else 2000
    cores = len(os.sched_getaffinity(0))
    threads = args.workers * threads_per_worker(args.workers)  # what the Ray workers use together
    bf16 = args.device == "cuda" and not args.no_bf16
    t0 = time.perf_counter()
    images, margins, shapes = phantom_train_rows(n, preset.train.seed, preset.train.val_fraction)
    print(f"preset {preset.name}, {n} phantoms -> {len(images)} train rows ({time.perf_counter() - t0:.1f} s to render), "
          f"global batch {preset.train.batch_size}, {args.epochs} epochs (first = warm-up), {cores} cores, "
          f"device {args.device}{' bf16' if bf16 else ''}")
    if args.device == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(0)}")
    results: dict = {"preset": preset.name, "train_rows": len(images), "epochs": args.epochs, "device": args.device}
    flops = step_flops(preset)
    peak = matmul_peak(threads) if args.device == "cpu" else None
    results.update(gflop_per_image=flops / 1e9, peak_gflop_s=peak)
    if peak:
        print(f"cpu: {cpu_name()}; fp32 matmul peak {peak:.0f} GFLOP/s on {threads} threads; "
              f"a step is {flops / 1e9:.3f} GFLOP per image")
    share = (lambda rate: rate * flops / 1e9 / peak) if peak else (lambda rate: float("nan"))  # noqa: E731

    plain_threads = threads if args.device == "cpu" else cores
    before = plain_loop(preset, images, margins, shapes, args.epochs, plain_threads, args.device, bf16)
    for t in before:
        print(f"  plain | epoch {t.epoch}: {t.steps} steps, {t.images / t.seconds:8.1f} img/s, "
              f"L1 {t.losses.get('l1', float('nan')):.4f}, D margin {t.losses.get('d_margin_loss', float('nan')):.3f}")
    results["plain_before_img_s"] = steady(before)
    results["plain_share_of_peak"] = share(steady(before))
    if args.plain_only:
        print(f"plain loop ({args.device}): {steady(before):.1f} img/s steady state, "
              f"{share(steady(before)):.2f} of the fp32 peak")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return

    summary, timings, extras = ray_run(preset, args.data, args.epochs, args.workers)
    after = plain_loop(preset, images, margins, shapes, args.epochs, plain_threads, args.device, bf16)
    plain = (steady(before) + steady(after)) / 2
    ray_rate = steady(timings)
    steady_seconds = np.mean([t.seconds for t in timings[1:]]) if len(timings) > 1 else timings[0].seconds
    first_extra = timings[0].seconds - steady_seconds
    overhead = float(np.mean(extras[1:])) if len(extras) > 1 else float("nan")  # epochs after the first
    results.update(
        plain_after_img_s=steady(after), plain_img_s=plain, ray_img_s=ray_rate, ratio=ray_rate / plain,
        ray_startup_s=summary.startup_seconds, ray_first_epoch_extra_s=first_extra,
        ray_per_epoch_overhead_s=overhead, steps_per_epoch_plain=before[0].steps,
        steps_per_epoch_ray=timings[0].steps,
    )
    single = None
    if not args.no_single_thread and args.device == "cpu":
        # What one worker's share costs with no Ray and no DDP: x workers is perfect scaling.
        per_worker = preset.train.batch_size // args.workers
        single = plain_loop(preset, images, margins, shapes, args.epochs, 1, "cpu", False, batch=per_worker)
        results.update(single_thread_img_s=steady(single), ideal_img_s=args.workers * steady(single),
                       efficiency_vs_ideal=ray_rate / (args.workers * steady(single)))
    print()
    print(f"{'':34}{'steps/epoch':>12}{'steady img/s':>14}")
    print(f"{f'plain loop (1 process x {plain_threads} threads)':34}{before[0].steps:>12}{plain:>14.1f}"
          f"   (before {steady(before):.1f}, after {steady(after):.1f})")
    print(f"{f'Ray Train ({args.workers} workers x {threads // args.workers} threads)':34}{timings[0].steps:>12}"
          f"{ray_rate:>14.1f}")
    print(f"ratio Ray Train / plain: {ray_rate / plain:.2f}")
    print(f"share of the fp32 peak ({flops / 1e9:.3f} GFLOP per image): plain {share(plain):.2f}, "
          f"Ray Train {share(ray_rate):.2f}")
    results.update(plain_share_of_peak=share(plain), ray_share_of_peak=share(ray_rate))
    if single:
        print(f"{'plain loop (1 process x 1 thread)':34}{single[0].steps:>12}{steady(single):>14.1f}"
              f"   (batch {preset.train.batch_size // args.workers}; x {args.workers} = {args.workers * steady(single):.1f} ideal)")
        print(f"Ray Train / ideal {args.workers}-way data parallelism: {results['efficiency_vs_ideal']:.2f}")
    print(f"Ray fixed start-up: {summary.startup_seconds:.1f} s from fit() to the first epoch, "
          f"+{first_extra:.1f} s in the first epoch; per-epoch evaluation/metrics/report overhead "
          f"{overhead:.1f} s (not in img/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
