"""Zero-shot CLIP for VQA: prompt templates, prompt embeddings (cached), ranking.

CLIP ranks the candidate answers by image-prompt similarity; a prompt fills a template
such as "a photo of {subject} {answer} {object}" with the question's fields and each
candidate answer, and is embedded with the CLIP checkpoint the image embeddings came from
(a block of prompts at a time, batched, cached on disk across runs).
"""

from __future__ import annotations

import contextlib
import string
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Self

import numpy as np
import pyarrow as pa
from pyarrow import ipc
from tqdm import tqdm

from pipeline.atomic import atomic_path
from pipeline.embedding.files import vector_array, vectors
from pipeline.errors import UserError
from pipeline.readers import readable
from pipeline.vqa.data import VQASplit
from pipeline.vqa.scores import TOP_K, topk_rows

TextEncoder = Callable[[list[str]], np.ndarray]
# per question type; `default` for the types not named
TEMPLATES = {
    "relation": "a photo of {subject} {answer} {object}",
    "object": "a photo of a {answer}",
    "default": "a photo of {answer}",
}
TEMPLATE_FIELDS = {"answer", "subject", "object", "question"}


def template_fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def template_problem(template: str) -> str | None:
    """Why `template` is unusable (None when it is fine)."""
    try:
        fields = template_fields(template)
    except ValueError as exc:
        return f"malformed template {template!r} ({exc})"
    if "answer" not in fields or not fields <= TEMPLATE_FIELDS:
        return f"must use {{answer}} and only {sorted(TEMPLATE_FIELDS)}, got {template!r}"
    try:  # conversions and format specs ("{answer!z}", "{answer:d}") fail only here
        template.format(**{f: "x" for f in TEMPLATE_FIELDS})
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        return f"malformed template {template!r} ({exc})"
    return None


def template_for(templates: dict[str, str], qtype: str) -> str:
    return templates.get(qtype, templates["default"])


def load_text_encoder(checkpoint: str) -> tuple[TextEncoder, str, str]:
    """`encode_texts` of the CLIP checkpoint (through load_backbone), its id and revision."""
    from pipeline.clip.backbone import load_backbone

    backbone = load_backbone(checkpoint)
    return (
        (lambda texts: backbone.encode_texts(texts).numpy()),
        backbone.model_id,
        backbone.revision,
    )


class PromptEncoder:
    """CLIP text embeddings of prompts, a block at a time, cached on disk across runs.

    `embed_block` embeds one block's distinct prompts (sorted, in batches of `batch`).
    The cache is an Arrow IPC file tagged with the model and revision, one record batch
    per block (its distinct prompts and their embeddings): a block whose distinct prompts
    equal a cached block's reuses its embeddings, any other is embedded anew. Memory is
    one block, plus an index of (size, first, last prompt) per cached block, read from a
    memory map; the blocks themselves are read into memory one at a time (a map would
    leave the pages read mapped, counted in the resident set, until the end).

    Used as a context manager: on a clean exit this run's blocks, in order, replace the
    cache atomically, unless every block was the cached one at the same place (the file
    is then kept as it is, not rewritten); the new file is written block by block, from
    the first block that differs from the old file's (the blocks before are copied over).
    """

    def __init__(
        self,
        encode: TextEncoder,
        batch: int = 256,
        cache: Path | None = None,
        model: str = "",
        revision: str = "",
    ):
        self.encode, self.batch, self.cache = encode, int(batch), cache
        self.model, self.revision = model or "", revision or ""
        self.embedded = self.cached = 0  # prompts embedded by this run / taken from the cache
        self.blocks = 0  # blocks asked for so far
        self._stack = contextlib.ExitStack()  # the old cache file, the new one once begun
        self._old: ipc.RecordBatchFileReader | None = None
        self._index: dict[tuple, list[int]] = defaultdict(list)  # key -> old batch numbers
        self._writer: ipc.RecordBatchFileWriter | None = None
        if cache is not None and cache.exists():
            self._open_old(cache)

    @property
    def prompts(self) -> int:
        """Prompts scored: the sum of each block's distinct prompts (a prompt found in two
        blocks counts twice; counting each once over the run would need an unbounded set)."""
        return self.embedded + self.cached

    def _open_old(self, path: Path) -> None:
        with readable(path, "a readable Arrow IPC file"):
            mapped = ipc.open_file(pa.memory_map(str(path), "r"))
            meta = mapped.schema.metadata or {}
            made_with = (meta.get(b"model", b"").decode(), meta.get(b"revision", b"").decode())
            if made_with != (self.model, self.revision) or mapped.schema.names != ["text", "emb"]:
                return  # made with another checkpoint (or not a prompt cache): start over
            for i in range(mapped.num_record_batches):
                text = mapped.get_batch(i).column(0)  # zero-copy: touches only these strings
                if len(text):
                    self._index[(len(text), text[0].as_py(), text[-1].as_py())].append(i)
            self._old = ipc.open_file(self._stack.enter_context(pa.OSFile(str(path), "rb")))

    def _lookup(self, texts: list[str]) -> tuple[int, pa.RecordBatch] | None:
        """The old cache's batch (number, batch) holding exactly `texts` (sorted, distinct)."""
        if self._old is None or not texts:
            return None
        want = pa.array(texts, pa.string())
        for i in self._index.get((len(texts), texts[0], texts[-1]), []):
            batch = self._old.get_batch(i)
            if batch.column(0).equals(want):
                return i, batch
        return None

    def _encode(self, texts: list[str]) -> np.ndarray:
        out = None
        for start in range(0, len(texts), self.batch):
            emb = np.asarray(self.encode(texts[start : start + self.batch]), dtype=np.float32)
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[start : start + len(emb)] = emb
            out[start : start + len(emb)] /= np.maximum(
                np.linalg.norm(emb, axis=1, keepdims=True), 1e-12
            )
        return out

    def _write(self, batch: pa.RecordBatch) -> None:
        if self._writer is None:
            schema = batch.schema.with_metadata({"model": self.model, "revision": self.revision})
            path = self._stack.enter_context(atomic_path(self.cache))
            sink = self._stack.enter_context(pa.OSFile(str(path), "wb"))
            self._writer = self._stack.enter_context(ipc.new_file(sink, schema))
            for i in range(self.blocks - 1):  # the old blocks this run reused in place
                self._writer.write_batch(self._old.get_batch(i))
        self._writer.write_batch(batch)

    def embed_block(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """One block's prompts: (its distinct prompts' (n, d) float32 L2-normalised
        embeddings, each prompt's row in them)."""
        texts = sorted(set(prompts))
        self.blocks += 1
        hit = self._lookup(texts)
        if hit is None:
            emb = self._encode(texts)
            self.embedded += len(texts)
            columns, number = [pa.array(texts, pa.string()), vector_array(emb)], -1
            batch = pa.record_batch(columns, names=["text", "emb"])
        else:
            (number, batch), emb = hit, vectors(hit[1].column(1))
            self.cached += len(texts)
        in_place = number == self.blocks - 1  # the old file's block at this place
        if self.cache is not None and (self._writer is not None or not in_place):
            self._write(batch)
        where = {t: i for i, t in enumerate(texts)}
        return emb, np.array([where[t] for t in prompts], dtype=np.int64)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        """Close the new cache file, if any, and move it into place (on an error: delete it)."""
        self._old = None
        self._stack.__exit__(*exc)  # last in, first out: the writer, the file, atomic_path


def zeroshot_rank(
    prompts: PromptEncoder,
    template: str,
    answers: list[str],
    data: VQASplit,
    rows: np.ndarray,
    cand: np.ndarray,
    meta: dict[str, list],
    block: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k candidate ids and cosines of image . prompt(answer) for `rows` of `data`.

    Rows are grouped by the template's non-answer fields (e.g. (subject, object)); the
    groups, in order of first row, are taken in blocks of about `block` prompts (one per
    group and candidate answer): a block's prompts are embedded once and scored against
    its rows' images, a group's rows a slice at a time (a score matrix of about
    16 x `block` values), keeping each row's top-k.
    """
    fields = sorted(template_fields(template) - {"answer"})
    groups: dict[tuple, list[int]] = defaultdict(list)
    for pos, r in enumerate(rows.tolist()):
        groups[tuple((meta[f][r] or "") for f in fields)].append(pos)
    keys = list(groups)
    ids = np.empty((len(rows), min(TOP_K, len(cand))), dtype=np.int64)
    vals = np.empty(ids.shape, dtype=np.float32)
    if not len(cand):
        return ids, vals
    per_block, step = max(1, block // len(cand)), max(1, 16 * block // len(cand))
    bar = tqdm(total=len(keys) * len(cand), desc="prompts", unit="prompt", leave=False,
               disable=not sys.stderr.isatty())  # fmt: skip
    for b in range(0, len(keys), per_block):
        chunk = keys[b : b + per_block]
        texts = [
            template.format(answer=answers[c], **dict(zip(fields, key)))
            for key in chunk
            for c in cand
        ]
        emb, where = prompts.embed_block(texts)
        where = where.reshape(len(chunk), len(cand))
        for g, key in enumerate(chunk):
            text = emb[where[g]]  # the group's prompts, in candidate order
            for s in range(0, len(groups[key]), step):
                pos = np.asarray(groups[key][s : s + step])
                image = data.image_emb(rows[pos])
                image /= np.maximum(np.linalg.norm(image, axis=1, keepdims=True), 1e-12)
                order, top = topk_rows(image @ text.T, TOP_K)
                ids[pos], vals[pos] = cand[order], top
        bar.update(len(texts))
        del emb  # before the next block's is made
    bar.close()
    return ids, vals


def open_prompts(clip: str, manifest: dict, batch: int, cache: Path | None = None) -> PromptEncoder:
    """A `PromptEncoder` on CLIP `clip`, which must be the checkpoint the embeddings (whose
    `manifest` is given) were made with, when both name a revision."""
    encode, _, revision = load_text_encoder(str(clip))
    want = manifest.get("revision")
    if want and revision and want != revision:
        raise UserError(
            f"CLIP {clip} (revision {revision}) is not the one the "
            f"embeddings were made with (revision {want})"
        )
    model, made_with = str(manifest.get("model", "")), str(manifest.get("revision", ""))
    return PromptEncoder(encode, batch, cache, model, made_with)
