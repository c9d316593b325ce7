"""Streamed synthesis against reading the written Parquet, as a training job iterates them.

    (s)  stream(model, category, n, decode_images=True).iter_torch_batches(...): masses decoded on the fly
         by Ray Data actors (the same rows `f2m-ray synthesize` writes), nothing on disk
    (r)  open_synthetic(OUT, decode_images=True).iter_torch_batches(...) over the dataset written once
         by `synthesize` with the same arguments (its write time printed apart)

Both run on the same local Ray session (started before the clock), in interleaved rounds; the
medians are compared. A stream pays the decode on every pass; reading pays it once at synthesis.

    python benchmarks/stream_throughput.py                    # shipped model, 5,000 masses, batch 256
    python benchmarks/stream_throughput.py --n 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

from f2m_ray.runtime.cluster import ensure_ray
from f2m_ray.synth.driver import synthesize
from f2m_ray.synth.plan import SynthesisConfig
from f2m_ray.synthetic import open_synthetic, stream
from train_throughput import cpu_name

CATEGORY = "spiculated-irregular"


def _drain(dataset, batch_size: int) -> tuple[int, float, float]:
    """(masses, seconds to the first batch, seconds in all) of one pass."""
    start = time.perf_counter()
    first, masses = None, 0
    for batch in dataset.iter_torch_batches(batch_size=batch_size):
        first = first if first is not None else time.perf_counter() - start
        masses += len(batch["image"])
    return masses, first or 0.0, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pretrained")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}, 2 threads; model {args.model}, {args.n} masses, batch {args.batch_size}")
    ensure_ray()
    folder = tempfile.mkdtemp(prefix="f2m-stream-")
    try:
        out = f"{folder}/synthetic"
        start = time.perf_counter()
        synthesize(SynthesisConfig(categories=(CATEGORY,), n=args.n, out=out, model=args.model), report=None, use_ray=True)
        print(f"synthesize (written once): {args.n / (time.perf_counter() - start):,.0f} masses/s")
        rates: dict[str, list[float]] = {"stream": [], "read": []}
        firsts: dict[str, list[float]] = {"stream": [], "read": []}
        for _ in range(args.rounds):
            for name, make in (("stream", lambda: stream(args.model, CATEGORY, args.n, decode_images=True)),
                               ("read", lambda: open_synthetic(out, decode_images=True))):
                masses, first, seconds = _drain(make(), args.batch_size)
                assert masses == args.n, (name, masses)
                rates[name].append(masses / seconds)
                firsts[name].append(first)
        for name in rates:
            print(f"{name:7s} {statistics.median(rates[name]):8,.0f} masses/s   first batch after "
                  f"{statistics.median(firsts[name]):.1f} s   (rounds: {', '.join(f'{r:,.0f}' for r in rates[name])})")
        print(f"stream / read: {statistics.median(rates['stream']) / statistics.median(rates['read']):.2f}x")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
