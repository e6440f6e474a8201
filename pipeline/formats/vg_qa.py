"""Visual Genome JSON -> relation / object QA rows: the library of the `prepare_vqa` stage.

The stage (`pipeline.stages.prepare_vqa`) reads `image_data.json`, `relationships.json`
and `objects.json` one image entry at a time (see `pipeline.formats.vg`) and writes
`{train,val,test}.parquet` in row groups, so peak memory does not grow with the input (it
holds one row group per split, the per-image metadata and the answer counts). `SCHEMA`,
`split_of` and `build_vocab` also define the data/qa layout that `prepare-qa-table`
(`pipeline.formats.qa_table`) writes.

- Relation questions: "What is the relationship between {subject} and {object}?" ->
  predicate, one per relationship. Skipped and counted by reason: malformed entry, image
  unknown to image_data.json, empty predicate, subject/object without a name, bad box,
  self-relation (same object id, or same name and box), and duplicate (subject,
  predicate, object) triples within an image when `dedupe_triples`.
- Object questions: "What is this?" about one object's box -> its name, from
  objects.json; at most `max_objects_per_image` per image (largest boxes first; None = no
  cap, 0 = none). Counted separately (report `objects`).
- `image_path` is relative to the VG folder (`VG_100K/1.jpg`), null when the file is
  missing; the report records the folder (`image_path_base`).
- Names and predicates: lower-case, strip, collapse whitespace, then the alias files.
- Split per image by a hash of (seed, image_id) with the shared `split` fractions:
  deterministic, an image never straddles splits.
- Answer vocabulary (the shared `answers` settings): answers of the *train* rows, most
  frequent first (ties by text), at least `min_count`, at most `top_k`. Rows outside it
  are kept with `in_vocab = false`.
  As the vocabulary needs global counts, rows are first staged without `in_vocab`, then
  each split is rewritten row group by row group with it (`StagedSplits`).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.atomic import atomic_path, write_json
from pipeline.errors import UserError
from pipeline.formats import vg
from pipeline.report import Report
from pipeline.settings import Answers, Split

if TYPE_CHECKING:
    from pipeline.stages.prepare_vqa import Settings

SPLITS = ("train", "val", "test")
BOX = pa.list_(pa.int32(), 4)
SCHEMA = pa.schema(
    [
        ("qid", pa.string()),
        ("image_id", pa.int64()),
        ("image_path", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("qtype", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("subject", pa.string()),
        ("object", pa.string()),
        ("subj_box", BOX),
        ("obj_box", BOX),
        ("union_box", BOX),
        ("in_vocab", pa.bool_()),
        ("split", pa.string()),
    ]
)
STAGED = pa.schema([f for f in SCHEMA if f.name not in ("in_vocab", "split")])
RELATION_QUESTION = "What is the relationship between {} and {}?"
OBJECT_QUESTION = "What is this?"


def split_of(image_id: int, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of an image: a uniform number from blake2b(seed:image_id)."""
    digest = hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


class _Columns:
    """Column buffers of one split's pending rows (one parquet row group when flushed)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.qid: list[str] = []
        self.image_id: list[int] = []
        self.image_path: list[str | None] = []
        self.width: list[int | None] = []
        self.height: list[int | None] = []
        self.qtype: list[str] = []
        self.question: list[str] = []
        self.answer: list[str] = []
        self.subject: list[str] = []
        self.object: list[str | None] = []
        self.subj: list[int] = []  # flat x, y, w, h
        self.obj: list[int] = []
        self.union: list[int] = []
        self.no_obj: list[bool] = []

    def __len__(self) -> int:
        return len(self.qid)

    def add_image(
        self, n: int, image_id: int, path: str | None, w: int | None, h: int | None, qtype: str
    ) -> None:
        """Per-image columns for the `n` rows just added."""
        self.image_id.extend([image_id] * n)
        self.image_path.extend([path] * n)
        self.width.extend([w] * n)
        self.height.extend([h] * n)
        self.qtype.extend([qtype] * n)
        self.no_obj.extend([qtype == "object"] * n)

    def to_batch(self) -> pa.RecordBatch:
        mask = pa.array(self.no_obj, pa.bool_())

        def boxes(flat: list[int], with_mask: bool) -> pa.Array:
            values = pa.array(flat, pa.int32())
            return pa.FixedSizeListArray.from_arrays(values, 4, mask=mask if with_mask else None)

        arrays = [
            pa.array(self.qid, pa.string()),
            pa.array(self.image_id, pa.int64()),
            pa.array(self.image_path, pa.string()),
            pa.array(self.width, pa.int32()),
            pa.array(self.height, pa.int32()),
            pa.array(self.qtype, pa.string()),
            pa.array(self.question, pa.string()),
            pa.array(self.answer, pa.string()),
            pa.array(self.subject, pa.string()),
            pa.array(self.object, pa.string()),
            boxes(self.subj, False),
            boxes(self.obj, True),
            boxes(self.union, True),
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=STAGED)


class QABuilder:
    """Turns VG image entries into QA rows, buffered per split and handed to `emit`.

    `emit(split, batch)` receives record batches (schema `STAGED`, at most
    `settings.row_group_size` rows) as buffers fill and on `flush()`. Counts go to
    `relations` (a Report over relationships), `objects` (a Report over objects),
    `answer_counts`, `rows` and `images_with_rows`.
    """

    def __init__(
        self,
        settings: Settings,
        split: Split,
        images: dict[int, tuple[int | None, int | None]],
        files: vg.ImageFiles,
        rel_norm: vg.Normalizer,
        obj_norm: vg.Normalizer,
        emit: Callable[[str, pa.RecordBatch], None],
    ):
        self.settings = settings
        self.split = split
        self.images = images
        self.files = files
        self.rel_norm = rel_norm
        self.obj_norm = obj_norm
        self.emit = emit
        self.seen_images: dict[str, set[int]] = {"relationships": set(), "objects": set()}
        self.relations = Report("prepare_vqa")
        self.objects = Report("prepare_vqa.objects")
        self.buffers = {s: _Columns() for s in SPLITS}
        self.answer_counts = {s: Counter() for s in SPLITS}
        self.rows = {s: {"relation": 0, "object": 0} for s in SPLITS}
        self.images_with_rows: dict[str, set[int]] = {s: set() for s in SPLITS}
        self.rows_without_image_file = 0
        self.entries = {"relationships": 0, "objects": 0}
        self.malformed_entries = {"relationships": 0, "objects": 0}

    def _image(self, image_id: int | None) -> tuple[str, str | None, int | None, int | None] | None:
        if image_id is None or image_id not in self.images:
            return None
        w, h = self.images[image_id]
        sp = self.split
        split = split_of(image_id, self.settings.seed, sp.val_fraction, sp.test_fraction)
        return split, self.files.path(image_id), w, h

    def _items(self, entry: Any, key: str, report: Report) -> tuple[int, list, tuple] | None:
        """(image_id, items, image info) of an entry; None (counted by reason) to skip it."""
        self.entries[key] += 1
        items = entry.get(key) if isinstance(entry, dict) else None
        if not isinstance(items, list):
            self.malformed_entries[key] += 1
            return None
        report.read += len(items)
        image_id = vg.image_id_of(entry)
        if image_id is not None:
            seen = self.seen_images[key]
            if image_id in seen:  # a repeated entry would repeat qids and dodge dedupe
                report.skip("duplicate_image_entry", image_id, n=len(items))
                return None
            seen.add(image_id)
        if not items:
            return None
        img = self._image(image_id)
        if img is None:
            reason = "no_image_id" if image_id is None else "image_not_in_image_data"
            report.skip(reason, image_id if image_id is not None else "?", n=len(items))
            return None
        return image_id, items, img

    def _done(self, split: str, image_id: int, path: str | None, n: int, qtype: str) -> None:
        if not n:
            return
        cols = self.buffers[split]
        w, h = self.images[image_id]
        cols.add_image(n, image_id, path, w, h, qtype)
        self.rows[split][qtype] += n
        self.images_with_rows[split].add(image_id)
        if path is None:
            self.rows_without_image_file += n
        if len(cols) >= self.settings.row_group_size:
            self._flush(split)

    def _flush(self, split: str) -> None:
        cols = self.buffers[split]
        if len(cols):
            self.emit(split, cols.to_batch())
            cols.clear()

    def flush(self) -> None:
        for split in SPLITS:
            self._flush(split)

    def add_relationships(self, entry: Any) -> None:
        """One relationships.json entry -> relation rows (or counted skips)."""
        got = self._items(entry, "relationships", self.relations)
        if got is None:
            return
        image_id, rels, (split, path, _, _) = got
        rep = self.relations
        cols = self.buffers[split]
        rnorm, onorm, name_of, box_of = self.rel_norm, self.obj_norm, vg.entity_name, vg.box_of
        union_box = vg.union_box
        seen: set[tuple[str, str, str]] | None = set() if self.settings.dedupe_triples else None
        counts = self.answer_counts[split]
        n = 0
        # hot loop (millions of rows): plain dict lookups, no helper calls in the common case
        for i, rel in enumerate(rels):
            qid = f"{image_id}/r{i}"
            if rel.__class__ is not dict:
                rep.skip("malformed", qid)
                continue
            subj, obj = rel.get("subject"), rel.get("object")
            if subj.__class__ is not dict or obj.__class__ is not dict:
                rep.skip("malformed", qid)
                continue
            pred = rel.get("predicate")
            pred = rnorm[pred] if pred.__class__ is str else ""
            if not pred:
                rep.skip("empty_predicate", qid)
                continue
            s = subj.get("name")
            s = onorm[s] if s.__class__ is str else ""
            if not s and not (s := onorm[name_of(subj)]):  # blank "name": try "names"
                rep.skip("subject_no_name", qid)
                continue
            o = obj.get("name")
            o = onorm[o] if o.__class__ is str else ""
            if not o and not (o := onorm[name_of(obj)]):
                rep.skip("object_no_name", qid)
                continue
            sb, ob = box_of(subj), box_of(obj)
            if sb is None or ob is None:
                rep.skip("bad_box", qid)
                continue
            sid = subj.get("object_id")
            if (sid is not None and sid == obj.get("object_id")) or (s == o and sb == ob):
                rep.skip("self_relation", qid)
                continue
            if seen is not None:
                triple = (s, pred, o)
                if triple in seen:
                    rep.skip("duplicate_triple", qid)
                    continue
                seen.add(triple)
            cols.qid.append(qid)
            cols.question.append(RELATION_QUESTION.format(s, o))
            cols.answer.append(pred)
            cols.subject.append(s)
            cols.object.append(o)
            cols.subj.extend(sb)
            cols.obj.extend(ob)
            cols.union.extend(union_box(sb, ob))
            counts[pred] += 1
            n += 1
        rep.written += n
        self._done(split, image_id, path, n, "relation")

    def add_objects(self, entry: Any) -> None:
        """One objects.json entry -> object rows (largest boxes first, capped)."""
        got = self._items(entry, "objects", self.objects)
        if got is None:
            return
        image_id, objs, (split, path, _, _) = got
        rep = self.objects
        onorm = self.obj_norm
        kept: list[tuple[int, int, str, vg.Box]] = []
        seen_ids: set[int] = set()
        name_of, box_of = vg.entity_name, vg.box_of
        for j, ob in enumerate(objs):
            if ob.__class__ is not dict:
                rep.skip("malformed", f"{image_id}/o{j}")
                continue
            name = onorm[name_of(ob)]
            if not name:
                rep.skip("no_name", f"{image_id}/o{j}")
                continue
            box = box_of(ob)
            if box is None:
                rep.skip("bad_box", f"{image_id}/o{j}")
                continue
            oid = ob.get("object_id")
            if oid.__class__ is int:
                if oid in seen_ids:
                    rep.skip("duplicate_object", f"{image_id}/o{j}")
                    continue
                seen_ids.add(oid)
            kept.append((-box[2] * box[3], j, name, box))
        kept.sort()
        cap = self.settings.max_objects_per_image
        if cap is not None and len(kept) > cap:
            rep.skip("over_image_cap", f"{image_id}/o{kept[cap][1]}", n=len(kept) - cap)
            kept = kept[:cap]
        cols = self.buffers[split]
        counts = self.answer_counts[split]
        for _, j, name, box in kept:
            cols.qid.append(f"{image_id}/o{j}")
            cols.question.append(OBJECT_QUESTION)
            cols.answer.append(name)
            cols.subject.append(name)
            cols.object.append(None)
            cols.subj.extend(box)
            cols.obj.extend((0, 0, 0, 0))
            cols.union.extend((0, 0, 0, 0))
            counts[name] += 1
        rep.written += len(kept)
        self._done(split, image_id, path, len(kept), "object")


def read_image_data(path: Path, report: Report) -> dict[int, tuple[int | None, int | None]]:
    """image_id -> (width, height) from image_data.json; bad/duplicate entries noted."""
    images: dict[int, tuple[int | None, int | None]] = {}
    for k, (image_id, w, h) in enumerate(vg.iter_image_data(path)):
        if image_id is None:
            report.note("image_data_entry_without_id", f"#{k}")
            continue
        if image_id in images:
            report.note("image_data_duplicate_id", image_id)
        images[image_id] = (w, h)
    return images


def build_vocab(counts: Counter, top_k: int, min_count: int) -> list[tuple[str, int]]:
    """Most frequent answers first (ties by text), count >= min_count, at most top_k."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [(a, c) for a, c in ranked if c >= min_count][:top_k]


def finalize_split(staged: Path, final: Path, split: str, vocab: pa.Array) -> int:
    """Rewrite a staged split row group by row group, adding `in_vocab` and `split`."""
    n_in = 0
    pf = pq.ParquetFile(staged)
    with (
        atomic_path(final) as tmp,
        pq.ParquetWriter(tmp, SCHEMA, use_compliant_nested_type=False) as writer,
    ):
        for i in range(pf.num_row_groups):
            t = pf.read_row_group(i)
            in_vocab = pc.is_in(t["answer"], value_set=vocab)
            n_in += pc.sum(in_vocab).as_py() or 0
            split_col = pa.array([split] * len(t), pa.string())
            cols = [t[name] for name in STAGED.names] + [in_vocab, split_col]
            writer.write_table(pa.Table.from_arrays(cols, schema=SCHEMA))
    return n_in


class StagedSplits:
    """The three splits, staged then finalised: `write(split, batch)` appends rows (schema
    `STAGED`, uncompressed) to `out_dir/.<split>.parquet.staged`; `finalize(vocab)` rewrites
    each into `out_dir/<split>.parquet` with `in_vocab` and `split`. Leaving the `with`
    block removes the staged files, whatever happened."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.staged = {s: out_dir / f".{s}.parquet.staged" for s in SPLITS}
        self.writers: dict[str, pq.ParquetWriter] = {}

    def __enter__(self) -> Self:
        try:
            for s in SPLITS:
                self.writers[s] = pq.ParquetWriter(
                    self.staged[s], STAGED, compression="none", use_compliant_nested_type=False
                )
        except BaseException:
            self.__exit__()
            raise
        return self

    def write(self, split: str, batch: pa.RecordBatch) -> None:
        self.writers[split].write_batch(batch)

    def finalize(self, vocab: list[tuple[str, int]]) -> dict[str, int]:
        """Write the final splits; rows in the vocabulary per split."""
        for w in self.writers.values():
            w.close()
        vocab_arr = pa.array([a for a, _ in vocab], pa.string())
        return {
            s: finalize_split(self.staged[s], self.out_dir / f"{s}.parquet", s, vocab_arr)
            for s in SPLITS
        }

    def __exit__(self, *exc: object) -> None:
        for w in self.writers.values():
            if w.is_open:
                w.close()
        for path in self.staged.values():
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic GC: parsed entries hold no reference cycles, so refcounting frees
    them; otherwise the collector rescans the live heap as millions of dicts come and go."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def progress(it, total: int, desc: str):
    """`it` with a tqdm bar (per image entry) when stderr is a terminal."""
    return tqdm(
        it, total=total, desc=desc, unit="img", mininterval=1.0, disable=not sys.stderr.isatty()
    )


def check_vg_folder(vg_dir: Path, objects: bool) -> None:
    """`UserError` unless `vg_dir` holds the JSON files needed (objects.json if `objects`)."""
    if not vg_dir.is_dir():
        raise UserError(f"Visual Genome folder not found: {vg_dir}")
    needed = [vg.IMAGE_DATA, vg.RELATIONSHIPS] + ([vg.OBJECTS] if objects else [])
    for name in needed:
        if not (vg_dir / name).is_file():
            raise UserError(f"{vg_dir}: {name} not found (is this a Visual Genome folder?)")


def read_images(
    vg_dir: Path,
) -> tuple[dict[int, tuple[int | None, int | None]], vg.ImageFiles, Report]:
    """image_id -> (width, height), the image files found, and a report noting bad
    image_data.json entries and images without a file (`image_file_missing`)."""
    meta = Report("prepare_vqa.images")
    images = read_image_data(vg_dir / vg.IMAGE_DATA, meta)
    files = vg.ImageFiles(vg_dir)
    for image_id in images:
        if image_id not in files:
            meta.note("image_file_missing", image_id)
    return images, files, meta


def write_answers(path: Path, vocab: list[tuple[str, int]], answers: Answers) -> None:
    """`answers.json`: the vocabulary in class-id order, and how it was chosen."""
    write_json(
        path,
        {
            "answers": [{"answer": a, "count": c} for a, c in vocab],
            "top_k": answers.top_k,
            "min_count": answers.min_count,
            "counted_on": "train",
        },
    )


def summary(report: Report) -> str:
    """One line: relationships (read, written, skipped by reason), objects, rows per split."""
    objects = report.extra.get("objects", {})
    splits = report.extra.get("splits", {})
    rows = "/".join(str(splits.get(s, {}).get("rows", 0)) for s in SPLITS)
    return (
        f"{report.summary()}; objects: read {objects.get('read', 0)}, "
        f"wrote {objects.get('written', 0)}; rows train/val/test {rows}"
    )


def build_report(
    b: QABuilder,
    meta: Report,
    vg_dir: Path,
    vocab: list,
    in_vocab: dict[str, int],
    settings: dict[str, Any],
) -> Report:
    """The stage report: top-level counts are relationships; objects, images, splits, the
    vocabulary and the `settings` (flat, sorted by key) go in extras."""
    rep = b.relations
    objects = b.objects.to_dict()
    objects.pop("stage")
    images = meta.to_dict()
    images.pop("stage")
    for key in ("read", "written", "skipped_total", "skipped"):
        images.pop(key)
    splits = {}
    for s in SPLITS:
        rows = b.rows[s]["relation"] + b.rows[s]["object"]
        splits[s] = {
            "rows": rows,
            "relation": b.rows[s]["relation"],
            "object": b.rows[s]["object"],
            "images": len(b.images_with_rows[s]),
            "in_vocab": in_vocab[s],
        }
    rep.extra = {
        "counts": "read/written/skipped count relationships (relation questions); "
        "object questions are counted under 'objects'",
        "objects": objects,
        "images": {
            "in_image_data": len(b.images),
            "files_found": len(b.files),
            "files_per_folder": b.files.per_folder,
            "missing_file": meta.noted["image_file_missing"],
            "rows_without_image_file": b.rows_without_image_file,
            **images,
        },
        "json_entries": {"read": b.entries, "malformed": b.malformed_entries},
        "splits": splits,
        "answers": {
            "vocab_size": len(vocab),
            "distinct_train_answers": len(b.answer_counts["train"]),
        },
        "image_path_base": str(vg_dir),
        "json_backend": vg.json_backend(),
        "params": {k: settings[k] for k in sorted(settings)},
    }
    return rep
