"""Zero-shot CLIP for VQA: prompt templates, prompt embeddings (cached), ranking.

CLIP ranks the candidate answers by image-prompt similarity; a prompt fills a template
such as "a photo of {subject} {answer} {object}" with the question's fields and each
candidate answer, and is embedded with the CLIP checkpoint the image embeddings came from
(each distinct prompt once, batched, cached on disk across runs).
"""

from __future__ import annotations

import string
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.embedding.files import read_table, vector_array, vectors, write_table
from pipeline.errors import UserError
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
    """CLIP text embeddings of prompts: each distinct prompt once, batched, cached on disk.

    The cache (an Arrow file) is used only when it was made with the same model and
    revision; `save` rewrites it when this run embedded anything new.
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
        self.texts: dict[str, int] = {}
        self._buf = np.zeros((0, 0), dtype=np.float32)  # grows by doubling
        self.new = 0  # prompts embedded by this run (the rest came from the cache)
        self.used: set[str] = set()  # distinct prompts asked for by this run
        if cache is not None and cache.exists():
            self._load(cache)

    def _load(self, path: Path) -> None:
        table = read_table(path)
        meta = table.schema.metadata or {}
        if (meta.get(b"model", b"").decode(), meta.get(b"revision", b"").decode()) != (
            self.model,
            self.revision,
        ):
            return  # made with another checkpoint: start over
        self._buf = np.array(vectors(table.column("emb")), dtype=np.float32)
        self.texts = {t: i for i, t in enumerate(table.column("text").to_pylist())}

    def _append(self, rows: np.ndarray) -> None:
        n = len(self.texts)
        if self._buf.shape[1] != rows.shape[1]:
            self._buf = np.zeros((0, rows.shape[1]), dtype=np.float32)
        if n + len(rows) > len(self._buf):
            grown = np.zeros((max(2 * len(self._buf), n + len(rows)), rows.shape[1]), np.float32)
            grown[:n] = self._buf[:n]
            self._buf = grown
        self._buf[n : n + len(rows)] = rows

    def embed(self, prompts: list[str]) -> np.ndarray:
        """(len(prompts), d) float32 L2-normalised rows, computing only unseen prompts."""
        self.used.update(prompts)
        todo = sorted({t for t in prompts if t not in self.texts})
        bar = tqdm(
            total=len(todo),
            desc="prompts",
            unit="prompt",
            disable=not sys.stderr.isatty() or not todo,
            leave=False,
        )
        for start in range(0, len(todo), self.batch):
            chunk = todo[start : start + self.batch]
            new = np.asarray(self.encode(chunk), dtype=np.float32)
            new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
            self._append(new)
            base = len(self.texts)
            self.texts.update({t: base + i for i, t in enumerate(chunk)})
            self.new += len(chunk)
            bar.update(len(chunk))
        bar.close()
        return self._buf[[self.texts[t] for t in prompts]]

    def save(self) -> None:
        """Rewrite the cache file (all prompts embedded so far) when anything was added."""
        if self.cache is None or not self.new:
            return
        texts = sorted(self.texts, key=self.texts.get)
        emb = self._buf[: len(texts)]
        schema = pa.schema(
            [("text", pa.string()), ("emb", pa.list_(pa.float32(), emb.shape[1]))],
            metadata={"model": self.model, "revision": self.revision},
        )
        table = pa.table([pa.array(texts, pa.string()), vector_array(emb)], schema=schema)
        write_table(self.cache, table)


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

    Rows are grouped by the template's non-answer fields (e.g. (subject, object)); each
    group's prompts are embedded once and scored against all its rows' images.
    """
    fields = sorted(template_fields(template) - {"answer"})
    groups: dict[tuple, list[int]] = defaultdict(list)
    for pos, r in enumerate(rows.tolist()):
        groups[tuple((meta[f][r] or "") for f in fields)].append(pos)
    keys = list(groups)
    image = data.image_emb(rows)
    image /= np.maximum(np.linalg.norm(image, axis=1, keepdims=True), 1e-12)
    ids = np.empty((len(rows), min(TOP_K, len(cand))), dtype=np.int64)
    vals = np.empty(ids.shape, dtype=np.float32)
    per_block = max(1, block // max(len(cand), 1))
    for b in range(0, len(keys), per_block):
        chunk = keys[b : b + per_block]
        texts = [
            template.format(answer=answers[c], **dict(zip(fields, key)))
            for key in chunk
            for c in cand
        ]
        emb = prompts.embed(texts).reshape(len(chunk), len(cand), -1)
        for g, key in enumerate(chunk):
            pos = np.asarray(groups[key])
            order, top = topk_rows(image[pos] @ emb[g].T, TOP_K)
            ids[pos], vals[pos] = cand[order], top
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
