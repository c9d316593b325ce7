"""Does G draw real margin and shape cues, or marks only its own discriminators read?

Trains GAN variants side by side (one process and one thread each, the same data, seed and
step code as `f2m-ray train`) and, every `--every` seconds, scores G on phantoms it never saw:

    val L1      reconstruction error G(I, m, s) vs I
    D reads     D1/D2's accuracy on the reconstructions (the GAN's own discriminators)
    judge recon an independent judge's accuracy on the reconstructions
    judge mix   the judge's accuracy on decodes of mixed visual features: for each unseen
                phantom, 3 training phantoms of its category mixed with grid-Dirichlet weights,
                i.e. what `f2m-ray synthesize` makes

A large gap between "D reads" and "judge" means G paints marks D1/D2 learned to read as labels.

    python benchmarks/label_marks.py --judge runs/judge                       # paper loss vs small's
    python benchmarks/label_marks.py --judge runs/judge --seconds 300 --every 100

Variants: `paper-loss` (`small` with the paper's lambda3 = 10 and no D augmentation; its
fake-label weight stays 0.1) and `small` (the preset: lambda3 = 3, diff_augment on D's inputs).
Prints a JSON line per report and a table of the last one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time

import numpy as np
import torch

from f2m_ray.core.augment import augment
from f2m_ray.config import PRESETS, Preset
from f2m_ray.judge_model import load_judge, predict
from f2m_ray.core.mixing import quantized_dirichlet
from f2m_ray.core.networks import build_networks
from f2m_ray.data.phantom import generate_phantoms
from f2m_ray.core.images import to_model_range
from f2m_ray.core.step import Feature2MassStep, make_optimizers


def variants() -> dict[str, Preset]:
    small = PRESETS["small"]
    paper_loss = dataclasses.replace(
        small,
        name="paper-loss",
        loss=dataclasses.replace(small.loss, lambda_generator_labels=PRESETS["paper"].loss.lambda_generator_labels),
        train=dataclasses.replace(small.train, d_augment=False),
    )
    return {"paper-loss": paper_loss, "small": small}


def phantoms(n: int, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = list(generate_phantoms(start + n, 0, start=start))
    images = torch.from_numpy(np.stack([to_model_range(img) for _, img, _ in rows]))[:, None]  # (N, 1, 64, 64)
    margins = torch.tensor([c.margin_id for *_, c in rows])
    shapes = torch.tensor([c.shape_id for *_, c in rows])
    return images, margins, shapes


def accuracy(judge, images: torch.Tensor, margins: torch.Tensor, shapes: torch.Tensor) -> list[float]:
    p = predict(judge, images[:, 0].numpy())
    return [round(float((p.margin_probs.argmax(1) == margins.numpy()).mean()), 3),
            round(float((p.shape_probs.argmax(1) == shapes.numpy()).mean()), 3)]


@torch.no_grad()
def score(generator, d_margin, d_shape, judge, train, val) -> dict:
    x, m, s = train
    xv, mv, sv = val
    for net in (generator, d_margin, d_shape):
        net.eval()
    recon = generator(xv, mv, sv)
    features = torch.cat([generator.encode(x[i:i + 500], m[i:i + 500], s[i:i + 500]) for i in range(0, len(x), 500)])
    rng = np.random.default_rng(0)
    mixed = []
    for j in range(len(xv)):
        pool = np.flatnonzero((m.numpy() == mv[j].item()) & (s.numpy() == sv[j].item()))
        pick = rng.choice(pool, 3, replace=False)
        weights = torch.from_numpy(quantized_dirichlet(rng, 3)).float()
        mixed.append((weights[:, None] * features[pick]).sum(0))
    mixes = generator.decode(torch.stack(mixed))
    out = {
        "val_l1": round((recon - xv).abs().mean().item(), 4),
        "d_reads": [round((d_margin(recon)[1].argmax(1) == mv).float().mean().item(), 3),
                    round((d_shape(recon)[1].argmax(1) == sv).float().mean().item(), 3)],
        "judge_recon": accuracy(judge, recon, mv, sv),
        "judge_mix": accuracy(judge, mixes, mv, sv),
    }
    for net in (generator, d_margin, d_shape):
        net.train()
    return out


def run(name: str, preset: Preset, judge_path: str, n_train: int, n_val: int, seconds: float, every: float, queue) -> None:
    torch.set_num_threads(1)
    train, val = phantoms(n_train, 0), phantoms(n_val, n_train)
    judge = load_judge(judge_path).model
    torch.manual_seed(preset.train.seed)
    generator, d_margin, d_shape = build_networks(preset.model)
    optimizer_g, optimizer_d = make_optimizers(generator, d_margin, d_shape, preset.train)
    rng = torch.Generator().manual_seed(preset.train.seed)
    step = Feature2MassStep(generator, d_margin, d_shape, optimizer_g, optimizer_d, preset.loss,
                            d_augment=preset.train.d_augment, augment_generator=rng)
    x, m, s = train
    batch, steps, train_seconds, next_report = preset.train.batch_size, 0, 0.0, every
    while train_seconds < seconds:
        start = time.perf_counter()
        rows = torch.randint(0, len(x), (batch,), generator=rng)
        step(augment(x[rows], preset.train.flips, preset.train.crop_padding, rng), m[rows], s[rows])
        steps += 1
        train_seconds += time.perf_counter() - start
        if train_seconds >= next_report or train_seconds >= seconds:
            queue.put({"variant": name, "steps": steps, "train_seconds": round(train_seconds),
                       **score(generator, d_margin, d_shape, judge, train, val)})
            next_report += every
    queue.put({"variant": name, "done": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--judge", required=True, help="a judge directory (f2m-ray judge train)")
    parser.add_argument("--train", type=int, default=2000, help="training phantoms 0..N-1")
    parser.add_argument("--val", type=int, default=400, help="unseen phantoms scored (they follow the training ones)")
    parser.add_argument("--seconds", type=float, default=1500, help="training seconds per variant")
    parser.add_argument("--every", type=float, default=300, help="seconds of training between reports")
    args = parser.parse_args()
    load_judge(args.judge)  # fail here, in one line, before the processes start
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=run, args=(name, preset, args.judge, args.train, args.val, args.seconds,
                                               args.every, queue))
             for name, preset in variants().items()]
    for proc in procs:
        proc.start()
    last, running = {}, len(procs)
    while running:
        row = queue.get()
        if row.get("done"):
            running -= 1
            continue
        print(json.dumps(row), flush=True)
        last[row["variant"]] = row
    for proc in procs:
        proc.join()
    print(f"\n{'variant':<11} {'steps':>6} {'val L1':>7}  {'D reads m/s':>12}  {'judge recon m/s':>15}  {'judge mix m/s':>13}")
    for name, row in last.items():
        pair = lambda v: f"{v[0]:.2f} / {v[1]:.2f}"  # noqa: E731
        print(f"{name:<11} {row['steps']:>6} {row['val_l1']:>7.4f}  {pair(row['d_reads']):>12}  "
              f"{pair(row['judge_recon']):>15}  {pair(row['judge_mix']):>13}")


if __name__ == "__main__":
    sys.exit(main())
