"""Flickr30k: images plus five captions each, from any of the three common caption files.

- `results.csv` (the Kaggle release): header `image_name| comment_number| comment`, rows
  `1000092795.jpg| 0| Two young guys ...`, separated by `| `. Some rows lack a separator
  (`2199200615.jpg| 4 A dog ...`): they are recovered when the row still reads
  unambiguously (noted `csv_missing_separator`), skipped as `malformed_row` otherwise.
- `results_20130124.token` (the original release): `1000092795.jpg#0<TAB>Two young ...`.
- `dataset_flickr30k.json` (Karpathy's splits): images with `filename`, `split` and
  `sentences[].raw`. When present its splits are used (and its sentences, if no other
  caption file exists); without it, splits come from a hash of the file name (with
  the shared `split` fractions, as the CLIP bootstrap's).

Row ids are `<image stem>#<k>`; image ids are the file stem (`1000092795`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pipeline.embedding.items import ImageItem, Listing, file_stamp, source_entry
from pipeline.errors import UserError
from pipeline.report import Report
from pipeline.settings import Split

IMAGE_DIRS = ("flickr30k_images", "flickr30k-images", "images", "Images")
CSV_NAME = "results.csv"
TOKEN_NAME = "results_20130124.token"
KARPATHY_NAME = "dataset_flickr30k.json"
# name, number, caption with either separator missing
_LOOSE_ROW = re.compile(
    r"^\s*(?P<name>[^|\s]+\.(?:jpe?g|png))\s*\|?\s*(?P<num>\d+)\s*(?:\|\s?)?(?P<cap>.*)$",
    re.IGNORECASE,
)


def image_dir(root: Path) -> Path:
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    return root


def hash_split(name: str, val: float, test: float) -> str:
    """A stable split from the file name (used when no Karpathy split file exists): `test`
    and `val` are the shares of test and val images."""
    u = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test else ("val" if u < test + val else "train")


def _data_lines(path: Path, report: Report, header: str | None = None):
    """(line number, line) of the non-blank lines, each counted as read; a first line
    starting with `header` (case-insensitive) is the header, not data."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if lineno == 1 and header and line.lower().startswith(header):
                continue
            report.read += 1
            yield lineno, line


def parse_results_csv(path: Path, report: Report) -> list[tuple[str, int, str]]:
    """(image name, comment number, caption) rows of results.csv, in file order."""
    rows = []
    for lineno, line in _data_lines(path, report, header="image_name"):
        parts = line.split("|", 2)
        if len(parts) == 3 and parts[1].strip().isdigit():
            name, num, cap = parts[0].strip(), int(parts[1].strip()), parts[2]
            cap = cap.removeprefix(" ")
        else:
            m = _LOOSE_ROW.match(line)
            if not m:
                report.skip("malformed_row", f"{path.name}:{lineno}")
                continue
            name, num, cap = m.group("name"), int(m.group("num")), m.group("cap")
            report.note("csv_missing_separator", f"{Path(name).stem}#{num}")
        rows.append((name, num, cap.strip()))
    return rows


def parse_token_file(path: Path, report: Report) -> list[tuple[str, int, str]]:
    """(image name, comment number, caption) rows of results_20130124.token."""
    rows = []
    for lineno, line in _data_lines(path, report):
        head, tab, cap = line.partition("\t")
        name, hash_, num = head.strip().partition("#")
        if not tab or not hash_ or not num.isdigit():
            report.skip("malformed_row", f"{path.name}:{lineno}")
            continue
        rows.append((name, int(num), cap.strip()))
    return rows


def read_karpathy(path: Path, report: Report) -> tuple[dict[str, str], list[tuple[str, int, str]]]:
    """{filename: split} and the (name, k, raw sentence) rows of dataset_flickr30k.json."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = data["images"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a Karpathy split file ({exc})".splitlines()[0]) from None
    splits, rows = {}, []
    for img in images:
        name = str(img.get("filename", ""))
        if not name:
            report.skip("malformed_row", f"{path.name}:imgid={img.get('imgid')}")
            continue
        split = str(img.get("split", "train"))
        splits[name] = "train" if split == "restval" else split
        for k, sent in enumerate(img.get("sentences", [])):
            raw = sent.get("raw")
            if raw is None:
                raw = " ".join(sent.get("tokens", []))
            rows.append((name, k, str(raw).strip()))
    return splits, rows


def list_flickr30k(input_path: Path, split: Split) -> Listing:
    """Flickr30k folder -> one item per image with its captions, in caption-file order.

    Without a Karpathy split for an image, its split is `hash_split` with the shared
    `split` fractions (the same for every stage that reads Flickr30k).

    `read` / `skipped` count caption rows. Skipped by reason: malformed rows, empty
    captions (row ids), duplicate rows, and the caption rows of images whose file is
    missing (`missing_file`, one per caption row, ids = image ids). Noted: recovered rows
    missing a separator, images without a Karpathy split (given a hash split).
    `extra["images"]` counts the images this listing dropped (the embed stage adds the
    ones it decodes).
    """
    if not input_path.is_dir():
        raise UserError(f"Flickr30k input folder not found: {input_path}")
    report = Report("embed")
    csv_path, token_path = input_path / CSV_NAME, input_path / TOKEN_NAME
    karpathy_path = input_path / KARPATHY_NAME
    sources = []
    splits: dict[str, str] | None = None
    karpathy_rows: list = []
    if karpathy_path.exists():
        splits, karpathy_rows = read_karpathy(karpathy_path, report)
        sources.append(source_entry(karpathy_path))
    if csv_path.exists():
        rows, caption_source = parse_results_csv(csv_path, report), CSV_NAME
        sources.append(source_entry(csv_path))
    elif token_path.exists():
        rows, caption_source = parse_token_file(token_path, report), TOKEN_NAME
        sources.append(source_entry(token_path))
    elif splits is not None:
        rows, caption_source = karpathy_rows, KARPATHY_NAME
        report.read += len(rows)
    else:
        raise UserError(
            f"{input_path}: no {CSV_NAME}, {TOKEN_NAME} or {KARPATHY_NAME} caption file"
        )
    images_dir = image_dir(input_path)
    sources.append(source_entry(images_dir))

    captions: dict[str, list[tuple[str, str]]] = {}
    seen: set[str] = set()
    for name, num, cap in rows:
        stem = Path(name).stem
        row_id = f"{stem}#{num}"
        if row_id in seen:
            report.skip("duplicate_row", row_id)
            continue
        seen.add(row_id)
        if not cap:
            report.skip("empty_caption", row_id)
            continue
        captions.setdefault(name, []).append((row_id, cap))

    items = []
    missing = 0
    for name, caps in captions.items():
        path = images_dir / name
        stamp = file_stamp(path)
        if stamp is None:
            report.skip("missing_file", Path(name).stem, n=len(caps))
            missing += 1
            continue
        if splits is not None and name in splits:
            image_split = splits[name]
        else:
            image_split = hash_split(name, split.val_fraction, split.test_fraction)
            if splits is not None:
                report.note("not_in_karpathy_split", name)
        items.append(
            ImageItem(
                id=Path(name).stem,
                path=str(path),
                split=image_split,
                captions=tuple(caps),
                stamp=stamp,
            )
        )
    extra = {
        "caption_source": caption_source,
        "split_source": KARPATHY_NAME if splits is not None else "hash of file name",
        "images": {
            "read": missing,
            "written": 0,
            "skipped_by_reason": {"missing_file": missing} if missing else {},
        },
    }
    return Listing(items, report, sources, extra)
