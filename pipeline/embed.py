"""The `embed` stage: cached CLIP embeddings of VG, LAION and Flickr30k as Arrow shards.

    items (pipeline.formats.*) -> shards of `shard_size` images -> part-NNNNN.arrow

- Images are read and decoded in DataLoader worker processes (`pipeline.imagedecode`:
  JPEG draft mode, EXIF orientation, colour conversion, resize + center crop to uint8);
  the main process normalises each batch on the model's device (pinned memory and
  non-blocking copies on CUDA) and runs the forward under `inference_mode`.
- Each finished shard is one Arrow IPC file written atomically, with its fingerprint
  (model revision, settings, the shard's inputs) and its part of the report in the schema
  metadata. A shard whose file exists with the same fingerprint is never recomputed, so a
  killed run resumes where it stopped; `--shard i/n` (or torchrun's RANK / WORLD_SIZE)
  gives process i the shards k with k % n == i. Whichever process sees every shard
  finished writes `manifest.json` and `report.json`.
- Row order is the order of the format's listing; output bytes depend only on the inputs,
  the model and the params (not on worker count, resumes or process splits).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tarfile
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pyarrow import ipc

from pipeline.atomic import atomic_path, write_json
from pipeline.embed_items import (
    ImageItem,
    Listing,
    file_stamp,
    fingerprint_fields,
    source_entry,
)
from pipeline.embfile import vector_array, write_table
from pipeline.errors import UserError
from pipeline.imagedecode import Decoded, decode_image, read_bytes
from pipeline.report import Report

DATASETS = ("vg", "laion", "flickr30k")
FORMAT_VERSION = 1
TOKEN_TABLE = "token_embedding.safetensors"
TEXTS_FILE = "texts.arrow"
DEFAULTS: dict[str, Any] = {
    "model": "models/clip",
    "batch_size": 64,
    "text_batch_size": 256,
    "num_workers": 2,
    "dtype": "float16",
    "shard_size": 10000,
    "vg_crops": False,
    "draft": True,
    "device": None,
    "torch_threads": None,
    "val_fraction": 0.05,
    "test_fraction": 0.05,
}
META_FP, META_REPORT, META_ROWS = b"clipda.fingerprint", b"clipda.report", b"clipda.rows"
_DTYPES = {"float16": np.float16, "float32": np.float32}


def part_path(out_dir: Path, k: int) -> Path:
    return out_dir / f"part-{k:05d}.arrow"


# --------------------------------------------------------------------------- sharding


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


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`"i/n"` -> (i, n)."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    return resolve_shard((i, n))


def fingerprint(common: dict[str, Any], parts: list[Any]) -> str:
    h = hashlib.sha256(json.dumps(common, sort_keys=True).encode())
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


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
    return report, rows


def write_part(path: Path, table: pa.Table, fp: str, report: Report) -> None:
    meta = {
        META_FP: fp.encode(),
        META_ROWS: str(table.num_rows).encode(),
        META_REPORT: json.dumps(report.to_dict(), sort_keys=True).encode(),
    }
    write_table(path, table.combine_chunks().replace_schema_metadata(meta))


# --------------------------------------------------------------------------- tables


def vectors_f(mat: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    return vector_array(np.asarray(mat, dtype=_DTYPES[dtype]))


def caption_table(
    rows: dict[str, list], image: np.ndarray, text: np.ndarray, dim: int, dtype: str
) -> pa.Table:
    """laion / flickr30k rows: id, image_id, split, image_emb, text_emb, caption, token_ids."""
    image = image.reshape(-1, dim)
    text = text.reshape(-1, dim)
    return pa.table(
        {
            "id": pa.array(rows["id"], pa.string()),
            "image_id": pa.array(rows["image_id"], pa.string()),
            "split": pa.array(rows["split"], pa.string()),
            "image_emb": vectors_f(image, dtype),
            "text_emb": vectors_f(text, dtype),
            "caption": pa.array(rows["caption"], pa.string()),
            "token_ids": pa.array(rows["token_ids"], pa.list_(pa.int32())),
        }
    )


def image_table(rows: dict[str, list], image: np.ndarray, dim: int, dtype: str) -> pa.Table:
    """vg rows: id (image id, or `<image_id>@x,y,w,h` for crops), image_id, box, image_emb."""
    return pa.table(
        {
            "id": pa.array(rows["id"], pa.string()),
            "image_id": pa.array(rows["image_id"], pa.string()),
            "box": pa.array(rows["box"], pa.list_(pa.int32())),
            "image_emb": vectors_f(image.reshape(-1, dim), dtype),
        }
    )


# --------------------------------------------------------------------------- model calls


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
    if not texts:
        return []
    enc = backbone.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
    ctx, eos = backbone.context_length, backbone.eos_token_id
    out = []
    for row_id, tok in zip(ids, enc["input_ids"]):
        tok = [int(t) for t in tok]
        if len(tok) > ctx:
            report.note(reason, row_id)
            tok = tok[: ctx - 1] + [eos] if tok[-1] == eos else tok[:ctx]
        out.append(tok)
    return out


def encode_token_ids(backbone, ids: list[list[int]], batch_size: int) -> np.ndarray:
    out = [
        backbone.encode_token_ids(ids[s : s + batch_size]).numpy()
        for s in range(0, len(ids), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, backbone.dim), np.float32)


# --------------------------------------------------------------------------- decoding workers


class ImageDataset(torch.utils.data.Dataset):
    """Item index -> (index, Decoded); runs in DataLoader workers."""

    def __init__(self, items: list[ImageItem], size: int, resize: int | None, draft: bool):
        self.items, self.size, self.resize, self.draft = items, size, resize, draft
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
        return i, decode_image(data, self.size, self.resize, item.boxes, item.whole, self.draft)


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

    def table(self, backbone, p: dict) -> pa.Table:
        dim, dtype = backbone.dim, p["dtype"]
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
            rows["token_ids"] = tokenize_checked(
                backbone, rows["caption"], rows["id"], self.report, "caption_truncated"
            )
            text = encode_token_ids(backbone, rows["token_ids"], int(p["text_batch_size"]))
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


def shard_ranges(n_items: int, shard_size: int) -> list[range]:
    """Item ranges of the shards (one empty shard for an empty dataset)."""
    n = max(1, math.ceil(n_items / shard_size))
    return [range(k * shard_size, min((k + 1) * shard_size, n_items)) for k in range(n)]


class ShardEmbedder:
    """Decode (DataLoader workers) + embed (main process) some shards; write each when done.

    The workers start decoding as soon as the object is built, so the main process can do
    other work (token table, texts) while the first batches are being prepared.
    """

    def __init__(
        self,
        listing: Listing,
        todo: list[int],
        ranges: list[range],
        fps: list[str],
        out_dir: Path,
        backbone,
        p: dict,
        captions: bool,
        on_shard_written: Callable[[int], None] | None = None,
    ):
        self.todo, self.ranges, self.fps, self.out_dir = todo, ranges, fps, out_dir
        self.backbone, self.p, self.on_shard_written = backbone, p, on_shard_written
        self.bs = int(p["batch_size"])
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
            workers = int(p["num_workers"])
            dataset = ImageDataset(
                self.items, backbone.image_size, backbone.resize_size, bool(p["draft"])
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
        table = builder.table(self.backbone, self.p)
        write_part(part_path(self.out_dir, k), table, self.fps[k], builder.report)
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


# --------------------------------------------------------------------------- texts (vg)


def write_texts(
    out_dir: Path, rows: list[tuple[str, str, str]], backbone, p: dict, fp: str
) -> None:
    """texts.arrow: id, kind, text, text_emb (skipped when already complete)."""
    path = out_dir / TEXTS_FILE
    if finished(path, fp) is not None:
        return
    report = Report("embed")
    ids = [r[0] for r in rows]
    texts = [r[2] for r in rows]
    tokens = tokenize_checked(backbone, texts, ids, report, "text_truncated")
    emb = encode_token_ids(backbone, tokens, int(p["text_batch_size"]))
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "kind": pa.array([r[1] for r in rows], pa.string()),
            "text": pa.array(texts, pa.string()),
            "text_emb": vectors_f(emb.reshape(-1, backbone.dim), p["dtype"]),
        }
    )
    report.written = table.num_rows
    write_part(path, table, fp, report)


def write_token_table(out_dir: Path, backbone) -> None:
    from safetensors.torch import save_file

    weight = backbone.token_embedding().contiguous()
    meta = {"revision": backbone.revision}  # one key: safetensors orders keys arbitrarily
    with atomic_path(out_dir / TOKEN_TABLE) as tmp:
        save_file({"weight": weight}, str(tmp), metadata=meta)


def token_table_ok(out_dir: Path, backbone) -> bool:
    from safetensors import SafetensorError, safe_open

    path = out_dir / TOKEN_TABLE
    if not path.exists():
        return False
    try:
        with safe_open(str(path), "pt") as fh:
            return (fh.metadata() or {}).get("revision") == backbone.revision
    except (OSError, SafetensorError):
        return False


# --------------------------------------------------------------------------- precomputed laion


def embed_precomputed(
    input_path: Path,
    out_dir: Path,
    backbone,
    p: dict,
    common: dict,
    rank: int,
    world: int,
    on_shard_written: Callable[[int], None] | None,
) -> tuple[Listing, list[str]]:
    """The LAION / clip-retrieval embedding layout, taken as is: one part per img_emb_N.

    Image embeddings are never recomputed (their dimension must match the model's); text
    embeddings are taken from text_emb_N.npy, computed only when that file is absent.
    """
    from pipeline.formats import laion

    chunks = laion.precomputed_chunks(input_path)
    for c in chunks:
        shape, _ = laion.npy_shape(c.img_emb)
        if len(shape) != 2 or shape[1] != backbone.dim:
            raise UserError(
                f"{c.img_emb}: embeddings of dim {shape[-1]} but the model {backbone.model_id} "
                f"has dim {backbone.dim}; this layout has no images to recompute them from"
            )
    fps = []
    sources = []
    for c in chunks:
        files = [f for f in (c.img_emb, c.text_emb, c.metadata) if f is not None]
        sources += [source_entry(f) for f in files]
        # paths relative to the input: a moved or copied layout is not recomputed
        fps.append(
            fingerprint(
                common, [[f.relative_to(input_path).as_posix(), file_stamp(f)] for f in files]
            )
        )
    for k, c in enumerate(chunks):
        if k % world != rank or finished(part_path(out_dir, k), fps[k]) is not None:
            continue
        report = Report("embed")
        rows = laion.read_precomputed(c, report)
        token_ids = tokenize_checked(backbone, rows.captions, rows.ids, report, "caption_truncated")
        text = rows.text_emb
        if text is None:
            text = encode_token_ids(backbone, token_ids, int(p["text_batch_size"]))
            report.note("text_emb_computed", f"chunk {c.n}", n=len(rows.ids))
        cols = {
            "id": rows.ids,
            "image_id": rows.image_ids,
            "split": ["train"] * len(rows.ids),
            "caption": rows.captions,
            "token_ids": token_ids,
        }
        table = caption_table(cols, rows.image_emb, text, backbone.dim, p["dtype"])
        report.written = table.num_rows
        write_part(part_path(out_dir, k), table, fps[k], report)
        if on_shard_written is not None:
            on_shard_written(k)
    listing = Listing([], Report("embed"), sources, {"layout": "precomputed embeddings"})
    return listing, fps


# --------------------------------------------------------------------------- the stage


def list_dataset(dataset: str, input_path: Path, p: dict, images_root: Path | None):
    from pipeline.formats import flickr30k, laion, qa

    texts = None
    if dataset == "vg":
        root = Path(images_root or p.get("vg_images", "data/sample/vg"))
        listing, qa_texts = qa.list_qa(input_path, root, crops=bool(p["vg_crops"]))
        texts = qa_texts.rows
    elif dataset == "laion":
        listing = laion.list_webdataset(input_path)
    else:
        listing = flickr30k.list_flickr30k(
            input_path, float(p["val_fraction"]), float(p["test_fraction"])
        )
    return listing, texts


def clean_outputs(out_dir: Path, n_parts: int, mine: list[int], texts: bool) -> None:
    """Remove what a new run must not keep: parts beyond the new count, own temp files,
    the previous manifest and report, texts.arrow when the dataset has no texts."""
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
    for name in ("manifest.json", "report.json", *(() if texts else (TEXTS_FILE,))):
        (out_dir / name).unlink(missing_ok=True)


def merge_image_counts(a: dict, b: dict) -> dict:
    """Sum two `{"read", "written", "skipped_by_reason"}` image-count dicts."""
    skipped = Counter(a.get("skipped_by_reason", {}))
    skipped.update(b.get("skipped_by_reason", {}))
    return {
        "read": a.get("read", 0) + b.get("read", 0),
        "written": a.get("written", 0) + b.get("written", 0),
        "skipped_by_reason": dict(sorted(skipped.items())),
    }


def finalize(
    out_dir: Path,
    dataset: str,
    fps: list[str],
    texts_fp: str | None,
    listing: Listing,
    backbone,
    p: dict,
    input_path: Path,
) -> Report | None:
    """manifest.json + report.json once every shard (and texts.arrow) is complete."""
    report = Report("embed")
    report.merge(listing.report)
    shard_rows = []
    images = listing.extra.get("images")
    for k, fp in enumerate(fps):
        done = finished(part_path(out_dir, k), fp)
        if done is None:
            return None
        report.merge(done[0])
        shard_rows.append(done[1])
        if images is not None:
            images = merge_image_counts(images, done[0].extra.get("images", {}))
    texts_rows = None
    if texts_fp is not None:
        done = finished(out_dir / TEXTS_FILE, texts_fp)
        if done is None:
            return None
        texts_report, texts_rows = done
        texts_report.written = 0  # `written` counts image / caption rows
        report.merge(texts_report)
    if not token_table_ok(out_dir, backbone):
        return None
    report.extra = {
        "dataset": dataset,
        "input": str(input_path),
        **listing.extra,
        **({"images": images} if images is not None else {}),
        "images_listed": len(listing.items),
        "shards": len(fps),
        "shard_rows": shard_rows,
    }
    if texts_rows is not None:
        report.extra["texts_written"] = texts_rows
    report.save(out_dir / "report.json")
    manifest = {
        "model": backbone.model_id,
        "revision": backbone.revision,
        "dataset": dataset,
        "dim": backbone.dim,
        "dtype": p["dtype"],
        "normalized": True,
        "rows": sum(shard_rows),
        "shards": len(fps),
        "files": [part_path(out_dir, k).name for k in range(len(fps))]
        + ([TEXTS_FILE] if texts_fp else []),
        "texts_rows": texts_rows,
        "image_size": backbone.image_size,
        "context_length": backbone.context_length,
        "sources": listing.sources,
        "token_embedding": {
            "file": TOKEN_TABLE,
            "vocab_size": int(backbone.model.config.text_config.vocab_size),
            "width": int(backbone.model.config.text_config.hidden_size),
            "bos_token_id": backbone.bos_token_id,
            "eos_token_id": backbone.eos_token_id,
            "pad_token_id": backbone.pad_token_id,
        },
        "format_version": FORMAT_VERSION,
    }
    if texts_fp is None:
        del manifest["texts_rows"]
    write_json(out_dir / "manifest.json", manifest)
    return report


def settings_fingerprint(dataset: str, backbone, p: dict) -> dict[str, Any]:
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
        "dtype": p["dtype"],
        "draft": bool(p["draft"]),
        "vocab": int(backbone.model.config.text_config.vocab_size),
    }


def check_params(params: dict) -> dict[str, Any]:
    """The `embed` params over `DEFAULTS`, typed; a bad value is a one-line `UserError`."""
    from pipeline.params import typed

    p = {**DEFAULTS, "seed": 0, **{k: v for k, v in params.items() if v is not None}}
    p = typed(
        p,
        {**DEFAULTS, "seed": 0, "torch_threads": 0},
        "embed",
        positive=("batch_size", "text_batch_size", "shard_size"),
    )
    if p["dtype"] not in _DTYPES:
        raise UserError(f"params embed.dtype: must be float16 or float32, got {p['dtype']!r}")
    if p["num_workers"] < 0:
        raise UserError(f"params embed.num_workers: must be >= 0, got {p['num_workers']!r}")
    if p["torch_threads"] is not None and p["torch_threads"] < 0:
        raise UserError(f"params embed.torch_threads: must be >= 0, got {p['torch_threads']!r}")
    val, test = p["val_fraction"], p["test_fraction"]
    if not (0 <= val <= 1 and 0 <= test <= 1 and val + test <= 1):
        raise UserError(
            f"params embed.val_fraction / test_fraction: need 0 <= each and sum <= 1, "
            f"got {val!r} and {test!r}"
        )
    return p


def run(
    dataset: str,
    input_path: Path,
    out_dir: Path,
    params: dict,
    model: str | None = None,
    shard: tuple[int, int] | None = None,
    *,
    images_root: Path | None = None,
    backbone=None,
    on_shard_written: Callable[[int], None] | None = None,
) -> Report:
    """Embed one dataset into `out_dir` (see the module doc); return the stage report.

    `images_root`: VG image folder (default params `vg_images`); `backbone`: an already
    loaded `Backbone` (library use, benchmarks); `on_shard_written(k)`: called after each
    part file is written (tests use it to kill a run).
    When this process does not finish the last shard, the returned report covers only
    what it listed and its manifest/report files are left to the process that does.
    """
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    p = check_params(params)
    rank, world = resolve_shard(shard)
    input_path, out_dir = Path(input_path), Path(out_dir)
    if not input_path.exists():
        raise UserError(f"--input not found: {input_path}")
    if p["torch_threads"]:
        torch.set_num_threads(int(p["torch_threads"]))
    torch.manual_seed(p["seed"])
    if backbone is None:
        from pipeline.clip.backbone import load_backbone

        backbone = load_backbone(model or p["model"], device=p["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    common = settings_fingerprint(dataset, backbone, p)

    texts_fp = None
    from pipeline.formats import laion

    if dataset == "laion" and laion.is_precomputed(input_path):
        n_parts = len(laion.precomputed_chunks(input_path))
        clean_outputs(out_dir, n_parts, [k for k in range(n_parts) if k % world == rank], False)
        if rank == 0:
            write_token_table(out_dir, backbone)
        listing, fps = embed_precomputed(
            input_path, out_dir, backbone, p, common, rank, world, on_shard_written
        )
    else:
        listing, texts = list_dataset(dataset, input_path, p, images_root)
        ranges = shard_ranges(len(listing.items), int(p["shard_size"]))
        fps = [
            fingerprint(common, [fingerprint_fields(listing.items[i]) for i in r]) for r in ranges
        ]
        mine = [k for k in range(len(ranges)) if k % world == rank]
        clean_outputs(out_dir, len(ranges), mine, texts is not None)
        todo = [k for k in mine if finished(part_path(out_dir, k), fps[k]) is None]
        embedder = ShardEmbedder(
            listing, todo, ranges, fps, out_dir, backbone, p, dataset != "vg", on_shard_written
        )  # decoding starts now, in parallel with the token table and the texts
        texts_fp = fingerprint(common, texts) if texts is not None else None
        try:
            if rank == 0:
                write_token_table(out_dir, backbone)
                if texts is not None:
                    write_texts(out_dir, texts, backbone, p, texts_fp)
            embedder.run(f"embed {dataset}")
        finally:
            embedder.close()
    final = finalize(out_dir, dataset, fps, texts_fp, listing, backbone, p, input_path)
    return final if final is not None else listing.report
