"""Synthesis throughput: the Ray Data pipeline vs one process, on the same model and bank.

    (a) bare decoder loop in one process: decode only, no planning, no PNG, no I/O
        (torch threads = cores, batches of --batch-size, mixed features prepared beforehand)
    (b) plain single-process loop: plan + mix + decode + PNG + Parquet files, the same
        per-sample work as (c), shard after shard (synthesize(use_ray=False), threads = cores)
    (c) the Ray Data pipeline end to end (synthesize(), Ray already started: actor start-up,
        model loading, every file and the manifest are inside the measured time)

All three decode the same number of masses with the same model (random-init weights with
Kaiming scaling so that images carry texture and PNGs have a realistic size, ~3 KB).
They run in interleaved rounds (order rotated each round) and the medians are compared,
so that load from other processes on a shared machine shows up as a spread, not a bias. The 100,000-mass wall time is measured
with --full, else extrapolated from (c) as start-up + 100,000 / steady rate.

    python benchmarks/synthesis_throughput.py                      # paper preset, 10,000 masses
    python benchmarks/synthesis_throughput.py --preset small --n 20000
    python benchmarks/synthesis_throughput.py --full               # also run --n 100000 for real
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from f2m_ray.checkpoint import load_checkpoint, save_checkpoint
from f2m_ray.config import get_preset
from f2m_ray.bank import default_bank_path, load_feature_bank, write_feature_bank
from f2m_ray.runtime.actors import local_cores
from f2m_ray.labels import parse_category
from f2m_ray.core.mixing import plan_sample
from f2m_ray.core.networks import build_networks
from f2m_ray.data.phantom import generate_phantoms
from f2m_ray.core.images import to_model_range
from f2m_ray.data.rows import assign_split
from f2m_ray.core.images import to_uint8
from f2m_ray.schema import png_bytes
from f2m_ray.core.mixing import mix_rows
from f2m_ray.synth.driver import synthesize
from f2m_ray.synth.plan import SynthesisConfig

CATEGORY = "spiculated-irregular"


def make_model(root: str, preset_name: str, seeds: int) -> str:
    """A random-init checkpoint plus a bank of `seeds` phantoms of CATEGORY."""
    torch.manual_seed(0)
    preset = get_preset(preset_name)
    nets = build_networks(preset.model)
    for module in nets[0].modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, a=0.2)  # textured images, not flat grey
    checkpoint = save_checkpoint(os.path.join(root, "ckpt"), preset, *nets, epoch=1, step=1)
    rows = list(generate_phantoms(seeds, 0, [parse_category(CATEGORY)]))
    images = np.stack([to_model_range(img) for _, img, _ in rows])
    margins = np.array([c.margin_id for *_, c in rows])
    shapes = np.array([c.shape_id for *_, c in rows])
    ckpt = load_checkpoint(checkpoint)
    with torch.no_grad():
        features = ckpt.generator().encode(torch.from_numpy(images)[:, None], torch.from_numpy(margins),
                                           torch.from_numpy(shapes)).numpy()
    ids = np.array([f"roi-{i:04d}" for i in range(seeds)])
    write_feature_bank(default_bank_path(checkpoint), ids, margins, shapes, np.array(assign_split(list(ids), 0.1, 0)),
                       ids, np.array(["phantom"] * seeds), [png_bytes(to_uint8(i)) for i in images], features,
                       ckpt.model_id, info={"checkpoint": checkpoint})
    return checkpoint


def bare_decode(checkpoint: str, n: int, batch_size: int, device: str = "cpu") -> float:
    """(a): masses/s of decode alone; the mixed features are made before the clock starts."""
    torch.set_num_threads(local_cores())
    generator = load_checkpoint(checkpoint).generator(device)
    bank = load_feature_bank(default_bank_path(checkpoint))
    pool = bank.pool(parse_category(CATEGORY))
    plans = [plan_sample(0, parse_category(CATEGORY).id, i, len(pool)) for i in range(batch_size)]
    mixed = torch.from_numpy(mix_rows(bank.features[np.stack([pool[p.seed_positions] for p in plans])],
                                      np.stack([p.weights for p in plans]))).to(device)  # (B, D)
    # As the synthesis actors do: bf16 autocast on GPU, images back to the host as uint8-ready floats.
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        generator.decode(mixed).float().cpu()  # warm-up: first-call allocations, kernel selection
        start = time.perf_counter()
        for _ in range(n // batch_size):
            generator.decode(mixed).float().cpu()
        seconds = time.perf_counter() - start
    return (n // batch_size) * batch_size / seconds


def pipeline(checkpoint: str, out: str, n: int, rows_per_file: int, batch_size: int, use_ray: bool,
             workers: int | None) -> tuple[float, float, float | None]:
    """(b) or (c): (masses/s, seconds) of a whole synthesize() call, and its steady rate.

    The steady rate counts the files finished after the first wave (one file per actor):
    rows / time between the end of the first wave and the last file; None with too few files.
    """
    shutil.rmtree(out, ignore_errors=True)
    config = SynthesisConfig(categories=(CATEGORY,), n=n, out=out, model=checkpoint, rows_per_file=rows_per_file,
                             batch_size=batch_size, workers=workers)
    finished: list[tuple[float, int]] = []
    summary = synthesize(config, report=lambda line: print(f"    {line}", file=sys.stderr), use_ray=use_ray,
                         on_file=lambda record: finished.append((time.perf_counter(), record["rows"])))
    assert summary.rows == n
    wave = min(workers or local_cores(), len(finished)) if use_ray else 1
    steady = None
    if len(finished) > wave:
        rows = sum(r for _, r in finished[wave:])
        steady = rows / (finished[-1][0] - finished[wave - 1][0])
    return n / summary.seconds, summary.seconds, steady


def stage_costs(checkpoint: str, samples: int = 512) -> dict[str, float]:
    """Milliseconds per mass of the non-decode stages, one thread (what (c) adds to (a))."""
    torch.set_num_threads(1)
    bank = load_feature_bank(default_bank_path(checkpoint))
    category = parse_category(CATEGORY)
    pool = bank.pool(category)
    start = time.perf_counter()
    plans = [plan_sample(0, category.id, i, len(pool)) for i in range(samples)]
    plan_ms = (time.perf_counter() - start) / samples * 1e3
    start = time.perf_counter()
    mixed = np.concatenate([  # in decode-sized batches, as the actors mix
        mix_rows(bank.features[np.stack([pool[p.seed_positions] for p in plans[i:i + 64]])],
                 np.stack([p.weights for p in plans[i:i + 64]]))
        for i in range(0, samples, 64)
    ])
    mix_ms = (time.perf_counter() - start) / samples * 1e3
    generator = load_checkpoint(checkpoint).generator()
    with torch.inference_mode():
        start = time.perf_counter()
        images = to_uint8(generator.decode(torch.from_numpy(mixed[:64])).numpy()[:, 0])
        decode_ms = (time.perf_counter() - start) / 64 * 1e3
    start = time.perf_counter()
    sizes = [len(png_bytes(images[i % 64])) for i in range(samples)]
    png_ms = (time.perf_counter() - start) / samples * 1e3
    return {"plan": plan_ms, "mix": mix_ms, "decode (1 thread)": decode_ms, "png": png_ms, "png_bytes": float(np.mean(sizes))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--n", type=int, default=10_000, help="masses per measurement")
    parser.add_argument("--rows-per-file", type=int, default=1_024,
                        help="a multiple of --batch-size: no padded decode batches at file boundaries")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="actor pool size for (c) [default: auto]")
    parser.add_argument("--seeds", type=int, default=40, help="bank size (one category)")
    parser.add_argument("--full", action="store_true", help="also measure --n 100000 end to end")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (a), (b), (c)")
    parser.add_argument("--no-ray", action="store_true",
                        help="(a) and (b) only, on the GPU when there is one (machines without Ray)")
    args = parser.parse_args()

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="f2mb", dir="/tmp"))
    root = tempfile.mkdtemp(prefix="f2m-synth-bench-")
    try:
        checkpoint = make_model(root, args.preset, args.seeds)
        print(f"preset {args.preset}, {args.n} masses per run, {local_cores()} cores, decode batch {args.batch_size}, "
              f"{args.rows_per_file} rows per file; load average {os.getloadavg()[0]:.1f}")
        costs = stage_costs(checkpoint)
        print("per-mass cost, one thread: " + ", ".join(
            f"{k} {v:.0f} B" if k == "png_bytes" else f"{k} {v:.3f} ms" for k, v in costs.items()))
        out = os.path.join(root, "out")
        device = "cuda" if args.no_ray and torch.cuda.is_available() else "cpu"
        if args.no_ray:
            a1 = bare_decode(checkpoint, args.n, args.batch_size, device)
            b1, _, _ = pipeline(checkpoint, out, args.n, args.rows_per_file, args.batch_size, use_ray=False, workers=None)
            print(f"(a) bare decoder loop on {device}         {a1:8.1f} masses/s")
            print(f"(b) plain loop on {device}: decode+PNG+Parquet {b1:8.1f} masses/s   b/a = {b1 / a1:.3f}")
            return

        from f2m_ray.runtime.cluster import ensure_ray

        ensure_ray()  # Ray's own start-up is not part of (c); actor start-up is
        runs: dict[str, list[float]] = {"a": [], "b": [], "c": []}
        c_seconds = []
        steady: dict[str, list[float]] = {"b": [], "c": []}
        for round_index in range(args.rounds):
            # Rotate the order so that no variant always runs in the same slot of a load swing.
            order = "abc"[round_index % 3:] + "abc"[: round_index % 3]
            for kind in order:
                if kind == "a":
                    runs["a"].append(bare_decode(checkpoint, args.n, args.batch_size))
                else:
                    rate, seconds, steady_rate = pipeline(checkpoint, out, args.n, args.rows_per_file,
                                                          args.batch_size, use_ray=kind == "c", workers=args.workers)
                    runs[kind].append(rate)
                    if steady_rate:
                        steady[kind].append(steady_rate)
                    if kind == "c":
                        c_seconds.append(seconds)
            r = {k: v[-1] for k, v in runs.items()}
            print(f"round {round_index + 1} ({order}): a {r['a']:.1f}, b {r['b']:.1f}, c {r['c']:.1f} masses/s; "
                  f"c/a {r['c'] / r['a']:.3f}, c/b {r['c'] / r['b']:.3f}; load average {os.getloadavg()[0]:.1f}")
        a, b, c = (float(np.median(runs[k])) for k in "abc")
        spread = {k: ", ".join(f"{x:.1f}" for x in v) for k, v in runs.items()}
        print()
        print(f"(a) bare decoder loop, 1 process      {a:8.1f} masses/s   (median of {spread['a']})")
        print(f"(b) plain loop: decode+PNG+Parquet    {b:8.1f} masses/s   (median of {spread['b']})")
        print(f"(c) Ray Data pipeline, end to end     {c:8.1f} masses/s   (median of {spread['c']})")
        print(f"c/a = {c / a:.3f}   c/b = {c / b:.3f}   (medians; targets on 2 cores: c/a >= 0.85, c/b >= 0.95)")
        if steady["b"] and steady["c"]:
            sb, sc = float(np.median(steady["b"])), float(np.median(steady["c"]))
            startup = float(np.median(c_seconds)) - args.n / sc
            print(f"steady state (files after the first wave): b {sb:.1f}, c {sc:.1f} masses/s, c/b = {sc / sb:.3f}; "
                  f"(c)'s fixed start-up ~{startup:.1f} s (actor processes, imports, model and bank)")
            for n_big in (40_000, 100_000):
                print(f"  expected c/b at --n {n_big}: {(n_big / sb) / (startup + n_big / sc):.3f}")
        if args.full:
            full, full_seconds, _ = pipeline(checkpoint, out, 100_000, 10_000, args.batch_size, use_ray=True,
                                             workers=args.workers)
            print(f"--n 100000 ({args.preset}): {full_seconds:.0f} s measured ({full:.1f} masses/s, 10 files)")
        else:
            print(f"--n 100000 ({args.preset}): ~{100_000 / c:.0f} s extrapolated from (c)'s median rate on "
                  f"{args.n} masses (actor start-up counted once per {args.n}, so slightly pessimistic)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
