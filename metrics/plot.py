"""Metric plots (docs/methods.md §9): a sweep's values as curves, drawn with matplotlib's Agg backend.

InstructPix2Pix plots CLIP directional similarity against CLIP image similarity, one curve per image
guidance scale over the text scale; ``parse_series`` reads such points as 'series, x, y' lines.
"""
from __future__ import annotations

import io

import numpy as np
import torch

from ..errors import EditLabError


def parse_series(text: str) -> dict[str, list[tuple[float, float]]]:
    """'series, x, y' per line (blank lines and '#' comments skipped) -> {series: [(x, y), ...]} in line order."""
    series: dict[str, list[tuple[float, float]]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.rsplit(",", 2)]
        try:
            name, x, y = parts[0], float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            raise EditLabError(f"plot data line {n}: {line!r} is not 'series, x, y' with two numbers") from None
        series.setdefault(name, []).append((x, y))
    if not series:
        raise EditLabError("plot data is empty; give one 'series, x, y' line per point")
    return series


def parse_x_values(text: str, n: int) -> list[float]:
    """A sweep's x values, 'a, b, c' (one per image row); empty -> 0, 1, ... n-1 (the row index)."""
    parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    if not parts:
        return [float(i) for i in range(n)]
    try:
        xs = [float(p) for p in parts]
    except ValueError:
        raise EditLabError(f"x_values {text!r}: give one number per image, separated by commas") from None
    if len(xs) != n:
        raise EditLabError(f"x_values has {len(xs)} numbers for {n} images; give one per image (or leave it empty "
                           "for the row index)")
    return xs


def format_points(series: str, xs: list[float], ys: list[float]) -> str:
    """'series, x, y' lines (parse_series' format), so sweep nodes can feed Metric Plot through string nodes."""
    name = series.replace("\n", " ").strip() or "series"
    return "\n".join(f"{name}, {x:.6g}, {y:.6g}" for x, y in zip(xs, ys))


def plot_series(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, title: str = "",
                width: int = 640, height: int = 480) -> torch.Tensor:
    """The curves as a ComfyUI IMAGE [1,height,width,3] in [0,1]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no global pyplot state
    ax = fig.add_subplot()
    for name, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(series) > 1 or next(iter(series)):
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.canvas.print_raw(buf)
    rgba = np.frombuffer(buf.getvalue(), np.uint8).reshape(int(fig.bbox.height), int(fig.bbox.width), 4)
    return torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0).unsqueeze(0)
