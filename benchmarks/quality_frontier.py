"""Quality frontier: per model (training option) and mixing scheme, how varied, real, new and useful.

    python benchmarks/quality_frontier.py --model mix=runs/r200-mix --model base=runs/r200-base \
        --judge runs/judge --real phantom:10000 --n 200 --work frontier

For every model and every scheme of f2m_ray.core.mixing.SCHEMES it synthesizes N masses per
category of the model's bank into WORK/MODEL/SCHEME (kept: a second call reuses finished
datasets), evaluates them with `f2m_ray.evaluation.evaluate` (usefulness off) and trains the scarce-data
usefulness arms once (`f2m_ray.evaluation.usefulness.scarce_usefulness`: real, real + mixup,
real + synthetic of each model and scheme of --usefulness-schemes, on the R real ROIs the GANs
were trained on; the real and mixup arms are shared by all models). Printed per row:

    spread    mean pairwise RMS pixel difference of a category's masses / that of its held-out
              real ROIs (images in [-1, 1]); min and median over categories
    outline spread  mean 1 - IoU between the segmented masses of a category, synthetic / held-out
              real (f2m_ray.core.mass_metrics), median over categories
    contrast  mean per-image pixel standard deviation, synthetic / held-out real (median)
    coverage, recall (Naeem et al. k = 5; Kynkaanniemi et al. k = 3), overall, judge features
    FD/floor  overall Frechet distance to real half B over the real half-A/half-B floor
    fidelity  judge accuracy on synthetic / on held-out real, margin and shape, overall
    memorized share of synthetic masses at or below the 1st percentile of held-out-to-seen
              RMS pixel distances (unguarded: no synthesis guard is set)
    useful    real + synthetic minus real, mean accuracy points over the seeds, +- sd

The table and everything measured go to WORK/frontier.json. Heavy: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from f2m_ray.core import metrics  # noqa: E402
from f2m_ray.evaluation.evaluate import EvaluateConfig, ProgressPrinter, evaluate_arrays  # noqa: E402
from f2m_ray.evaluation.inputs import gan_training_ids, read_synthetic, split_real  # noqa: E402
from f2m_ray.bank import default_bank_path, load_feature_bank  # noqa: E402
from f2m_ray.labels import MARGINS, SHAPES  # noqa: E402
from f2m_ray.core.mixing import SCHEMES  # noqa: E402
from f2m_ray.evaluation.usefulness import run_on_ray, scarce_usefulness  # noqa: E402

PAIR_SAMPLES = 200  # masses per category for the pairwise spread (200 * 199 / 2 pairs)


def pixel_spread(images: np.ndarray, seed: int = 0) -> float:
    """Mean pairwise RMS pixel difference of (N, H, W) images in [-1, 1] (subsampled to PAIR_SAMPLES)."""
    x = images[metrics.subsample_indices(len(images), PAIR_SAMPLES, seed)].reshape(-1, images[0].size).astype(np.float64)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0) / x.shape[1]
    upper = np.triu_indices(len(x), 1)
    return float(np.sqrt(d2[upper]).mean())


def fmt(value, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def contrast(images: np.ndarray) -> float:
    return float(images.reshape(len(images), -1).std(axis=1).mean())


def synthesize_once(model: str, scheme: str, n: int, out: str, categories: list[str]) -> str:
    from f2m_ray.synth.driver import synthesize
    from f2m_ray.synth.plan import SynthesisConfig

    if os.path.exists(os.path.join(out, "_manifest.json")):
        return out
    config = SynthesisConfig(categories=tuple(categories), n=n, out=out, model=model, mixing=scheme,
                             rows_per_file=max(n, 1000), resume=os.path.exists(out))
    summary = synthesize(config, report=None)
    print(f"  synthesized {summary.rows} masses ({scheme}) in {summary.seconds:.0f} s", file=sys.stderr)
    return out


def category_figures(images: np.ndarray, categories: np.ndarray, real_all, heldout_mask: np.ndarray) -> dict[str, dict[str, float]]:
    """Spread and contrast ratios per category: (N, H, W) images with their (N,) category names vs held-out real."""
    real_category = np.array([f"{MARGINS[m]}-{SHAPES[s]}" for m, s in zip(real_all.margin, real_all.shape)])
    out = {}
    for category in sorted(set(categories.tolist())):
        real = real_all.images[heldout_mask & (real_category == category)]
        syn = images[categories == category]
        if len(real) < 2 or len(syn) < 2:
            continue
        out[category] = {"spread": pixel_spread(syn) / pixel_spread(real), "contrast": contrast(syn) / contrast(real)}
    return out


def reconstruction_figures(model: str, bank, real_all, heldout_mask: np.ndarray) -> dict[str, dict[str, float]]:
    """Spread and contrast of the decodes of the bank's own features (K = 1): what the decoder keeps."""
    import torch

    from f2m_ray.checkpoint import load_generator
    from f2m_ray.core.images import to_uint8

    generator, _ = load_generator(model)  # a training checkpoint or a synthesis-only export
    with torch.inference_mode():
        decoded = generator.decode(torch.from_numpy(np.asarray(bank.features, dtype=np.float32))).numpy()[:, 0]
    images = to_uint8(decoded).astype(np.float32) / 127.5 - 1.0  # as stored: 8-bit
    names = np.array([f"{MARGINS[m]}-{SHAPES[s]}" for m, s in zip(bank.margin, bank.shape)])
    return category_figures(images, names, real_all, heldout_mask)


def row_of(report: dict, per_category: dict[str, dict[str, float]]) -> dict[str, float | None]:
    overall = report["groups"]["overall"]
    spreads = [v["spread"] for v in per_category.values()]
    fidelity = overall["label_fidelity"]["ratio"]
    return {
        "spread_min": min(spreads), "spread_median": float(np.median(spreads)),
        "contrast_median": float(np.median([v["contrast"] for v in per_category.values()])),
        "coverage": overall["density_coverage"]["coverage"], "density": overall["density_coverage"]["density"],
        "recall": overall["precision_recall"]["recall"], "precision": overall["precision_recall"]["precision"],
        "fd_over_floor": overall["realism"]["ratio_to_floor"],
        "fidelity_margin": fidelity["margin"], "fidelity_shape": fidelity["shape"],
        "memorized_pixels": overall["memorization"]["share_pixels"],
        # outlines (f2m_ray.core.mass_metrics): a template in varied light has spread near 0 whatever its background
        "outline_spread_median": _median_ratio(report, "outline_spread"),
    }


def _median_ratio(report: dict, metric: str) -> float | None:
    ratios = [g[metric]["ratio"] for name, g in report["groups"].items()
              if name != "overall" and g.get(metric, {}).get("ratio") is not None]
    return float(np.median(ratios)) if ratios else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=RUN",
                        help="a training run (or checkpoint) to compare, repeatable")
    parser.add_argument("--judge", required=True, help="a judge (f2m-ray judge train) trained on real data only")
    parser.add_argument("--real", default="phantom:10000", help="real labeled ROIs (held-out rows are the reference)")
    parser.add_argument("--n", type=int, default=200, help="masses per category and scheme")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated mixing schemes")
    parser.add_argument("--work", required=True, help="folder for the synthetic datasets and frontier.json")
    parser.add_argument("--usefulness-real", type=int, default=200, help="R: real ROIs of every usefulness arm")
    parser.add_argument("--usefulness-synthetic", type=int, default=4000, help="S: synthetic masses per arm")
    parser.add_argument("--usefulness-steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=5, help="classifier seeds per arm")
    parser.add_argument("--usefulness-schemes", default="variance-preserving,paper",
                        help="comma-separated SCHEME (for every model) or MODEL/SCHEME entries that get a real + "
                             "synthetic usefulness arm (each arm costs SEEDS classifiers)")
    parser.add_argument("--no-usefulness", action="store_true")
    args = parser.parse_args(argv)

    from f2m_ray.evaluation.judge import collect_labeled
    from f2m_ray.judge_model import load_judge
    from f2m_ray.data.readers import read_labeled
    from f2m_ray.runtime.cluster import ensure_ray

    started = time.perf_counter()
    schemes = [s for s in args.schemes.split(",") if s]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        sys.exit(f"error: unknown mixing scheme(s) {', '.join(unknown)}; known: {', '.join(SCHEMES)}")
    models = dict(m.split("=", 1) if "=" in m else (os.path.basename(m.rstrip("/")), m) for m in args.model)
    judge = load_judge(args.judge)
    ensure_ray()
    config = EvaluateConfig(usefulness=False).resolved(judge.train_config)
    real_all = collect_labeled(read_labeled(args.real, "auto", config.val_fraction, config.seed).dataset)
    results: dict[str, dict] = {}
    wanted = [w for w in args.usefulness_schemes.split(",") if w]  # SCHEME (every model) or MODEL/SCHEME
    all_sets: dict[str, object] = {}  # "MODEL/SCHEME" -> synthetic arrays, for the usefulness arms
    useful = None
    for name, model in models.items():
        from f2m_ray.checkpoint import find_checkpoint

        bank = load_feature_bank(default_bank_path(find_checkpoint(model)))
        categories = [c for c, count in bank.counts().items() if count >= 2]
        print(f"model {name}: {model}, {len(categories)} categories", file=sys.stderr)
        sets, rows = {}, {}
        for scheme in schemes:
            path = synthesize_once(model, scheme, args.n, os.path.join(args.work, name, scheme), categories)
            synthetic = read_synthetic(path)
            gan_ids, _ = gan_training_ids(synthetic.manifest)
            report, _ = evaluate_arrays(synthetic, real_all, judge, config, {"real": args.real}, gan_train_ids=gan_ids)
            _, heldout_mask = split_real(real_all, synthetic.seed_ids, gan_ids, judge)
            per_category = category_figures(synthetic.images, synthetic.category, real_all, heldout_mask)
            rows[scheme] = {**row_of(report, per_category), "categories": per_category}
            sets[scheme] = synthetic
            if "reconstruction" not in rows:
                recon = reconstruction_figures(model, bank, real_all, heldout_mask)
                spreads = [v["spread"] for v in recon.values()]
                rows["reconstruction"] = {"spread_min": min(spreads), "spread_median": float(np.median(spreads)),
                                          "contrast_median": float(np.median([v["contrast"] for v in recon.values()])),
                                          "categories": recon}
                print(f"  reconstructions (K = 1): spread {min(spreads):.3g} min, {np.median(spreads):.3g} median",
                      file=sys.stderr)
            print(f"  {scheme}: " + ", ".join(f"{k} {v:.3g}" for k, v in rows[scheme].items()
                                              if isinstance(v, float)), file=sys.stderr)
        results[name] = rows
        for scheme in schemes:
            if scheme in wanted or f"{name}/{scheme}" in wanted:
                all_sets[f"{name}/{scheme}"] = sets[scheme]

    if not args.no_usefulness:  # one run for every model: the real and mixup arms are shared
        seeds_used = set().union(*(s.seed_ids for s in all_sets.values()))
        gan_ids = set().union(*(gan_training_ids(s.manifest)[0] or set() for s in all_sets.values()))
        seen_mask, heldout_mask = split_real(real_all, seeds_used, gan_ids, judge)
        useful = scarce_usefulness(
            judge.config, judge.train_config, real_all.subset(np.flatnonzero(seen_mask)),
            real_all.subset(np.flatnonzero(heldout_mask)), all_sets, real=args.usefulness_real,
            synthetic=args.usefulness_synthetic, steps=args.usefulness_steps, seeds=args.seeds,
            seed=config.seed, runner=run_on_ray, progress=ProgressPrinter(sys.stderr))
        arms = useful["arms"]
        for key in all_sets:
            name, scheme = key.split("/", 1)
            arm = arms["real_plus_synthetic" if len(all_sets) == 1 else f"real_plus_synthetic:{key}"]
            results[name][scheme]["useful_points"] = 100 * arm["delta_vs_real"]["mean"]["mean"]
            results[name][scheme]["useful_sd"] = 100 * arm["delta_vs_real"]["mean"]["sd"]
        mixup = arms["real_mixup"]["delta_vs_real"]["mean"]
        print(f"usefulness: real {arms['real']['accuracy']['mean']['mean']:.3f} "
              f"+- {arms['real']['accuracy']['mean']['sd']:.3f}; real + mixup {100 * mixup['mean']:+.1f} "
              f"+- {100 * mixup['sd']:.1f} points (R={useful['R']}, {useful['test_rows']} test ROIs, "
              f"{useful['test_categories']} categories)", file=sys.stderr)

    os.makedirs(args.work, exist_ok=True)
    with open(os.path.join(args.work, "frontier.json"), "w") as f:
        json.dump({"models": models, "schemes": schemes, "n": args.n, "real": args.real, "results": results,
                   "usefulness": useful,
                   "seconds": round(time.perf_counter() - started, 1)}, f, indent=1, default=float)
    header = ("model", "scheme", "spread min", "spread med", "outline spread med", "contrast", "coverage", "recall",
              "FD/floor", "fid. margin", "fid. shape", "memorized", "useful (points)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, rows in results.items():
        r = rows.get("reconstruction")
        if r:
            print(f"| {name} | reconstruction (K = 1) | {r['spread_min']:.2f}x | {r['spread_median']:.2f}x | "
                  f" |{r['contrast_median']:.2f}x |" + " |" * 7)
        for scheme in schemes:
            r = rows[scheme]
            useful = f"{r['useful_points']:+.1f} +- {r['useful_sd']:.1f}" if "useful_points" in r else "-"
            cells = [name, scheme, fmt(r["spread_min"], "{:.2f}x"), fmt(r["spread_median"], "{:.2f}x"),
                     fmt(r.get("outline_spread_median"), "{:.2f}x"), fmt(r["contrast_median"], "{:.2f}x"), fmt(r["coverage"]), fmt(r["recall"]),
                     fmt(r["fd_over_floor"], "{:.1f}"), fmt(r["fidelity_margin"]), fmt(r["fidelity_shape"]),
                     fmt(r["memorized_pixels"] and 100 * r["memorized_pixels"], "{:.1f}%"), useful]
            print("| " + " | ".join(cells) + " |")
    print(f"{time.perf_counter() - started:.0f} s; {os.path.join(args.work, 'frontier.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
