"""Procedural phantom breast masses: labeled 64x64 ROIs with no data download.

The model, in 2-D and cheap enough to render a few hundred ROIs a second per core:

- Background: power-law noise (power spectrum ~ 1/f^beta, beta in [2.5, 3.5]),
  the classic statistical model of breast parenchyma in mammograms.
- Mass body: a star-shaped region around a jittered centre with boundary
  r(theta) = R * (1 + sum_k a_k cos(k theta + phi_k)), a 2-D cut of a Gaussian
  random sphere. SHAPE picks the amplitudes: round (tiny low-order terms), oval
  (an ellipse of aspect 1.4-2.0), lobulated (a union of 3-5 overlapping lobes),
  irregular (many mid-order terms, non-convex), architectural-distortion (a faint
  or absent body with straight-ish lines converging to a point).
- Its density is the projected thickness of a lump, sqrt(1 - (rho / r)^2), on a
  pedestal, times a fine internal texture.
- MARGIN shapes the edge: circumscribed (sharp), microlobulated (many small
  scallops), obscured (dense tissue lying over part of the edge), ill-defined
  (wide, fuzzy fading), spiculated (thin tapering branching spicules radiating out
  of the boundary, after the FDA VICTRE breastMass model of de Sisternes et al.,
  Med. Phys. 2015).
- The mass is rendered at 2x and box-downsampled (anti-aliasing), then a little
  quantum noise is added.

Phantom ``i`` of a run depends only on ``(seed, i)`` and its category, never on
the order or the process that renders it, so parallel and serial output match.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from f2m_ray.errors import F2MError
from f2m_ray.core.images import to_model_range
from f2m_ray.labels import MARGINS, PAPER_CATEGORIES, SHAPES, Category, parse_category

# The 5 margins x 4 mass shapes; architectural distortion is not a mass, so it is
# only rendered when asked for by name.
DEFAULT_CATEGORIES: tuple[Category, ...] = tuple(
    Category(m, s) for m in MARGINS for s in SHAPES if s != "architectural-distortion"
)


_SUPERSAMPLE = 2  # render geometry at 2x and average 2x2 blocks: cheap anti-aliasing
_TABLE_SIZE = 4096  # outline lookup table: 2 pi / 4096 is < 0.05 px at the ROI's edge
_ANGLES = np.linspace(-np.pi, np.pi, _TABLE_SIZE, endpoint=False)


# ---------------------------------------------------------------- randomness


def phantom_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for phantom ``index`` of run ``seed``: a pure function of both."""
    if int(seed) < 0 or int(index) < 0:
        raise F2MError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([int(seed), int(index)])


def phantom_category(index: int, categories: Sequence[Category]) -> Category:
    """Balanced, deterministic assignment: categories take turns."""
    return categories[index % len(categories)]


# ---------------------------------------------------------------- fields


@functools.lru_cache(maxsize=8)
def _log_frequency(n: int) -> np.ndarray:
    """log |f| on the rfft2 grid of an n x n canvas (DC set to 0, masked by the caller)."""
    f = np.fft.fftfreq(n)
    freq = np.hypot(f[:, None], f[None, : n // 2 + 1])
    freq[0, 0] = 1.0
    return np.log(freq)


def _power_law_noise(
    rng: np.random.Generator, size: int, beta: float, pad: bool = True
) -> np.ndarray:
    """Zero-mean, unit-std noise with power spectrum 1/f^beta, shape (size, size).

    With ``pad``, synthesised on a 2x canvas and cropped so that the periodic FFT
    wrap-around does not show as matching opposite edges (it does not matter for
    the texture inside a mass).
    """
    n = 2 * size if pad else size
    amplitude = np.exp((-beta / 2.0) * _log_frequency(n))
    amplitude[0, 0] = 0.0  # no DC: the mean is set by the caller
    spectrum = np.fft.rfft2(rng.standard_normal((n, n))) * amplitude
    field = np.fft.irfft2(spectrum, s=(n, n))[:size, :size]
    field -= field.mean()
    return field / (field.std() + 1e-12)


def _downsample(a: np.ndarray, factor: int) -> np.ndarray:
    """Box average over factor x factor blocks (strided sums: faster than reshape-mean)."""
    out = sum(a[i::factor, j::factor] for i in range(factor) for j in range(factor))
    return out * (1.0 / (factor * factor))


# ---------------------------------------------------------------- mass boundary


def _harmonics(rng: np.random.Generator, orders, amplitudes):
    """theta -> sum_k a_k cos(k theta + phi_k), with the random phases drawn now."""
    terms = [(k, a, rng.uniform(0.0, 2.0 * np.pi)) for k, a in zip(orders, amplitudes)]
    return lambda theta: sum(a * np.cos(k * theta + phi) for k, a, phi in terms)


def _ellipse(aspect: float, angle: float):
    """theta -> radius of an area-preserving ellipse (unit mean radius)."""
    a, b = math.sqrt(aspect), 1.0 / math.sqrt(aspect)
    return lambda theta: a * b / np.sqrt(
        (b * np.cos(theta - angle)) ** 2 + (a * np.sin(theta - angle)) ** 2
    )


def _lobes(rng: np.random.Generator):
    """theta -> boundary of a union of discs (a core plus 3-5 lobes): big bumps, notches.

    Each disc is seen from the mass centre (inside the core disc); the ray at
    angle theta leaves disc (D, alpha, rho) at D cos(t) + sqrt(rho^2 - D^2 sin^2 t).
    """
    core = rng.uniform(0.6, 0.75)
    n_lobes = int(rng.integers(3, 6))
    base = rng.uniform(0.0, 2.0 * np.pi)
    discs = [
        (base + 2.0 * np.pi * j / n_lobes + rng.normal(0.0, 0.25),
         rng.uniform(0.35, 0.6), rng.uniform(0.4, 0.65))
        for j in range(n_lobes)
    ]

    def radius(theta):
        r = np.full_like(theta, core)
        for alpha, dist, rho in discs:
            t = theta - alpha
            disc = rho**2 - (dist * np.sin(t)) ** 2
            exit_ = dist * np.cos(t) + np.sqrt(np.clip(disc, 0.0, None))
            r = np.maximum(r, np.where(disc > 0, exit_, 0.0))
        return r

    return radius


def _boundary(shape: str, margin: str, rng: np.random.Generator):
    """theta -> r(theta) / R of the mass body, all random parameters drawn now."""
    if shape == "round":
        outline, bumps = _ellipse(rng.uniform(1.0, 1.12), rng.uniform(0, np.pi)), _harmonics(
            rng, (2, 3, 4), rng.uniform(0.0, 0.03, 3))
        body = lambda t: outline(t) + bumps(t)  # noqa: E731
    elif shape == "oval":
        outline, bumps = _ellipse(rng.uniform(1.4, 2.0), rng.uniform(0, np.pi)), _harmonics(
            rng, (2, 3), rng.uniform(0.0, 0.025, 2))
        body = lambda t: outline(t) + bumps(t)  # noqa: E731
    elif shape == "lobulated":
        body = _lobes(rng)
    elif shape == "irregular":
        # Many mid-order terms with random (half-normal) amplitudes decaying slowly
        # with order: a non-convex, jagged outline unlike the few smooth lobes above.
        orders = np.arange(2, 11)
        amps = np.abs(rng.normal(0.0, 1.0, orders.size)) * 0.2 * (orders / 2.0) ** -1.0
        bumps = _harmonics(rng, orders, amps)
        outline = _ellipse(rng.uniform(1.0, 1.5), rng.uniform(0, np.pi))
        body = lambda t: (1.0 + bumps(t)) * outline(t)  # noqa: E731
    else:  # architectural distortion: a small, plain core (often barely visible)
        bumps = _harmonics(rng, (2, 3, 5), rng.uniform(0.0, 0.1, 3))
        body = lambda t: 1.0 + bumps(t)  # noqa: E731
    if margin == "microlobulated":
        # Scallops |sin(k theta / 2)| give k small lobes with inward cusps.
        k = int(rng.integers(9, 16))
        depth, phase = rng.uniform(0.07, 0.11), rng.uniform(0, np.pi)
        ripple = _harmonics(rng, (k + 3, k + 7), rng.uniform(0.0, 0.025, 2))
        smooth = body
        body = lambda t: smooth(t) + depth * np.abs(np.sin(0.5 * k * t + phase)) + ripple(t)  # noqa: E731
    return lambda t: np.maximum(body(t), 0.25)


# ---------------------------------------------------------------- thin lines


def _segments_spicule(rng, x0, y0, direction, length, width, fade, depth, out):
    """One straight-ish spicule that tapers and fades to its tip, with side branches.

    Appends (x0, y0, x1, y1, w0, w1, fade0, fade1) tuples (output-pixel units).
    Branches leave at 20-40 degrees, inherit the local width and brightness and
    may branch once more, as in the VICTRE breastMass spicule model.
    """
    n_steps = 3
    step = length / n_steps
    x, y, w, f = x0, y0, width, fade
    for i in range(n_steps):
        direction += rng.normal(0.0, 0.08)  # straight-ish: small kinks only
        x1, y1 = x + step * math.cos(direction), y + step * math.sin(direction)
        w1 = width * (1.0 - 0.75 * (i + 1) / n_steps)  # taper to a quarter
        f1 = fade * (1.0 - 0.65 * (i + 1) / n_steps)  # fade to a third
        out.append((x, y, x1, y1, w, w1, f, f1))
        if depth < 2 and i < n_steps - 1 and rng.random() < 0.35:
            side = rng.choice((-1.0, 1.0)) * rng.uniform(0.35, 0.7)
            remaining = length - step * (i + 1)
            _segments_spicule(
                rng, x1, y1, direction + side, remaining * rng.uniform(0.5, 0.9),
                w1, f1, depth + 1, out,
            )
        x, y, w, f = x1, y1, w1, f1


def _render_segments(segments, size: int, factor: int):
    """Coverage and faded intensity of tapered segments on the (size*factor)^2 grid.

    PIL draws the lines at twice that resolution (C speed, a few microseconds a
    line) and 2x2 averaging anti-aliases them. Each segment gets its mean width
    and fade; segments are drawn dimmest first so overlaps keep the brighter one.
    Lines thinner than a drawing pixel keep a 1-pixel footprint, so they dim
    rather than vanish, as a thin line does when imaged.
    """
    scale = 2 * factor  # drawing pixels per output pixel
    side = size * scale
    cover = Image.new("L", (side, side), 0)
    shade = Image.new("L", (side, side), 0)
    draw_cover, draw_shade = ImageDraw.Draw(cover), ImageDraw.Draw(shade)

    def to_px(v: float) -> float:  # output-pixel coords (centre 0) -> drawing pixel centres
        return (v + size / 2.0) * scale - 0.5

    for x0, y0, x1, y1, w0, w1, f0, f1 in sorted(segments, key=lambda seg: seg[6] + seg[7]):
        xy = [(to_px(x0), to_px(y0)), (to_px(x1), to_px(y1))]
        width = max(1, int(round(0.5 * (w0 + w1) * scale)))
        draw_cover.line(xy, fill=255, width=width)
        draw_shade.line(xy, fill=int(round(127.5 * (f0 + f1))), width=width)
    coverage = np.asarray(cover.reduce(2), dtype=np.float32) / 255.0
    intensity = np.asarray(shade.reduce(2), dtype=np.float32) / 255.0
    return coverage, intensity


# ---------------------------------------------------------------- rendering


def _render(category: Category, rng: np.random.Generator, size: int = 64):
    """Render one phantom; returns (image, mass_mask), both float32 (size, size).

    ``mass_mask`` is the nominal lesion (body inside its nominal boundary, plus
    spicules or distortion lines) at pixel coverage >= 0.5: the ground truth
    the tests measure shape and margin statistics on.
    """
    if size < 16 or size % 2:
        raise F2MError(f"phantom size must be an even number >= 16, got {size}")
    margin, shape = category.margin, category.shape
    s = _SUPERSAMPLE
    n = size * s
    coords = (np.arange(n) + 0.5) / s - size / 2.0  # subpixel centres, output-pixel units

    # Background parenchyma.
    beta = rng.uniform(2.5, 3.5)
    background = rng.uniform(0.25, 0.5) + rng.uniform(0.04, 0.085) * _power_law_noise(rng, size, beta)

    # Mass geometry.
    cx, cy = rng.uniform(-0.07, 0.07, 2) * size
    mean_radius = rng.uniform(0.12, 0.2) * size
    contrast = rng.uniform(0.16, 0.3)
    dx, dy = coords[None, :] - cx, coords[:, None] - cy  # (n, n)
    rho = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    is_distortion = shape == "architectural-distortion"
    if is_distortion:
        mean_radius *= rng.uniform(0.3, 0.55)
        contrast_body = contrast * rng.uniform(0.0, 0.45)
    else:
        contrast_body = contrast
    outline = _boundary(shape, margin, rng)
    # Evaluate the outline on a 1-D table of angles and look it up per pixel: the
    # harmonics then cost a table's worth of cosines instead of one per pixel.
    boundary = mean_radius * _lookup(outline, theta)
    depth = boundary - rho  # approximate signed distance to the edge, > 0 inside

    # Internal texture, synthesised at the output size (it is smooth at that scale)
    # and repeated up to the supersampled grid.
    texture_small = _power_law_noise(rng, size, rng.uniform(1.8, 2.4), pad=False)
    texture = texture_small.repeat(s, 0).repeat(s, 1)
    body = _edge(margin, depth, mean_radius, texture, s, rng)
    thickness = np.sqrt(np.clip(1.0 - (rho / boundary) ** 2, 0.0, 1.0))
    mass = contrast_body * body * (0.55 + 0.45 * thickness) * (1.0 + 0.12 * texture)
    mask = np.clip(depth * s + 0.5, 0.0, 1.0)

    # Spicules (spiculated margin) or converging lines (architectural distortion).
    segments = _line_segments(margin, is_distortion, rng, cx, cy, mean_radius, outline, size)
    if segments:
        coverage, lines = _render_segments(segments, size, s)
        line_contrast = contrast * rng.uniform(0.55, 0.85)
        if margin == "ill-defined":
            lines = _blur3(lines)  # blurred lines for an ill-defined margin
        mass = np.maximum(mass, line_contrast * lines)
        mask = np.maximum(mask, coverage)

    if margin == "obscured":
        # Dense tissue over part of the edge. Tissue and mass combine by a soft
        # maximum rather than a sum, so the mass boundary under the patch has
        # (almost) no step left to see.
        tissue = _obscuring_tissue(rng, cx, cy, mean_radius, contrast, size, texture_small)
        tissue = tissue.repeat(s, 0).repeat(s, 1)
        mass = np.maximum(mass, tissue) + 0.2 * np.minimum(mass, tissue)

    image = background + _downsample(mass, s) + rng.normal(0.0, 0.008, (size, size))
    mass_mask = (_downsample(mask, s) >= 0.5).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32), mass_mask


def _edge(margin: str, depth: np.ndarray, mean_radius: float, texture: np.ndarray, s: int, rng) -> np.ndarray:
    """The body's profile across its edge, in [0, 1], by margin."""
    if margin == "ill-defined":
        # Wide, fuzzy fading: a smooth ramp whose width wanders around the edge.
        width = mean_radius * rng.uniform(0.3, 0.45)
        fuzzy = depth + 0.35 * width * texture
        return 0.5 * (1.0 + np.tanh(fuzzy / width))
    if margin == "obscured":
        return np.clip(depth / 1.2 + 0.5, 0.0, 1.0)
    # A sharp edge: a one-subpixel ramp, anti-aliased by the 2x downsample.
    return np.clip(depth * s + 0.5, 0.0, 1.0)


def _line_segments(margin: str, is_distortion: bool, rng, cx: float, cy: float, mean_radius: float, outline,
                   size: int) -> list:
    """Spicules growing out of the body (spiculated) and lines converging to a focal point (distortion)."""
    segments: list = []
    if margin == "spiculated":
        # Roughly even around the body, but not a regular star.
        n_spicules = int(rng.integers(8, 20))
        offsets = rng.uniform(0.0, 2.0 * np.pi) + 2.0 * np.pi * np.arange(n_spicules) / n_spicules
        for angle in offsets + rng.normal(0.0, 0.35, n_spicules):
            base = mean_radius * float(outline(np.array(angle)))
            start = 0.85 * base  # start inside so the spicule grows out of the body
            _segments_spicule(
                rng, cx + start * math.cos(angle), cy + start * math.sin(angle),
                angle + rng.normal(0.0, 0.2), mean_radius * rng.uniform(0.5, 1.8),
                rng.uniform(0.7, 1.5), rng.uniform(0.7, 1.0), 0, segments,
            )
    if is_distortion:
        # Straight lines converging to a focal point: tissue pulled toward a scar.
        n_lines = int(rng.integers(12, 24))
        reach = size * rng.uniform(0.28, 0.42)
        for angle in rng.uniform(0.0, 2.0 * np.pi, n_lines):
            inner = reach * rng.uniform(0.0, 0.15)
            outer = reach * rng.uniform(0.6, 1.0)
            segments.append((
                cx + inner * math.cos(angle), cy + inner * math.sin(angle),
                cx + outer * math.cos(angle), cy + outer * math.sin(angle),
                rng.uniform(0.8, 1.4), rng.uniform(0.3, 0.6), 1.0, 0.3,
            ))
    return segments


def _lookup(outline, theta: np.ndarray) -> np.ndarray:
    """outline(theta) through a periodic table of angles (nearest entry)."""
    index = np.rint((theta + np.pi) * (_TABLE_SIZE / (2.0 * np.pi))).astype(np.intp)
    return outline(_ANGLES)[index % _TABLE_SIZE]


def _blur3(a: np.ndarray) -> np.ndarray:
    """A separable [1, 2, 1] / 4 blur applied twice (cheap, no scipy)."""
    for _ in range(2):
        a = 0.25 * (np.roll(a, 1, 0) + 2 * a + np.roll(a, -1, 0))
        a = 0.25 * (np.roll(a, 1, 1) + 2 * a + np.roll(a, -1, 1))
    return a


def _obscuring_tissue(rng, cx, cy, mean_radius, contrast, size, texture):
    """1-2 dense tissue patches on one side of the mass, (size, size) at output resolution.

    They are soft (1.5-3 px edges), so the output grid is fine enough for them.
    """
    coords = np.arange(size) + 0.5 - size / 2.0
    tissue = np.zeros((size, size))
    side = rng.uniform(0.0, 2.0 * np.pi)
    for _ in range(int(rng.integers(1, 3))):
        angle = side + rng.normal(0.0, 0.5)
        dist = mean_radius * rng.uniform(0.8, 1.3)
        tx, ty = cx + dist * math.cos(angle), cy + dist * math.sin(angle)
        dx, dy = coords[None, :] - tx, coords[:, None] - ty
        theta = np.arctan2(dy, dx)
        radius = mean_radius * rng.uniform(0.7, 1.1) * (
            1.0 + _lookup(_harmonics(rng, (2, 3, 4), rng.uniform(0.05, 0.15, 3)), theta)
        )
        soft = rng.uniform(1.5, 3.0)
        patch = 0.5 * (1.0 + np.tanh((radius - np.hypot(dx, dy)) / soft))
        tissue = np.maximum(tissue, patch)
    return tissue * contrast * rng.uniform(0.85, 1.05) * (1.0 + 0.15 * texture)


def render_phantom(category: Category, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One phantom ROI of ``category``: float32 (size, size) in [0, 1], mass bright."""
    return _render(category, rng, size)[0]


def render_phantom_with_mask(category: Category, rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """One phantom and its true lesion: (image float32 (size, size) in [0, 1], mask float32 0/1).

    The image is exactly ``render_phantom``'s for the same ``rng`` state. The mask is the nominal
    lesion (body inside its boundary, plus spicules or distortion lines, at pixel coverage >= 0.5):
    what the mass measures (f2m_ray.core.mass_metrics) compare reconstructions inside.
    """
    return _render(category, rng, size)


def phantoms_with_masks(
    n: int, seed: int, categories: Sequence[Category] | None = None, start: int = 0
) -> Iterator[tuple[int, np.ndarray, np.ndarray, Category]]:
    """Yield (index, uint8 (64, 64) image, float32 (64, 64) mask, category): ``generate_phantoms`` plus masks.

    The images are byte-identical to ``generate_phantoms(n, seed, categories, start)``'s.
    """
    cats = tuple(categories) if categories else DEFAULT_CATEGORIES
    for index in range(start, n):
        category = phantom_category(index, cats)
        image, mask = _render(category, phantom_rng(seed, index))
        yield index, _to_uint8(image), mask, category


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def generate_phantoms(
    n: int, seed: int, categories: Sequence[Category] | None = None, start: int = 0
) -> Iterator[tuple[int, np.ndarray, Category]]:
    """Yield (index, uint8 (64, 64) image, category) for indices start .. n - 1."""
    cats = tuple(categories) if categories else DEFAULT_CATEGORIES
    for index in range(start, n):
        category = phantom_category(index, cats)
        yield index, _to_uint8(render_phantom(category, phantom_rng(seed, index))), category


MASS_PROBE_SEED = 11  # a phantom seed no training run of this tool uses by default (train uses 0)


def mass_probe(per_category: int = 16, seed: int = MASS_PROBE_SEED,
               categories: Sequence[str] = PAPER_CATEGORIES) -> dict[str, np.ndarray | list[str]]:
    """Held-out phantoms with their true lesions, for mass fidelity (f2m_ray.core.mass_metrics).

    Plain data, so it travels into Ray workers: ``images`` (N, 64, 64) float32 in [-1, 1], ``masks``
    (N, 64, 64), ``margins`` and ``shapes`` (N,) int64, ``categories`` (N,) names; ``per_category``
    masses of each of ``categories`` (the paper's three by default).
    """
    images, masks, margins, shapes, names = [], [], [], [], []
    for name in categories:
        category = parse_category(name)
        for _, image, mask, _ in phantoms_with_masks(per_category, seed, [category]):
            images.append(to_model_range(image))
            masks.append(mask)
            margins.append(category.margin_id)
            shapes.append(category.shape_id)
            names.append(category.name)
    return {"images": np.stack(images), "masks": np.stack(masks), "margins": np.array(margins, dtype=np.int64),
            "shapes": np.array(shapes, dtype=np.int64), "categories": names}

