"""Which training levers let the generator draw the mass it is given: each lever alone and together.

Every variant trains the same networks from the same seed on the same 2,000 phantoms (seed 0, the
train split), same batch and step count, in a plain single-process loop (f2m_ray.core.step, the step
the Ray Train workers run), then reconstructs held-out phantoms (seed 11) of the paper's three
categories and scores them with their true lesion masks (f2m_ray.core.mass_metrics):

    fidelity  1 - RMS(own reconstruction - mass) / RMS(other reconstructions - mass) inside the lesion,
              on detail images; 0 = a category template, 1 = the mass itself (a 1-px blur: ~0.6)
    identity  share of masses whose own reconstruction is the nearest of the category's

    python benchmarks/recipe_ablation.py                         # every variant, 600 steps each
    python benchmarks/recipe_ablation.py --steps 300 --variants template-recipe,"small (all)"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mass_fidelity import held_out, reconstruct  # noqa: E402
from train_throughput import phantom_train_rows  # noqa: E402

from f2m_ray.config import LossConfig, ModelConfig, Preset, TrainConfig, build_dataclass, get_preset  # noqa: E402
from f2m_ray.core.augment import augment  # noqa: E402
from f2m_ray.core.mass_metrics import mass_fidelity  # noqa: E402
from f2m_ray.core.networks import build_networks  # noqa: E402
from f2m_ray.core.step import Feature2MassStep, WeightAverage, make_optimizers  # noqa: E402
from f2m_ray.labels import PAPER_CATEGORIES  # noqa: E402

# name -> (model, loss, train overrides) applied to the template recipe; the values `small` uses now
LEVERS = {
    "resize": ({"upsample": "resize"}, {}, {}),
    "no-g-labels": ({}, {"lambda_generator_labels": 0.0}, {}),
    "low-adversarial": ({}, {"lambda_adversarial": 0.03}, {}),
    "gradient-l1": ({}, {"lambda_gradient": 100.0}, {}),
    "ema": ({}, {}, {"ema_kimg": 1.0}),
}
# Levers tried on top of `small` (not in it): a decoder twice as wide at 32x32 and 64x64, a higher learning
# rate, no adversarial term at all (G trained by L1 and gradient L1 beside label-trained Ds)
BEYOND = {
    "wide-top": ({"decoder_channels": (128, 128, 64, 64, 32, 16, 1)}, {}, {}),
    "lr-5e-4": ({}, {}, {"lr": 5e-4}),
    "no-adversarial": ({}, {"lambda_adversarial": 0.0}, {}),
}
LEVERS.update(BEYOND)
VARIANTS = {
    "template-recipe": [],  # `small` as it was: G's label term 3, adversarial 1, transposed convs, no EMA
    **{f"+{name}": [name] for name in LEVERS if name not in BEYOND},
    "small (all)": [name for name in LEVERS if name not in BEYOND],
    **{f"small +{name}": [*[n for n in LEVERS if n not in BEYOND], name] for name in BEYOND},
}
AUTOENCODER = "autoencoder"  # the same G trained on L1 alone (no D): what the networks can draw


def template_recipe() -> Preset:
    """`small` with every lever at its old value: the recipe whose G drew one template per category."""
    small = get_preset("small")
    return replace(small, model=replace(small.model, upsample="transposed"),
                   loss=replace(small.loss, lambda_generator_labels=3.0, lambda_adversarial=1.0,
                                lambda_feature_matching=0.0, lambda_gradient=0.0),
                   train=replace(small.train, ema_kimg=0.0))


def variant_preset(levers: list[str]) -> Preset:
    base = template_recipe()
    model, loss, train = asdict(base.model), asdict(base.loss), asdict(base.train)
    for name in levers:
        model.update(LEVERS[name][0])
        loss.update(LEVERS[name][1])
        train.update(LEVERS[name][2])
    return replace(base, model=build_dataclass(ModelConfig, model), loss=build_dataclass(LossConfig, loss),
                   train=build_dataclass(TrainConfig, train))


def train_and_score(preset: Preset, rows, evalsets, steps: int, autoencoder: bool = False) -> dict:
    images, margins, shapes = rows
    torch.manual_seed(0)
    generator, d_margin, d_shape = build_networks(preset.model)
    optimizer_g, optimizer_d = make_optimizers(generator, d_margin, d_shape, preset.train)
    rng = torch.Generator().manual_seed(0)
    average = (WeightAverage(generator, preset.train.ema_kimg * 1000, preset.train.batch_size)
               if preset.train.ema_kimg > 0 and not autoencoder else None)
    step = Feature2MassStep(generator, d_margin, d_shape, optimizer_g, optimizer_d, preset.loss,
                            d_augment=preset.train.d_augment, augment_generator=rng, average=average)
    order_rng = np.random.default_rng(0)
    batch = preset.train.batch_size
    order = np.zeros(0, dtype=np.int64)
    seconds = 0.0
    for _ in range(steps):
        if len(order) < batch:
            order = np.concatenate([order, order_rng.permutation(len(images))])
        idx, order = order[:batch], order[batch:]
        x = augment(torch.from_numpy(images[idx]).unsqueeze(1), flips=True, crop_padding=preset.train.crop_padding,
                    generator=rng)
        m, s = torch.from_numpy(margins[idx]), torch.from_numpy(shapes[idx])
        start = time.perf_counter()
        if autoencoder:
            loss = torch.nn.functional.l1_loss(generator(x, m, s), x)
            optimizer_g.zero_grad(set_to_none=True)
            loss.backward()
            optimizer_g.step()
        else:
            step(x, m, s)
        seconds += time.perf_counter() - start
    drawing = average.module if average is not None else generator.eval()  # what synthesis would use
    scores = [mass_fidelity(imgs, masks, reconstruct(drawing, imgs, cat)) for imgs, masks, cat in evalsets]
    return {"fidelity": [m.fidelity for m in scores], "identity": [m.identity for m in scores],
            "img_s": steps * batch / seconds, "seconds": seconds}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--variants", default=",".join([*[v for v in VARIANTS if not v.startswith("small +")], AUTOENCODER]),
                        help="comma-separated; also 'small +wide-top', 'small +lr-5e-4', 'small +no-adversarial'")
    parser.add_argument("--per-category", type=int, default=32, help="held-out phantoms per category")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS and v != AUTOENCODER]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join([*VARIANTS, AUTOENCODER])}")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rows = phantom_train_rows(2000, 0, 0.1)
    evalsets = [held_out(c, args.per_category) for c in PAPER_CATEGORIES]
    print(f"{len(rows[0])} train phantoms, batch {template_recipe().train.batch_size}, {args.steps} steps per variant, "
          f"{args.per_category} held-out masses per category ({', '.join(PAPER_CATEGORIES)})")
    print(f"{'variant':22}{'img/s':>7}{'s':>6}   fidelity per category / mean   identity per category / mean")
    results = {}
    for name in names:
        preset = template_recipe() if name == AUTOENCODER else variant_preset(VARIANTS[name])
        r = train_and_score(preset, rows, evalsets, args.steps, autoencoder=name == AUTOENCODER)
        results[name] = r
        fid = " ".join(f"{v:.2f}" for v in r["fidelity"])
        ide = " ".join(f"{v:.2f}" for v in r["identity"])
        print(f"{name:22}{r['img_s']:7.0f}{r['seconds']:6.0f}   {fid} / {np.mean(r['fidelity']):.3f}"
              f"          {ide} / {np.mean(r['identity']):.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
