"""Mass fidelity and identity of a model's reconstructions of held-out phantoms (f2m_ray.core.mass_metrics).

Phantoms of the paper's three categories from a seed no training run uses (11 by default), with their
true lesion masks; each category's masses are reconstructed, G(I), and compared with each other inside
their masks. The calibration rows show what blurs of the input score on the same masses.

    python benchmarks/mass_fidelity.py --model pretrained
    python benchmarks/mass_fidelity.py --model runs/demo --per-category 64
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


if __name__ == "__main__":
    sys.exit(main())
