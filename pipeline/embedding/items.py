"""What the embed stage works on: images (with their captions or crop boxes) in a fixed order.

A format reader (`pipeline.formats.*`) turns a dataset folder into a `Listing`;
`pipeline.embedding` cuts it into shards and embeds them. Everything in an item is plain
data, so items pickle cheaply into DataLoader workers.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.report import Report


@dataclass(frozen=True)
class ImageItem:
    """One image to embed.

    `path` is the image file, or the tar archive holding `member` (read with
    `TarFile.extractfile`, never extracted). `captions` are (row id, text) pairs: one output
    row each (LAION, Flickr30k). `boxes` (x, y, w, h) are crops embedded as extra rows
    (VG); `whole` says whether the whole image is a row too. `stamp` identifies the
    image's bytes (`file_stamp`): a change invalidates the finished shard holding the item.
    `path` is not part of a shard's fingerprint (a moved or copied dataset is not
    recomputed); see `fingerprint_fields`.
    """

    id: str
    path: str
    member: str | None = None
    split: str = "train"
    captions: tuple[tuple[str, str | None], ...] = ()  # (row id, caption; None: image only)
    boxes: tuple[tuple[int, int, int, int], ...] = ()
    whole: bool = True
    stamp: str = ""


@dataclass
class Listing:
    """A dataset as items in output order, plus what was skipped while reading it."""

    items: list[ImageItem]
    report: Report
    sources: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


STAMP_BLOCK = 64 * 1024  # bytes hashed at each end of a file


def file_stamp(path: str | os.PathLike) -> str | None:
    """`size:digest` of a regular file, None when it does not exist or cannot be read.

    The digest is blake2b of the first and last `STAMP_BLOCK` bytes (the whole file when it
    is smaller than two blocks): it depends on the bytes only, so a copy, a `git clone` or
    a `dvc checkout` (new mtimes, same bytes) keeps it, and costs at most 128 KiB of reading
    per file, also for multi-GB tar shards. An edit inside a large file that keeps its size
    and both ends is not seen (replace such a file, or remove the output, to recompute).
    """
    try:
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            h = hashlib.blake2b(digest_size=16)
            if size <= 2 * STAMP_BLOCK:
                h.update(fh.read())
            else:
                h.update(fh.read(STAMP_BLOCK))
                fh.seek(size - STAMP_BLOCK)
                h.update(fh.read(STAMP_BLOCK))
    except OSError:
        return None
    return f"{size}:{h.hexdigest()}"


def fingerprint_fields(item: ImageItem) -> tuple:
    """What of an item decides its output rows: everything but where the file lies."""
    return (item.id, item.member, item.split, item.captions, item.boxes, item.whole, item.stamp)


def source_entry(path: str | os.PathLike, **extra: Any) -> dict[str, Any]:
    """A manifest `sources` entry: path as given, and its size when it is a file."""
    entry: dict[str, Any] = {"path": str(path)}
    if os.path.isfile(path):
        entry["bytes"] = os.path.getsize(path)
    entry.update(extra)
    return entry
