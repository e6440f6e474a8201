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

Both are decoded by msgspec into typed structs that keep only these fields, so the
question texts are all that is held; other JSON is not one of these (`detect` says None).
Questions without an answer are skipped by reason (`no_annotation`, `empty_answer`).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import msgspec
import pyarrow as pa

from pipeline.errors import UserError

COLUMNS = ("qid", "image_id", "image_path", "question", "answer", "qtype")


class GQATypes(msgspec.Struct):
    structural: str = ""


class GQAQuestion(msgspec.Struct):
    imageId: str | int
    question: str
    answer: str | None = None
    types: GQATypes | None = None


class VQAQuestion(msgspec.Struct):
    image_id: int
    question: str
    question_id: int


class VQAQuestions(msgspec.Struct):
    questions: list[VQAQuestion]
    data_subtype: str = ""
    data_type: str = "mscoco"


class VQAAnnotation(msgspec.Struct):
    question_id: int
    multiple_choice_answer: str | None = None
    answer_type: str = ""


class VQAAnnotations(msgspec.Struct):
    annotations: list[VQAAnnotation]


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
    """A JSON array of row objects (`[{"image": ..., "question": ..., ...}, ...]`)."""
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


def _table(rows: dict[str, list]) -> pa.Table:
    return pa.table({c: pa.array(rows[c], pa.string()) for c in COLUMNS})


def read_gqa(path: Path) -> tuple[pa.Table, Counter]:
    """GQA questions -> (flat table, {reason: count} of questions skipped)."""
    questions = _decode(path, dict[str, GQAQuestion], "GQA questions")
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    skipped: Counter = Counter()
    for qid, q in questions.items():
        if not (q.answer or "").strip():
            skipped["empty_answer"] += 1
            continue
        iid = str(q.imageId)
        for col, value in zip(COLUMNS, (qid, iid, f"{iid}.jpg", q.question, q.answer,
                                        q.types.structural if q.types else "")):  # fmt: skip
            rows[col].append(value)
    return _table(rows), skipped


def read_vqa2(path: Path, annotations: Path | None, images: Path) -> tuple[pa.Table, Counter]:
    """VQA v2 questions + annotations -> (flat table, {reason: count} of questions skipped)."""
    if annotations is None:
        raise UserError(f"{path} is a VQA v2 questions file: pass its answers with --annotations")
    qs = _decode(path, VQAQuestions, "VQA v2 questions")
    if qs.data_type != "mscoco":
        raise UserError(f"{path}: VQA v2 data_type {qs.data_type!r} (only mscoco images)")
    if not qs.data_subtype:
        raise UserError(f"{path} names no data_subtype (e.g. train2014): image files unknown")
    answer = {a.question_id: a for a in _decode(annotations, VQAAnnotations, "VQA v2 annotations")
              .annotations}  # fmt: skip
    sub = qs.data_subtype
    folder = f"{sub}/" if (images / sub).is_dir() else ""
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    skipped: Counter = Counter()
    for q in qs.questions:
        a = answer.get(q.question_id)
        if a is None:
            skipped["no_annotation"] += 1
            continue
        if not (a.multiple_choice_answer or "").strip():
            skipped["empty_answer"] += 1
            continue
        path_ = f"{folder}COCO_{sub}_{q.image_id:012d}.jpg"
        for col, value in zip(COLUMNS, (str(q.question_id), str(q.image_id), path_, q.question,
                                        a.multiple_choice_answer, a.answer_type)):  # fmt: skip
            rows[col].append(value)
    return _table(rows), skipped
