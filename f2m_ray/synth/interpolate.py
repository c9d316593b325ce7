"""Interpolation figures (paper Fig. 3 and Fig. 4) from a checkpoint and its feature bank.

    two seeds A, B     one row:  [A]  dec(v(t)) for t = 0 .. 1 in `steps` equidistant steps  [B]
    three seeds A,B,C  a triangle: dec(a vA + b vB + c vC) on the barycentric grid with
                       `steps` points per side; the corners are the seeds

The real seed ROIs (as stored in the bank) stand beside the decoded images, so a
reader sees both the inputs and how well the decoder reproduces them. Runs in one
process: a figure is a few dozen decodes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from f2m_ray.errors import F2MError
from f2m_ray.core.images import to_uint8
from f2m_ray.schema import decode_png
from f2m_ray.checkpoint import find_checkpoint, load_generator
from f2m_ray.bank import default_bank_path, load_feature_bank
from f2m_ray.core.mixing import barycentric_grid, line_weights, mix
from f2m_ray.storage import filesystem

TILE = 64  # pixels per image
GAP = 4  # between decoded images
SEPARATION = 16  # between a real seed and the decoded images
CAPTION = 16  # caption strip height
LETTERS = "ABC"


@dataclass(frozen=True)
class Interpolation:
    seed_ids: tuple[str, ...]
    seed_images: np.ndarray  # (S, 64, 64) uint8: the real ROIs
    weights: np.ndarray  # (M, S) float64: line_weights or barycentric_grid
    images: np.ndarray  # (M, 64, 64) uint8: decoded mixes, in `weights` order


def interpolate(model: str, seeds: list[str], steps: int = 8, bank: str | None = None) -> Interpolation:
    """Decode the line (2 seeds) or barycentric triangle (3 seeds) between bank features."""
    import torch

    seeds = [s.strip() for s in seeds if s.strip()]
    if len(seeds) not in (2, 3):
        raise F2MError(f"--seeds takes 2 roi ids (a line, Fig. 3) or 3 (a triangle, Fig. 4), got {len(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise F2MError(f"--seeds repeats a roi id: {','.join(seeds)}")
    checkpoint = find_checkpoint(model)
    generator, meta = load_generator(checkpoint, "cpu")
    feature_bank = load_feature_bank(bank or default_bank_path(checkpoint), with_images=True)
    if feature_bank.model_id != meta["model_id"]:
        raise F2MError(
            f"the bank {feature_bank.path} was encoded by model {feature_bank.model_id}, "
            f"not by {checkpoint} (model {meta['model_id']})"
        )
    rows = [feature_bank.row_of(s) for s in seeds]
    weights = line_weights(steps) if len(seeds) == 2 else barycentric_grid(steps)  # (M, S)
    mixed = mix(feature_bank.features[rows], weights)  # (M, D)
    with torch.inference_mode():
        decoded = generator.decode(torch.from_numpy(mixed)).numpy()[:, 0]  # (M, 64, 64) in [-1, 1]
    return Interpolation(
        seed_ids=tuple(seeds),
        seed_images=np.stack([decode_png(feature_bank.images[r]) for r in rows]),
        weights=weights,
        images=to_uint8(decoded),
    )


def line_figure(result: Interpolation):
    """Fig. 3: [A] decoded steps [B] in one row, with a caption."""
    from PIL import Image

    steps = len(result.images)
    width = 2 * (TILE + SEPARATION) + steps * (TILE + GAP) - GAP
    sheet = Image.new("L", (width, TILE + CAPTION), 0)
    sheet.paste(Image.fromarray(result.seed_images[0]), (0, 0))
    for i, image in enumerate(result.images):
        sheet.paste(Image.fromarray(image), (TILE + SEPARATION + i * (TILE + GAP), 0))
    sheet.paste(Image.fromarray(result.seed_images[1]), (width - TILE, 0))
    _caption(sheet, result.seed_ids)
    return sheet


def triangle_figure(result: Interpolation):
    """Fig. 4: the barycentric grid as a triangle (A at the top, B bottom left, C bottom right)."""
    from PIL import Image

    n = _triangle_side(len(result.images)) - 1
    pitch = TILE + GAP
    left = TILE + SEPARATION  # room for the real B (and A) on the left
    width = left + (n + 1) * pitch - GAP + SEPARATION + TILE
    height = (n + 1) * pitch - GAP
    sheet = Image.new("L", (width, height + CAPTION), 0)
    index = 0
    for r in range(n + 1):
        x0 = left + (n - r) * pitch // 2
        for j in range(r + 1):
            sheet.paste(Image.fromarray(result.images[index]), (x0 + j * pitch, r * pitch))
            index += 1
    apex_x = left + n * pitch // 2
    sheet.paste(Image.fromarray(result.seed_images[0]), (apex_x - TILE - SEPARATION, 0))
    sheet.paste(Image.fromarray(result.seed_images[1]), (0, n * pitch))
    sheet.paste(Image.fromarray(result.seed_images[2]), (width - TILE, n * pitch))
    _caption(sheet, result.seed_ids)
    return sheet


def _triangle_side(points: int) -> int:
    side = int(round((np.sqrt(8 * points + 1) - 1) / 2))
    if side * (side + 1) // 2 != points:
        raise F2MError(f"{points} points do not form a triangle")
    return side


def _caption(sheet, seed_ids: tuple[str, ...]) -> None:
    from PIL import ImageDraw, ImageFont

    text = "   ".join(f"{LETTERS[i]} = {s}" for i, s in enumerate(seed_ids))
    ImageDraw.Draw(sheet).text((2, sheet.height - CAPTION + 2), text, fill=255, font=ImageFont.load_default())


def write_interpolation(model: str, seeds: list[str], out: str, steps: int = 8, bank: str | None = None) -> Interpolation:
    """Compute the figure for `seeds` and save it as a PNG (local or s3://)."""
    if not str(out).lower().endswith(".png"):
        raise F2MError(f"--out must name a .png file, got {out}")
    result = interpolate(model, seeds, steps, bank)
    figure = line_figure(result) if len(result.seed_ids) == 2 else triangle_figure(result)
    buffer = io.BytesIO()
    figure.save(buffer, format="PNG")
    fs, inner = filesystem(out)
    parent = inner.rsplit("/", 1)[0] if "/" in inner else ""
    try:
        if parent and not fs.exists(parent):
            fs.makedirs(parent, exist_ok=True)
        with fs.open(inner, "wb") as f:
            f.write(buffer.getvalue())
    except OSError as err:
        raise F2MError(f"cannot write {out}: {err.strerror or err}") from None
    return result
