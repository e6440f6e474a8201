"""GQA and VQA v2 question files, as released, -> the flat QA table `qa_table` converts.

- **GQA** (`train_balanced_questions.json`, ...): one JSON object `{qid: {"imageId",
  "question", "answer", "types": {"structural", ...}, ...}}`. Image ids are strings
  ("2354786", "n161313"); images are `<imageId>.jpg` in GQA's `images/` folder (pass it as
  `--images`). The question type is `types.structural` (verify, query, choose, logical,
  compare), GQA's own breakdown.
- **VQA v2**: a questions file `{"data_type": "mscoco", "data_subtype": "train2014",
  "questions": [{"image_id", "question", "question_id"}]}` and an annotations file
  `{"annotations": [{"question_id", "multiple_choice_answer", "answer_type", ...}]}`.
  The answer is `multiple_choice_answer` (the most common of the ten human answers); the
  question type is `answer_type` (yes/no, number, other). Images are COCO's
  `<subtype>/COCO_<subtype>_<12-digit id>.jpg` under `--images` (or directly in it).

Both are read as a stream by ijson (its C `yajl2_c` backend), one question at a time,
never decoded whole (GQA's 14M `train_all_questions` would not fit in memory as Python
objects): the fields used are type-checked, with msgspec's words (`not a GQA questions
file (Expected `str`, got `int` - at ...)`), the others dropped, and the rows gathered
`CHUNK` at a time into Arrow record batches, so peak memory is about the Arrow table
returned (for VQA v2, plus a {question_id: (answer, answer_type)} map of the annotations).
Other JSON is not one of these (`detect` says None). Questions without an answer are
skipped by reason (`no_annotation`, `empty_answer`). A JSON array of row objects
(`read_array`, generic tables) is still decoded whole, by msgspec.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import ijson
import msgspec
import pyarrow as pa

from pipeline.errors import UserError

COLUMNS = ("qid", "image_id", "image_path", "question", "answer", "qtype")
SCHEMA = pa.schema([(c, pa.string()) for c in COLUMNS])
CHUNK = 20_000  # rows per Arrow record batch: bounds the Python strings held (~20 MB)

_JSON = {dict: "object", list: "array", str: "str", int: "int", float: "float", bool: "bool",
         type(None): "null"}  # fmt: skip
_STR_INT, _STR_NULL = (int, str), (str, type(None))
# ((field, types, required), ...): what the msgspec structs that read these files declared
_GQA = (("imageId", _STR_INT, True), ("question", (str,), True), ("answer", _STR_NULL, False),
        ("types", (dict, type(None)), False))  # fmt: skip
_GQA_TYPES = (("structural", (str,), False),)
_VQA_Q = (("image_id", (int,), True), ("question", (str,), True), ("question_id", (int,), True))
_VQA_A = (("question_id", (int,), True), ("multiple_choice_answer", _STR_NULL, False),
          ("answer_type", (str,), False))  # fmt: skip


class _Invalid(Exception):
    """JSON that parses but is not the file kind expected (turned into a `UserError`)."""


def detect(path: Path) -> str | None:
    """The kind of a .json file from its first bytes: "gqa", "vqa2" (questions),
    "vqa2_annotations", "array" (a JSON array of row objects), or None (JSON lines)."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith(b"["):
        return "array"
    if not head.startswith(b"{"):
        return None
    if b'"annotations"' in head and b'"questions"' not in head:
        return "vqa2_annotations"
    if b'"questions"' in head or b'"task_type"' in head or b'"data_subtype"' in head:
        return "vqa2"
    if re.match(rb'\{\s*"[^"]*"\s*:\s*\{', head) and b'"imageId"' in head:
        return "gqa"  # {qid: {...}}; a JSON line has a value, not an object, after its key
    return None


def read_array(path: Path) -> pa.Table:
    """A JSON array of row objects (`[{"image": ..., "question": ..., ...}, ...]`).

    Decoded whole: `pa.Table.from_pylist` takes its columns from the first row and its
    types from all rows, which batches read one at a time would not reproduce."""
    rows = _decode(path, list[dict], "JSON array of row objects")
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise UserError(f"{path}: rows of different types ({exc})".splitlines()[0]) from None


def _decode(path: Path, kind: type, what: str):
    try:
        return msgspec.json.decode(path.read_bytes(), type=kind)
    except msgspec.ValidationError as exc:
        raise UserError(f"{path}: not a {what} file ({exc})") from None
    except msgspec.DecodeError as exc:
        raise UserError(f"{path}: malformed JSON ({exc})") from None


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[BinaryIO]:
    """`path` opened for ijson; malformed JSON and `_Invalid` -> one-line `UserError`s."""
    with open(path, "rb") as f:
        try:
            yield f
        except ijson.JSONError as exc:
            msg = exc.args[0] if exc.args else type(exc).__name__
            if isinstance(msg, bytes):  # yajl's message for bytes that are not UTF-8
                msg = msg.decode("utf-8", "replace")
            msg = str(msg).strip().splitlines()[0] if str(msg).strip() else type(exc).__name__
            where = f"in the first {f.tell():,} bytes"  # ijson reads 64 KiB at a time
            raise UserError(f"{path}: malformed JSON ({msg}; {where})") from None
        except _Invalid as exc:
            raise UserError(f"{path}: not a {what} file ({exc})") from None


def _expected(kind: str, value: Any, where: str) -> str:
    return f"Expected `{kind}`, got `{_JSON.get(type(value), type(value).__name__)}` - at `{where}`"


def _problem(obj: Any, where: str, fields: tuple) -> str:
    """What is wrong with `obj` (a question or annotation) as `fields` declares it, in
    msgspec's words; only called once a fast check failed."""
    if type(obj) is not dict:
        return _expected("object", obj, where)
    for name, types, required in fields:
        if name not in obj:
            if required:
                return f"Object missing required field `{name}` - at `{where}`"
            continue
        if type(obj[name]) not in types:
            return _expected(" | ".join(_JSON[t] for t in types), obj[name], f"{where}.{name}")
    if fields is _GQA and obj.get("types") is not None:
        return _problem(obj["types"], f"{where}.types", _GQA_TYPES)
    return "unexpected field values"  # not reached: the fast checks test the same


def _check_object(f: BinaryIO) -> None:
    """Check that the JSON `f` reads is an object at the top level; back to its start."""
    _, event, value = next(ijson.parse(f, use_float=True))
    if event != "start_map":
        raise _Invalid(_expected("object", [] if event == "start_array" else value, "$"))
    f.seek(0)


def _top_object(f: BinaryIO, stop_at: str | None = None) -> dict[str, Any]:
    """{key: value} of the scalars at the top level of the JSON object `f` reads, with `{}`
    / `[]` standing for an object / array value; the read stops where the array at key
    `stop_at` starts. Events below the top level pass through a Python loop: about 1.5x
    the time `ijson.items` takes to read the items of a VQA v2 questions file."""
    top: dict[str, Any] = {}
    depth, key = 1, ""
    for _, event, value in itertools.islice(ijson.parse(f, use_float=True), 1, None):
        if depth > 1:
            if event == "start_map" or event == "start_array":
                depth += 1
            elif event == "end_map" or event == "end_array":
                depth -= 1
        elif event == "map_key":
            key = value
        elif event == "start_map" or event == "start_array":
            top[key] = {} if event == "start_map" else []
            if key == stop_at and event == "start_array":
                break
            depth += 1
        elif event == "end_map":
            break
        else:
            top[key] = value
    return top


def _top_level(f: BinaryIO, array: str) -> dict[str, Any]:
    """The top level of the VQA v2 file `f` reads (`_top_object`), checked to be an object
    with the list `array`; `f` is back at its start.

    VQA v2's keys `data_type` and `data_subtype` may come after the big array, which cannot
    be skipped without parsing it. Tapping the events of the one pass that reads the items
    (an `ijson.parse` generator fed to `ijson.items`) would cost a Python step per event,
    3x that pass, on every file; so a first read stops where the array starts (nothing to
    parse when the keys come first), and only when a key is missing there does a second
    read go through the whole file for the top-level values.
    """
    _check_object(f)
    top = _top_object(f, stop_at=array)
    if array in top and not {"data_type", "data_subtype"} <= top.keys():
        f.seek(0)
        top = _top_object(f)
    f.seek(0)
    if array not in top:
        raise _Invalid(f"Object missing required field `{array}`")
    if not isinstance(top[array], list):
        raise _Invalid(_expected("array", top[array], f"$.{array}"))
    for name in ("data_type", "data_subtype"):
        if name in top and type(top[name]) is not str:
            raise _Invalid(_expected("str", top[name], f"$.{name}"))
    return top


class _Rows:
    """Rows gathered in column lists, moved into an Arrow record batch every `CHUNK` rows."""

    def __init__(self) -> None:
        self.columns: list[list] = [[] for _ in COLUMNS]
        self.batches: list[pa.RecordBatch] = []
        self.size = CHUNK

    def add(self, *values: str) -> None:
        for column, value in zip(self.columns, values):
            column.append(value)
        if len(self.columns[0]) >= self.size:
            self.flush()

    def flush(self) -> None:
        if self.columns[0]:
            arrays = [pa.array(c, pa.string()) for c in self.columns]
            self.batches.append(pa.record_batch(arrays, schema=SCHEMA))
            for c in self.columns:
                c.clear()

    def table(self) -> pa.Table:
        self.flush()
        return pa.Table.from_batches(self.batches, schema=SCHEMA)


def read_gqa(path: Path) -> tuple[pa.Table, Counter]:
    """GQA questions -> (flat table, {reason: count} of questions skipped)."""
    rows, skipped = _Rows(), Counter()
    with _reading(path, "GQA questions") as f:
        _check_object(f)
        for qid, q in ijson.kvitems(f, "", use_float=True):
            try:
                iid, question, answer = q["imageId"], q["question"], q.get("answer")
                types = q.get("types")
                qtype = "" if types is None else types.get("structural", "")
            except (TypeError, KeyError, AttributeError):
                raise _Invalid(_problem(q, f"$[{qid!r}]", _GQA)) from None
            if (type(iid) not in _STR_INT or type(question) is not str
                    or type(answer) not in _STR_NULL or type(qtype) is not str):  # fmt: skip
                raise _Invalid(_problem(q, f"$[{qid!r}]", _GQA))
            if not (answer or "").strip():
                skipped["empty_answer"] += 1
                continue
            iid = str(iid)
            rows.add(qid, iid, f"{iid}.jpg", question, answer, qtype)
    return rows.table(), skipped


def _answers(path: Path) -> dict[int, tuple[str | None, str]]:
    """{question_id: (multiple_choice_answer, answer_type)} of a VQA v2 annotations file,
    read one annotation at a time (the ten human answers of each are dropped)."""
    answers: dict[int, tuple[str | None, str]] = {}
    strings: dict[str | None, str | None] = {}  # one copy of each answer and answer type
    with _reading(path, "VQA v2 annotations") as f:
        _top_level(f, "annotations")
        for i, a in enumerate(ijson.items(f, "annotations.item", use_float=True)):
            try:
                qid = a["question_id"]
                answer, atype = a.get("multiple_choice_answer"), a.get("answer_type", "")
            except (TypeError, KeyError, AttributeError):
                raise _Invalid(_problem(a, f"$.annotations[{i}]", _VQA_A)) from None
            if type(qid) is not int or type(answer) not in _STR_NULL or type(atype) is not str:
                raise _Invalid(_problem(a, f"$.annotations[{i}]", _VQA_A))
            answers[qid] = (strings.setdefault(answer, answer), strings.setdefault(atype, atype))
    return answers


def read_vqa2(path: Path, annotations: Path | None, images: Path) -> tuple[pa.Table, Counter]:
    """VQA v2 questions + annotations -> (flat table, {reason: count} of questions skipped)."""
    if annotations is None:
        raise UserError(f"{path} is a VQA v2 questions file: pass its answers with --annotations")
    with _reading(path, "VQA v2 questions") as f:
        top = _top_level(f, "questions")
    data_type, sub = top.get("data_type", "mscoco"), top.get("data_subtype", "")
    if data_type != "mscoco":
        raise UserError(f"{path}: VQA v2 data_type {data_type!r} (only mscoco images)")
    if not sub:
        raise UserError(f"{path} names no data_subtype (e.g. train2014): image files unknown")
    answer = _answers(annotations)
    folder = f"{sub}/" if (images / sub).is_dir() else ""
    rows, skipped = _Rows(), Counter()
    with _reading(path, "VQA v2 questions") as f:
        for i, q in enumerate(ijson.items(f, "questions.item", use_float=True)):
            try:
                iid, question, qid = q["image_id"], q["question"], q["question_id"]
            except (TypeError, KeyError):
                raise _Invalid(_problem(q, f"$.questions[{i}]", _VQA_Q)) from None
            if type(iid) is not int or type(question) is not str or type(qid) is not int:
                raise _Invalid(_problem(q, f"$.questions[{i}]", _VQA_Q))
            a = answer.get(qid)
            if a is None:
                skipped["no_annotation"] += 1
                continue
            if not (a[0] or "").strip():
                skipped["empty_answer"] += 1
                continue
            rows.add(str(qid), str(iid), f"{folder}COCO_{sub}_{iid:012d}.jpg", question, *a)
    return rows.table(), skipped
