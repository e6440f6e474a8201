"""LAION-style image-text pairs: img2dataset webdataset shards, or precomputed embeddings.

img2dataset (webdataset output) writes, per shard, `NNNNN.tar` with members `{key}.jpg`,
`{key}.txt` (the caption) and `{key}.json`, a sibling `NNNNN.parquet` with one row per
attempted sample (url, caption, key, status, error_message, ...) and `NNNNN_stats.json`.
Only samples with status "success" have tar members.

Tar members are listed, never extracted: members with absolute paths, `..` components or
that are not regular files (links, devices) are skipped and reported. The embed stage
reads the image bytes of the remaining members with `TarFile.extractfile`.

The precomputed layout of LAION / clip-retrieval is `img_emb/img_emb_N.npy`,
`text_emb/text_emb_N.npy` (optional) and `metadata/metadata_N.parquet` (caption, key or
url, ...), one row per pair in the same order.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.embedding.items import ImageItem, Listing, file_stamp, source_entry
from pipeline.errors import UserError
from pipeline.report import Report

MAX_TEXT_BYTES = 1 << 20
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


# --------------------------------------------------------------------------- tar members


def unsafe_member(member: tarfile.TarInfo) -> bool:
    """True for members that must never be read: absolute or `..` paths, non-regular files."""
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        return True
    return not member.isfile()


def split_key(name: str) -> tuple[str, str]:
    """webdataset key and extension: `a/000001.jpg` -> ("a/000001", "jpg")."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


@dataclass
class TarListing:
    """The members of one tar: safe ones grouped by key (first occurrence wins, archive
    order), the text of the small `.txt` / `.json` members, unsafe member names by key,
    and the error that stopped the listing (None when the whole archive was read)."""

    groups: dict[str, dict[str, tarfile.TarInfo]]
    texts: dict[str, dict[str, str]]
    unsafe: dict[str, list[str]]
    error: str | None = None


def list_tar(path: Path, report: Report) -> TarListing:
    """List one tar without extracting it (texts read with `extractfile`).

    Duplicate members are noted (`duplicate_tar_member`); unsafe members are returned for
    the caller to count with their sample.
    """
    out = TarListing({}, {}, {})
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if member.isdir():
                    continue
                key, ext = split_key(member.name)
                if unsafe_member(member):
                    out.unsafe.setdefault(key, []).append(member.name)
                    continue
                group = out.groups.setdefault(key, {})
                if ext in group:
                    report.note("duplicate_tar_member", f"{path.name}:{member.name}")
                    continue
                group[ext] = member
                if ext in ("txt", "json") and member.size <= MAX_TEXT_BYTES:
                    fh = tf.extractfile(member)
                    data = fh.read() if fh is not None else b""
                    out.texts.setdefault(key, {})[ext] = data.decode("utf-8", errors="replace")
    except (tarfile.TarError, OSError, EOFError) as exc:
        out.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return out


class TarReader:
    """Reads member bytes through `extractfile`, keeping the last archive open (per process)."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.tf: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}

    def read(self, path: str, name: str) -> bytes | None:
        if path != self.path:
            self.close()
            self.tf = tarfile.open(path, "r:*")  # noqa: SIM115 (kept open across calls)
            self.members = {}
            for m in self.tf.getmembers():
                self.members.setdefault(m.name, m)
            self.path = path
        member = self.members.get(name)
        if member is None or unsafe_member(member):
            return None
        fh = self.tf.extractfile(member)
        return fh.read() if fh is not None else None

    def close(self) -> None:
        if self.tf is not None:
            self.tf.close()
        self.tf, self.path, self.members = None, None, {}


# --------------------------------------------------------------------------- webdataset


def tar_files(input_path: Path) -> list[Path]:
    if input_path.is_file() and input_path.name.endswith(".tar"):
        return [input_path]
    if not input_path.is_dir():
        raise UserError(f"LAION input not found: {input_path}")
    tars = sorted(input_path.glob("*.tar"))
    if not tars:
        raise UserError(f"{input_path}: no img2dataset .tar shards and no img_emb/ folder")
    return tars


def _parquet_rows(path: Path, report: Report) -> list[dict]:
    if not path.exists():
        return []
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:  # loses its status info, not the run
        report.note("unreadable_parquet", f"{path.name}: {str(exc).splitlines()[0]}")
        return []
    cols = [c for c in ("key", "status", "caption", "error_message") if c in table.column_names]
    return table.select(cols).to_pylist()


def list_webdataset(input_path: Path, captionless: bool = True) -> Listing:
    """img2dataset shards -> one item per downloaded sample with its caption.

    `read` counts samples (keys of the parquet rows and of the tar members); each one is
    either an item or skipped once, by reason (ids = keys unless said): rows whose status
    is not "success" (`img2dataset_failed`), samples without an image member
    (`missing_image_in_tar`), successful rows without tar members (`missing_tar_member`),
    samples whose members are unsafe (`unsafe_tar_member`, ids
    `<tar>:<member>`), samples lost in an unreadable tar (`unreadable_tar`; a tar with no
    known samples counts as one, id `<tar>: <error>`), samples without a caption
    (`empty_caption`) unless `captionless`. Noted: samples without a caption when
    `captionless` (`empty_caption`: kept with caption None, for their image embedding),
    duplicate members, unsafe members of samples counted otherwise, unreadable tars and
    parquet files.
    """
    report = Report("embed")
    items: list[ImageItem] = []
    sources = []
    failed_status: dict[str, int] = {}
    for tar_path in tar_files(input_path):
        parquet = tar_path.with_suffix(".parquet")
        stats = tar_path.with_name(tar_path.stem + "_stats.json")
        sources.append(source_entry(tar_path))
        if parquet.exists():
            sources.append(source_entry(parquet))
        if stats.exists():
            sources.append(source_entry(stats))
        rows = _parquet_rows(parquet, report)
        status, captions, errors = {}, {}, {}
        for row in rows:
            key = str(row.get("key"))
            status[key] = row.get("status") or "success"
            captions[key] = row.get("caption")
            errors[key] = row.get("error_message")
        for key, st in status.items():
            if st != "success":
                report.read += 1
                report.skip("img2dataset_failed", key)
                msg = str(errors[key] or st).splitlines()[0][:80]
                failed_status[msg] = failed_status.get(msg, 0) + 1
        listed = list_tar(tar_path, report)
        groups, unsafe = listed.groups, listed.unsafe
        stamp = file_stamp(tar_path) or ""
        for key, members in groups.items():
            if status.get(key, "success") != "success":
                continue  # counted above; a failed row with members is still failed
            report.read += 1
            bad = [f"{tar_path.name}:{m}" for m in unsafe.get(key, [])]
            image = next((members[e] for e in IMAGE_EXTS if e in members), None)
            if image is None:
                if bad:
                    report.skip("unsafe_tar_member", bad[0])
                    bad = bad[1:]
                else:
                    report.skip("missing_image_in_tar", key)
            for member in bad:
                report.note("unsafe_tar_member", member)
            if image is None:
                continue
            caption = _caption(listed.texts.get(key, {}), captions.get(key)).strip() or None
            if caption is None and not captionless:
                report.skip("empty_caption", key)
                continue
            if caption is None:  # the image is kept for its embedding; no caption training
                report.note("empty_caption", key)
            items.append(
                ImageItem(
                    id=key,
                    path=str(tar_path),
                    member=image.name,
                    split="train",
                    captions=((f"{key}#0", caption),),
                    stamp=f"{stamp}:{image.name}:{image.offset_data}:{image.size}",
                )
            )
        for key, names in unsafe.items():
            if key in groups or status.get(key, "success") != "success":
                continue
            report.read += 1  # a sample with nothing but unsafe members
            report.skip("unsafe_tar_member", f"{tar_path.name}:{names[0]}")
            for name in names[1:]:
                report.note("unsafe_tar_member", f"{tar_path.name}:{name}")
        lost = 0
        for key, st in status.items():
            if st == "success" and key not in groups and key not in unsafe:
                report.read += 1
                if listed.error is None:
                    report.skip("missing_tar_member", key)
                else:
                    report.skip("unreadable_tar", key)
                    lost += 1
        if listed.error is not None:
            label = f"{tar_path.name}: {listed.error}"
            if lost:
                report.note("unreadable_tar", label)
            else:  # samples unknown: the tar counts as one
                report.read += 1
                report.skip("unreadable_tar", label)
    extra = {"layout": "webdataset", "images": {"read": 0, "written": 0, "skipped_by_reason": {}}}
    if failed_status:
        extra["img2dataset_failures"] = dict(sorted(failed_status.items()))
    return Listing(items, report, sources, extra)


def _caption(texts: dict[str, str], parquet_caption) -> str:
    """Caption of a sample: its .txt member, else the parquet row, else the .json member."""
    if "txt" in texts:
        return texts["txt"]
    if parquet_caption is not None:
        return str(parquet_caption)
    if "json" in texts:
        try:
            return str(json.loads(texts["json"]).get("caption") or "")
        except (ValueError, AttributeError):
            return ""
    return ""


# --------------------------------------------------------------------------- precomputed


@dataclass(frozen=True)
class PrecomputedChunk:
    """One `N` of the precomputed layout: its three files (text may be absent); `exported`:
    written by `clipda export` (its `export.json` beside), whose metadata `id` and `split`
    columns are this project's row ids and splits."""

    n: int
    img_emb: Path
    text_emb: Path | None
    metadata: Path | None
    exported: bool = False


def is_precomputed(input_path: Path) -> bool:
    return input_path.is_dir() and (input_path / "img_emb").is_dir()


def _number(path: Path, prefix: str) -> int | None:
    m = re.fullmatch(rf"{prefix}_(\d+)\.(npy|parquet)", path.name)
    return int(m.group(1)) if m else None


def precomputed_chunks(input_path: Path) -> list[PrecomputedChunk]:
    """The img_emb_N.npy files (numeric order) with their text_emb / metadata siblings,
    which carry the same N as written (clip-retrieval pads it: `img_emb_07.npy`)."""
    chunks = []
    exported = (input_path / "export.json").is_file()
    for f in (input_path / "img_emb").glob("img_emb_*.npy"):
        n = _number(f, "img_emb")
        if n is None:
            continue
        digits = f.stem.removeprefix("img_emb_")
        text = input_path / "text_emb" / f"text_emb_{digits}.npy"
        meta = input_path / "metadata" / f"metadata_{digits}.parquet"
        text, meta = (p if p.exists() else None for p in (text, meta))
        chunks.append(PrecomputedChunk(n, f, text, meta, exported))
    if not chunks:
        raise UserError(f"{input_path}/img_emb holds no img_emb_N.npy files")
    return sorted(chunks, key=lambda c: c.n)


def npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header (nothing else read)."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    return arr.shape, arr.dtype


@dataclass
class PrecomputedRows:
    ids: list[str]
    image_ids: list[str]
    splits: list[str]  # "train", or the split `clipda export` recorded
    captions: list[str | None]  # None: no caption (the image embedding is kept)
    image_emb: np.ndarray  # (n, d) float32, L2-normalised
    text_emb: np.ndarray | None


def read_precomputed(chunk: PrecomputedChunk, report: Report) -> PrecomputedRows:
    """The usable rows of one chunk; bad rows are skipped by reason (ids = keys). Image ids
    are the keys; row ids are `<key>#0` and splits "train", except in a `clipda export`
    folder (`chunk.exported`), whose metadata `id` and `split` are taken back.

    Rows need a finite, non-zero image embedding; a row with a caption (from metadata)
    also needs such a text embedding (when the chunk has them). A row without a caption
    keeps its image embedding, caption None (noted `empty_caption`: no caption training).
    Embeddings that are not unit length are normalised (noted as `renormalized`).
    """
    img = np.load(chunk.img_emb, mmap_mode="r", allow_pickle=False)
    n = img.shape[0] if img.ndim else 0
    txt = np.load(chunk.text_emb, mmap_mode="r", allow_pickle=False) if chunk.text_emb else None
    meta = pq.read_table(chunk.metadata).to_pylist() if chunk.metadata else []
    label = f"chunk {chunk.n}"
    if img.ndim != 2 or len(meta) != n or (txt is not None and txt.shape != img.shape):
        lost = max(n, len(meta)) or 1  # an empty chunk still counts as one
        report.read += lost
        report.skip("precomputed_chunk_mismatch", label, n=lost)
        return PrecomputedRows(
            [], [], [], [], np.zeros((0, img.shape[-1] if img.ndim else 0), np.float32), None
        )
    report.read += n
    keys, row_ids, splits = [], [], []
    for i, row in enumerate(meta):
        key = row.get("key")
        keys.append(str(key) if key not in (None, "") else f"{chunk.n}_{i}")
        row_id, split = (row.get(c) if chunk.exported else None for c in ("id", "split"))
        row_ids.append(str(row_id) if row_id not in (None, "") else f"{keys[-1]}#0")
        splits.append(split if split in ("train", "val", "test") else "train")
    captions = [str(row.get("caption") or "").strip() or None for row in meta]
    image = np.array(img, dtype=np.float32)  # a copy: the memory map is read-only
    text = np.array(txt, dtype=np.float32) if txt is not None else None
    keep = np.ones(n, dtype=bool)
    captioned = np.array([c is not None for c in captions], dtype=bool)
    for name, mat in (("image", image), ("text", text)):
        if mat is None:
            continue
        norms = np.linalg.norm(mat, axis=1)
        bad = ~np.isfinite(mat).all(axis=1) | ~(norms > 0)
        if name == "text":
            bad &= captioned  # the text embedding of a row without a caption is unused
        for i in np.flatnonzero(bad & keep):
            report.skip(f"bad_{name}_embedding", keys[i])
        keep &= ~bad
        off = keep & (np.abs(norms - 1.0) > 1e-2) & (captioned if name == "text" else True)
        for i in np.flatnonzero(off):
            report.note("renormalized", keys[i])
        with np.errstate(invalid="ignore", divide="ignore"):
            mat /= np.where(norms > 0, norms, 1.0)[:, None]
    for i in np.flatnonzero(keep & ~captioned):
        report.note("empty_caption", keys[i])
    idx = np.flatnonzero(keep)
    return PrecomputedRows(
        ids=[row_ids[i] for i in idx],
        image_ids=[keys[i] for i in idx],
        splits=[splits[i] for i in idx],
        captions=[captions[i] for i in idx],
        image_emb=image[idx],
        text_emb=text[idx] if text is not None else None,
    )
