"""report.html of `f2m-ray evaluate`: one self-contained page (inline PNG tiles and SVG histograms, no
scripts, no external files) from report.json's figures.
"""

from __future__ import annotations

import base64
import html
from typing import Any

import numpy as np

from f2m_ray.core import metrics
from f2m_ray.evaluation.usefulness import USEFULNESS_LABELS
from f2m_ray.core.images import to_uint8
from f2m_ray.schema import png_bytes
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # an annotation only: evaluate imports this module
    from f2m_ray.evaluation.inputs import SyntheticArrays


# ---------------------------------------------------------------- figures


def _png_base64(tile: np.ndarray) -> str:
    return base64.b64encode(png_bytes(to_uint8(tile))).decode()


def _tile(images: np.ndarray, gap: int = 2) -> np.ndarray:
    """(n, H, W) -> one (H, n*W + gaps) strip, gaps white."""
    if len(images) == 0:
        return np.ones((8, 8), dtype=np.float32)
    h, w = images.shape[1:]
    strip = np.ones((h, len(images) * (w + gap) - gap), dtype=np.float32)
    for i, image in enumerate(images):
        strip[:, i * (w + gap) : i * (w + gap) + w] = image
    return strip


def grids(synthetic: SyntheticArrays, real_all, real_category: np.ndarray, categories: list[str], n: int,
           seed: int) -> dict[str, dict[str, str]]:
    """Per category: base64 PNG strips of n synthetic and n real masses (deterministic picks)."""
    out = {}
    for i, category in enumerate(categories):
        syn_rows = np.flatnonzero(synthetic.category == category)
        real_rows = np.flatnonzero(real_category == category)
        syn_pick = syn_rows[metrics.subsample_indices(len(syn_rows), n, seed + i)]
        real_pick = real_rows[metrics.subsample_indices(len(real_rows), n, seed + i)]
        out[category] = {"synthetic": _png_base64(_tile(synthetic.images[syn_pick])),
                         "real": _png_base64(_tile(real_all.images[real_pick]))}
    return out


def histogram_svg(title: str, synthetic: np.ndarray, heldout: np.ndarray, threshold: float,
                   bins: int = 40, width: int = 560, height: int = 220) -> str:
    """Two overlaid histograms (share of each set per bin) and the threshold as a line, as inline SVG."""
    values = np.concatenate([synthetic, heldout])
    low, high = float(values.min()), float(values.max())
    high = high if high > low else low + 1.0
    edges = np.linspace(low, high, bins + 1)
    syn_share = np.histogram(synthetic, edges)[0] / max(1, len(synthetic))
    real_share = np.histogram(heldout, edges)[0] / max(1, len(heldout))
    top = max(syn_share.max(), real_share.max(), 1e-9)
    left, bottom, plot_w, plot_h = 40, height - 30, width - 60, height - 60
    bar_w = plot_w / bins

    def x_of(v: float) -> float:
        return left + (v - low) / (high - low) * plot_w

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" font-family="sans-serif">',
             f'<text x="{left}" y="14" font-weight="bold">{html.escape(title)}</text>']
    for shares, colour in ((real_share, "#1f77b4"), (syn_share, "#ff7f0e")):
        for i, share in enumerate(shares):
            if share <= 0:
                continue
            bar_h = share / top * plot_h
            parts.append(f'<rect x="{left + i * bar_w:.1f}" y="{bottom - bar_h:.1f}" width="{bar_w:.1f}" '
                         f'height="{bar_h:.1f}" fill="{colour}" fill-opacity="0.55"/>')
    tx = x_of(threshold)
    parts += [
        f'<line x1="{left}" y1="{bottom}" x2="{left + plot_w}" y2="{bottom}" stroke="black"/>',
        f'<line x1="{tx:.1f}" y1="{bottom - plot_h}" x2="{tx:.1f}" y2="{bottom}" stroke="red" stroke-dasharray="4 3"/>',
        f'<text x="{tx + 3:.1f}" y="{bottom - plot_h + 10}" fill="red">threshold {threshold:.3g}</text>',
        f'<text x="{left}" y="{height - 14}">{low:.3g}</text>',
        f'<text x="{left + plot_w}" y="{height - 14}" text-anchor="end">{high:.3g}</text>',
        f'<rect x="{left + plot_w - 150}" y="22" width="10" height="10" fill="#ff7f0e"/>'
        f'<text x="{left + plot_w - 136}" y="31">synthetic ({len(synthetic)})</text>',
        f'<rect x="{left + plot_w - 150}" y="38" width="10" height="10" fill="#1f77b4"/>'
        f'<text x="{left + plot_w - 136}" y="47">held-out real ({len(heldout)})</text>',
        "</svg>",
    ]
    return "\n".join(parts)


def _share_text(share: float | None) -> str:
    if share is None:
        return "the mixed classifier draws uniformly from real and synthetic rows"
    return f"the mixed classifier's batches are {share:.0%} real in expectation"


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


SUMMARY_ROWS: list[tuple[str, tuple[str, ...]]] = [
    ("synthetic masses", ("synthetic_rows",)),
    ("held-out real masses", ("heldout_real_rows",)),
    ("judge margin accuracy: synthetic", ("label_fidelity", "synthetic", "margin")),
    ("judge margin accuracy: held-out real", ("label_fidelity", "heldout_real", "margin")),
    ("margin fidelity ratio", ("label_fidelity", "ratio", "margin")),
    ("judge shape accuracy: synthetic", ("label_fidelity", "synthetic", "shape")),
    ("judge shape accuracy: held-out real", ("label_fidelity", "heldout_real", "shape")),
    ("shape fidelity ratio", ("label_fidelity", "ratio", "shape")),
    ("FD synthetic vs held-out real", ("realism", "synthetic_vs_heldout")),
    ("FD synthetic vs real half B", ("realism", "synthetic_vs_half")),
    ("FD floor: real half A vs half B", ("realism", "floor_half_vs_half")),
    ("precision", ("precision_recall", "precision")),
    ("recall", ("precision_recall", "recall")),
    ("density (k = 5)", ("density_coverage", "density")),
    ("coverage (k = 5)", ("density_coverage", "coverage")),
    ("diversity: synthetic", ("diversity", "synthetic")),
    ("diversity: held-out real", ("diversity", "heldout_real")),
    ("outline spread: synthetic", ("outline_spread", "synthetic")),
    ("outline spread: held-out real", ("outline_spread", "heldout_real")),
    ("memorized share (features)", ("memorization", "share")),
    ("memorized share (pixels)", ("memorization", "share_pixels")),
]


def _scarce_html(useful: dict[str, Any]) -> list[str]:
    """The scarce-data usefulness table: mean +- sd over the classifier seeds, delta to real."""
    def pm(stat: dict[str, Any] | None, scale: float = 1.0) -> str:
        if not stat:
            return ""
        return f"{scale * stat['mean']:.3g} &plusmn; {scale * stat['sd']:.2g}"

    parts = [f"<h2>Usefulness (scarce real data)</h2><p>Every arm sees the same R = {useful['R']} real ROIs "
             f"(the GAN's training set) with flips and crops, {useful['steps']} steps, {useful['seeds']} classifier "
             f"seeds (mean &plusmn; sd); tested on {useful['test_rows']} held-out real ROIs of "
             f"{useful['test_categories']} categories; mixup Beta({useful['mixup_alpha']:g}, {useful['mixup_alpha']:g}); "
             f"S = {useful['S']} synthetic, {_share_text(useful.get('real_share'))}.</p>",
             "<table><tr><th>arm</th><th>margin</th><th>shape</th><th>mean</th><th>&Delta; mean vs real (points)</th></tr>"]
    for arm, result in useful["arms"].items():
        label = USEFULNESS_LABELS.get(arm.split(":")[0], arm) + (f" [{arm.split(':', 1)[1]}]" if ":" in arm else "")
        acc = result["accuracy"]
        parts.append(f"<tr><th>{html.escape(label)}</th><td>{pm(acc['margin'])}</td><td>{pm(acc['shape'])}</td>"
                     f"<td>{pm(acc['mean'])}</td><td>{pm((result['delta_vs_real'] or {}).get('mean'), 100)}</td></tr>")
    parts.append("</table>")
    return parts


def _dig(data: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def render_html(report: dict[str, Any], figures: dict[str, Any]) -> str:
    """The self-contained page: tables, image strips (base64 PNG) and SVG histograms."""
    groups = report["groups"]
    names = list(groups)
    # One row per category (and overall), one column per metric: 20 categories fit down the page.
    head = "".join(f"<th class='metric'>{html.escape(label)}</th>" for label, _ in SUMMARY_ROWS)
    rows = []
    for n in names:
        cells = "".join(f"<td>{_fmt(_dig(groups[n], path))}</td>" for _, path in SUMMARY_ROWS)
        rows.append(f"<tr><th>{html.escape(n)}</th>{cells}</tr>")
    inputs = report["inputs"]
    judge = report["judge"]
    judge_val = _dig(judge, ("report", "val_accuracy"))
    judge_line = (f"judge {html.escape(str(judge.get('path') or 'trained for this report'))}; "
                  f"its held-out accuracy when trained: margin {_fmt(_dig(judge_val or {}, ('margin',)))}, "
                  f"shape {_fmt(_dig(judge_val or {}, ('shape',)))}")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>f2m-ray evaluation</title>",
        "<style>body{font-family:sans-serif;margin:24px;max-width:1200px}table{border-collapse:collapse;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th:first-child{text-align:left}"
        "img{image-rendering:pixelated;height:96px}.note{color:#a40}th.metric{font-size:11px;font-weight:normal;"
        "vertical-align:bottom;max-width:90px;text-align:center}.wide{overflow-x:auto}</style></head><body>",
        "<h1>f2m-ray evaluation</h1>",
        f"<p>synthetic <code>{html.escape(str(inputs.get('synthetic', '')))}</code> ({inputs['synthetic_rows']} masses, model "
        f"{html.escape(str(inputs.get('model_id')))}); real <code>{html.escape(str(inputs.get('real', '')))}</code>: "
        f"{inputs['seen_real_rows']} seen, {inputs['heldout_real_rows']} held out. {judge_line}. Features: "
        f"{html.escape(inputs['features'])}. f2m-ray {html.escape(report['tool_version'])}, {report['seconds']} s.</p>",
    ]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in report.get("notes", [])]
    parts += ["<h2>Per category and overall</h2>", f"<div class='wide'><table><tr><th>category</th>{head}</tr>{''.join(rows)}</table></div>",
              "<p>FD: Frechet distance in judge features; compare <em>synthetic vs real half B</em> with the floor "
              "(same sizes, same reference). Memorized: share of synthetic masses at or below percentile "
              f"{report['memorization_threshold']['percentile']:g} of held-out-real-to-seen distances "
              f"(thresholds {report['memorization_threshold']['features']:.4g} in features, "
              f"{report['memorization_threshold']['pixels']:.4g} in pixels).</p>"]
    useful = report.get("usefulness")
    if useful and useful.get("protocol") == "scarce":
        parts += _scarce_html(useful)
    elif useful:
        parts.append(f"<h2>Usefulness</h2><p>Fresh classifiers of the judge's architecture, {useful['steps']} steps "
                     f"each, tested on {useful['test_rows']} held-out real masses; R = {useful['R']}, S = {useful['S']}; "
                     f"{_share_text(useful.get('real_share'))}.</p><table><tr><th>trained on</th><th>rows</th><th>margin</th><th>shape</th><th>mean</th>"
                     "<th>&Delta; mean vs real</th></tr>")
        for name, result in useful["classifiers"].items():
            delta = useful["delta_vs_real"].get(name, {}).get("mean")
            acc = result["accuracy"]
            parts.append(f"<tr><th>{html.escape(name.replace('_', ' + ' if name == 'real_plus_synthetic' else ' '))}"
                         f"</th><td>{result['train_rows']}</td><td>{_fmt(acc['margin'])}</td><td>{_fmt(acc['shape'])}"
                         f"</td><td>{_fmt(acc['mean'])}</td><td>{_fmt(delta) if delta is not None else ''}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Masses: synthetic (top) beside real (bottom)</h2>")
    for category, strips in figures["grids"].items():
        parts.append(f"<h3>{html.escape(category)}</h3>"
                     f"<div>synthetic<br><img alt='synthetic {html.escape(category)}' "
                     f"src='data:image/png;base64,{strips['synthetic']}'></div>"
                     f"<div>real<br><img alt='real {html.escape(category)}' src='data:image/png;base64,{strips['real']}'></div>")
    parts.append("<h2>Distances to the nearest seen real mass</h2>")
    parts += [f"<div>{svg}</div>" for svg in figures["histograms"]]
    parts.append("</body></html>")
    return "\n".join(parts)
