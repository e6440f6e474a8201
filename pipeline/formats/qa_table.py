"""A generic QA table (parquet, JSONL, a JSON array or CSV), or GQA / VQA v2 question files
as released (`pipeline.formats.vqa_json`) -> the data/qa layout that prepare_vqa writes.

So that any VQA dataset runs through the same embed / train_vqa / evaluate_vqa stages:
one row per question with an image path, the question and its answer; optional columns
qtype, split, subject, object, image_id, qid, box (x,y,w,h). Relative image paths are
resolved against `images` (default: the table's folder). Images are not decoded (only
their header is read, for width and height); missing ones keep the row with a null path,
as prepare_vqa does, so that embed counts them.

Image ids are kept as given in `source_image_id` (string; null when the table has none).
The int64 `image_id` the other stages join on is the id itself when it is an integer (or
its canonical decimal string, as GQA's "2354786"), else a stable hash of the string (as
GQA's "n161313"), or of the image path when no id is given.

Without a split column, splits are drawn by prepare_vqa's hash of the image id (an image
id is a hash of its path unless the table gives one) with the top-level `seed` and the
shared `split` fractions, so no image is in two splits; the answer vocabulary is built as
prepare_vqa builds it, from the shared `answers` settings (top-K train answers, min count).
This is no dvc.yaml stage: `clipda prepare-qa-table` calls `main`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from pipeline.atomic import atomic_path, write_json
from pipeline.errors import UserError
from pipeline.formats import vqa_json
from pipeline.formats.vg_qa import SCHEMA, SPLITS, build_vocab, split_of
from pipeline.report import Report
from pipeline.settings import Answers, Split, load

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
COLUMN_ALIASES = {
    "image_path": ("image_path", "image", "image_file", "file", "filename", "path"),
    "question": ("question", "query"),
    "answer": ("answer", "multiple_choice_answer", "label"),
    "qtype": ("qtype", "question_type"),
    "split": ("split",),
    "subject": ("subject",),
    "object": ("object",),
    "image_id": ("image_id",),
    "qid": ("qid", "question_id", "id"),
    "box": ("box", "bbox"),
}


@dataclass(frozen=True)
class Settings:
    """prepare-qa-table has no section of its own: it reads the top-level `seed` (and the
    shared `split` and `answers`); a leftover `qa_table:` section is an error."""

    SECTION: ClassVar[str] = "qa_table"
    seed: int = 0  # top-level `seed`: the hash split of rows without a split column


SETTINGS = (Settings, Split, Answers)
TABLE_SCHEMA = SCHEMA.append(pa.field("source_image_id", pa.string()))


def read_any(path: Path, annotations: Path | None, images: Path) -> tuple[pa.Table, Counter]:
    """Parquet, JSON lines (.jsonl/.json), a JSON array of rows (.json), CSV/TSV by
    extension, or GQA / VQA v2 question JSON; with the questions skipped while reading, by
    reason."""
    suffix = path.suffix.lower()
    kind = vqa_json.detect(path) if suffix == ".json" else None
    if kind == "vqa2_annotations":
        raise UserError(f"{path} is a VQA v2 annotations file: pass the questions file as "
                        "--input and this one as --annotations")  # fmt: skip
    if annotations is not None and kind != "vqa2":
        raise UserError(f"--annotations is for a VQA v2 questions file; {path} is not one")
    if kind == "array":
        return vqa_json.read_array(path), Counter()
    if kind == "gqa":
        return vqa_json.read_gqa(path)
    if kind == "vqa2":
        return vqa_json.read_vqa2(path, annotations, images)
    return _read_table(path, suffix), Counter()


def _read_table(path: Path, suffix: str) -> pa.Table:
    try:
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
        if suffix in (".jsonl", ".json", ".ndjson"):
            return pajson.read_json(path)
        if suffix in (".csv", ".tsv"):
            opts = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            conv = pacsv.ConvertOptions(
                strings_can_be_null=False,
                column_types={"question": pa.string(), "answer": pa.string()},
            )
            return pacsv.read_csv(path, parse_options=opts, convert_options=conv)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    raise UserError(f"{path}: unknown table format (use .parquet, .jsonl or .csv)")


def _columns(table: pa.Table) -> dict[str, str]:
    """Our column name -> the table's column name, for the columns present."""
    names = {n.lower(): n for n in table.column_names}
    found = {}
    for ours, aliases in COLUMN_ALIASES.items():
        for a in aliases:
            if a in names:
                found[ours] = names[a]
                break
    missing = [c for c in ("image_path", "question", "answer") if c not in found]
    if missing:
        raise UserError(
            f"QA table lacks column(s) {', '.join(missing)} (has {', '.join(table.column_names)})"
        )
    return found


def stable_image_id(key: str) -> int:
    """A non-negative int64 from an image path or id string (the same on every machine)."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") & (2**63 - 1)


def image_ids(value: Any, path: str) -> tuple[int, str | None]:
    """(int64 id, the id as given) of a row: see the module docstring."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return stable_image_id(path), None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value, str(value)
    given = str(value).strip()
    if given.isascii() and given.isdigit() and str(int(given)) == given and int(given) < 2**63:
        return int(given), given
    return stable_image_id(given), given


def _norm(text: Any) -> str:
    return " ".join(str(text).split()) if text is not None else ""


def _box(value: Any) -> list[int] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = value.strip("[]() ").split(",")
    try:
        box = [round(float(v)) for v in value]
    except (TypeError, ValueError):
        return None
    return box if len(box) == 4 else None


def _image_size(path: Path) -> tuple[int | None, int | None, str | None]:
    """(width, height, problem) from the image header, no decoding."""
    try:
        with Image.open(path) as img:
            w, h = img.size
        return w, h, None
    except FileNotFoundError:
        return None, None, "missing_image"
    except (UnidentifiedImageError, OSError):
        return None, None, "unreadable_image"


def main(
    input: Path,
    out: Path,
    *,
    images: Path | None = None,
    default_qtype: str = "other",
    params: Path,
    annotations: Path | None = None,
) -> str:
    """`clipda prepare-qa-table`: convert the table `input` into `out`; the summary line."""
    settings, split, answers = (load(cls, params) for cls in SETTINGS)
    report = convert(input, out, settings.seed, split, answers, images, default_qtype, annotations)
    return report.summary()


def convert(
    input_path: str | Path,
    out_dir: str | Path,
    seed: int,
    split_fractions: Split,
    answers: Answers,
    images: str | Path | None = None,
    default_qtype: str = "other",
    annotations: str | Path | None = None,
) -> Report:
    """Convert the table at `input_path` into `out_dir/{train,val,test}.parquet` + answers.

    Rows without a split column are split by `split_of(image_id, seed, ...)` with
    `split_fractions`; the vocabulary keeps `answers.top_k` train answers seen at least
    `answers.min_count` times. Relative image paths resolve against `images` (default: the
    table's folder). `annotations`: the answers of a VQA v2 questions file.
    """
    input_path, out_dir = Path(input_path), Path(out_dir)
    for path in (input_path, annotations):
        if path is not None and not Path(path).is_file():
            raise UserError(f"QA table not found: {path}")
    root = Path(images) if images is not None else input_path.parent
    val_fraction, test_fraction = split_fractions.val_fraction, split_fractions.test_fraction
    table, skipped_on_read = read_any(input_path, annotations and Path(annotations), root)
    cols = _columns(table)
    data = {ours: table.column(theirs).to_pylist() for ours, theirs in cols.items()}
    report = Report("prepare_qa_table")
    for reason, n in skipped_on_read.items():
        report.read += n
        report.skip(reason, n=n)
    sizes: dict[str, tuple] = {}
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for i in range(table.num_rows):
        report.read += 1
        get = {k: v[i] for k, v in data.items()}
        qid = _norm(get.get("qid")) or f"q{i}"
        question, answer = _norm(get["question"]), _norm(get["answer"]).lower()
        rel = _norm(get["image_path"])
        if not rel:
            report.skip("no_image_path", qid)
            continue
        if not question:
            report.skip("empty_question", qid)
            continue
        if not answer:
            report.skip("empty_answer", qid)
            continue
        image_id, source_image_id = image_ids(get.get("image_id"), rel)
        if "split" in get and _norm(get["split"]):
            split = SPLIT_ALIASES.get(_norm(get["split"]).lower())
            if split is None:
                report.skip("unknown_split", qid)
                continue
        else:
            split = split_of(image_id, seed, val_fraction, test_fraction)
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        if rel not in sizes:
            sizes[rel] = _image_size(path)
        width, height, problem = sizes[rel]
        if problem:
            report.note(problem, qid)
        box = _box(get.get("box"))
        rows[split].append(
            {
                "qid": qid,
                "image_id": image_id,
                "image_path": None if problem == "missing_image" else str(path),
                "width": width,
                "height": height,
                "qtype": _norm(get.get("qtype")) or default_qtype,
                "question": question,
                "answer": answer,
                "subject": _norm(get.get("subject")).lower() or None,
                "object": _norm(get.get("object")).lower() or None,
                "subj_box": box,
                "obj_box": None,
                "union_box": None,
                "split": split,
                "source_image_id": source_image_id,
            }
        )
    counts = Counter(r["answer"] for r in rows["train"])
    vocab = build_vocab(counts, answers.top_k, answers.min_count)
    in_vocab = {a for a, _ in vocab}
    if not vocab:
        kept = sum(len(v) for v in rows.values())
        skipped = ", ".join(f"{k} {n}" for k, n in report.skipped.most_common())
        why = f"skipped {skipped}" if skipped else "none skipped"
        raise UserError(
            f"{input_path}: no train answers: {report.read} rows read, {why}, "
            f"{kept} kept ({', '.join(f'{s} {len(rows[s])}' for s in SPLITS)})"
            + ("" if report.skipped and not kept else "; check the split column / fractions")
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    per_split = {}
    for split in SPLITS:
        for r in rows[split]:
            r["in_vocab"] = r["answer"] in in_vocab
        out = pa.Table.from_pylist(rows[split], schema=TABLE_SCHEMA)
        with atomic_path(out_dir / f"{split}.parquet") as tmp:
            pq.write_table(out, tmp, use_compliant_nested_type=False)
        per_split[split] = {
            "rows": len(rows[split]),
            "in_vocab": sum(r["in_vocab"] for r in rows[split]),
            "images": len({r["image_id"] for r in rows[split]}),
        }
        report.written += len(rows[split])
    write_json(
        out_dir / "answers.json",
        {
            "answers": [{"answer": a, "count": c} for a, c in vocab],
            "top_k": answers.top_k,
            "min_count": answers.min_count,
        },
    )
    report.extra.update(
        {"source": str(input_path), "splits": per_split, "n_answers": len(vocab), "columns": cols}
    )
    report.save(out_dir / "report.json")
    return report
