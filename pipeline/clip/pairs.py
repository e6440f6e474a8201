"""Image-caption pairs for contrastive training: LAION shards and Flickr30k, decoded once.

Images are decoded to uint8 crops at the model's input size (as `embed` decodes them) and
kept in memory; every decode problem is counted in the stage's `Report`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.report import Report
from pipeline.settings import Split


@dataclass
class PairSet:
    """Images (uint8 crops) with one or more captions each."""

    ids: list[str]
    captions: list[list[str]]
    pixels: torch.Tensor  # (n, 3, S, S) uint8
    source: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: list[int] | np.ndarray) -> PairSet:
        idx = [int(i) for i in idx]
        return PairSet(
            [self.ids[i] for i in idx], [self.captions[i] for i in idx],
            self.pixels[idx], [self.source[i] for i in idx],
        )  # fmt: skip

    def __add__(self, other: PairSet) -> PairSet:
        return PairSet(
            self.ids + other.ids, self.captions + other.captions,
            torch.cat([self.pixels, other.pixels]), self.source + other.source,
        )  # fmt: skip

    def count(self, source: str) -> int:
        """Images that came from `source` ("laion" or "flickr30k")."""
        return sum(1 for s in self.source if s == source)


def decode_pairs(items, size: int, resize: int | None, source: str, report: Report) -> PairSet:
    """Decode listed `items` (tar members or files) to (3, size, size) uint8 crops."""
    from pipeline.formats.laion import TarReader
    from pipeline.imagedecode import decode_image, read_bytes

    reader = TarReader()
    ids, caps, crops = [], [], []
    try:
        for item in items:
            data = reader.read(item.path, item.member) if item.member else read_bytes(item.path)
            dec = decode_image(data, size, resize)
            label = item.id if source == "laion" else f"{source}:{item.id}"
            if dec.skip:
                report.skip(dec.skip, label)
                continue
            for note in dec.notes:
                report.note(note, label)
            ids.append(item.id)
            caps.append([text for _, text in item.captions])
            crops.append(dec.pixels[0])
    finally:
        reader.close()
    pixels = (
        torch.from_numpy(np.stack(crops))
        if crops
        else torch.zeros((0, 3, size, size), dtype=torch.uint8)
    )
    return PairSet(ids, caps, pixels, [source] * len(ids))


def load_laion(
    folder: Path, size: int, resize: int | None, report: Report, max_pairs: int = 0
) -> PairSet:
    """The downloaded image-caption pairs of img2dataset shards, decoded to uint8 crops."""
    from pipeline.formats.laion import list_webdataset

    listing = list_webdataset(Path(folder), captionless=False)  # pairs need captions
    report.merge(listing.report)
    items = listing.items
    if max_pairs and len(items) > max_pairs:
        for item in items[max_pairs:]:
            report.skip("over_max_pairs", item.id)
        items = items[:max_pairs]
    return decode_pairs(items, size, resize, "laion", report)


def flickr30k_train_items(folder: Path, split: Split, report: Report) -> list:
    """Flickr30k train-split images with their captions: Karpathy's split when
    `dataset_flickr30k.json` is present, else the hash split of `split` (as `embed`'s).

    What the Flickr30k reader read and skipped goes to `report.extra["flickr30k"]`.
    """
    from pipeline.formats.flickr30k import list_flickr30k

    listing = list_flickr30k(Path(folder), split)
    sub = listing.report.to_dict()
    sub.pop("stage", None)
    report.extra["flickr30k"] = sub
    return [item for item in listing.items if item.split == "train"]


def split_heldout(n: int, fraction: float, cap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of `n` pairs into (train, held-out) index arrays, both sorted."""
    n_held = min(round(n * fraction), cap)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])
