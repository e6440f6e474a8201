"""What `embed --dataset vg` reads from prepare_vqa's output (`data/qa/`).

`{train,val,test}.parquet` rows reference VG images (`image_id`, `image_path` relative to
the VG folder, or absolute, or null) and carry questions and boxes; `answers.json` lists
the answer vocabulary in class-id order. The embed stage needs each distinct image once
(optionally with the union-box crops of its relation questions and the subject boxes of
its object questions), every distinct question and every vocabulary answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.embedding.items import ImageItem, Listing, file_stamp, source_entry
from pipeline.errors import UserError
from pipeline.readers import PARQUET, parquet_file, read_json, read_parquet_schema, readable
from pipeline.report import Report

SPLITS = ("train", "val", "test")
IMAGE_FOLDERS = ("VG_100K", "VG_100K_2")


@dataclass
class QATexts:
    """Rows of texts.arrow: (id, kind, text); questions `q<n>` (sorted), answers `a<class>`."""

    rows: list[tuple[str, str, str]]


def crop_row_id(image_id: str, box) -> str:
    """Row id of a crop: `<image_id>@x,y,w,h`."""
    return f"{image_id}@{','.join(str(int(v)) for v in box)}"


def _resolve(image_id: int, image_path: str | None, images_root: Path, qa_dir: Path):
    if image_path:
        p = Path(image_path)
        candidates = [p] if p.is_absolute() else [images_root / p, qa_dir / p, p]
    else:
        candidates = [images_root / d / f"{image_id}.jpg" for d in IMAGE_FOLDERS]
    for c in candidates:
        stamp = file_stamp(c)
        if stamp is not None:
            return c, stamp
    return None, None


def _box(value) -> tuple[int, int, int, int] | None:
    if value is None or len(value) != 4 or any(v is None for v in value):
        return None
    return tuple(int(v) for v in value)


def _add_boxes(boxes: dict[int, set], col: dict[str, list], none: list) -> None:
    """Each row's crop box (relation: the union box, else the subject box) into `boxes`."""
    qtypes, unions, subjs = (
        col.get("qtype", none),
        col.get("union_box", none),
        col.get("subj_box", none),
    )
    for iid, qtype, union, subj in zip(col["image_id"], qtypes, unions, subjs):
        box = _box(union) if qtype == "relation" else None
        box = box or _box(subj)
        if box is not None:
            boxes.setdefault(int(iid), set()).add(box)


def list_qa(qa_dir: Path, images_root: Path, crops: bool = False) -> tuple[Listing, QATexts]:
    """Distinct images (sorted by id) of all splits, and the question / answer texts.

    Skipped by reason: images whose file is missing (`missing_file`, image ids), empty
    questions (`empty_text`, qids).
    """
    if not qa_dir.is_dir():
        raise UserError(f"QA folder not found: {qa_dir} (run `clipda prepare-vqa` first)")
    paths = [qa_dir / f"{s}.parquet" for s in SPLITS if (qa_dir / f"{s}.parquet").exists()]
    if not paths:
        raise UserError(f"{qa_dir}: no train/val/test.parquet (run `clipda prepare-vqa` first)")
    answers_path = qa_dir / "answers.json"
    if not answers_path.exists():
        raise UserError(f"{answers_path} not found (run `clipda prepare-vqa` first)")
    report = Report("embed")
    image_path: dict[int, str | None] = {}
    boxes: dict[int, set] = {}
    questions: set[str] = set()
    want = ["qid", "image_id", "image_path", "question", "qtype", "subj_box", "union_box"]
    for path in paths:
        schema = read_parquet_schema(path)
        missing = {"image_id", "question"} - set(schema.names)
        if missing:
            raise UserError(f"{path} lacks column(s) {', '.join(sorted(missing))}")
        cols = [c for c in want if c in schema.names and (crops or not c.endswith("_box"))]
        with readable(path, PARQUET):  # a batch at a time: the splits can hold millions of rows
            for batch in parquet_file(path).iter_batches(batch_size=65536, columns=cols):
                col = {c: batch.column(c).to_pylist() for c in cols}
                none = [None] * batch.num_rows
                qids, paths_ = col.get("qid", none), col.get("image_path", none)
                for k, (iid, q) in enumerate(zip(col["image_id"], col["question"])):
                    iid = int(iid)
                    if iid not in image_path or (image_path[iid] is None and paths_[k]):
                        image_path[iid] = paths_[k]
                    q = (q or "").strip()
                    if q:
                        questions.add(q)
                    else:
                        report.skip("empty_text", qids[k])
                if crops:
                    _add_boxes(boxes, col, none)
    entries = read_json(answers_path).get("answers", [])
    if not isinstance(entries, list):
        raise UserError(f"{answers_path}: 'answers' must be a list")

    items = []
    for iid in sorted(image_path):
        report.read += 1
        path, stamp = _resolve(iid, image_path[iid], images_root, qa_dir)
        if path is None:
            report.skip("missing_file", iid)
            continue
        items.append(
            ImageItem(
                id=str(iid), path=str(path), boxes=tuple(sorted(boxes.get(iid, ()))), stamp=stamp
            )
        )
    rows = [(f"q{i}", "question", q) for i, q in enumerate(sorted(questions))]
    for i, e in enumerate(entries):
        text = str(e.get("answer", "")).strip() if isinstance(e, dict) else str(e).strip()
        if text:
            rows.append((f"a{i}", "answer", text))
        else:
            report.skip("empty_text", f"a{i}")
    sources = [source_entry(p) for p in paths] + [source_entry(answers_path)]
    sources.append(source_entry(images_root, images=len(items)))
    extra = {"crops": crops, "questions": len(questions), "answers": len(entries)}
    return Listing(items, report, sources, extra), QATexts(rows)
