"""Visual Genome on-disk formats: streaming JSON readers and the quirks of its releases.

- The JSON files are top-level arrays with one entry per image, read a block of entries
  at a time (`iter_entries`), so memory stays flat whatever the file size: the 0.8 GB
  `relationships.json` takes ~7x its size in RAM with `json.load`. Each block is decoded
  by msgspec straight into the typed structs below (`Ent`, `Rel`, `RelEntry`,
  `ObjEntry`, `ImageEntry`), skipping the fields not used. A block holding anything else
  (a float box, a name that is not a string, an entry that is not an object, ...) is
  read by ijson (`iter_array`, its C `yajl2_c` backend when installed, see
  `json_backend()`) into dicts that each struct's `from_dict` brings to the same form,
  applying the quirk rules; so the entries are always those ijson + `from_dict` give.
- `image_data.json` keys images by `image_id` (v1.2+) or `id` (v1.0).
- Subjects and objects carry `name` (a string) or `names` (a list), sometimes empty;
  `synsets` may be missing (it is not used here).
- Image files live in `VG_100K/` or `VG_100K_2/`; some images have no file.
- `relationship_alias.txt` / `object_alias.txt`: each line lists comma-separated synonyms
  which all map to the first one.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO, TypeVar

import ijson
import msgspec

from pipeline.errors import UserError

IMAGE_FOLDERS = ("VG_100K", "VG_100K_2")
RELATIONSHIPS = "relationships.json"
OBJECTS = "objects.json"
IMAGE_DATA = "image_data.json"
RELATIONSHIP_ALIAS = "relationship_alias.txt"
OBJECT_ALIAS = "object_alias.txt"

Box = tuple[int, int, int, int]
BLOCK = 1 << 21  # bytes read at a time by `iter_entries`


def json_backend() -> str:
    """The JSON readers in use: msgspec, and the ijson backend ('yajl2_c' is the fast C
    one) that reads the blocks msgspec rejects (`iter_entries`)."""
    return f"msgspec {msgspec.__version__}; ijson {ijson.backend} for blocks msgspec rejects"


def _check_array(path: str | Path) -> Path:
    """`path`, after checking that it is a file whose top level is an array."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Visual Genome file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if not head.startswith(b"["):
        raise UserError(f"{path}: expected a JSON array at the top level")
    return path


def _ijson_items(f: BinaryIO, path: Path) -> Iterator[Any]:
    """The items of the array that `f` reads, by ijson; malformed JSON -> `UserError`."""
    try:
        yield from ijson.items(f, "item", use_float=True, buf_size=1 << 16)
    except ijson.JSONError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: malformed JSON near byte {f.tell()}: {msg}") from None


def iter_array(path: str | Path) -> Iterator[Any]:
    """Yield the items of the top-level JSON array in `path`, one at a time, by ijson.

    Numbers come back as int/float (not Decimal). A missing file, a top level that is
    not an array, or malformed JSON raises `UserError` naming the file.
    """
    path = _check_array(path)
    with open(path, "rb") as f:
        yield from _ijson_items(f, path)


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
    non-strings (-> ''). A tuple of raw names (`Ent.names`) gives the first of them that
    normalises to a non-empty name, or ''. The memo is cleared at `max_cache` entries so
    memory stays bounded.
    """

    def __init__(self, aliases: dict[str, str] | None = None, max_cache: int = 500_000):
        super().__init__()
        self.aliases = aliases or {}
        self.max_cache = max_cache

    def __missing__(self, raw: str | tuple[str, ...]) -> str:
        if raw.__class__ is tuple:
            text = next(filter(None, map(self.__getitem__, raw)), "")
        else:
            text = normalize(raw)
            text = self.aliases.get(text, text)
        if len(self) >= self.max_cache:
            self.clear()
        self[raw] = text
        return text

    def __call__(self, raw: Any) -> str:
        return self[raw] if isinstance(raw, str) else ""


# --------------------------------------------------------------------------- typed entries

I64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]  # the integers ijson reads


class Ent(msgspec.Struct, gc=False):
    """A subject, object or objects.json object: name(s), box, object id.

    msgspec decodes one only when it is typed so; `from_dict` brings any dict to the same
    form: `name` the string or '', `names` the strings of the list (as a tuple), the box
    by `box_of` (w = h = 0 when it has none), `object_id` as it is.
    """

    x: I64
    y: I64
    w: I64
    h: I64
    name: str = ""
    names: tuple[str, ...] = ()
    object_id: I64 | None = None

    @classmethod
    def from_dict(cls, d: Any) -> Ent | None:
        if d.__class__ is not dict:
            return None
        name, names = d.get("name"), d.get("names")
        return cls(
            *(box_of(d) or (0, 0, 0, 0)),
            name=name if name.__class__ is str else "",
            names=tuple(n for n in names if isinstance(n, str)) if isinstance(names, list) else (),
            object_id=d.get("object_id"),
        )


class Rel(msgspec.Struct, gc=False):
    """A relationship; `from_dict` gives None (malformed) unless subject and object are
    dicts, and '' for a predicate that is not a string."""

    predicate: str
    subject: Ent
    object: Ent

    @classmethod
    def from_dict(cls, d: Any) -> Rel | None:
        if d.__class__ is not dict:
            return None
        subj, obj = Ent.from_dict(d.get("subject")), Ent.from_dict(d.get("object"))
        if subj is None or obj is None:
            return None
        pred = d.get("predicate")
        return cls(pred if pred.__class__ is str else "", subj, obj)


class _Entry(msgspec.Struct, kw_only=True, gc=False):
    """An image entry: its id is `image_id` (v1.2+) or `id` (v1.0), see `image_id_of`."""

    image_id: I64 | None = None
    id: I64 | None = None

    def __post_init__(self) -> None:
        if self.image_id is None:
            self.image_id, self.id = self.id, None


class RelEntry(_Entry):
    """A relationships.json entry; from a dict, malformed relationships are None."""

    relationships: list[Rel]

    @classmethod
    def from_dict(cls, d: Any) -> RelEntry | None:
        rels = d.get("relationships") if isinstance(d, dict) else None
        if not isinstance(rels, list):
            return None
        return cls([Rel.from_dict(r) for r in rels], image_id=image_id_of(d))


class ObjEntry(_Entry):
    """An objects.json entry; from a dict, malformed objects are None."""

    objects: list[Ent]

    @classmethod
    def from_dict(cls, d: Any) -> ObjEntry | None:
        objs = d.get("objects") if isinstance(d, dict) else None
        if not isinstance(objs, list):
            return None
        return cls([Ent.from_dict(o) for o in objs], image_id=image_id_of(d))


class ImageEntry(_Entry):
    """An image_data.json entry: width and height (rounded; None when not numbers)."""

    width: I64 | None = None
    height: I64 | None = None

    @classmethod
    def from_dict(cls, d: Any) -> ImageEntry | None:
        if not isinstance(d, dict):
            return None
        w, h = d.get("width"), d.get("height")
        w = round(w) if isinstance(w, (int, float)) and not isinstance(w, bool) else None
        h = round(h) if isinstance(h, (int, float)) and not isinstance(h, bool) else None
        return cls(width=w, height=h, image_id=image_id_of(d))


E = TypeVar("E", RelEntry, ObjEntry, ImageEntry)
_FIRST = re.compile(rb'[ \t\n\r]*\[[ \t\n\r]*(\{[ \t\n\r]*"[^"\\]*")')  # [ + how entries start
_WS = b" \t\n\r"


class _Rest:
    """A file-like: the bytes `head`, then the rest of the open file `f`."""

    def __init__(self, head: bytes, f: BinaryIO):
        self.head, self.size, self.f = io.BytesIO(head), len(head), f

    def read(self, n: int = -1) -> bytes:
        return self.head.read(n) or self.f.read(n)

    def tell(self) -> int:  # in the file (approximately: `head` is partly made up)
        return self.f.tell() - self.size + self.head.tell()


def _cut(buf: bytearray, pos: int, sig: bytes) -> int:
    """Index of the ',' before the last entry of `buf[pos:]` starting with `sig`, or -1.

    `sig` is an object's opening and first key (`{"relationships"`), text that cannot
    occur inside a JSON string; the cut is wrong only if it opens an object of a nested
    array, which makes the block before it invalid JSON."""
    i = len(buf)
    while (i := buf.rfind(sig, pos + 1, i)) > 0:
        j = i - 1
        while buf[j] in _WS:
            j -= 1
        if j >= pos and buf[j] == 0x2C:
            return j
    return -1


def iter_entries(path: str | Path, cls: type[E]) -> Iterator[E | None]:
    """The entries of the top-level array in `path` as `cls` structs; None when malformed.

    The file is read `BLOCK` bytes at a time and cut at the ',' before the last entry
    that starts like the first one; msgspec decodes the entries before it into `cls` in
    one go. A block it rejects is read again by ijson into dicts for `cls.from_dict`; if
    ijson rejects it too (a cut inside a nested array, or a malformed file), ijson reads
    the rest of the file. So the entries (and errors) are always those of
    `map(cls.from_dict, iter_array(path))`.
    """
    path = _check_array(path)
    decode, from_dict = _decoder(cls).decode, cls.from_dict
    with open(path, "rb") as f:
        buf = bytearray(f.read(BLOCK))
        first = _FIRST.match(buf)
        if first is None:  # a byte-order mark, no entry, an entry that is not an object...
            yield from map(from_dict, _ijson_items(_Rest(bytes(buf), f), path))
            return
        sig, pos = bytes(first[1]), first.start(1)  # buf[pos - 1] is free for a "["
        at_end = False
        while True:
            cut = _cut(buf, pos, sig)
            if cut < 0:
                more = b"" if len(buf) - pos > 8 * BLOCK else f.read(BLOCK)
                if not more:  # the end, or no cut in sight
                    at_end = len(buf) - pos <= 8 * BLOCK
                    break
                del buf[: pos - 1]
                pos = 1
                buf += more
                continue
            buf[pos - 1], buf[cut] = 0x5B, 0x5D  # "[" entries "]", in place
            with memoryview(buf) as view, view[pos - 1 : cut + 1] as block:
                items = _decode_block(block, decode, from_dict)
            if items is None:
                buf[cut] = 0x2C
                break
            yield from items
            pos = cut + 1
        rest = b"[" + buf[pos:]  # the last entries and "]" (at the end), or ijson's part
        items = _decode_block(rest, decode, from_dict) if at_end else None
        if items is not None:
            yield from items
        else:
            yield from map(from_dict, _ijson_items(_Rest(rest, f), path))


def _decode_block(block: Any, decode: Any, from_dict: Any) -> list | None:
    """A JSON array of entries by msgspec, else by ijson + `from_dict`; None if invalid."""
    try:
        return decode(block)
    except msgspec.DecodeError:
        pass
    try:
        return [from_dict(d) for d in ijson.items(io.BytesIO(block), "item", use_float=True)]
    except ijson.JSONError:
        return None


@functools.cache
def _decoder(cls: type) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(list[cls])


def iter_image_data(path: str | Path) -> Iterator[tuple[int | None, int | None, int | None]]:
    """Yield (image_id, width, height) per entry of image_data.json (None when absent)."""
    for e in iter_entries(path, ImageEntry):
        yield (None, None, None) if e is None else (e.image_id, e.width, e.height)


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
