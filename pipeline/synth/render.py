"""Drawing scenes with Pillow in two visual styles.

`clipart` (the LAION-like source domain): flat saturated colours with black outlines on a
light plain background. `photo` (the Flickr30k-like target domain, also used for Visual
Genome): muted colours, no outlines, a coloured gradient background, sensor noise, blur
and uneven lighting. The shift is in palette, background, texture and noise at once.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.synth.scene import COLOURS, Obj


def _regular(n: int, phase: float = -math.pi / 2, r: float = 0.5):
    return [
        (
            0.5 + r * math.cos(phase + 2 * math.pi * k / n),
            0.5 + r * math.sin(phase + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _star():
    pts = []
    for k in range(10):
        r = 0.5 if k % 2 == 0 else 0.2
        a = -math.pi / 2 + math.pi * k / 5
        pts.append((0.5 + r * math.cos(a), 0.5 + r * math.sin(a)))
    return pts


def _heart():
    pts = []
    for k in range(40):
        t = 2 * math.pi * k / 40
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((0.5 + x / 34, 0.45 - y / 34))
    return pts


def _crescent():
    outer = [
        (0.5 + 0.5 * math.cos(a), 0.5 + 0.5 * math.sin(a))
        for a in np.linspace(math.pi / 2, 3 * math.pi / 2, 20)
    ]
    inner = [
        (0.75 + 0.35 * math.cos(a), 0.5 + 0.45 * math.sin(a))
        for a in np.linspace(3 * math.pi / 2, math.pi / 2, 20)
    ]
    return outer + inner


SHAPES = {
    "triangle": [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "hexagon": _regular(6, 0.0),
    "pentagon": _regular(5),
    "octagon": _regular(8, math.pi / 8),
    "star": _star(),
    "cross": [
        (0.35, 0),
        (0.65, 0),
        (0.65, 0.35),
        (1, 0.35),
        (1, 0.65),
        (0.65, 0.65),
        (0.65, 1),
        (0.35, 1),
        (0.35, 0.65),
        (0, 0.65),
        (0, 0.35),
        (0.35, 0.35),
    ],
    "heart": _heart(),
    "arrow": [(0, 0.35), (0.6, 0.35), (0.6, 0.1), (1, 0.5), (0.6, 0.9), (0.6, 0.65), (0, 0.65)],
    "crescent": _crescent(),
    "trapezoid": [(0.25, 0.1), (0.75, 0.1), (1, 0.9), (0, 0.9)],
    "parallelogram": [(0.3, 0.15), (1, 0.15), (0.7, 0.85), (0, 0.85)],
    "semicircle": [
        (0.5 + 0.5 * math.cos(a), 0.75 - 0.7 * math.sin(a)) for a in np.linspace(0, math.pi, 24)
    ],
    "kite": [(0.5, 0), (0.9, 0.35), (0.5, 1), (0.1, 0.35)],
    "chevron": [(0, 0), (0.5, 0.45), (1, 0), (1, 0.45), (0.5, 0.95), (0, 0.45)],
    "house": [(0.5, 0), (1, 0.45), (0.85, 0.45), (0.85, 1), (0.15, 1), (0.15, 0.45), (0, 0.45)],
}


def _draw_obj(draw: ImageDraw.ImageDraw, o: Obj, fill, outline, line: int) -> None:
    x, y, w, h = o.box
    box = (x, y, x + w - 1, y + h - 1)
    thick = max(3, min(w, h) // 6)
    if o.category in ("circle", "ellipse"):
        draw.ellipse(box, fill=fill, outline=outline, width=line)
    elif o.category in ("square", "rectangle"):
        draw.rectangle(box, fill=fill, outline=outline, width=line)
    elif o.category == "ring":
        if outline is not None:
            draw.ellipse(box, outline=outline, width=thick + 2 * line)
        draw.ellipse(
            (box[0] + line, box[1] + line, box[2] - line, box[3] - line), outline=fill, width=thick
        )
    elif o.category == "frame":
        if outline is not None:
            draw.rectangle(box, outline=outline, width=thick + 2 * line)
        draw.rectangle(
            (box[0] + line, box[1] + line, box[2] - line, box[3] - line), outline=fill, width=thick
        )
    else:
        pts = [(x + px * (w - 1), y + py * (h - 1)) for px, py in SHAPES[o.category]]
        draw.polygon(pts, fill=fill, outline=outline, width=line)


def render(
    objs: list[Obj], width: int, height: int, style: str, rng: np.random.Generator
) -> Image.Image:
    """Draw the objects (in placement order, so contained objects lie on top)."""
    if style == "clipart":
        bg = tuple(int(v) for v in rng.integers(236, 256, size=3))
        img = Image.new("RGB", (width, height), bg)
        draw = ImageDraw.Draw(img)
        for o in objs:
            _draw_obj(draw, o, COLOURS[o.colour], (0, 0, 0), 2)
        return img
    if style != "photo":
        raise ValueError(f"unknown style {style!r}")
    top, bottom = rng.integers(40, 150, size=3), rng.integers(20, 110, size=3)
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    arr = (top[None, None, :] * (1 - t) + bottom[None, None, :] * t) * np.ones((1, width, 1))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for o in objs:
        muted = tuple(int(0.7 * c + 0.3 * m) for c, m in zip(COLOURS[o.colour], (120, 100, 80)))
        _draw_obj(draw, o, muted, None, 0)
    img = img.filter(ImageFilter.GaussianBlur(radius=0.8))
    arr = np.asarray(img, dtype=np.float32)
    light = 0.75 + 0.5 * np.linspace(rng.uniform(0, 1), rng.uniform(0, 1), width)[None, :, None]
    arr = arr * light + rng.normal(0.0, 10.0, size=arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))
