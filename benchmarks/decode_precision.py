"""What `synthesize --precision bf16` changes on CPU: decode speed, and the images (and labels) it makes.

    python benchmarks/decode_precision.py                      # the shipped model; speed of small and paper
    python benchmarks/decode_precision.py --judge JUDGE        # also the judge's label fidelity on both

Speed: one thread, decode batches of 64 (as synthesis), fp32 and bf16 autocast interleaved over
--rounds rounds, medians; `small` is the shipped model, `paper` a randomly initialised paper-size
generator (the cost of a decode does not depend on its weights). Quality: --n masses of every
category of the shipped bank, mixed as `synthesize` mixes them (variance-preserving, K=20),
decoded both ways and compared as the stored 8-bit images: mean and largest absolute difference
in grey levels, share of pixels that differ, PSNR; with --judge, the share of masses whose
margin and shape the judge reads as their labels, for each precision.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from f2m_ray.bank import default_bank_path, load_feature_bank  # noqa: E402
from f2m_ray.checkpoint import find_checkpoint, load_generator  # noqa: E402
from f2m_ray.config import PRESETS  # noqa: E402
from f2m_ray.core.images import to_model_range, to_uint8  # noqa: E402
from f2m_ray.core.inference import inference_decoder  # noqa: E402
from f2m_ray.core.mixing import mix_rows  # noqa: E402
from f2m_ray.core.networks import Generator  # noqa: E402
from f2m_ray.labels import parse_category  # noqa: E402
from f2m_ray.runtime.actors import keep_large_allocations  # noqa: E402

BATCH = 64


def decode(decoder, features: np.ndarray, bf16: bool) -> np.ndarray:
    out = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(features), BATCH):
            out.append(decoder(torch.from_numpy(features[i:i + BATCH])).float().numpy()[:, 0])
    return to_uint8(np.concatenate(out))


def speed(generator, feature_dim: int, rounds: int) -> dict[str, float]:
    x = np.random.default_rng(0).standard_normal((4 * BATCH, feature_dim)).astype(np.float32)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    decode(generator, x[:BATCH], False), decode(generator, x[:BATCH], True)  # warm-up
    for _ in range(rounds):
        for name in ("fp32", "bf16"):
            start = time.perf_counter()
            decode(generator, x, name == "bf16")
            times[name].append((time.perf_counter() - start) / len(x) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def mixes(bank, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n variance-preserving K=20 mixes per category of the bank: (features, margin ids, shape ids)."""
    rng = np.random.default_rng(seed)
    features, margins, shapes = [], [], []
    for name in sorted(bank.counts()):
        pool = bank.pool(parse_category(name))
        k = min(20, len(pool))
        rows = np.stack([rng.choice(pool, k, replace=False) for _ in range(n)])
        weights = rng.dirichlet(np.ones(k), n)
        centroid = bank.features[pool].mean(axis=0)
        features.append(mix_rows(bank.features[rows], weights, centroid, len(pool)))
        margins += [bank.margin[pool[0]]] * n
        shapes += [bank.shape[pool[0]]] * n
    return np.concatenate(features), np.array(margins), np.array(shapes)


def fidelity(judge_path: str, images: np.ndarray, margins: np.ndarray, shapes: np.ndarray) -> float:
    from f2m_ray.judge_model import load_judge, predict

    judge = load_judge(judge_path)
    pred = predict(judge.model, to_model_range(images))
    return float(np.mean((pred.margin == margins) & (pred.shape == shapes)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pretrained")
    parser.add_argument("--judge", default=None)
    parser.add_argument("--n", type=int, default=100, help="masses per category [default: 100]")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_large_allocations()  # as every synthesis actor does
    checkpoint = find_checkpoint(args.model)
    generator, meta = load_generator(checkpoint)
    generator = inference_decoder(generator.decoder)  # what synthesis decodes with
    paper = inference_decoder(Generator(PRESETS["paper"].model).eval().decoder)
    print(f"decode on 1 thread ({torch.backends.cpu.get_cpu_capability()}), batch {BATCH}, the synthesis decoder, "
          f"medians of {args.rounds} interleaved rounds (ms per mass):")
    for name, net, dim in (("small (shipped)", generator, meta["preset"]["model"]["feature_dim"]),
                           ("paper", paper, PRESETS["paper"].model.feature_dim)):
        t = speed(net, dim, args.rounds)
        print(f"  {name:16s} fp32 {t['fp32']:.2f}  bf16 {t['bf16']:.2f}  bf16 speed-up {t['fp32'] / t['bf16']:.2f}x")
    bank = load_feature_bank(default_bank_path(checkpoint))
    features, margins, shapes = mixes(bank, args.n)
    a, b = decode(generator, features, False), decode(generator, features, True)
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    psnr = 10 * np.log10(255.0 ** 2 / np.mean(d.astype(np.float64) ** 2))
    print(f"images of {len(a)} masses ({args.n} per category), bf16 against fp32: mean |difference| "
          f"{d.mean():.3f} grey levels, largest {d.max()}, pixels that differ {100 * (d > 0).mean():.2f}%, "
          f"PSNR {psnr:.1f} dB")
    if args.judge:
        f32, f16 = fidelity(args.judge, a, margins, shapes), fidelity(args.judge, b, margins, shapes)
        print(f"label fidelity (judge reads margin and shape as labeled): fp32 {f32:.4f}  bf16 {f16:.4f}  "
              f"difference {f16 - f32:+.4f}")


if __name__ == "__main__":
    main()
