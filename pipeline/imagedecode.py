"""Safe image decoding for DataLoader workers: bytes -> uint8 RGB crops, or a skip reason.

Nothing here raises on bad data: `decode_image` returns the model inputs minus the float
normalisation, which runs on the model's device: the whole image as CLIPImageProcessor
prepares it (shortest side resized, center crop), and each box crop padded to a square
with the CLIP's mean colour, then resized (`letterbox_resize`: a center crop of a wide
union box would cut off its two objects). Or it returns the reason the image was skipped, plus the notes for what was altered on the way (converted
colour modes, applied EXIF orientation). Reasons and notes are the keys `report.json`
counts.

Large JPEGs are decoded in Pillow's draft mode (DCT scaling by 1/2, 1/4 or 1/8 while
decoding) to the smallest scale that still leaves the shortest side at least the target
size, which makes decoding of big photos several times cheaper.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.clip.backbone import CLIP_MEAN_PIXEL, letterbox_resize, resize_crop, to_rgb

# skip reasons
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated_image"
UNDECODABLE = "undecodable_image"
TOO_LARGE = "image_too_large"
# notes (image kept, altered)
EXIF_APPLIED = "exif_orientation_applied"
CONVERTED = {
    "cmyk": "cmyk_converted",
    "grayscale": "grayscale_converted",
    "alpha": "alpha_converted",
    "16bit": "16bit_converted",
    "palette": "palette_converted",
    "other": "color_mode_converted",
}
BAD_BOX = "bad_box"


class DecodeError(Exception):
    """An image that cannot be used; `reason` is its report key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Decoded:
    """The outcome for one image: crops (k, 3, S, S) uint8, or `skip` with its reason."""

    pixels: np.ndarray | None
    skip: str | None = None
    notes: list[str] = field(default_factory=list)
    bad_boxes: list[int] = field(default_factory=list)  # indices of boxes that were unusable


def mode_note(img: Image.Image) -> str | None:
    """The report note for converting `img` (as opened, before loading) to 8-bit RGB."""
    rawmodes = " ".join(str(t.args) for t in getattr(img, "tile", []) or [])
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") or ";16" in rawmodes:
        return CONVERTED["16bit"]
    if mode == "RGB":
        return None
    if mode == "CMYK":
        return CONVERTED["cmyk"]
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.info.get("transparency") is not None:
        return CONVERTED["alpha"]
    if mode in ("L", "1"):
        return CONVERTED["grayscale"]
    if mode == "P":
        return CONVERTED["palette"]
    return CONVERTED["other"]


def open_rgb(data: bytes, draft_size: int | None = None) -> tuple[Image.Image, list[str]]:
    """Decode `data` to an upright 8-bit RGB image; raise `DecodeError` when unusable.

    `draft_size`: let JPEGs decode at a reduced scale whose shortest side stays >= it.
    """
    if not data:
        raise DecodeError(EMPTY_FILE)
    import io

    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            note = mode_note(img)
            if draft_size and img.format == "JPEG" and min(img.size) >= 2 * draft_size:
                img.draft(None, (draft_size, draft_size))
            img.load()
    except UnidentifiedImageError:
        raise DecodeError(NOT_AN_IMAGE) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(TOO_LARGE, str(exc)) from None
    except (OSError, EOFError, SyntaxError, ValueError) as exc:
        msg = str(exc)
        if isinstance(exc, EOFError) or "truncat" in msg.lower():
            raise DecodeError(TRUNCATED, msg) from None
        raise DecodeError(UNDECODABLE, msg) from None
    try:
        orientation = img.getexif().get(0x0112)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError, struct.error):  # broken EXIF
        orientation = None
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        img = ImageOps.exif_transpose(img)
        notes.append(EXIF_APPLIED)
    if note:
        notes.append(note)
    try:
        img = to_rgb(img)
    except (OSError, ValueError) as exc:
        raise DecodeError(UNDECODABLE, str(exc)) from None
    return img, notes


def crop_box(img: Image.Image, box) -> Image.Image | None:
    """The region x, y, w, h of `img`, clamped to the image; None when empty."""
    x, y, w, h = (int(v) for v in box)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, img.width), min(y + h, img.height)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return img.crop((x0, y0, x1, y1))


def decode_image(
    data: bytes | None,
    size: int,
    resize: int | None = None,
    boxes: tuple = (),
    whole: bool = True,
    draft: bool = True,
    fill: tuple[int, int, int] = CLIP_MEAN_PIXEL,
) -> Decoded:
    """Bytes (None: file missing) -> the whole image and/or box crops, never raising.

    Rows of `pixels`: the whole image first (when `whole`, resized and center-cropped),
    then one per usable box, in order, letterboxed with `fill` (the CLIP's mean colour,
    `pipeline.clip.backbone.mean_pixel(backbone.mean)`; default: OpenAI CLIP's); `bad_boxes`
    lists the boxes that lie outside the image.
    """
    if data is None:
        return Decoded(None, MISSING_FILE)
    try:
        img, notes = open_rgb(data, draft_size=(resize or size) if draft and not boxes else None)
    except DecodeError as exc:
        return Decoded(None, exc.reason)
    out, bad = [], []
    if whole:
        out.append(resize_crop(img, size, resize))
    for i, box in enumerate(boxes):
        region = crop_box(img, box)
        if region is None:
            bad.append(i)
            continue
        out.append(letterbox_resize(region, size, fill))
    pixels = np.stack(out) if out else np.zeros((0, 3, size, size), dtype=np.uint8)
    return Decoded(pixels, None, notes, bad)


def read_bytes(path: str) -> bytes | None:
    """A file's bytes, None when it does not exist (or is not a regular file)."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
