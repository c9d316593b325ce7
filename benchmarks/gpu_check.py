"""One accelerator check: plain-loop training and bare decode of `small` and `paper`, against the peak.

Needs torch and this package's pure modules only (no Ray, no data files): the training batches are
random images, which cost what phantoms cost. On a GPU it runs in bf16 autocast (the `train`
default there) and measures the bf16 and fp32 matmul peaks in the same run; without one it runs a
CPU dry mode (few steps, fp32) that checks the script end to end.

    python benchmarks/gpu_check.py            # cuda if present, else the CPU dry mode
    python benchmarks/gpu_check.py --dry-run  # the CPU dry mode even on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from f2m_ray.config import get_preset
from f2m_ray.core.inference import inference_decoder
from f2m_ray.core.networks import build_networks
from f2m_ray.core.step import Feature2MassStep, make_optimizers


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int, repeats: int) -> float:
    """GFLOP/s of an n x n matmul, best of `repeats`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = max(best, 10 * 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def train_rate(preset_name: str, device: str, bf16: bool, batch: int, steps: int) -> dict:
    """img/s of Feature2MassStep (D1 + D2 then G) in a plain loop, and GFLOP per image per step."""
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    nets = [net.to(device) for net in build_networks(preset.model)]
    opt_g, opt_d = make_optimizers(*nets, preset.train)
    step = Feature2MassStep(*nets, opt_g, opt_d, preset.loss, autocast_bf16=bf16,
                            d_augment=preset.train.d_augment,
                            augment_generator=torch.Generator(device=device).manual_seed(0))
    images = torch.rand(batch, 1, 64, 64, device=device) * 2 - 1
    margins = torch.randint(0, 5, (batch,), device=device)
    shapes = torch.randint(0, 5, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        step(images, margins, shapes)
    flops = counter.get_total_flops() / batch
    for _ in range(2):  # warm-up (cuDNN autotuning, allocator)
        step(images, margins, shapes)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(images, margins, shapes)
    sync(device)
    rate = steps * batch / (time.perf_counter() - start)
    return {"img_s": rate, "gflop_per_image": flops / 1e9, "gflop_s": rate * flops / 1e9}


def decode_rate(preset_name: str, device: str, bf16: bool, batch: int, repeats: int) -> dict:
    """masses/s of the synthesis decoder on prepared features (no planning, PNG or I/O)."""
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    generator = build_networks(preset.model)[0].eval()
    decoder = inference_decoder(generator.decoder).to(device)
    features = torch.randn(batch, preset.model.feature_dim, device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        decoder(features)
    flops = counter.get_total_flops() / batch
    context = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if bf16 else torch.inference_mode()
    with torch.inference_mode(), context:
        decoder(features)
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            decoder(features)
        sync(device)
    rate = repeats * batch / (time.perf_counter() - start)
    return {"masses_s": rate, "gflop_per_mass": flops / 1e9, "gflop_s": rate * flops / 1e9}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU dry mode even where a GPU is present")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if gpu else "cpu"
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(0)
        plan = {"peak_n": 8192, "peak_repeats": 5, "train_steps": 50, "train_batch": {"small": 512, "paper": 512},
                "decode_batch": 4096, "decode_repeats": 50}
    else:
        name = "CPU dry mode"
        plan = {"peak_n": 512, "peak_repeats": 2, "train_steps": 2, "train_batch": {"small": 8, "paper": 4},
                "decode_batch": 16, "decode_repeats": 2}
    print(f"device: {name}; torch {torch.__version__}")
    results: dict = {"device": name, "torch": torch.__version__, "plan": plan}
    peaks = {"fp32": matmul_peak(device, torch.float32, plan["peak_n"], plan["peak_repeats"])}
    if gpu:
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, plan["peak_n"], plan["peak_repeats"])
    results["peak_gflop_s"] = peaks
    print("matmul peak: " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peaks.items()))
    reference = peaks["bf16" if gpu else "fp32"]
    for preset in ("small", "paper"):
        t = train_rate(preset, device, gpu, plan["train_batch"][preset], plan["train_steps"])
        d = decode_rate(preset, device, gpu, plan["decode_batch"], plan["decode_repeats"])
        results[preset] = {"train": t, "decode": d}
        print(f"{preset:6} train  {t['img_s']:>10,.0f} img/s     {t['gflop_per_image']:.2f} GFLOP/img  "
              f"{t['gflop_s'] / reference:.2f} of the {'bf16' if gpu else 'fp32'} peak")
        print(f"{preset:6} decode {d['masses_s']:>10,.0f} masses/s  {d['gflop_per_mass']:.3f} GFLOP/mass "
              f"{d['gflop_s'] / reference:.2f} of the {'bf16' if gpu else 'fp32'} peak")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
