"""Visual Genome JSON -> relation / object QA rows: the library of the `prepare_vqa` stage.

The stage (`pipeline.stages.prepare_vqa`) reads `image_data.json`, `relationships.json`
and `objects.json` a block of image entries at a time (see `pipeline.formats.vg`) and
writes `{train,val,test}.parquet` in row groups, so peak memory does not grow with the
input (it holds a block, a batch of rows per split, one row group when rewriting, the
per-image metadata and the counts). A large objects.json is read by a second process
(`InChild`) while the first reads relationships.json; `QABuilder.merge` adds up their
counts and the row groups are those of one pass over both. `SCHEMA`, `split_of` and
`build_vocab` also define the data/qa layout that `prepare-qa-table`
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
  As the vocabulary needs global counts, rows are first staged without `in_vocab`
  (`StagedWriter`: Arrow IPC files), then each split is rewritten row group by row group
  with it (`StagedSplits`); a row group closes after the image that fills it
  (`row_groups`).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import multiprocessing as mp
import sys
import threading
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
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
BATCH_ROWS = 8192  # rows per staged batch (held in Python lists until then)
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
    """Column buffers of one split's pending rows: per row the name columns, the index of
    the relationship/object in its image entry (-> qid) and the boxes; per image the
    rest. `to_batch` derives qid, question and the union box in Arrow / numpy."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.index = array("i")
        self.answer: list[str] = []
        self.subject: list[str] = []
        self.object: list[str | None] = []
        self.subj = array("i")  # flat x, y, w, h
        self.obj = array("i")  # zeros for object rows
        self.image_id = array("q")  # per image from here on
        self.image_path: list[str | None] = []
        self.width: list[int | None] = []
        self.height: list[int | None] = []
        self.is_object = array("b")
        self.rows = array("i")

    def __len__(self) -> int:
        return len(self.index)

    def add_image(
        self, n: int, image_id: int, path: str | None, w: int | None, h: int | None, qtype: str
    ) -> None:
        """Per-image columns for the `n` rows just added."""
        self.image_id.append(image_id)
        self.image_path.append(path)
        self.width.append(w)
        self.height.append(h)
        self.is_object.append(qtype == "object")
        self.rows.append(n)

    def to_batch(self) -> pa.RecordBatch:
        is_obj_np = np.repeat(np.frombuffer(self.is_object, np.bool_), self.rows)
        is_obj = pa.array(is_obj_np)
        at = pa.array(np.repeat(np.arange(len(self.rows)), self.rows))  # row -> its image

        def per_image(values: Any, type: pa.DataType) -> pa.Array:
            return pa.array(values, type).take(at)

        def boxes(flat: Any, masked: bool) -> pa.Array:
            values = pa.array(np.asarray(flat).reshape(-1), pa.int32())  # int64 checked
            return pa.FixedSizeListArray.from_arrays(values, 4, mask=is_obj if masked else None)

        subj = np.frombuffer(self.subj, np.int32).reshape(-1, 4).astype(np.int64)
        obj = np.frombuffer(self.obj, np.int32).reshape(-1, 4).astype(np.int64)
        x0y0 = np.minimum(subj[:, :2], obj[:, :2])
        x1y1 = np.maximum(subj[:, :2] + subj[:, 2:], obj[:, :2] + obj[:, 2:])
        union = np.where(is_obj_np[:, None], 0, np.concatenate([x0y0, x1y1 - x0y0], axis=1))
        image_id = per_image(self.image_id, pa.int64())
        index = pc.cast(pa.array(self.index, pa.int32()), pa.string())
        subject, object_ = pa.array(self.subject, pa.string()), pa.array(self.object, pa.string())
        head, mid, tail = RELATION_QUESTION.split("{}")
        question = pc.binary_join_element_wise(head, subject, mid, object_, tail, "")
        arrays = [
            pc.binary_join_element_wise(
                pc.cast(image_id, pa.string()), pc.if_else(is_obj, "/o", "/r"), index, ""
            ),
            image_id,
            per_image(self.image_path, pa.string()),
            per_image(self.width, pa.int32()),
            per_image(self.height, pa.int32()),
            pc.if_else(is_obj, "object", "relation"),
            pc.if_else(is_obj, OBJECT_QUESTION, question),
            pa.array(self.answer, pa.string()),
            subject,
            object_,
            boxes(subj, False),
            boxes(obj, True),
            boxes(union, True),
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=STAGED)


_COUNTS = ("relations", "objects", "answer_counts", "rows", "images_with_rows", "image_rows",
           "rows_without_image_file", "entries", "malformed_entries")  # fmt: skip


class QABuilder:
    """Turns VG image entries into QA rows, buffered per split and handed to `emit`.

    `emit(split, batch)` receives record batches (schema `STAGED`, about `BATCH_ROWS`
    rows) as buffers fill and on `flush()`. Counts go to `relations` (a Report over
    relationships), `objects` (a Report over objects), `answer_counts`, `rows`,
    `images_with_rows`, and `image_rows` (rows per image, in order: see `row_groups`).
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
        self.image_rows = {s: array("i") for s in SPLITS}
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
        if entry is None:
            self.malformed_entries[key] += 1
            return None
        items = getattr(entry, key)
        report.read += len(items)
        image_id = entry.image_id
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
        self.image_rows[split].append(n)
        if path is None:
            self.rows_without_image_file += n
        if len(cols) >= BATCH_ROWS:
            self._flush(split)

    def _flush(self, split: str) -> None:
        cols = self.buffers[split]
        if len(cols):
            batch = cols.to_batch()
            counts = pc.value_counts(batch.column("answer"))
            self.answer_counts[split].update(
                dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))
            )
            self.emit(split, batch)
            cols.clear()

    def flush(self) -> None:
        for split in SPLITS:
            self._flush(split)

    def counts(self) -> dict[str, Any]:
        """What `merge` adds up (the rows went to `emit`)."""
        return {k: getattr(self, k) for k in _COUNTS}

    def merge(self, other: dict[str, Any]) -> None:
        """Add the `counts()` of a builder that read the input after this one's (objects.json
        after relationships.json): the same as if this builder had read both."""
        self.relations.merge(other["relations"])
        self.objects.merge(other["objects"])
        for s in SPLITS:
            self.answer_counts[s].update(other["answer_counts"][s])
            for qtype, n in other["rows"][s].items():
                self.rows[s][qtype] += n
            self.images_with_rows[s] |= other["images_with_rows"][s]
            self.image_rows[s].extend(other["image_rows"][s])
        self.rows_without_image_file += other["rows_without_image_file"]
        for key in self.entries:
            self.entries[key] += other["entries"][key]
            self.malformed_entries[key] += other["malformed_entries"][key]

    def add_relationships(self, entry: vg.RelEntry | None) -> None:
        """One relationships.json entry -> relation rows (or counted skips)."""
        got = self._items(entry, "relationships", self.relations)
        if got is None:
            return
        image_id, rels, (split, path, _, _) = got
        rep = self.relations
        cols = self.buffers[split]
        rnorm, onorm = self.rel_norm, self.obj_norm
        seen: set[tuple[str, str, str]] | None = set() if self.settings.dedupe_triples else None
        n = 0
        # hot loop (millions of rows): attribute and dict lookups, no calls in the common case
        for i, rel in enumerate(rels):
            if rel is None:
                rep.skip("malformed", f"{image_id}/r{i}")
                continue
            pred = rnorm[rel.predicate]
            if not pred:
                rep.skip("empty_predicate", f"{image_id}/r{i}")
                continue
            subj, obj = rel.subject, rel.object
            if not (s := onorm[subj.name]) and not (s := onorm[subj.names]):
                rep.skip("subject_no_name", f"{image_id}/r{i}")
                continue
            if not (o := onorm[obj.name]) and not (o := onorm[obj.names]):
                rep.skip("object_no_name", f"{image_id}/r{i}")
                continue
            sx, sy, sw, sh = subj.x, subj.y, subj.w, subj.h
            ox, oy, ow, oh = obj.x, obj.y, obj.w, obj.h
            if sw < 1 or sh < 1 or ow < 1 or oh < 1:
                rep.skip("bad_box", f"{image_id}/r{i}")
                continue
            sid = subj.object_id
            if (sid is not None and sid == obj.object_id) or (
                s == o and sx == ox and sy == oy and sw == ow and sh == oh
            ):
                rep.skip("self_relation", f"{image_id}/r{i}")
                continue
            if seen is not None:
                triple = (s, pred, o)
                if triple in seen:
                    rep.skip("duplicate_triple", f"{image_id}/r{i}")
                    continue
                seen.add(triple)
            cols.index.append(i)
            cols.answer.append(pred)
            cols.subject.append(s)
            cols.object.append(o)
            cols.subj.extend((sx, sy, sw, sh))
            cols.obj.extend((ox, oy, ow, oh))
            n += 1
        rep.written += n
        self._done(split, image_id, path, n, "relation")

    def add_objects(self, entry: vg.ObjEntry | None) -> None:
        """One objects.json entry -> object rows (largest boxes first, capped)."""
        got = self._items(entry, "objects", self.objects)
        if got is None:
            return
        image_id, objs, (split, path, _, _) = got
        rep = self.objects
        onorm = self.obj_norm
        kept: list[tuple[int, int, str, vg.Ent]] = []
        seen_ids: set[int] = set()
        for j, ob in enumerate(objs):
            if ob is None:
                rep.skip("malformed", f"{image_id}/o{j}")
                continue
            if not (name := onorm[ob.name]) and not (name := onorm[ob.names]):
                rep.skip("no_name", f"{image_id}/o{j}")
                continue
            if ob.w < 1 or ob.h < 1:
                rep.skip("bad_box", f"{image_id}/o{j}")
                continue
            oid = ob.object_id
            if oid.__class__ is int:
                if oid in seen_ids:
                    rep.skip("duplicate_object", f"{image_id}/o{j}")
                    continue
                seen_ids.add(oid)
            kept.append((-ob.w * ob.h, j, name, ob))
        kept.sort(key=itemgetter(0, 1))
        cap = self.settings.max_objects_per_image
        if cap is not None and len(kept) > cap:
            rep.skip("over_image_cap", f"{image_id}/o{kept[cap][1]}", n=len(kept) - cap)
            kept = kept[:cap]
        cols = self.buffers[split]
        for _, j, name, ob in kept:
            cols.index.append(j)
            cols.answer.append(name)
            cols.subject.append(name)
            cols.object.append(None)
            cols.subj.extend((ob.x, ob.y, ob.w, ob.h))
            cols.obj.extend((0, 0, 0, 0))
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


def row_groups(image_rows: Iterable[int], size: int) -> list[int]:
    """Row-group sizes of a split: a group closes after the image that brings it to at
    least `size` rows (an image never straddles two), the last one holds the rest."""
    groups, n = [], 0
    for rows in image_rows:
        n += rows
        if n >= size:
            groups.append(n)
            n = 0
    return groups + [n] if n else groups


def staged_path(out_dir: Path, split: str, part: str) -> Path:
    return out_dir / f".{split}.{part}.arrow"


class StagedWriter:
    """`write(split, batch)` appends rows (schema `STAGED`) to the Arrow IPC stream
    `out_dir/.<split>.<part>.arrow`; `close()` ends the three streams."""

    def __init__(self, out_dir: Path, part: str):
        self.sinks: dict[str, pa.ipc.RecordBatchStreamWriter] = {}
        try:
            for s in SPLITS:
                self.sinks[s] = pa.ipc.new_stream(staged_path(out_dir, s, part), STAGED)
        except BaseException:
            self.close()
            raise

    def write(self, split: str, batch: pa.RecordBatch) -> None:
        self.sinks[split].write_batch(batch)

    def close(self) -> None:
        while self.sinks:
            self.sinks.popitem()[1].close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _regroup(batches: Iterable[pa.RecordBatch], sizes: list[int]) -> Iterator[pa.Table]:
    """The rows of `batches` as one-chunk tables of `sizes` rows (which add up to all rows);
    one chunk, as the row groups were written before the staging (same pages)."""
    pending: list[pa.RecordBatch] = []
    have, todo = 0, iter(sizes)
    size = next(todo, None)
    for batch in batches:
        pending.append(batch)
        have += len(batch)
        while size is not None and have >= size:
            t = pa.Table.from_batches(pending, STAGED)
            group = t.slice(0, size).combine_chunks()
            pending, have = t.slice(size).to_batches(), have - size
            del t  # only the group and the rows after it are held while it is written
            yield group
            size = next(todo, None)
    if size is not None or have:
        raise RuntimeError("staged rows do not add up to the row groups")


def finalize_split(
    staged: list[Path], final: Path, split: str, vocab: pa.Array, sizes: list[int]
) -> int:
    """Rewrite the staged parts of a split into row groups of `sizes` rows, adding
    `in_vocab` and `split`; the rows in the vocabulary."""

    def batches() -> Iterator[pa.RecordBatch]:
        for path in staged:
            with pa.OSFile(str(path)) as f, pa.ipc.open_stream(f) as reader:
                yield from reader

    n_in = 0
    with (
        atomic_path(final) as tmp,
        pq.ParquetWriter(tmp, SCHEMA, use_compliant_nested_type=False) as writer,
    ):
        for t in _regroup(batches(), sizes):
            pa.default_memory_pool().release_unused()  # else mimalloc keeps what was freed
            in_vocab = pc.is_in(t["answer"], value_set=vocab)
            n_in += pc.sum(in_vocab).as_py() or 0
            split_col = pa.array([split] * len(t), pa.string())
            cols = [t[name] for name in STAGED.names] + [in_vocab, split_col]
            writer.write_table(pa.Table.from_arrays(cols, schema=SCHEMA))
            del t, cols
    return n_in


class StagedSplits:
    """The staged rows of the three splits (`StagedWriter`s for `parts`, in order), then
    the final splits: `finalize(vocab, groups)` rewrites each into `out_dir/<split>.parquet`
    with `in_vocab` and `split`. Leaving the `with` block removes the staged files,
    whatever happened."""

    def __init__(self, out_dir: Path, parts: tuple[str, ...]):
        self.out_dir = out_dir
        self.staged = {s: [staged_path(out_dir, s, p) for p in parts] for s in SPLITS}

    def __enter__(self) -> Self:
        return self

    def finalize(
        self, vocab: list[tuple[str, int]], groups: dict[str, list[int]]
    ) -> dict[str, int]:
        """Write the final splits with the row groups `groups`; rows in the vocabulary per split."""
        vocab_arr = pa.array([a for a, _ in vocab], pa.string())
        return {
            s: finalize_split(
                self.staged[s], self.out_dir / f"{s}.parquet", s, vocab_arr, groups[s]
            )
            for s in SPLITS
        }

    def __exit__(self, *exc: object) -> None:
        for paths in self.staged.values():
            for path in paths:
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


def progress(it, total: int, desc: str, position: int = 0):
    """`it` with a tqdm bar (per image entry) when stderr is a terminal."""
    off = not sys.stderr.isatty()
    return tqdm(it, desc, total, unit="img", mininterval=1.0, disable=off, position=position)


def build_part(
    new_builder: Callable[..., QABuilder],
    out_dir: Path,
    part: str,
    relationships: Path | None,
    objects: Path | None,
) -> dict[str, Any]:
    """A builder (`new_builder(emit)`) over `relationships` then `objects` (None: skipped),
    its rows staged as `part` (`StagedWriter`); its `counts()`."""
    bar = int(part == "objects")  # the second process's progress bar goes below
    with StagedWriter(out_dir, part) as writer, gc_paused():
        b = new_builder(writer.write)
        if relationships is not None:
            entries = vg.iter_entries(relationships, vg.RelEntry)
            for entry in progress(entries, len(b.images), "rels", bar):
                b.add_relationships(entry)
        if objects is not None:
            for entry in progress(
                vg.iter_entries(objects, vg.ObjEntry), len(b.images), "objs", bar
            ):
                b.add_objects(entry)
        b.flush()
    return b.counts()


def _child_main(conn: Any, fn: Callable, args: tuple) -> None:
    try:
        out = fn(*args)
    except BaseException as exc:  # noqa: BLE001 (handed to the parent, which raises it)
        out = exc
    conn.send(out)
    conn.close()


def _receive(conn: Any) -> Any:
    with conn:
        try:
            return conn.recv()
        except EOFError:
            return RuntimeError("the worker process ended without a result")


class InChild:
    """`fn(*args)` in a child process, forked where the OS allows it (no copy of the inputs).

    `result()` is what it returned, or raises what it raised; leaving the `with` block
    ends the child if it still runs."""

    def __init__(self, fn: Callable, *args: Any):
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        conn, child_conn = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_child_main, args=(child_conn, fn, args), daemon=True)
        self.proc.start()
        child_conn.close()
        # received as soon as sent, so that the child ends (and frees its memory) then
        self.got: list = []
        self.receiver = threading.Thread(target=lambda: self.got.append(_receive(conn)))
        self.receiver.start()

    def result(self) -> Any:
        self.receiver.join()
        out = self.got[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join()
        self.receiver.join()


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
