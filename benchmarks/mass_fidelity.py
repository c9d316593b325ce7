"""Mass fidelity and identity of a model's reconstructions of held-out phantoms (f2m_ray.core.mass_metrics).

Phantoms of the paper's three categories from a seed no training run uses (11 by default), with their
true lesion masks; each category's masses are reconstructed, G(I), and compared with each other inside
their masks. The calibration rows show what blurs of the input score on the same masses.

    python benchmarks/mass_fidelity.py --model pretrained
    python benchmarks/mass_fidelity.py --model runs/demo --per-category 64
    python benchmarks/mass_fidelity.py --model pretrained --two-sample 4000   # also the classifier two-sample test

``--two-sample N``: N masses that `f2m-ray synthesize` makes with the model (all 20 categories,
default mixing) against N held-out real phantoms (seed 11) in a classifier two-sample test
(f2m_ray.evaluation.two_sample: held-out ROC AUC, 0.5 = indistinguishable), beside the same test
on real phantoms against real phantoms blurred by 1 px.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from f2m_ray.checkpoint import load_generator
from f2m_ray.core.images import to_model_range
from f2m_ray.core.mass_metrics import gaussian_blur, mass_fidelity, outline_masks, outline_spread
from f2m_ray.data.phantom import phantoms_with_masks
from f2m_ray.labels import PAPER_CATEGORIES, parse_category
from f2m_ray.pretrained import named_model

HELD_OUT_SEED = 11


def held_out(category_name: str, n: int, seed: int = HELD_OUT_SEED):
    """(images (n, 64, 64) in [-1, 1], masks (n, 64, 64), category) of one category."""
    category = parse_category(category_name)
    rows = list(phantoms_with_masks(n, seed, [category]))
    images = np.stack([to_model_range(img) for _, img, _, _ in rows])
    masks = np.stack([mask for _, _, mask, _ in rows])
    return images, masks, category


def reconstruct(generator, images: np.ndarray, category) -> np.ndarray:
    x = torch.from_numpy(images).unsqueeze(1)
    labels = torch.full((len(images),), category.margin_id), torch.full((len(images),), category.shape_id)
    with torch.inference_mode():
        return generator(x, *labels)[:, 0].numpy()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pretrained")
    parser.add_argument("--per-category", type=int, default=64)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--no-calibration", action="store_true")
    parser.add_argument("--two-sample", type=int, default=0, metavar="N", help="masses per side of the two-sample test")
    parser.add_argument("--two-sample-steps", type=int, default=400)
    args = parser.parse_args(argv)
    generator, meta = load_generator(named_model(args.model))
    print(f"model {args.model} (preset {meta.get('preset', {}).get('name')}, epoch {meta.get('epoch')}); "
          f"{args.per_category} held-out phantoms per category, seed {args.seed}")
    print(f"{'category':26}{'what':14}{'fidelity':>9}{'identity':>9}{'outline spread':>16}")
    for name in PAPER_CATEGORIES:
        images, masks, category = held_out(name, args.per_category, args.seed)
        rows = [("model", reconstruct(generator, images, category))]
        if not args.no_calibration:
            rows += [(f"blur {s:g} px", gaussian_blur(images, s)) for s in (1.0, 2.0)]
            rows += [("real itself", images)]
        for what, recon in rows:
            m = mass_fidelity(images, masks, recon)
            spread = outline_spread(outline_masks(recon))
            print(f"{category.name:26}{what:14}{m.fidelity:9.3f}{m.identity:9.3f}{spread:16.3f}")
        print(f"{'':26}{'true masks':14}{'':18}{outline_spread(masks > 0.5):16.3f}")
    if args.two_sample:
        two_sample(args.model, args.two_sample, args.seed, args.two_sample_steps)


def two_sample(model: str, n: int, seed: int, steps: int) -> None:
    import io
    import os
    import tempfile

    from PIL import Image

    from f2m_ray.data.phantom import generate_phantoms
    from f2m_ray.evaluation.two_sample import blur_calibrator, two_sample_auc
    from f2m_ray.synth.driver import synthesize
    from f2m_ray.synth.plan import SynthesisConfig
    from f2m_ray.synthetic import read_table

    real = np.stack([to_model_range(image) for _, image, _ in generate_phantoms(n, seed)])
    per_category = -(-n // 20)
    with tempfile.TemporaryDirectory(prefix="f2m-c2st-") as out:
        synthesize(SynthesisConfig(categories=("all",), n=per_category, out=os.path.join(out, "syn"), model=model,
                                   executor="in-process"), report=None)
        cells = read_table(os.path.join(out, "syn"), columns=["image"]).column("image").to_pylist()
    synthetic = np.stack([to_model_range(np.array(Image.open(io.BytesIO(c["bytes"])))) for c in cells])[:n]
    test = two_sample_auc(real, synthetic, steps)
    calibrator = blur_calibrator(real, steps)  # halves of the real set: fewer rows than the test, said below
    print(f"classifier two-sample test, {test.train_rows} + {test.train_rows} training and {test.test_rows} + "
          f"{test.test_rows} held-out masses, {steps} steps: AUC synthetic vs real {test.auc:.3f}; "
          f"calibrator (real vs other real blurred by 1 px, {calibrator.train_rows} + {calibrator.train_rows}) "
          f"{calibrator.auc:.3f}")


if __name__ == "__main__":
    sys.exit(main())
