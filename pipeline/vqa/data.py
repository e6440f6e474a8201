"""Join data/qa parquet rows with cached CLIP embeddings (memory-mapped, nothing decoded).

Inputs (see the conventions): `data/qa/{split}.parquet` + `answers.json`, and
`data/emb/vg/` with `part-*.arrow` (id = str(image_id), image_emb) and `texts.arrow`
(id, kind question|answer, text, text_emb). A split becomes index arrays into the
memory-mapped embedding matrices; a batch gathers only its own rows (float16 -> float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.embedding.files import read_dataset, read_table, vectors
from pipeline.errors import UserError
from pipeline.readers import read_json, read_parquet, read_parquet_schema
from pipeline.report import Report

META_COLUMNS = ["qid", "image_id", "qtype", "question", "answer", "subject", "object"]
SOURCE_ID = "source_image_id"  # the image id as the table gave it (prepare-qa-table), if any
BOX_COLUMNS = ["subj_box", "union_box"]
ImageSource = Literal["auto", "whole", "crop"]  # see `image_rows`
IMAGE_SOURCES: tuple[str, ...] = get_args(ImageSource)


class ChunkedMatrix:
    """Rows of several memory-mapped (n_i, d) chunks addressed as one (sum n_i, d) matrix."""

    def __init__(self, column: pa.ChunkedArray | pa.Array):
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        self.views = [vectors(c) for c in chunks if len(c)]
        self.dim = column.type.list_size
        sizes = [len(v) for v in self.views]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, idx: np.ndarray) -> np.ndarray:
        """The rows `idx` as a new float32 (len(idx), d) array."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        if len(self.views) == 1:
            out[:] = self.views[0][idx]
            return out
        chunk = np.searchsorted(self.offsets, idx, side="right") - 1
        for c in np.unique(chunk):
            mask = chunk == c
            out[mask] = self.views[c][idx[mask] - self.offsets[c]]
        return out


@dataclass
class AnswerVocab:
    """answers.json in class-id order, with each answer's CLIP text embedding."""

    answers: list[str]
    counts: list[int]
    emb: np.ndarray  # (n_answers, d) float32, L2-normalised

    @property
    def index(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.answers)}


@dataclass
class EmbeddingStore:
    """The memory-mapped image and text embeddings of one embed output folder."""

    folder: Path
    image: ChunkedMatrix
    image_ids: pa.Array  # str, row order of `image`
    text: ChunkedMatrix
    text_kind: pa.Array
    text_text: pa.Array
    manifest: dict[str, Any]

    @property
    def dim(self) -> int:
        return self.image.dim

    @property
    def has_crops(self) -> bool:
        """Whether embed wrote box-crop rows (`<image_id>@x,y,w,h`, embed.vg_crops)."""
        return bool(pc.any(pc.match_substring(self.image_ids, "@")).as_py())

    def text_rows(self, kind: str) -> tuple[np.ndarray, pa.Array]:
        """Row numbers and texts of one kind ('question' | 'answer')."""
        rows = np.flatnonzero(pc.equal(self.text_kind, kind).to_numpy(zero_copy_only=False))
        return rows, self.text_text.take(pa.array(rows))


def open_embeddings(emb_dir: str | Path) -> EmbeddingStore:
    """Memory-map `part-*.arrow` and `texts.arrow` of an embed output folder."""
    emb_dir = Path(emb_dir)
    if not emb_dir.is_dir():
        raise UserError(f"embedding folder not found: {emb_dir}")
    texts_path = emb_dir / "texts.arrow"
    if not texts_path.exists():
        raise UserError(f"{emb_dir} has no texts.arrow (run `clipda embed --dataset vg` first)")
    try:
        images = read_dataset(emb_dir)
    except FileNotFoundError:
        raise UserError(f"{emb_dir} has no part-*.arrow image embeddings") from None
    texts = read_table(texts_path)
    for name, table, cols in (
        ("image shards", images, ["id", "image_emb"]),
        ("texts.arrow", texts, ["kind", "text", "text_emb"]),
    ):
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise UserError(f"{emb_dir}: {name} lack column(s) {', '.join(missing)}")
    manifest_path = emb_dir / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else {}
    store = EmbeddingStore(
        folder=emb_dir,
        image=ChunkedMatrix(images.column("image_emb")),
        image_ids=images.column("id").combine_chunks().cast(pa.string()),
        text=ChunkedMatrix(texts.column("text_emb")),
        text_kind=texts.column("kind").combine_chunks(),
        text_text=texts.column("text").combine_chunks(),
        manifest=manifest,
    )
    if store.text.dim != store.dim:
        raise UserError(
            f"{emb_dir}: image embeddings have {store.dim} dims, text embeddings {store.text.dim}"
        )
    return store


def load_vocab(qa_dir: str | Path, store: EmbeddingStore) -> AnswerVocab:
    """answers.json joined with the answer text embeddings of `store`."""
    path = Path(qa_dir) / "answers.json"
    if not path.exists():
        raise UserError(f"answer vocabulary not found: {path}")
    entries = read_json(path).get("answers", [])
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and "answer" in e for e in entries
    ):
        raise UserError(f"{path}: 'answers' must be a list of {{\"answer\": ...}} objects")
    if not entries:
        raise UserError(f"{path} lists no answers")
    answers = [str(e["answer"]).strip() for e in entries]
    rows, texts = store.text_rows("answer")
    pos = pc.index_in(pa.array(answers, pa.string()), value_set=texts).to_numpy(
        zero_copy_only=False
    )
    missing = [a for a, p in zip(answers, pos) if p is None or np.isnan(p)]
    if missing:
        raise UserError(
            f"{store.folder}/texts.arrow lacks embeddings for {len(missing)} vocabulary "
            f"answer(s), e.g. {missing[0]!r}: re-run embed on this data/qa"
        )
    emb = store.text.take(rows[pos.astype(np.int64)])
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return AnswerVocab(answers, [int(e.get("count", 0)) for e in entries], emb)


def _lookup(values: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Position of each value in value_set, -1 where absent."""
    pos = pc.index_in(values, value_set=value_set)
    return pc.fill_null(pos, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _valid_box(value) -> list[int] | None:
    if value is None or len(value) != 4 or any(v is None for v in value):
        return None
    return [int(v) for v in value]


def crop_ids(table: pa.Table) -> pa.Array:
    """Each row's crop row id as embed writes it: the union box of a relation question,
    else the subject (object) box; null when the row has no usable box."""
    cols = {
        c: table.column(c).to_pylist() if c in table.column_names else [None] * len(table)
        for c in ("image_id", "qtype", *BOX_COLUMNS)
    }
    out = []
    for iid, qtype, subj, union in zip(*cols.values()):
        box = _valid_box(union) if qtype == "relation" else None
        box = box or _valid_box(subj)
        out.append(None if box is None else f"{iid}@{','.join(map(str, box))}")
    return pa.array(out, pa.string())


def image_rows(table: pa.Table, store: EmbeddingStore, source: ImageSource = "auto") -> np.ndarray:
    """Row of `store.image` for each QA row: the whole image, or its box crop.

    `auto` takes the crop when embed wrote one (embed.vg_crops) and the whole image
    otherwise; `crop` requires the crop; `whole` ignores crops.
    """
    if source not in IMAGE_SOURCES:
        raise UserError(f"image_source must be one of {', '.join(IMAGE_SOURCES)}, got {source!r}")
    whole = _lookup(pc.cast(table.column("image_id"), pa.string()), store.image_ids)
    if source == "whole" or (source == "auto" and not store.has_crops):
        return whole
    if not store.has_crops:
        raise UserError(f"{store.folder} has no crop embeddings: embed with vg_crops: true")
    crop = _lookup(crop_ids(table), store.image_ids)
    return crop if source == "crop" else np.where(crop >= 0, crop, whole)


@dataclass
class VQASplit:
    """One split's usable rows as indices into the memory-mapped embeddings."""

    name: str
    store: EmbeddingStore
    image_idx: np.ndarray  # (n,) rows of store.image
    question_idx: np.ndarray  # (n,) rows of store.text
    label: np.ndarray  # (n,) answer class id, -1 when the answer is outside the vocabulary
    meta: pa.Table  # META_COLUMNS of the kept rows, same order

    def __len__(self) -> int:
        return len(self.label)

    def column(self, name: str) -> list:
        return self.meta.column(name).to_pylist()

    def image_emb(self, idx: np.ndarray | None = None) -> np.ndarray:
        rows = self.image_idx if idx is None else self.image_idx[idx]
        return self.store.image.take(rows)

    def question_emb(self, idx: np.ndarray | None = None) -> np.ndarray:
        rows = self.question_idx if idx is None else self.question_idx[idx]
        return self.store.text.take(rows)

    def batch(
        self, idx: np.ndarray, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, question) float32 embeddings and labels of rows `idx`."""
        image = torch.from_numpy(self.image_emb(idx)).to(device)
        question = torch.from_numpy(self.question_emb(idx)).to(device)
        label = torch.from_numpy(self.label[idx]).to(device)
        return image, question, label


def load_split(
    qa_dir: str | Path,
    split: str,
    store: EmbeddingStore,
    vocab: AnswerVocab,
    report: Report | None = None,
    in_vocab_only: bool = False,
    image_source: ImageSource = "auto",
) -> VQASplit:
    """Rows of `{split}.parquet` that have an image and a question embedding.

    Rows without them are skipped and counted in `report` by reason (with qids); with
    `in_vocab_only` rows whose answer is not in the vocabulary are skipped too.
    `image_source`: see `image_rows`.
    """
    path = Path(qa_dir) / f"{split}.parquet"
    if not path.exists():
        raise UserError(f"QA split not found: {path}")
    names = read_parquet_schema(path).names
    missing = [c for c in META_COLUMNS if c not in names]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}")
    extra = [SOURCE_ID] if SOURCE_ID in names else []
    table = read_parquet(
        path, columns=[c for c in META_COLUMNS + BOX_COLUMNS + extra if c in names]
    )
    image_idx = image_rows(table, store, image_source)
    table = table.select(META_COLUMNS + extra)
    q_rows, q_texts = store.text_rows("question")
    q_pos = _lookup(pc.utf8_trim_whitespace(table.column("question")), q_texts)
    question_idx = np.where(q_pos >= 0, q_rows[np.maximum(q_pos, 0)] if len(q_rows) else -1, -1)
    label = _lookup(table.column("answer"), pa.array(vocab.answers, pa.string()))

    keep = np.ones(len(table), dtype=bool)
    reasons = [
        ("no_image_embedding", image_idx < 0),
        ("no_question_embedding", question_idx < 0),
    ]
    if in_vocab_only:
        reasons.append(("answer_out_of_vocab", label < 0))
    qids = table.column("qid")
    for reason, bad in reasons:
        bad = bad & keep
        if report is not None and bad.any():
            for i in np.flatnonzero(bad)[: report.max_ids]:
                report.skip(reason, qids[int(i)].as_py(), n=0)
            report.skip(reason, None, n=int(bad.sum()))
        keep &= ~bad
    if report is not None:
        report.read += len(table)
    kept = np.flatnonzero(keep)
    return VQASplit(
        name=split,
        store=store,
        image_idx=image_idx[kept],
        question_idx=question_idx[kept].astype(np.int64),
        label=label[kept],
        meta=table.take(pa.array(kept)),
    )


def read_train_answers(qa_dir: str | Path, vocab: AnswerVocab) -> pa.Table:
    """The train split's text columns (no embeddings needed) plus `label` (-1 if OOV)."""
    path = Path(qa_dir) / "train.parquet"
    if not path.exists():
        raise UserError(f"QA split not found: {path}")
    table = read_parquet(path, columns=["qtype", "question", "answer", "subject", "object"])
    label = _lookup(table.column("answer"), pa.array(vocab.answers, pa.string()))
    return table.append_column("label", pa.array(label, pa.int64()))


def qtype_candidates(qtypes: list[str], labels: list[int]) -> dict[str, list[int]]:
    """Per question type, the vocabulary answers that are ever its answer (sorted ids)."""
    out: dict[str, set[int]] = {}
    for qtype, label in zip(qtypes, labels):
        if label >= 0:
            out.setdefault(qtype, set()).add(int(label))
    return {q: sorted(v) for q, v in sorted(out.items())}
