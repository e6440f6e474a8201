"""Small JPEG thumbnails inlined as data URIs, with question boxes drawn on them."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

BOX_COLOURS = ("#e41a1c", "#377eb8")  # subject (or the object asked about), object


def thumbnail(path: Path, size: int, boxes: Sequence[Sequence[int] | None] = ()) -> str | None:
    """`data:image/jpeg;base64,...` of the image at `path` scaled to fit `size` x `size`,
    each box (x, y, w, h in image pixels) outlined in turn in BOX_COLOURS; None if the
    file is missing or not an image."""
    from PIL import Image, ImageDraw, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, UnidentifiedImageError):
        return None
    scale = min(1.0, size / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    draw = ImageDraw.Draw(img)
    for box, colour in zip(boxes, BOX_COLOURS):
        if box is None:
            continue
        x, y, w, h = (v * scale for v in box)
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=2)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
