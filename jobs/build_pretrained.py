"""Rebuild the model shipped in the package: f2m_ray/pretrained/small-phantom/.

    python jobs/build_pretrained.py                       # train (about 25 minutes on 2 cores), export, encode
    python jobs/build_pretrained.py --from-run RUN_DIR    # export and encode an existing run of the same recipe

The recipe: preset `small` with its defaults, 2,000 procedural phantoms (seed 0), 60 epochs,
2 CPU workers. The final checkpoint is exported generator-only with float16 weights
(f2m_ray.checkpoint.export_generator), the same phantoms are encoded with the export into its
feature bank, and MODEL_CARD.md is written beside them with the figures of this build.
Everything is deterministic given the recipe, except wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

SIZE_LIMIT_BYTES = 15 * 1000 * 1000
RECIPE = {"preset": "small", "data": "phantom:2000", "epochs": 60, "seed": 0, "workers": 2}


def train_run(storage: str) -> str:
    from f2m_ray.runtime.cluster import ensure_ray
    from f2m_ray.runtime.console import quiet_ray_data
    from f2m_ray.train.driver import train
    from f2m_ray.train.options import resolve_run

    preset, options = resolve_run(
        None, RECIPE["preset"], train_overrides={"epochs": RECIPE["epochs"], "seed": RECIPE["seed"]},
        run_overrides={"data": RECIPE["data"], "storage": storage, "name": "small-phantom",
                       "workers": RECIPE["workers"], "feature_bank": False},
    )
    summary = train(preset, options, echo=print, start_ray=lambda: (ensure_ray(), quiet_ray_data()))
    return summary.run_dir


def export_error(source: str, export: str, n: int = 512) -> dict[str, float]:
    """What float16 storage changes: the same mixes decoded by the source and the export, in grey levels."""
    import numpy as np
    import torch

    from f2m_ray.checkpoint import load_generator
    from f2m_ray.bank import load_feature_bank
    from f2m_ray.core.images import to_uint8

    g32, _ = load_generator(source)
    g16, _ = load_generator(export)
    bank = load_feature_bank(os.path.join(export, "feature_bank.parquet"))
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(len(bank.features)), size=n).astype(np.float32)
    features = torch.from_numpy(weights @ bank.features)
    with torch.inference_mode():
        a = to_uint8(g32.decode(features).numpy()[:, 0]).astype(np.int16)
        b = to_uint8(g16.decode(features).numpy()[:, 0]).astype(np.int16)
    diff = np.abs(a - b)
    return {"mean_grey_levels": float(diff.mean()), "max_grey_levels": int(diff.max()),
            "pixels_differing": float((diff > 0).mean())}


def mass_scores(export: str, per_category: int = 64) -> dict[str, dict[str, float]]:
    """Mass fidelity and identity of the export's reconstructions of held-out phantoms (seed 11), per category."""
    import numpy as np
    import torch

    from f2m_ray.checkpoint import load_generator
    from f2m_ray.core.mass_metrics import score_probe
    from f2m_ray.data.phantom import mass_probe

    generator, _ = load_generator(export)
    probe = mass_probe(per_category)
    with torch.inference_mode():
        recon = generator(torch.from_numpy(probe["images"]).unsqueeze(1), torch.from_numpy(probe["margins"]),
                          torch.from_numpy(probe["shapes"]))[:, 0].numpy()
    scores = {c: {"fidelity": m.fidelity, "identity": m.identity} for c, m in score_probe(probe, recon).items()}
    scores["mean"] = {k: float(np.mean([v[k] for v in scores.values()])) for k in ("fidelity", "identity")}
    return scores


SHEET = "masses.png"


def sheet(export: str) -> None:
    """masses.png: held-out phantoms, their reconstructions and synthesized masses, per paper category."""
    import subprocess

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "mass_sheet.py")
    subprocess.run([sys.executable, script, "--model", f"this model={export}", "--per-row", "10",
                    "--out", os.path.join(export, SHEET)], check=True)


def history(run_dir: str) -> list[dict]:
    from f2m_ray.train.report import read_metrics

    return read_metrics(run_dir)


def card(meta: dict, rows: list[dict], error: dict, sizes: dict[str, int], bank_meta: dict, masses: dict) -> str:
    last = rows[-1] if rows else {}
    seconds = sum(r.get("train_seconds", 0.0) for r in rows)
    total = sum(sizes.values())
    lines = [
        "# small-phantom: the model shipped with f2m-ray",
        "",
        "A Feature2Mass generator (preset `small`: the paper's topology at a quarter of its widths, 256-d "
        "visual feature) trained on **procedural phantom masses**, not on mammograms. It makes the tool work "
        "out of the box (`f2m-ray synthesize --category spiculate-irregular --n 100000`) and shows what the "
        "pipeline does; for masses that look like a real archive's, train on your own labeled ROIs "
        "(`f2m-ray train --data manifest.csv`).",
        "",
        "## How it was built",
        "",
        "```bash",
        "python jobs/build_pretrained.py",
        "```",
        "",
        f"- `f2m-ray train --preset {RECIPE['preset']} --data {RECIPE['data']} --epochs {RECIPE['epochs']} "
        f"--seed {RECIPE['seed']} --workers {RECIPE['workers']}` (CPU, bf16 off, data-parallel over 2 Ray Train workers)",
        f"- training: {len(rows)} epochs, {last.get('step', '?')} optimizer steps, {seconds / 60:.1f} minutes of "
        "training time on 2 CPU cores",
        f"- last epoch: L1 {last.get('l1', float('nan')):.4f} train / {last.get('val_l1', float('nan')):.4f} on held-out "
        f"phantoms; D's label accuracy on held-out real phantoms: margin {last.get('val_margin_accuracy', float('nan')):.2f}, "
        f"shape {last.get('val_shape_accuracy', float('nan')):.2f} (chance 0.20)",
        f"- exported generator-only with float16 weights (`f2m_ray.checkpoint.export_generator`): against the "
        f"float32 generator, {error['pixels_differing'] * 100:.2f}% of the pixels of 512 decoded mixes differ, by "
        f"{error['mean_grey_levels']:.4f} grey levels on average and at most {error['max_grey_levels']}",
        f"- feature bank: the {bank_meta.get('rows')} phantoms of the training data encoded by the export, "
        f"{len(bank_meta.get('counts', {}))} categories of {min(bank_meta.get('counts', {0: 0}).values())}-"
        f"{max(bank_meta.get('counts', {0: 0}).values())} seeds",
        "",
        "| file | bytes |",
        "|---|---:|",
        *[f"| {name} | {size:,} |" for name, size in sorted(sizes.items())],
        f"| total | {total:,} |",
        "",
        "## Identity",
        "",
        f"- model id `{meta['model_id']}` (of the exported weights; trained model `{meta['export']['from_model_id']}`)",
        f"- bank id `{bank_meta.get('bank_id')}`",
        f"- written by f2m-ray {meta['tool_version']}",
        "",
        "## What it is worth",
        "",
        "Does it draw the mass it is given? Reconstructions of 64 held-out phantoms per category (seed 11, never "
        "trained on), scored inside their true lesion masks (`f2m_ray.core.mass_metrics`; fidelity 0 = a category "
        "template, 1 = the mass itself, a 1-px blur of the input about 0.6; identity = share of masses whose own "
        "reconstruction is the nearest of the category's):",
        "",
        f"![held-out phantoms, their reconstructions and synthesized masses]({SHEET})",
        "",
        "| category | mass fidelity | identity |",
        "|---|---:|---:|",
        *[f"| {name} | {v['fidelity']:.2f} | {v['identity']:.2f} |" for name, v in masses.items()],
        "",
        "Phantoms are simple shapes with painted margins and no breast tissue around them: no figure here says "
        "anything about real mammograms.",
        "",
        "Loading runs no code: JSON metadata, `torch.load(weights_only=True)` on a tensor dict, Parquet.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-run", help="a finished run of the recipe (skip training)")
    parser.add_argument("--storage", default=os.path.expanduser("~/f2m-work/pretrained-runs"),
                        help="where the training run goes [default: ~/f2m-work/pretrained-runs]")
    parser.add_argument("--out", default=None, help="[default: f2m_ray/pretrained/small-phantom in this checkout]")
    args = parser.parse_args(argv)

    from f2m_ray.checkpoint import export_generator, find_checkpoint, read_metadata
    from f2m_ray.bank import load_feature_bank
    from f2m_ray.encode import build_feature_bank
    from f2m_ray.pretrained import MODEL_CARD, PRETRAINED_ROOT, SHIPPED_MODEL

    out = args.out or os.path.join(PRETRAINED_ROOT, SHIPPED_MODEL)
    run_dir = args.from_run or train_run(args.storage)
    final = find_checkpoint(run_dir)
    source_meta = read_metadata(final)
    if source_meta["preset"]["name"] != RECIPE["preset"] or source_meta["extra"].get("data") != RECIPE["data"]:
        print(f"{final} is not a run of the recipe {RECIPE}", file=sys.stderr)
        return 1
    building = out + ".building"
    shutil.rmtree(building, ignore_errors=True)
    export_generator(final, building, "float16", note={"recipe": RECIPE, "epoch": source_meta["epoch"]})
    start = time.time()
    build_feature_bank(building, data=RECIPE["data"], seed=RECIPE["seed"],
                       stored_checkpoint=f"pretrained:{SHIPPED_MODEL}")
    print(f"encoded the bank in {time.time() - start:.1f} s")
    error = export_error(final, building)
    meta = read_metadata(building)
    bank_meta = load_feature_bank(os.path.join(building, "feature_bank.parquet")).metadata
    sizes = {name: os.path.getsize(os.path.join(building, name)) for name in sorted(os.listdir(building))}
    masses = mass_scores(building)
    sheet(building)
    with open(os.path.join(building, MODEL_CARD), "w", encoding="utf-8") as f:
        f.write(card(meta, history(run_dir), error, sizes, bank_meta, masses))
    total = sum(os.path.getsize(os.path.join(building, n)) for n in os.listdir(building))
    if total > SIZE_LIMIT_BYTES:
        print(f"the export is {total:,} bytes, over the {SIZE_LIMIT_BYTES:,} a shipped model may take", file=sys.stderr)
        return 1
    shutil.rmtree(out, ignore_errors=True)
    os.replace(building, out)
    print(json.dumps({"out": out, "bytes": total, "model_id": meta["model_id"], "export_error": error,
                      "mass_fidelity": masses}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
