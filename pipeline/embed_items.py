"""What the embed stage works on: images (with their captions or crop boxes) in a fixed order.

A format reader (`pipeline.formats.*`, the VG reader in `pipeline.embed`) turns a dataset
folder into a `Listing`; `pipeline.embed` cuts it into shards and embeds them. Everything
in an item is plain data, so items pickle cheaply into DataLoader workers.
"""

from __future__ import annotations

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
    (VG); `whole` says whether the whole image is a row too. `stamp` is the file's size
    and mtime: a change invalidates the finished shard holding the item.
    """

    id: str
    path: str
    member: str | None = None
    split: str = "train"
    captions: tuple[tuple[str, str], ...] = ()
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


def file_stamp(path: str | os.PathLike) -> str | None:
    """`size:mtime_ns` of a regular file, None when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def source_entry(path: str | os.PathLike, **extra: Any) -> dict[str, Any]:
    """A manifest `sources` entry: path as given, and its size when it is a file."""
    entry: dict[str, Any] = {"path": str(path)}
    if os.path.isfile(path):
        entry["bytes"] = os.path.getsize(path)
    entry.update(extra)
    return entry
