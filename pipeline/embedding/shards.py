"""Shards of an embeddings folder: part files, fingerprints, resume, process split.

Each finished shard is one Arrow IPC file `part-NNNNN.arrow` written atomically, with its
fingerprint (model revision, settings, the shard's inputs) and its part of the report in
the schema metadata. A shard whose file exists with the same fingerprint is never
recomputed, so a killed run resumes where it stopped; `--shard i/n` (or torchrun's RANK /
WORLD_SIZE) gives process i the shards k with k % n == i.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from pyarrow import ipc

from pipeline.clip.backbone import mean_pixel
from pipeline.compute import precision
from pipeline.embedding.encoders import (
    ImageDataset,
    PixelNormalizer,
    collate,
    encode_captions,
    encode_pixels,
)
from pipeline.embedding.files import write_table
from pipeline.embedding.items import ImageItem, Listing
from pipeline.embedding.tables import caption_table, image_table
from pipeline.errors import UserError
from pipeline.report import Report

if TYPE_CHECKING:
    from pipeline.stages.embed import Settings

# Part of every fingerprint: a change recomputes every shard. 2: box crops letterboxed.
FORMAT_VERSION = 2
# The CLIP token table that embed wrote into every folder before it moved to the CLIP
# folder (`pipeline.clip.token_table`); a new run removes it (the shards stay valid).
OLD_TOKEN_TABLE = "token_embedding.safetensors"
TEXTS_FILE = "texts.arrow"
MANIFEST, REPORT = "manifest.json", "report.json"
META_FP, META_REPORT, META_ROWS = b"clipda.fingerprint", b"clipda.report", b"clipda.rows"
META_RUNTIME = b"clipda.runtime"  # what wrote the shard (`pipeline.runtime`; not fingerprinted)


def part_path(out_dir: Path, k: int) -> Path:
    return out_dir / f"part-{k:05d}.arrow"


# --------------------------------------------------------------------------- process split


def resolve_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    """(rank, world): `--shard i/n`, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    if shard is None and os.environ.get("WORLD_SIZE"):
        try:
            shard = (int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"]))
        except ValueError:
            raise UserError("RANK / WORLD_SIZE must be integers") from None
    rank, world = shard or (0, 1)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"bad shard {rank}/{world}: need 0 <= i < n")
    return rank, world


def parse_shard(text: str | None) -> tuple[int, int]:
    """`"i/n"` (or None: torchrun's env, else 0/1) -> (rank, world)."""
    if text is None:
        return resolve_shard(None)
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    return resolve_shard((i, n))


def shard_ranges(n_items: int, shard_size: int) -> list[range]:
    """Item ranges of the shards (one empty shard for an empty dataset)."""
    n = max(1, math.ceil(n_items / shard_size))
    return [range(k * shard_size, min((k + 1) * shard_size, n_items)) for k in range(n)]


# --------------------------------------------------------------------------- fingerprints


def settings_fingerprint(dataset: str, backbone, settings: Settings) -> dict[str, Any]:
    """What besides its inputs decides a shard's bytes (a change recomputes every shard)."""
    return {
        "version": FORMAT_VERSION,
        "dataset": dataset,
        "revision": backbone.revision,
        "context_length": backbone.context_length,
        "image_size": backbone.image_size,
        "resize": backbone.resize_size,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "dtype": settings.dtype,
        "draft": settings.draft,
        "vocab": int(backbone.model.config.text_config.vocab_size),
        # the kind of device and the autocast precision change the floats materially (a
        # run begun on the CPU and resumed on a GPU must not mix the two); threads, CPU
        # capability and GPU model change rounding only: recorded (runtime), not here
        "device": backbone.device.type,
        "precision": precision(backbone.device),
    }


def fingerprint(common: dict[str, Any], parts: list[Any]) -> str:
    """sha256 of the settings fingerprint and a shard's inputs."""
    h = hashlib.sha256(json.dumps(common, sort_keys=True).encode())
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- part files


def finished(path: Path, fp: str) -> tuple[Report, int] | None:
    """(report, rows) of a complete shard file with fingerprint `fp`, else None."""
    if not path.exists():
        return None
    try:
        with pa.memory_map(str(path), "r") as source:
            reader = ipc.open_file(source)
            meta = reader.schema.metadata or {}
            rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (pa.ArrowInvalid, OSError):
        return None
    if meta.get(META_FP, b"").decode() != fp or int(meta.get(META_ROWS, b"-1")) != rows:
        return None
    data = json.loads(meta[META_REPORT])
    report = Report.from_dict(data)
    if "images" in data:  # image-level counts of a caption shard (ShardBuilder)
        report.extra["images"] = data["images"]
    if META_RUNTIME in meta:
        report.extra["runtime"] = json.loads(meta[META_RUNTIME])
    return report, rows


def write_part(path: Path, table: pa.Table, fp: str, report: Report, device="cpu") -> None:
    """`table` as one Arrow file, atomically, with its fingerprint, row count and report,
    and the runtime (on `device`) that wrote it."""
    from pipeline.runtime import runtime

    meta = {
        META_FP: fp.encode(),
        META_ROWS: str(table.num_rows).encode(),
        META_REPORT: json.dumps(report.to_dict(), sort_keys=True).encode(),
        META_RUNTIME: json.dumps(runtime(device), sort_keys=True).encode(),
    }
    write_table(path, table.combine_chunks().replace_schema_metadata(meta))


def clean_outputs(out_dir: Path, n_parts: int, mine: list[int], texts: bool) -> None:
    """Remove what a new run must not keep: parts beyond the new count, own temp files,
    the previous manifest and report, an old token table, texts.arrow when the dataset has
    no texts."""
    for f in out_dir.glob("part-*.arrow"):
        try:
            k = int(f.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if k >= n_parts:
            f.unlink(missing_ok=True)
    for k in mine:
        for f in out_dir.glob(f".part-{k:05d}.arrow.*.tmp"):
            f.unlink(missing_ok=True)
    for name in (MANIFEST, REPORT, OLD_TOKEN_TABLE, *(() if texts else (TEXTS_FILE,))):
        (out_dir / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- one shard


class ShardBuilder:
    """Collects one shard's embeddings in item order, then builds its table.

    Counts are in output rows: for caption datasets an image that cannot be used skips
    each of its caption rows under the image's reason (`not_an_image`, ... ids = image
    ids), and image-level counts go to `report.extra["images"]`; for vg one per image.
    """

    def __init__(self, captions: bool):
        self.captions = captions
        self.report = Report("embed")
        self.ok: list[tuple[ImageItem, np.ndarray, list[int]]] = []
        self.images_read = 0
        self.images_skipped: Counter[str] = Counter()

    def add(self, items: list[ImageItem], meta: list, emb: np.ndarray) -> None:
        row = 0
        for (_, skip, notes, bad_boxes, n), item in zip(meta, items):
            self.images_read += 1
            if skip:
                rows = len(item.captions) if self.captions else 1
                self.report.skip(skip, item.id, n=rows)
                self.images_skipped[skip] += 1
                continue
            for note in notes:
                self.report.note(note, item.id)
            for b in bad_boxes:
                self.report.skip("bad_box", f"{item.id}@{','.join(map(str, item.boxes[b]))}")
            good = [b for b in range(len(item.boxes)) if b not in bad_boxes]
            self.ok.append((item, emb[row : row + n], good))
            row += n

    def table(self, backbone, dtype: str, text_batch_size: int) -> pa.Table:
        dim = backbone.dim
        if self.captions:
            rows: dict[str, list] = {k: [] for k in ("id", "image_id", "split", "caption")}
            image_rows = []
            for item, emb, _ in self.ok:
                for row_id, text in item.captions:
                    rows["id"].append(row_id)
                    rows["image_id"].append(item.id)
                    rows["split"].append(item.split)
                    rows["caption"].append(text)
                    image_rows.append(emb[0])
            rows["token_ids"], text = encode_captions(
                backbone, rows["caption"], rows["id"], self.report, text_batch_size
            )
            image = np.stack(image_rows) if image_rows else np.zeros((0, dim), np.float32)
            table = caption_table(rows, image, text, dim, dtype)
        else:
            from pipeline.formats.qa import crop_row_id

            rows = {"id": [], "image_id": [], "box": []}
            parts = []
            for item, emb, good in self.ok:
                if item.whole:
                    rows["id"].append(item.id)
                    rows["image_id"].append(item.id)
                    rows["box"].append(None)
                for b in good:
                    rows["id"].append(crop_row_id(item.id, item.boxes[b]))
                    rows["image_id"].append(item.id)
                    rows["box"].append(list(item.boxes[b]))
                parts.append(emb)
            image = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
            table = image_table(rows, image, dim, dtype)
        self.report.written = table.num_rows
        if self.captions:
            self.report.extra["images"] = {
                "read": self.images_read,
                "written": len(self.ok),
                "skipped_by_reason": dict(sorted(self.images_skipped.items())),
            }
        return table


# --------------------------------------------------------------------------- the loop


class ShardEmbedder:
    """Decode (DataLoader workers) + embed (main process) some shards; write each when done.

    The workers start decoding as soon as the object is built, so the main process can do
    other work (texts) while the first batches are being prepared.
    """

    def __init__(
        self,
        listing: Listing,
        todo: list[int],
        ranges: list[range],
        fps: list[str],
        out_dir: Path,
        backbone,
        settings: Settings,
        captions: bool,
        on_shard_written: Callable[[int], None] | None = None,
    ):
        self.todo, self.ranges, self.fps, self.out_dir = todo, ranges, fps, out_dir
        self.backbone, self.settings = backbone, settings
        self.on_shard_written = on_shard_written
        self.bs = settings.batch_size
        self.items: list[ImageItem] = []  # only the items to embed travel to the workers
        self.batch_shard: list[int] = []
        batches = []
        for k in todo:
            idx = list(range(len(self.items), len(self.items) + len(ranges[k])))
            self.items.extend(listing.items[i] for i in ranges[k])
            for s in range(0, len(idx), self.bs):
                batches.append(idx[s : s + self.bs])
                self.batch_shard.append(k)
        self.last_batch = {k: b for b, k in enumerate(self.batch_shard)}
        self.builders = {k: ShardBuilder(captions) for k in todo}
        self.batches = iter(())
        if batches:
            workers = settings.num_workers
            dataset = ImageDataset(
                self.items,
                backbone.image_size,
                backbone.resize_size,
                settings.draft,
                mean_pixel(backbone.mean),
            )
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=batches,
                num_workers=workers,
                collate_fn=partial(collate, size=backbone.image_size),
                pin_memory=backbone.device.type == "cuda",
                prefetch_factor=4 if workers else None,
            )
            self.batches = iter(loader)  # workers start here

    def _finish(self, k: int) -> None:
        builder = self.builders.pop(k)
        s = self.settings
        table = builder.table(self.backbone, s.dtype, s.text_batch_size)
        write_part(part_path(self.out_dir, k), table, self.fps[k], builder.report,
                   self.backbone.device)  # fmt: skip
        if self.on_shard_written is not None:
            self.on_shard_written(k)

    def run(self, desc: str = "embed") -> None:
        from tqdm import tqdm

        for k in [k for k in self.todo if not len(self.ranges[k])]:
            self._finish(k)
        norm = PixelNormalizer(self.backbone)
        bar = tqdm(
            total=len(self.batch_shard), desc=desc, unit="batch", disable=not sys.stderr.isatty()
        )
        try:
            for b, (pixels, meta) in enumerate(self.batches):
                k = self.batch_shard[b]
                emb = encode_pixels(self.backbone, norm, pixels, self.bs)
                self.builders[k].add([self.items[i] for i, *_ in meta], meta, emb)
                if self.last_batch[k] == b:
                    self._finish(k)
                bar.update(1)
        finally:
            bar.close()

    def close(self) -> None:
        """Shut the decode workers down (also when a run stops early)."""
        shutdown = getattr(self.batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.batches = iter(())
