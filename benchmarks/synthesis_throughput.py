"""Synthesis throughput against the machine: how close the pipeline comes to the hardware.

    peak  fp32 matmul (2048 x 2048) in one process with a thread per core, GFLOP/s
    FLOPs per mass, counted by torch's FlopCounterMode on the synthesis decoder
          (f2m_ray.core.inference) and on the trained decoder it replaces
    (a)   the strongest bare decode this machine does: the synthesis decoder on prepared features,
          no planning, PNG or I/O, as (a1) one process with a thread per core and (a2) one
          process per core with one thread each; (a) is the faster of the two
    (b)   a plain single-process loop: plan + mix + decode + nearest-seed distance + PNG +
          Parquet files (synthesize(executor="in-process"), threads = cores)
    (c)   the Ray Data pipeline end to end (synthesize(executor="ray"), Ray already started:
          actor start-up, model loading, every file and the manifest are inside the time)

Every variant decodes the same model (random-init weights, Kaiming-scaled so that images
carry texture and PNGs have a realistic size). (a), (b) and (c) run in interleaved rounds
(order rotated) and the medians are compared, so that load from other processes on a shared
machine shows up as spread, not bias.

    python benchmarks/synthesis_throughput.py                     # paper preset, 10,000 masses, 3 rounds
    python benchmarks/synthesis_throughput.py --preset small --n 20000
    python benchmarks/synthesis_throughput.py --full              # also 100,000 masses: (b), (c) and the
                                                                  # command line end to end, and --n 1000
                                                                  # of the shipped model from the command line
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from f2m_ray.bank import default_bank_path, load_feature_bank, write_feature_bank
from f2m_ray.checkpoint import load_checkpoint, load_generator, save_checkpoint
from f2m_ray.config import get_preset
from f2m_ray.core.images import to_model_range, to_uint8
from f2m_ray.core.inference import inference_decoder
from f2m_ray.core.mixing import mix_rows, plan_sample
from f2m_ray.core.networks import build_networks
from f2m_ray.data.phantom import generate_phantoms
from f2m_ray.data.rows import assign_split
from f2m_ray.labels import parse_category
from f2m_ray.runtime.actors import keep_large_allocations, local_cores
from f2m_ray.schema import png_bytes
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


def matmul_peak(threads: int, size: int = 2048, repeats: int = 9) -> float:
    """Best GFLOP/s of an fp32 (size x size) @ (size x size) product on `threads` torch threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9  # the best of the repeats: a peak, not a typical rate


def mixed_features(checkpoint: str, batch_size: int) -> torch.Tensor:
    """One decode batch of mixed features of CATEGORY, as the actors make them (paper mix)."""
    bank = load_feature_bank(default_bank_path(checkpoint))
    pool = bank.pool(parse_category(CATEGORY))
    plans = [plan_sample(0, parse_category(CATEGORY).id, i, len(pool)) for i in range(batch_size)]
    return torch.from_numpy(mix_rows(bank.features[np.stack([pool[p.seed_positions] for p in plans])],
                                     np.stack([p.weights for p in plans])))  # (B, D)


def flops_per_mass(checkpoint: str, batch_size: int) -> tuple[float, float]:
    """(synthesis decoder, trained decoder) FLOPs per mass, counted by torch on one decode batch."""
    from torch.utils.flop_counter import FlopCounterMode

    generator, _ = load_generator(checkpoint)
    features = mixed_features(checkpoint, batch_size)
    counts = []
    for decode in (inference_decoder(generator.decoder), generator.decode):
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            decode(features)
        counts.append(counter.get_total_flops() / batch_size)
    return counts[0], counts[1]


def _decode_loop(checkpoint: str, n: int, batch_size: int, threads: int, barrier=None, results=None) -> float:
    """Decode n masses with the synthesis decoder; masses/s (or (start, end) into `results` when in a pool)."""
    torch.set_num_threads(threads)
    keep_large_allocations()  # as every synthesis actor does
    generator, _ = load_generator(checkpoint)
    decoder = inference_decoder(generator.decoder)
    features = mixed_features(checkpoint, batch_size)
    with torch.inference_mode():
        decoder(features)  # warm-up: first-call allocations, kernel selection
        if barrier is not None:
            barrier.wait()
        start = time.perf_counter()
        for _ in range(n // batch_size):
            decoder(features).numpy()
        end = time.perf_counter()
    if results is not None:
        results.put((start, end))
    return (n // batch_size) * batch_size / (end - start)


def bare_decode_one_process(checkpoint: str, n: int, batch_size: int) -> float:
    """(a1): one process, a torch thread per core."""
    return _decode_loop(checkpoint, n, batch_size, local_cores())


def bare_decode_process_per_core(checkpoint: str, n: int, batch_size: int) -> float:
    """(a2): one process per core with one thread each, started together; all masses / wall time."""
    cores = local_cores()
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(cores), context.Queue()
    share = (n // cores // batch_size) * batch_size
    processes = [context.Process(target=_decode_loop, args=(checkpoint, share, batch_size, 1, barrier, results))
                 for _ in range(cores)]
    for process in processes:
        process.start()
    spans = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return share * cores / (max(end for _, end in spans) - min(start for start, _ in spans))


def pipeline(checkpoint: str, out: str, n: int, rows_per_file: int, batch_size: int, executor: str,
             workers: int | None) -> tuple[float, float, float | None]:
    """(b) or (c): (masses/s, seconds) of a whole synthesize() call, and its steady rate.

    The steady rate counts the files finished after the first wave (one file per actor):
    rows / time between the end of the first wave and the last file; None with too few files.
    """
    shutil.rmtree(out, ignore_errors=True)
    config = SynthesisConfig(categories=(CATEGORY,), n=n, out=out, model=checkpoint, rows_per_file=rows_per_file,
                             batch_size=batch_size, workers=workers, executor=executor)
    finished: list[tuple[float, int]] = []
    summary = synthesize(config, report=lambda line: print(f"    {line}", file=sys.stderr),
                         on_file=lambda record: finished.append((time.perf_counter(), record["rows"])))
    assert summary.rows == n
    wave = min(workers or local_cores(), len(finished)) if executor == "ray" else 1
    steady = None
    if len(finished) > wave:
        rows = sum(r for _, r in finished[wave:])
        steady = rows / (finished[-1][0] - finished[wave - 1][0])
    return n / summary.seconds, summary.seconds, steady


def command_line(args: list[str], cwd: str) -> float:
    """Wall seconds of `f2m-ray ARGS` in a fresh process (Ray's own start-up included when it uses Ray)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "f2m_ray_cli", *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def stage_costs(checkpoint: str, samples: int = 512) -> dict[str, float]:
    """Milliseconds per mass of the stages of one sample, one thread (what (b) and (c) add to (a))."""
    from f2m_ray.core.nearest import NearestImage

    torch.set_num_threads(1)
    bank = load_feature_bank(default_bank_path(checkpoint), with_images=True)
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
    decoder = inference_decoder(load_generator(checkpoint)[0].decoder)
    with torch.inference_mode():
        decoder(torch.from_numpy(mixed[:64]))
        start = time.perf_counter()
        images = to_uint8(decoder(torch.from_numpy(mixed[:64])).numpy()[:, 0])
        decode_ms = (time.perf_counter() - start) / 64 * 1e3
    from f2m_ray.schema import decode_png

    nearest = NearestImage(np.stack([decode_png(bank.images[r]) for r in bank.seed_rows("all")]))
    start = time.perf_counter()
    nearest.rms(images)
    nearest_ms = (time.perf_counter() - start) / 64 * 1e3
    start = time.perf_counter()
    sizes = [len(png_bytes(images[i % 64])) for i in range(samples)]
    png_ms = (time.perf_counter() - start) / samples * 1e3
    return {"plan": plan_ms, "mix": mix_ms, "decode": decode_ms, "nearest seed": nearest_ms, "png": png_ms,
            "png_bytes": float(np.mean(sizes))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--n", type=int, default=10_000, help="masses per measurement")
    parser.add_argument("--rows-per-file", type=int, default=1_024,
                        help="a multiple of --batch-size: no padded decode batches at file boundaries")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="actor pool size for (c) [default: auto]")
    parser.add_argument("--seeds", type=int, default=40, help="bank size (one category)")
    parser.add_argument("--full", action="store_true",
                        help="also 100,000 masses ((b), (c), and the command line end to end) and --n 1000 of the shipped model")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (a), (b), (c)")
    parser.add_argument("--no-ray", action="store_true", help="(a) and (b) only (machines without Ray)")
    args = parser.parse_args()

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="f2mb", dir="/tmp"))
    root = tempfile.mkdtemp(prefix="f2m-synth-bench-")
    cores = local_cores()
    try:
        checkpoint = make_model(root, args.preset, args.seeds)
        peak = matmul_peak(cores)
        synthesis_flops, trained_flops = flops_per_mass(checkpoint, args.batch_size)
        print(f"preset {args.preset}, {args.n} masses per run, {cores} cores, decode batch {args.batch_size}, "
              f"{args.rows_per_file} rows per file; load average {os.getloadavg()[0]:.1f}")
        print(f"machine: fp32 matmul peak {peak:.0f} GFLOP/s on {cores} threads; torch {torch.__version__}, "
              f"{torch.backends.cpu.get_cpu_capability()}")
        print(f"FLOPs per mass: synthesis decoder {synthesis_flops / 1e9:.3f} GFLOP (trained decoder "
              f"{trained_flops / 1e9:.3f}); at peak: {peak * 1e9 / synthesis_flops:.0f} masses/s")
        costs = stage_costs(checkpoint)
        print("per-mass cost, one thread: " + ", ".join(
            f"{k} {v:.0f} B" if k == "png_bytes" else f"{k} {v:.3f} ms" for k, v in costs.items()))
        out = os.path.join(root, "out")
        kinds = ("a1", "a2", "b") + (() if args.no_ray else ("c",))
        if not args.no_ray:
            from f2m_ray.runtime.cluster import ensure_ray

            ensure_ray()  # Ray's own start-up is not part of (c); its actors' start-up is
        runs: dict[str, list[float]] = {k: [] for k in kinds}
        c_seconds: list[float] = []
        steady: dict[str, list[float]] = {"b": [], "c": []}
        for round_index in range(args.rounds):
            order = kinds[round_index % len(kinds):] + kinds[: round_index % len(kinds)]  # rotate the slots
            for kind in order:
                if kind == "a1":
                    runs[kind].append(bare_decode_one_process(checkpoint, args.n, args.batch_size))
                elif kind == "a2":
                    runs[kind].append(bare_decode_process_per_core(checkpoint, args.n, args.batch_size))
                else:
                    rate, seconds, steady_rate = pipeline(checkpoint, out, args.n, args.rows_per_file, args.batch_size,
                                                          "ray" if kind == "c" else "in-process", args.workers)
                    runs[kind].append(rate)
                    if steady_rate:
                        steady[kind].append(steady_rate)
                    if kind == "c":
                        c_seconds.append(seconds)
            print(f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()) +
                  f" masses/s; load average {os.getloadavg()[0]:.1f}")
        med = {k: float(np.median(v)) for k, v in runs.items()}
        a = max(med["a1"], med["a2"])
        spread = {k: ", ".join(f"{x:.1f}" for x in v) for k, v in runs.items()}
        share = lambda rate: 100 * rate * synthesis_flops / (peak * 1e9)  # noqa: E731
        print()
        print(f"(a1) bare decode, 1 process x {cores} threads  {med['a1']:8.1f} masses/s  {share(med['a1']):3.0f}% of peak"
              f"   (median of {spread['a1']})")
        print(f"(a2) bare decode, {cores} processes x 1 thread  {med['a2']:8.1f} masses/s  {share(med['a2']):3.0f}% of peak"
              f"   (median of {spread['a2']})")
        print(f"(b)  plain loop, decode+guards+PNG+Parquet {med['b']:8.1f} masses/s  {share(med['b']):3.0f}% of peak"
              f"   (median of {spread['b']})")
        if args.no_ray:
            print(f"b/a = {med['b'] / a:.3f}")
            return
        c = med["c"]
        print(f"(c)  Ray Data pipeline, end to end         {c:8.1f} masses/s  {share(c):3.0f}% of peak"
              f"   (median of {spread['c']})")
        print(f"at {args.n} masses: c/a = {c / a:.3f}   c/b = {c / med['b']:.3f}   (medians; (a) = the faster of a1, a2)")
        if steady["b"] and steady["c"]:
            sb, sc = float(np.median(steady["b"])), float(np.median(steady["c"]))
            startup = float(np.median(c_seconds)) - args.n / sc
            print(f"steady state (files after the first wave): b {sb:.1f}, c {sc:.1f} masses/s, c/a = {sc / a:.3f}; "
                  f"(c)'s fixed start-up ~{startup:.1f} s (actor processes: Python, Ray's worker, torch, model and bank)")
        if args.full:
            rate_b, seconds_b, _ = pipeline(checkpoint, out, 100_000, 10_000, args.batch_size, "in-process", None)
            rate_c, seconds_c, _ = pipeline(checkpoint, out, 100_000, 10_000, args.batch_size, "ray", args.workers)
            print(f"at 100000 masses (10,000-row files): b {rate_b:.1f} masses/s ({seconds_b:.0f} s), "
                  f"c {rate_c:.1f} masses/s ({seconds_c:.0f} s); c/a = {rate_c / a:.3f}   c/b = {rate_c / rate_b:.3f}")
            shutil.rmtree(out, ignore_errors=True)
            wall = command_line(["synthesize", "--model", checkpoint, "--category", CATEGORY, "--n", "100000",
                                 "--out", out], root)
            print(f"`f2m-ray synthesize --n 100000` ({args.preset}, command line, Ray's start-up included): "
                  f"{wall:.0f} s, {100_000 / wall:.0f} masses/s")
            small = []
            for _ in range(3):
                shutil.rmtree(os.path.join(root, "f2m-synthetic"), ignore_errors=True)
                small.append(command_line(["synthesize", "--category", "spiculate-irregular", "--n", "1000",
                                           "--model", "pretrained"], root))
            print(f"`f2m-ray synthesize --category spiculate-irregular --n 1000` (the shipped small model, command line): "
                  f"median {np.median(small):.1f} s of {', '.join(f'{s:.1f}' for s in small)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
