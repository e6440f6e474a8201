"""Visual Genome on-disk formats: streaming JSON readers and the quirks of its releases.

- The JSON files are top-level arrays with one entry per image. They are read one entry
  at a time with ijson (its C `yajl2_c` backend when installed, see `json_backend()`), so
  memory stays flat whatever the file size: the 0.8 GB `relationships.json` takes ~7x
  its size in RAM with `json.load`.
- `image_data.json` keys images by `image_id` (v1.2+) or `id` (v1.0).
- Subjects and objects carry `name` (a string) or `names` (a list), sometimes empty;
  `synsets` may be missing (it is not used here).
- Image files live in `VG_100K/` or `VG_100K_2/`; some images have no file.
- `relationship_alias.txt` / `object_alias.txt`: each line lists comma-separated synonyms
  which all map to the first one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ijson

from pipeline.errors import UserError

IMAGE_FOLDERS = ("VG_100K", "VG_100K_2")
RELATIONSHIPS = "relationships.json"
OBJECTS = "objects.json"
IMAGE_DATA = "image_data.json"
RELATIONSHIP_ALIAS = "relationship_alias.txt"
OBJECT_ALIAS = "object_alias.txt"

Box = tuple[int, int, int, int]


def json_backend() -> str:
    """Name of the ijson backend in use ('yajl2_c' is the fast C one)."""
    return ijson.backend


def iter_array(path: str | Path) -> Iterator[Any]:
    """Yield the items of the top-level JSON array in `path`, one at a time.

    Numbers come back as int/float (not Decimal). A missing file, a top level that is
    not an array, or malformed JSON raises `UserError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Visual Genome file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:].lstrip()
        if not head.startswith(b"["):
            raise UserError(f"{path}: expected a JSON array at the top level")
        f.seek(0)
        try:
            yield from ijson.items(f, "item", use_float=True, buf_size=1 << 16)
        except ijson.JSONError as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"{path}: malformed JSON near byte {f.tell()}: {msg}") from None


def as_id(value: Any) -> int | None:
    """An image/object id as int (ints or digit strings), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def image_id_of(entry: Any) -> int | None:
    """The image id of an entry: `image_id` (v1.2+) or `id` (v1.0 image_data.json)."""
    if not isinstance(entry, dict):
        return None
    value = entry.get("image_id")
    if value is None:
        value = entry.get("id")
    return as_id(value)


def entity_name(ent: dict) -> str:
    """Raw name of a subject/object: `name` (str) or the first non-blank of `names`."""
    name = ent.get("name")
    if name.__class__ is str and name and not name.isspace():
        return name
    names = ent.get("names")
    if isinstance(names, list):
        for name in names:
            if isinstance(name, str) and name and not name.isspace():
                return name
    return ""


def box_of(ent: dict) -> Box | None:
    """(x, y, w, h) as ints, or None when a coordinate is missing/non-numeric or w, h < 1."""
    try:
        x, y, w, h = ent["x"], ent["y"], ent["w"], ent["h"]
    except (KeyError, TypeError):
        return None
    if x.__class__ is int and y.__class__ is int and w.__class__ is int and h.__class__ is int:
        return (x, y, w, h) if w >= 1 and h >= 1 else None  # the common case
    for v in (x, y, w, h):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return None
    w, h = round(w), round(h)
    if w < 1 or h < 1:
        return None
    return round(x), round(y), w, h


def union_box(a: Box, b: Box) -> Box:
    """Smallest (x, y, w, h) box holding both boxes."""
    x0, y0 = min(a[0], b[0]), min(a[1], b[1])
    x1, y1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
    return x0, y0, x1 - x0, y1 - y0


def normalize(text: Any) -> str:
    """Lower-case, strip, collapse inner whitespace; non-strings give ''."""
    if not isinstance(text, str):
        return ""
    return " ".join(text.lower().split())


def load_aliases(path: str | Path) -> dict[str, str]:
    """Alias file -> {synonym: canonical} (normalised); a missing file gives {}.

    Each line is `canonical,synonym,synonym,...`. When a synonym is listed on two lines
    the first line wins.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        words = [normalize(w) for w in line.split(",")]
        words = [w for w in words if w]
        if not words:
            continue
        for word in words[1:]:
            if word != words[0]:
                out.setdefault(word, words[0])
    return out


class Normalizer(dict):
    """`normalize` then the alias map, memoised (VG names repeat heavily).

    A dict from raw string to normalised name that fills itself: `norm[raw]` is a plain
    dict lookup once `raw` was seen (the hot path), `norm(anything)` also accepts
    non-strings (-> ''). The memo is cleared at `max_cache` entries so memory stays bounded.
    """

    def __init__(self, aliases: dict[str, str] | None = None, max_cache: int = 500_000):
        super().__init__()
        self.aliases = aliases or {}
        self.max_cache = max_cache

    def __missing__(self, raw: str) -> str:
        text = normalize(raw)
        text = self.aliases.get(text, text)
        if len(self) >= self.max_cache:
            self.clear()
        self[raw] = text
        return text

    def __call__(self, raw: Any) -> str:
        return self[raw] if isinstance(raw, str) else ""


def iter_image_data(path: str | Path) -> Iterator[tuple[int | None, int | None, int | None]]:
    """Yield (image_id, width, height) per entry of image_data.json (None when absent)."""
    for entry in iter_array(path):
        if not isinstance(entry, dict):
            yield None, None, None
            continue
        w, h = entry.get("width"), entry.get("height")
        w = round(w) if isinstance(w, (int, float)) and not isinstance(w, bool) else None
        h = round(h) if isinstance(h, (int, float)) and not isinstance(h, bool) else None
        yield image_id_of(entry), w, h


class ImageFiles:
    """Which image files exist: one directory scan of VG_100K/ and VG_100K_2/.

    `path(image_id)` is `<folder>/<image_id>.jpg`, relative to the VG folder (so outputs
    do not depend on where the data sits), or None when no file exists. VG_100K wins
    over VG_100K_2.
    """

    def __init__(self, vg_dir: str | Path):
        self.vg_dir = Path(vg_dir)
        self._where: dict[int, int] = {}
        self.per_folder = dict.fromkeys(IMAGE_FOLDERS, 0)
        for k in reversed(range(len(IMAGE_FOLDERS))):
            folder = self.vg_dir / IMAGE_FOLDERS[k]
            if not folder.is_dir():
                continue
            with os.scandir(folder) as it:
                for de in it:
                    stem, dot, ext = de.name.rpartition(".")
                    if dot and ext == "jpg" and stem.isdigit():
                        self._where[int(stem)] = k
        for k in self._where.values():
            self.per_folder[IMAGE_FOLDERS[k]] += 1
        self._prefix = [f"{f}/" for f in IMAGE_FOLDERS]

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self._where

    def path(self, image_id: int) -> str | None:
        k = self._where.get(image_id)
        return None if k is None else f"{self._prefix[k]}{image_id}.jpg"
