"""Images and texts into CLIP embeddings: decode workers, pixel normalisation, forwards.

Images are read and decoded in DataLoader worker processes (`pipeline.imagedecode`: JPEG
draft mode, EXIF orientation, colour conversion, resize + center crop to uint8); the main
process normalises each batch on the model's device (pinned memory and non-blocking
copies on CUDA) and runs the forward under `inference_mode`.
"""

from __future__ import annotations

import tarfile

import numpy as np
import torch

from pipeline.embedding.items import ImageItem
from pipeline.imagedecode import Decoded, decode_image, read_bytes
from pipeline.report import Report

TOKENIZE_CHUNK = 8192  # texts per tokenizer call (270k at once held 1.2 GB of encodings)


class ImageDataset(torch.utils.data.Dataset):
    """Item index -> (index, Decoded); runs in DataLoader workers."""

    def __init__(
        self, items: list[ImageItem], size: int, resize: int | None, draft: bool,
        fill: tuple[int, int, int],
    ):  # fmt: skip
        self.items, self.size, self.resize, self.draft = items, size, resize, draft
        self.fill = fill  # letterbox colour of box crops: the CLIP's mean pixel
        self._tar = None

    def __len__(self) -> int:
        return len(self.items)

    def _bytes(self, item: ImageItem) -> bytes | None:
        if item.member is None:
            return read_bytes(item.path)
        if self._tar is None:
            from pipeline.formats.laion import TarReader

            self._tar = TarReader()
        return self._tar.read(item.path, item.member)

    def __getitem__(self, i: int) -> tuple[int, Decoded]:
        item = self.items[i]
        try:
            data = self._bytes(item)
        except (OSError, tarfile.TarError, EOFError):  # skipped and reported, not a crash
            return i, Decoded(None, "unreadable_file")
        return i, decode_image(
            data, self.size, self.resize, item.boxes, item.whole, self.draft, fill=self.fill
        )


def collate(samples: list[tuple[int, Decoded]], size: int) -> tuple[torch.Tensor, list]:
    """Stack the usable crops of a batch (in the worker); keep per-item outcomes."""
    pix = [d.pixels for _, d in samples if d.pixels is not None and len(d.pixels)]
    if pix:
        pixels = torch.from_numpy(np.concatenate(pix) if len(pix) > 1 else pix[0])
    else:
        pixels = torch.zeros((0, 3, size, size), dtype=torch.uint8)
    meta = [
        (i, d.skip, d.notes, d.bad_boxes, 0 if d.pixels is None else len(d.pixels))
        for i, d in samples
    ]
    return pixels, meta


class PixelNormalizer:
    """uint8 (n, 3, S, S) -> normalised float32 on the model's device (as preprocess_image)."""

    def __init__(self, backbone):
        dev = backbone.device
        self.device = dev
        self.scale = torch.tensor(1 / 255, dtype=torch.float32, device=dev)
        self.mean = torch.tensor(backbone.mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor(backbone.std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, non_blocking=True).float()
        x.mul_(self.scale).sub_(self.mean).div_(self.std)
        return x


def encode_pixels(
    backbone, norm: PixelNormalizer, pixels: torch.Tensor, batch_size: int
) -> np.ndarray:
    """uint8 pixels -> (n, d) float32 L2-normalised image embeddings."""
    out = []
    for s in range(0, len(pixels), batch_size):
        with torch.inference_mode():
            out.append(backbone.encode_images(norm(pixels[s : s + batch_size])).numpy())
    return np.concatenate(out) if out else np.zeros((0, backbone.dim), np.float32)


def tokenize_checked(
    backbone, texts: list[str], ids: list[str], report: Report, reason: str
) -> list[list[int]]:
    """Token ids as `Backbone.tokenize` gives them; texts longer than the context are
    truncated (BOS ... EOS kept) and noted under `reason`."""
    ctx, eos = backbone.context_length, backbone.eos_token_id
    out = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):  # a tokenizer's encodings are heavy
        chunk = list(texts[start : start + TOKENIZE_CHUNK])
        enc = backbone.tokenizer(chunk, add_special_tokens=True, truncation=False, verbose=False)
        for row_id, tok in zip(ids[start : start + TOKENIZE_CHUNK], enc["input_ids"]):
            tok = [int(t) for t in tok]
            if len(tok) > ctx:
                report.note(reason, row_id)
                tok = tok[: ctx - 1] + [eos] if tok[-1] == eos else tok[:ctx]
            out.append(tok)
    return out


def encode_token_ids(backbone, ids: list[list[int]], batch_size: int) -> np.ndarray:
    """Token id lists -> (n, d) float32 L2-normalised text embeddings."""
    out = [
        backbone.encode_token_ids(ids[s : s + batch_size]).numpy()
        for s in range(0, len(ids), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, backbone.dim), np.float32)


def encode_captions(
    backbone,
    captions: list[str | None],
    ids: list[str],
    report: Report,
    batch_size: int,
    text: np.ndarray | None = None,
) -> tuple[list[list[int] | None], np.ndarray]:
    """Token ids (`tokenize_checked`) and text embeddings of caption rows; a row without a
    caption (None: an image kept for its embedding) has no token ids and a zero text row
    (stored as null). `text`: embeddings given with the captions, computed when None."""
    has = [i for i, c in enumerate(captions) if c is not None]
    tok = tokenize_checked(backbone, [captions[i] for i in has], [ids[i] for i in has], report,
                           "caption_truncated")  # fmt: skip
    token_ids: list[list[int] | None] = [None] * len(captions)
    for i, t in zip(has, tok):
        token_ids[i] = t
    if text is None:
        text = np.zeros((len(captions), backbone.dim), np.float32)
        text[has] = encode_token_ids(backbone, tok, batch_size)
    elif len(has) < len(captions):  # given with the captions: nothing kept under a null row
        text = np.array(text, dtype=np.float32)
        text[[t is None for t in token_ids]] = 0.0
    return token_ids, text
