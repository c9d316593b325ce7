"""Consumer throughput: the README's readers against a plain pyarrow + PIL loop over the same files.

A training job reads (image as float32 in [-1, 1], margin id, shape id) in batches:

    (p)  plain loop, one process: pyarrow.parquet reads each file, PIL decodes each PNG,
         numpy scales it, torch stacks batches of --batch-size
    (t)  SyntheticTorchDataset in a torch DataLoader with --workers worker processes
    (r)  open_synthetic(path, decode_images=True).iter_torch_batches(batch_size=...) on local Ray
         (started before the clock)

Each reader yields every mass once; they run in interleaved rounds and the medians are compared.
The dataset is made first by the shipped model, in this process.

    python benchmarks/consumer_throughput.py                  # 20,000 masses, batch 256, 2 workers
    python benchmarks/consumer_throughput.py --n 50000 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from f2m_ray.synth.driver import synthesize
from f2m_ray.synth.plan import SynthesisConfig
from f2m_ray.synthetic import SyntheticTorchDataset, open_synthetic, synthetic_files

CATEGORY = "spiculated-irregular"


def plain_loop(path: str, batch_size: int) -> int:
    """(p): what a user writes without our readers; returns the masses read."""
    import io

    count = 0
    images, margins, shapes = [], [], []
    for file in synthetic_files(path):
        table = pq.read_table(file, columns=["image", "margin_id", "shape_id"])
        png = table.column("image").combine_chunks().field("bytes").to_pylist()
        for data, margin, shape in zip(png, table.column("margin_id").to_pylist(), table.column("shape_id").to_pylist()):
            with Image.open(io.BytesIO(data)) as img:
                images.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
            margins.append(margin)
            shapes.append(shape)
            if len(images) == batch_size:
                count += len(_batch(images, margins, shapes)[0])
                images, margins, shapes = [], [], []
    if images:
        count += len(_batch(images, margins, shapes)[0])
    return count


def _batch(images, margins, shapes):
    return torch.from_numpy(np.stack(images))[:, None], torch.tensor(margins), torch.tensor(shapes)


def torch_loader(path: str, batch_size: int, workers: int) -> int:
    """(t): the map-style dataset in a DataLoader."""
    loader = torch.utils.data.DataLoader(SyntheticTorchDataset(path), batch_size=batch_size, num_workers=workers)
    return sum(len(images) for images, _, _ in loader)


def ray_batches(path: str, batch_size: int) -> int:
    """(r): the Ray Dataset with decoded images, as torch batches."""
    dataset = open_synthetic(path, decode_images=True)
    return sum(len(batch["image"]) for batch in dataset.iter_torch_batches(batch_size=batch_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="masses in the dataset")
    parser.add_argument("--rows-per-file", type=int, default=5_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="f2mc", dir="/tmp"))
    root = tempfile.mkdtemp(prefix="f2m-consumer-bench-")
    try:
        path = os.path.join(root, "synthetic")
        synthesize(SynthesisConfig(categories=(CATEGORY,), n=args.n, out=path, model="pretrained",
                                   rows_per_file=args.rows_per_file, executor="in-process"), report=None)
        print(f"{args.n} masses in {len(synthetic_files(path))} files, batch {args.batch_size}, "
              f"DataLoader workers {args.workers}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
        from f2m_ray.runtime.cluster import ensure_ray

        ensure_ray()
        readers = {
            "p": lambda: plain_loop(path, args.batch_size),
            "t": lambda: torch_loader(path, args.batch_size, args.workers),
            "r": lambda: ray_batches(path, args.batch_size),
        }
        rates: dict[str, list[float]] = {k: [] for k in readers}
        for round_index in range(args.rounds):
            order = list(readers)[round_index % 3:] + list(readers)[: round_index % 3]
            for kind in order:
                start = time.perf_counter()
                count = readers[kind]()
                rates[kind].append(count / (time.perf_counter() - start))
                assert count == args.n, (kind, count)
            print(f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()) + " masses/s")
        p, t, r = (float(np.median(rates[k])) for k in "ptr")
        print()
        print(f"(p) plain pyarrow + PIL loop, 1 process         {p:8.0f} masses/s")
        print(f"(t) SyntheticTorchDataset, DataLoader x{args.workers}      {t:8.0f} masses/s   t/p = {t / p:.2f}")
        print(f"(r) open_synthetic(...).iter_torch_batches     {r:8.0f} masses/s   r/p = {r / p:.2f}")
        print("(medians; target: both readers >= 0.8x the plain loop)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
