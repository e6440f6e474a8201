"""Line charts as inline SVG (no script, no network): the report's training curves and the
label-fraction sweep."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf",
           "#e377c2", "#7f7f7f", "#bcbd22")  # matplotlib's tab10  # fmt: skip
W, H, LEFT, RIGHT, TOP, BOTTOM = 420, 240, 52, 12, 28, 58


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(
    title: str, series: dict[str, Sequence[tuple[float, float]]], x_label: str,
    y_label: str = "", x_ticks: Sequence[tuple[float, str]] | None = None,
    bands: dict[str, Sequence[tuple[float, float, float]]] | None = None,
) -> str:  # fmt: skip
    """An SVG chart of `series` (name -> (x, y) points; NaN points are skipped), with an
    optional shaded band (x, lo, hi) per series and explicit x ticks (value, label)."""
    bands = bands or {}
    pts = [(x, y) for s in series.values() for x, y in s if _finite(x, y)]
    pts += [(x, v) for b in bands.values() for x, lo, hi in b for v in (lo, hi) if _finite(x, v)]
    if not pts:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="40"><text x="4" ' \
               f'y="24">{escape(title)}: no data</text></svg>'  # fmt: skip
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or abs(y1) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def sy(y: float) -> float:
        return H - BOTTOM + (y - y0) / (y1 - y0) * -(H - TOP - BOTTOM)

    # legend: three columns of short names (two rows at most), else one name per line below
    wide = len(series) > 6 or any(len(n) > 20 for n in series)
    height = H + (len(series) - 1) * 11 if wide else H
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
           f'viewBox="0 0 {W} {height}" font-family="sans-serif" font-size="10">'),
           f'<text x="{W / 2}" y="14" text-anchor="middle" font-size="12">{escape(title)}</text>',
           (f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" '
           'fill="none" stroke="#999"/>')]  # fmt: skip
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{LEFT - 3}" x2="{LEFT}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" '
                   f'stroke="#999"/><text x="{LEFT - 5}" y="{sy(t) + 3:.1f}" '
                   f'text-anchor="end">{t:.3g}</text>')  # fmt: skip
    for t, label in x_ticks if x_ticks is not None else [(t, f"{t:g}") for t in _ticks(x0, x1)]:
        out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{H - BOTTOM}" '
                   f'y2="{H - BOTTOM + 3}" stroke="#999"/><text x="{sx(t):.1f}" '
                   f'y="{H - BOTTOM + 13}" text-anchor="middle">{escape(label)}</text>')  # fmt: skip
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - BOTTOM + 26}" '
               f'text-anchor="middle">{escape(x_label)}</text>')  # fmt: skip
    if y_label:
        out.append(
            f'<text x="12" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" '
            f'transform="rotate(-90 12 {(TOP + H - BOTTOM) / 2})">{escape(y_label)}</text>'
        )
    for k, (name, points) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        band = [b for b in bands.get(name, ()) if _finite(b[0], b[1]) and _finite(b[0], b[2])]
        if band:
            poly = [(sx(x), sy(hi)) for x, _, hi in band] + [
                (sx(x), sy(lo)) for x, lo, _ in band[::-1]
            ]
            out.append(f'<polygon points="{_points(poly)}" fill="{colour}" opacity="0.15"/>')
        line = [(sx(x), sy(y)) for x, y in points if _finite(x, y)]
        if len(line) > 1:
            out.append(f'<polyline points="{_points(line)}" fill="none" stroke="{colour}" '
                       'stroke-width="1.5"/>')  # fmt: skip
        for x, y in line:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{colour}"/>')
        if wide:
            lx, ly = LEFT + 4, H - 14 + k * 11
        else:
            lx = LEFT + 4 + (k % 3) * 125
            ly = H - 14 + (k // 3) * 11 - (11 if len(series) > 3 else 0)
        out.append(f'<rect x="{lx}" y="{ly - 7}" width="10" height="3" fill="{colour}"/>'
                   f'<text x="{lx + 14}" y="{ly - 2}">{escape(name)}</text>')  # fmt: skip
    out.append("</svg>")
    return "".join(out)


def _finite(*v: float) -> bool:
    return all(isinstance(x, int | float) and math.isfinite(x) for x in v)


def _points(points: Sequence[tuple[float, float]]) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
