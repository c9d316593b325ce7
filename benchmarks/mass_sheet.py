"""Real, reconstructed and synthesized masses side by side, per paper category, as one PNG.

For each of the paper's three categories: a row of held-out phantoms (seed 11, never trained on),
the model's reconstructions of them, and a row of masses `f2m-ray synthesize` makes for that
category with the model (default mixing, in this process). Models after the first add a
reconstruction row and a synthesis row each, so that recipes can be compared on one sheet.

    python benchmarks/mass_sheet.py --model pretrained --out masses.png
    python benchmarks/mass_sheet.py --model old=runs/a --model new=runs/b --per-row 10 --out compare.png
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mass_fidelity import held_out, reconstruct  # noqa: E402

from f2m_ray.checkpoint import load_generator  # noqa: E402
from f2m_ray.core.images import to_uint8  # noqa: E402
from f2m_ray.labels import PAPER_CATEGORIES  # noqa: E402
from f2m_ray.pretrained import named_model  # noqa: E402
from f2m_ray.synth.driver import synthesize  # noqa: E402
from f2m_ray.synth.plan import SynthesisConfig  # noqa: E402
from f2m_ray.synthetic import read_table  # noqa: E402

LABEL_WIDTH = 200
SCALE = 2


def synthesized(model: str, category: str, n: int) -> np.ndarray:
    """n masses of `category` as `f2m-ray synthesize` writes them: uint8 (n, 64, 64)."""
    with tempfile.TemporaryDirectory(prefix="f2m-sheet-") as out:
        synthesize(SynthesisConfig(categories=(category,), n=n, out=os.path.join(out, "syn"), model=model,
                                   executor="in-process"), report=None)
        table = read_table(os.path.join(out, "syn"), columns=["image"])
    return np.stack([np.array(Image.open(io.BytesIO(cell["bytes"]))) for cell in table.column("image").to_pylist()])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None, help="[NAME=]MODEL, repeatable [default: pretrained]")
    parser.add_argument("--per-row", type=int, default=12)
    parser.add_argument("--out", default="masses.png")
    args = parser.parse_args(argv)
    models = [m.split("=", 1) if "=" in m else (m, m) for m in (args.model or ["pretrained"])]
    rows: list[tuple[str, np.ndarray]] = []
    for name in PAPER_CATEGORIES:
        images, _, category = held_out(name, args.per_row)
        rows.append((f"{name}: real", to_uint8(images)))
        for label, model in models:
            generator, _ = load_generator(named_model(model))
            rows.append((f"  {label}: reconstructed", to_uint8(reconstruct(generator, images, category))))
            rows.append((f"  {label}: synthesized", synthesized(model, name, args.per_row)))
    size = 64 * SCALE
    sheet = Image.new("L", (LABEL_WIDTH + args.per_row * size, len(rows) * size), 255)
    draw = ImageDraw.Draw(sheet)
    for r, (label, tiles) in enumerate(rows):
        draw.text((6, r * size + size // 2 - 6), label, fill=0)
        for c, tile in enumerate(tiles[: args.per_row]):
            sheet.paste(Image.fromarray(tile).resize((size, size), Image.NEAREST), (LABEL_WIDTH + c * size, r * size))
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out}: {len(rows)} rows of {args.per_row} masses")


if __name__ == "__main__":
    torch.set_num_threads(1)  # a background job beside training runs
    sys.exit(main())
