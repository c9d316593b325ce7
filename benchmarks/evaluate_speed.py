"""`evaluate` at the issue's size: N synthetic and M real masses, timed per stage.

The synthetic set is a real synthetic dataset on disk (Parquet + _manifest.json, the layout of
`f2m-ray synthesize`) holding phantoms of another seed in the paper's three categories: the
work evaluate does does not depend on what the images show. Real masses are phantoms. Ray is
left out (it only reads the real ROIs); everything else is the code path of `f2m-ray evaluate`:
decoding the dataset, training the judge, judging, distances, metrics, usefulness, the page.

    python benchmarks/evaluate_speed.py                                  # 10,000 synthetic, 2,000 real
    python benchmarks/evaluate_speed.py --cores 2 --threads 2            # as on a 2-core machine
    python benchmarks/evaluate_speed.py --judge-only --device cuda --epochs 30 60   # judge accuracy

Prints one line per stage with its seconds, then the total next to the 15-minute budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa
import torch

from f2m_ray.evaluation import evaluate as ev
from f2m_ray.evaluation.inputs import read_synthetic
from f2m_ray.evaluation.report_html import render_html
from f2m_ray.evaluation.usefulness import run_in_process, run_on_ray
from f2m_ray.evaluation.judge import LabeledArrays, train_judge
from f2m_ray.judge_model import JudgeConfig, JudgeTrainConfig, LoadedJudge
from f2m_ray.labels import PAPER_CATEGORIES, parse_category
from f2m_ray.data.phantom import generate_phantoms
from f2m_ray.core.images import to_model_range
from f2m_ray.data.rows import assign_split
from f2m_ray.schema import MANIFEST_NAME, SCHEMA_VERSION, SYNTHETIC_SCHEMA, image_column, png_bytes, write_table


def _render(args):
    start, stop, seed, names = args
    categories = [parse_category(n) for n in names] if names else None
    return [(i, img, c.name) for i, img, c in generate_phantoms(stop, seed, categories, start=start)]


def render(n: int, seed: int, categories: list[str] | None, workers: int):
    chunks = [(lo, min(n, lo + 500), seed, categories) for lo in range(0, n, 500)]
    with ProcessPoolExecutor(workers) as pool:
        rows = [row for part in pool.map(_render, chunks) for row in part]
    return rows


def real_arrays(n: int, val_fraction: float, workers: int) -> LabeledArrays:
    rows = render(n, 0, None, workers)
    ids = np.array([f"phantom-{i:06d}" for i, _, _ in rows])
    cats = [parse_category(c) for _, _, c in rows]
    return LabeledArrays(ids, np.stack([to_model_range(im) for _, im, _ in rows]),
                         np.array([c.margin_id for c in cats]), np.array([c.shape_id for c in cats]),
                         np.array(assign_split(list(ids), val_fraction, 0)))


def write_synthetic(out: str, rows, train_ids: list[str]) -> str:
    n = len(rows)
    cats = [parse_category(c) for _, _, c in rows]
    rng = np.random.default_rng(0)
    seeds = [list(rng.choice(train_ids, 20, replace=False)) for _ in range(n)]
    table = pa.table({
        "sample_id": [f"{c.name}-{i:09d}" for i, c in enumerate(cats)], "sample_index": list(range(n)),
        "image": image_column([png_bytes(im) for _, im, _ in rows], [f"{i}.png" for i in range(n)]),
        "height": pa.array([64] * n, pa.int32()), "width": pa.array([64] * n, pa.int32()),
        "margin": [c.margin for c in cats], "shape": [c.shape for c in cats], "category": [c.name for c in cats],
        "margin_id": [c.margin_id for c in cats], "shape_id": [c.shape_id for c in cats], "seed_ids": seeds,
        "weights": [[0.05] * 20] * n, "model_id": ["0" * 16] * n, "bank_id": ["1" * 16] * n, "run_seed": [0] * n,
        "label_confidence": pa.nulls(n, pa.float32()), "nearest_seed_distance": pa.nulls(n, pa.float32()),
    }, schema=SYNTHETIC_SCHEMA)
    write_table(table, os.path.join(out, "part-000.parquet"), row_group_size=1000)
    with open(os.path.join(out, MANIFEST_NAME), "w") as f:
        json.dump({"format": "f2m-ray-synthetic", "schema_version": SCHEMA_VERSION, "model_id": "0" * 16, "rows": n,
                   "counts": {}, "files": [{"path": "part-000.parquet", "category": "mixed", "rows": n,
                                            "start": 0, "stop": n}]}, f)
    return out


def judge_only(real: LabeledArrays, epochs: list[int], device: str, variants: list[str]) -> None:
    configs = {
        "default": JudgeConfig(),
        "no-dropout": JudgeConfig(dropout=0.0),
        "wide": JudgeConfig(stem_channels=16, channels=(32, 64, 128, 256), feature_dim=256),
    }
    for name in variants:
        for e in epochs:
            start = time.perf_counter()
            _, report = train_judge(real, configs[name], JudgeTrainConfig(epochs=e), device=device)
            val, train = report["val_accuracy"], report["train_accuracy"]
            print(f"judge {name:<10} epochs {e:>3}: held-out margin {val['margin']:.3f} shape {val['shape']:.3f} "
                  f"| train {train['margin']:.3f} {train['shape']:.3f} | {time.perf_counter() - start:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=10_000)
    parser.add_argument("--real", type=int, default=2_000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cores", type=int, default=None, help="after rendering, pin to the first N cores")
    parser.add_argument("--render-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--judge-epochs", type=int, default=ev.EvaluateConfig().judge_epochs)
    parser.add_argument("--usefulness-steps", type=int, default=ev.EvaluateConfig().usefulness_steps)
    parser.add_argument("--judge-only", action="store_true", help="only train judges and print their accuracy")
    parser.add_argument("--epochs", type=int, nargs="+", default=[30])
    parser.add_argument("--variants", nargs="+", default=["default"])
    parser.add_argument("--out", default=None, help="also write report.json/html here")
    parser.add_argument("--runner", choices=("ray", "process"), default="ray",
                        help="usefulness classifiers as Ray tasks (as `f2m-ray evaluate`) or in this process")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    real = real_arrays(args.real, 0.1, args.render_workers)
    print(f"render {args.real} real phantoms: {time.perf_counter() - start:.1f} s (not part of evaluate)", flush=True)
    if args.judge_only:
        judge_only(real, args.epochs, args.device, args.variants)
        return
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        rows = render(args.synthetic, 7, list(PAPER_CATEGORIES), args.render_workers)
        write_synthetic(tmp, rows, list(real.roi_id[real.split == "train"]))
        print(f"render + write {args.synthetic} synthetic phantoms: {time.perf_counter() - start:.1f} s "
              f"(not part of evaluate)", flush=True)
        if args.cores:  # after rendering: only evaluate runs as on an N-core machine
            os.sched_setaffinity(0, set(range(args.cores)))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
              f"cores visible {len(os.sched_getaffinity(0))}", flush=True)

        timings: dict[str, float] = {}
        stage_start = {"name": None, "t": time.perf_counter()}

        def progress(stage: str, done: int, total: int) -> None:
            now = time.perf_counter()
            if stage != stage_start["name"]:
                stage_start.update(name=stage, t=now)
            if done >= total:
                timings[stage] = now - stage_start["t"]

        runner = run_in_process
        if args.runner == "ray":
            from f2m_ray.runtime.cluster import ensure_ray

            ensure_ray()
            runner = run_on_ray
        t = time.perf_counter()
        judge_train_config = JudgeTrainConfig(epochs=args.judge_epochs)
        model, report = train_judge(real, JudgeConfig(), judge_train_config, device=args.device)
        judge_seconds = time.perf_counter() - t
        judge = LoadedJudge("bench", model.cpu().eval(), model.cfg, judge_train_config, "bench", report, "phantom")

        total_start = time.perf_counter()
        t = time.perf_counter()
        synthetic = read_synthetic(tmp)
        timings["read + decode synthetic"] = time.perf_counter() - t
        config = ev.EvaluateConfig(usefulness_steps=args.usefulness_steps)
        t = time.perf_counter()
        result, figures = ev.evaluate_arrays(synthetic, real, judge, config, {"real": "phantom"}, progress,
                                             device=args.device, runner=runner)
        timings["evaluate (judging, metrics, usefulness)"] = time.perf_counter() - t
        t = time.perf_counter()
        page = render_html(result, figures)
        timings["render the page"] = time.perf_counter() - t
        total = time.perf_counter() - total_start
        if args.out:
            ev.write_report(args.out, result, page)
    print(f"judge training ({args.judge_epochs} epochs, in-process; `f2m-ray judge train`): {judge_seconds:.1f} s")
    print(f"evaluate with --judge ({args.runner} runner):")
    for stage, seconds in timings.items():
        print(f"  {stage:<45} {seconds:8.1f} s", flush=True)
    print(f"total {total:.1f} s = {total / 60:.1f} min; budget 15 min; ratio {total / 900:.2f} of the budget")
    # Training time is linear in images seen: scale the training stages to the defaults.
    defaults = ev.EvaluateConfig()
    useful_s = sum(v for k, v in timings.items() if k.startswith("usefulness"))
    scaled = total - useful_s + useful_s * defaults.usefulness_steps / args.usefulness_steps
    judge_scaled = judge_seconds * defaults.judge_epochs / args.judge_epochs
    print(f"at the defaults (usefulness {defaults.usefulness_steps} steps): {scaled:.0f} s = {scaled / 60:.1f} min "
          f"(ratio {scaled / 900:.2f}); without --judge (+{defaults.judge_epochs} judge epochs): "
          f"{scaled + judge_scaled:.0f} s = {(scaled + judge_scaled) / 60:.1f} min (ratio {(scaled + judge_scaled) / 900:.2f})")
    train_rows = int((real.split == "train").sum())
    print(f"judge training {train_rows * args.judge_epochs / judge_seconds:.0f} images/s; "
          f"usefulness training {3 * args.usefulness_steps * 64 / useful_s:.0f} images/s (3 classifiers together)")
    overall = result["groups"]["overall"]
    print(json.dumps({"judge_val": report["val_accuracy"], "fidelity": overall["label_fidelity"]["synthetic"],
                      "fd": overall["realism"], "pr": overall["precision_recall"],
                      "memorization": overall["memorization"],
                      "usefulness": {k: v["accuracy"]["mean"] for k, v in result["usefulness"]["classifiers"].items()}},
                     indent=1))


if __name__ == "__main__":
    sys.exit(main())
