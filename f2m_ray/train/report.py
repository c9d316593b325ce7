"""What a training run leaves for a person to read: metrics.jsonl, a loss-curve PNG, sample grids.

All three are written into the run folder (local or s3://) through ``f2m_ray.storage``,
rewritten whole on each update: S3 has no append, and a run's history is a few
hundred short lines. Drawing uses PIL only (a line chart is a few polylines).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from f2m_ray.errors import F2MError
from f2m_ray.core.images import to_uint8
from f2m_ray.storage import filesystem, join

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
SAMPLES_DIR = "samples"


# ---------------------------------------------------------------- metrics


def format_epoch_line(metrics: dict, total_epochs: int) -> str:
    """One line per epoch: throughput, losses, D's label accuracy on held-out real ROIs, L1."""

    def acc(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.2f}"

    val_l1 = metrics.get("val_l1")
    return (
        f"epoch {metrics['epoch']:>4}/{total_epochs}  "
        f"{metrics['images_per_second']:7.1f} img/s  "
        f"D margin {metrics['d_margin_loss']:.3f} shape {metrics['d_shape_loss']:.3f}  "
        f"G {metrics['g_loss']:.3f} (adv {metrics['g_adversarial']:.3f}"
        + (f", mix adv {metrics['g_mix_adversarial']:.3f}" if "g_mix_adversarial" in metrics else "") + ")  "
        f"L1 {metrics['l1']:.4f}" + (f" val {val_l1:.4f}" if val_l1 is not None else "") + "  "
        f"D label acc on real val: margin {acc('val_margin_accuracy')} shape {acc('val_shape_accuracy')}"
        + (f"  mass fidelity {metrics['mass_fidelity']:.2f} identity {metrics['mass_identity']:.2f}"
           if metrics.get("mass_fidelity") is not None else "")
    )


def metrics_path(run_dir: str) -> str:
    return join(run_dir, METRICS_FILE)


def read_metrics(run_dir: str, events: bool = False) -> list[dict]:
    """The run's per-epoch metrics so far ([] when there are none).

    ``events=True`` also returns the rows that record a start or a restart of the worker
    group (``{"event": ...}``, no ``epoch``), in file order.
    """
    fs, path = filesystem(metrics_path(run_dir))
    try:
        with fs.open(path, "r") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a killed writer: the next rewrite drops it
    return rows if events else [row for row in rows if "epoch" in row]


def start_event(rows: Sequence[dict], session: str, from_epoch: int, max_failures: int, now: float) -> dict:
    """The row rank 0 logs when the worker group starts: the first start of a `train` call
    (its `session`), or a restart after a lost worker, counted within that call."""
    starts = [r for r in rows if r.get("session") == session and r.get("event") in ("start", "restart")]
    if not starts:
        return {"event": "start", "session": session, "from_epoch": from_epoch, "time": now}
    logged = [int(r["epoch"]) for r in rows if "epoch" in r]
    return {
        "event": "restart",
        "session": session,
        "lost_at_epoch": max(logged, default=from_epoch) + 1,
        "from_epoch": from_epoch,
        "restarts_used": len(starts),
        "max_failures": max_failures,
        "time": now,
    }


def format_restart_line(event: dict) -> str:
    """``worker lost at epoch 7: restarting from checkpoint epoch 5, 1 of 2 restarts used``."""
    origin = f"checkpoint epoch {event['from_epoch']}" if event["from_epoch"] else "the start (no checkpoint yet)"
    return (f"worker lost at epoch {event['lost_at_epoch']}: restarting from {origin}, "
            f"{event['restarts_used']} of {event['max_failures']} restarts used")


def write_bytes(path: str, data: bytes) -> None:
    fs, inner = filesystem(path)
    try:
        parent = inner.rsplit("/", 1)[0]
        if parent and not path.startswith("s3://"):
            fs.makedirs(parent, exist_ok=True)
        with fs.open(inner, "wb") as f:
            f.write(data)
    except OSError as err:
        raise F2MError(f"cannot write {path}: {err.strerror or err}") from None


def write_metrics(run_dir: str, history: Sequence[dict]) -> None:
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
    write_bytes(metrics_path(run_dir), text.encode())


# ---------------------------------------------------------------- drawing

_COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))
_GRAY = (150, 150, 150)
_FONT = ImageFont.load_default()


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    series: dict[str, list[tuple[float, float]]],
    guides: dict[str, float] | None = None,
    log_y: bool = False,
) -> None:
    """A line chart inside `box` (left, top, right, bottom): axes, min/max ticks, legend."""
    left, top, right, bottom = box
    draw.text((left + 4, top + 2), title, fill=(0, 0, 0), font=_FONT)
    plot = (left + 52, top + 18, right - 8, bottom - 20)  # room for tick labels
    draw.rectangle(plot, outline=(0, 0, 0))
    points = [p for values in series.values() for p in values if p[1] is not None and math.isfinite(p[1])]
    if not points:
        draw.text((plot[0] + 8, plot[1] + 8), "no data yet", fill=_GRAY, font=_FONT)
        return

    def ty(v: float) -> float:
        return math.log10(max(v, 1e-12)) if log_y else v

    xs = [p[0] for p in points]
    ys = [ty(p[1]) for p in points] + [ty(v) for v in (guides or {}).values()]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = plot[0] + (x - x0) / (x1 - x0) * (plot[2] - plot[0])
        py = plot[3] - (ty(y) - y0) / (y1 - y0) * (plot[3] - plot[1])
        return px, py

    for value in (y0 + pad, y1 - pad):
        label = _fmt(10**value if log_y else value)
        py = plot[3] - (value - y0) / (y1 - y0) * (plot[3] - plot[1])
        draw.text((left + 2, py - 6), label, fill=(0, 0, 0), font=_FONT)
    draw.text((plot[0], plot[3] + 4), f"epoch {x0:g}", fill=(0, 0, 0), font=_FONT)
    draw.text((plot[2] - 60, plot[3] + 4), f"epoch {x1:g}", fill=(0, 0, 0), font=_FONT)
    for name, value in (guides or {}).items():
        _, py = to_px(x0, value)
        for start in range(int(plot[0]), int(plot[2]), 8):  # dashed
            draw.line([(start, py), (min(start + 4, plot[2]), py)], fill=_GRAY)
        draw.text((plot[2] - 90, py - 12), name, fill=_GRAY, font=_FONT)
    for i, (name, values) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        pts = [to_px(x, y) for x, y in values if y is not None and math.isfinite(y)]
        if len(pts) == 1:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        elif pts:
            draw.line(pts, fill=color, width=2)
        draw.text((plot[0] + 6 + 120 * i, plot[1] + 4), name, fill=color, font=_FONT)


def loss_curve_png(history: Sequence[dict], chance: dict[str, float] | None = None) -> bytes:
    """Four panels over epochs: D losses, G loss, L1 (train, val), D label accuracy on real val."""

    def series(key: str) -> list[tuple[float, float]]:
        return [(row["epoch"], row.get(key)) for row in history if row.get(key) is not None]

    width, height = 960, 600
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    half_w, half_h = width // 2, height // 2
    _panel(draw, (0, 0, half_w, half_h), "discriminator loss (log)",
           {"D margin": series("d_margin_loss"), "D shape": series("d_shape_loss")}, log_y=True)
    _panel(draw, (half_w, 0, width, half_h), "generator loss (log)",
           {"G total": series("g_loss"), "G adversarial": series("g_adversarial")}, log_y=True)
    _panel(draw, (0, half_h, half_w, height), "L1 reconstruction",
           {"train": series("l1"), "val": series("val_l1")})
    chance = chance or {}
    _panel(draw, (half_w, half_h, width, height), "D label accuracy on real val",
           {"margin": series("val_margin_accuracy"), "shape": series("val_shape_accuracy")},
           guides={f"chance {k} {v:.2f}": v for k, v in chance.items()})
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_grid_png(real: np.ndarray, reconstructed: np.ndarray, row_labels: Sequence[str], per_row: int) -> bytes:
    """One row per category: `per_row` real ROIs | their reconstructions, category name on the left.

    real, reconstructed: (R * per_row, H, W) in [-1, 1], row r holding items r*per_row .. (r+1)*per_row-1.
    """
    rows = len(row_labels)
    if real.shape != reconstructed.shape or real.shape[0] != rows * per_row:
        raise ValueError(f"sample grid needs {rows} x {per_row} images, got {real.shape} and {reconstructed.shape}")
    size = real.shape[-1]
    label_w, gap, header = 190, 12, 16
    width = label_w + 2 * per_row * size + gap
    image = Image.new("L", (width, header + rows * size), 255)
    draw = ImageDraw.Draw(image)
    draw.text((label_w, 2), "real", fill=0, font=_FONT)
    draw.text((label_w + per_row * size + gap, 2), "reconstruction G(I, m, s)", fill=0, font=_FONT)
    real_u8, fake_u8 = to_uint8(real), to_uint8(reconstructed)
    for r, label in enumerate(row_labels):
        y = header + r * size
        draw.text((4, y + size // 2 - 6), label, fill=0, font=_FONT)
        for k in range(per_row):
            i = r * per_row + k
            image.paste(Image.fromarray(real_u8[i]), (label_w + k * size, y))
            image.paste(Image.fromarray(fake_u8[i]), (label_w + per_row * size + gap + k * size, y))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
