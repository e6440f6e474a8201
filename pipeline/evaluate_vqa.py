"""evaluate_vqa stage: the trained head against zero-shot CLIP, a text prior and the majority.

On one split (test by default), per question type and overall, for each method: top-1 and
top-5 accuracy and mean per-class accuracy. Every method ranks the same candidates: the
vocabulary answers seen for that question type in train (all answers for a type unseen
in train). Rows whose answer is outside the vocabulary stay in (always wrong for top-k)
and are left out of the mean per-class accuracy (a class no method can output).

- model: nearest answer embedding (cosine, a matrix product) to the head's prediction.
- zeroshot: CLIP ranks the answers by image-prompt similarity; prompts from templates
  such as "a photo of {subject} {answer} {object}", embedded with the CLIP checkpoint the
  embeddings were made with (once per distinct prompt, batched, cached on disk).
- prior: most frequent train answer for the question's text key -- (subject, object) for
  relation questions, the question text otherwise -- then the qtype's most frequent.
- majority: the qtype's most frequent train answers.
"""

from __future__ import annotations

import json
import string
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.atomic import atomic_path, write_json
from pipeline.embfile import read_table, vector_array, vectors, write_table
from pipeline.errors import UserError
from pipeline.nn.vqa_head import load_head
from pipeline.params import typed
from pipeline.report import Report
from pipeline.vqa_data import (
    VQASplit,
    load_split,
    load_vocab,
    open_embeddings,
    qtype_candidates,
    read_train_answers,
)

TOP_K = 5
DEFAULT_TEMPLATES = {
    "relation": "a photo of {subject} {answer} {object}",
    "object": "a photo of a {answer}",
    "default": "a photo of {answer}",
}
DEFAULTS: dict[str, Any] = {
    "split": "test",
    "templates": DEFAULT_TEMPLATES,
    "zeroshot": True,
    "clip": None,  # CLIP checkpoint for the prompts; default: the one in the emb manifest
    "prompt_batch": 256,
    "prompt_cache": None,  # Arrow file caching prompt embeddings across runs
    "max_samples": 0,  # 0 = the whole split; else a seeded random subset
    "batch_size": 4096,
    "image_source": None,  # auto | whole | crop; default: what train_vqa used
}
TEMPLATE_FIELDS = {"answer", "subject", "object", "question"}
TextEncoder = Callable[[list[str]], np.ndarray]


def settings(params: dict[str, Any]) -> dict[str, Any]:
    p = {**DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    p = typed(p, DEFAULTS, "evaluate_vqa", positive=("prompt_batch", "batch_size"))
    if p["max_samples"] < 0:
        raise UserError(f"params evaluate_vqa.max_samples: must be >= 0, got {p['max_samples']}")
    p["templates"] = check_templates(p.get("templates"))
    return p


def check_templates(templates: Any) -> dict[str, str]:
    """`DEFAULT_TEMPLATES` updated with `templates`, each checked (`UserError` if bad)."""
    if templates is not None and not isinstance(templates, dict):
        raise UserError(f"params evaluate_vqa.templates: expected a mapping, got {templates!r}")
    merged = {**DEFAULT_TEMPLATES, **(templates or {})}
    for qtype, template in merged.items():
        name = f"params evaluate_vqa.templates.{qtype}"
        if not isinstance(template, str):
            raise UserError(f"{name}: expected a string, got {template!r}")
        try:
            fields = template_fields(template)
        except ValueError as exc:
            raise UserError(f"{name}: malformed template {template!r} ({exc})") from None
        if "answer" not in fields or not fields <= TEMPLATE_FIELDS:
            raise UserError(
                f"{name}: must use {{answer}} and only {sorted(TEMPLATE_FIELDS)}, got {template!r}"
            )
        try:  # conversions and format specs ("{answer!z}", "{answer:d}") fail only here
            template.format(**{f: "x" for f in TEMPLATE_FIELDS})
        except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
            raise UserError(f"{name}: malformed template {template!r} ({exc})") from None
    return merged


def template_fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def norm_text(text: str | None) -> str:
    return " ".join((text or "").lower().split())


# ---------------------------------------------------------------- frequency baselines


def prior_key(qtype: str, subject: str | None, obj: str | None, question: str | None) -> tuple:
    """What the text-only prior conditions on: (subject, object) or the question text."""
    if qtype == "relation":
        return (qtype, norm_text(subject), norm_text(obj))
    return (qtype, norm_text(question))


def _ranked(counter: Counter) -> list[int]:
    """Labels by count desc, ties by class id (answers.json order = global frequency)."""
    return [a for a, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]


class FrequencyPrior:
    """Most frequent train answers per prior key, per question type and overall."""

    def __init__(self, train: pa.Table):
        by_key: dict[tuple, Counter] = defaultdict(Counter)
        by_type: dict[str, Counter] = defaultdict(Counter)
        overall: Counter = Counter()
        cols = [
            train.column(c).to_pylist() for c in ("qtype", "subject", "object", "question", "label")
        ]
        for qtype, subj, obj, question, label in zip(*cols):
            if label < 0:
                continue
            by_key[prior_key(qtype, subj, obj, question)][label] += 1
            by_type[qtype][label] += 1
            overall[label] += 1
        self.by_key = {k: _ranked(c) for k, c in by_key.items()}
        self.by_type = {k: _ranked(c) for k, c in by_type.items()}
        self.overall = _ranked(overall)

    def majority(self, qtype: str, k: int = TOP_K) -> list[int]:
        return self.by_type.get(qtype, self.overall)[:k]

    def prior(self, qtype: str, subject, obj, question, k: int = TOP_K) -> list[int]:
        ranked = list(self.by_key.get(prior_key(qtype, subject, obj, question), []))[:k]
        for label in self.by_type.get(qtype, self.overall):
            if len(ranked) >= k:
                break
            if label not in ranked:
                ranked.append(label)
        return ranked


# ---------------------------------------------------------------- embedding scores


def topk_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of each row's k best scores (stable: ties by index)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@torch.no_grad()
def model_rank(
    head,
    answer_emb: np.ndarray,
    data: VQASplit,
    rows: np.ndarray,
    cand: np.ndarray,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k candidate ids and cosines of the head's predictions for `rows` of `data`."""
    cand_emb = torch.from_numpy(answer_emb[cand])
    ids, vals = [], []
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        image, question, _ = data.batch(idx)
        pred = F.normalize(head(image, question).float(), dim=-1)
        order, top = topk_rows((pred @ cand_emb.T).numpy(), TOP_K)
        ids.append(cand[order])
        vals.append(top)
    return np.concatenate(ids), np.concatenate(vals)


class PromptEncoder:
    """CLIP text embeddings of prompts: each distinct prompt once, batched, cached on disk."""

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


# ---------------------------------------------------------------- metrics


def accuracy(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """top1, top5 over all rows; mean per-class top-1 over in-vocabulary classes."""
    if len(labels) == 0:
        return {"top1": None, "top5": None, "mean_class_acc": None}
    hit1 = pred[:, 0] == labels
    hit5 = (pred[:, :TOP_K] == labels[:, None]).any(axis=1)
    classes = np.unique(labels[labels >= 0])
    per_class = [hit1[labels == c].mean() for c in classes]
    return {
        "top1": round(float(hit1.mean()), 6),
        "top5": round(float(hit5.mean()), 6),
        "mean_class_acc": round(float(np.mean(per_class)), 6) if per_class else None,
    }


def _pad(ids: list[list[int]], k: int = TOP_K) -> np.ndarray:
    return np.array([(r + [-2] * k)[:k] for r in ids], dtype=np.int64)


def load_text_encoder(checkpoint: str) -> tuple[TextEncoder, str, str]:
    """`encode_texts` of the CLIP checkpoint (through load_backbone), its id and revision."""
    from pipeline.clip.backbone import load_backbone

    backbone = load_backbone(checkpoint)
    return (
        (lambda texts: backbone.encode_texts(texts).numpy()),
        backbone.model_id,
        backbone.revision,
    )


def run(
    qa_dir: str | Path,
    emb_dir: str | Path,
    model_dir: str | Path,
    metrics_path: str | Path,
    predictions_path: str | Path,
    params: dict[str, Any],
    encode_texts: TextEncoder | None = None,
) -> Report:
    """Evaluate on `params.split`; write metrics JSON and per-question predictions JSONL.

    `encode_texts` (texts -> (n, d) array) overrides loading the CLIP checkpoint for the
    zero-shot prompts (tests).
    """
    p = settings(params)
    report = Report("evaluate_vqa")
    store = open_embeddings(emb_dir)
    vocab = load_vocab(qa_dir, store)
    head, answer_emb, head_cfg = load_head(model_dir)
    if head_cfg.get("answers") != vocab.answers:
        raise UserError(
            f"{model_dir} was trained on another answer vocabulary than "
            f"{qa_dir}/answers.json: re-run train_vqa"
        )
    answer_emb = answer_emb.numpy()
    train = read_train_answers(qa_dir, vocab)
    freq = FrequencyPrior(train)
    candidates = qtype_candidates(
        train.column("qtype").to_pylist(), train.column("label").to_pylist()
    )
    source = str(p["image_source"] or head_cfg.get("train", {}).get("image_source", "auto"))
    data = load_split(qa_dir, str(p["split"]), store, vocab, report, image_source=source)
    rows_all = np.arange(len(data))
    if int(p["max_samples"]) and len(data) > int(p["max_samples"]):
        rng = np.random.default_rng(int(p.get("seed", 0)))
        rows_all = np.sort(rng.choice(len(data), int(p["max_samples"]), replace=False))
        report.note("not_sampled", None, n=len(data) - len(rows_all))
    meta = {c: data.column(c) for c in ("qtype", "subject", "object", "question")}

    prompts = None
    manifest = store.manifest
    if p["zeroshot"]:
        checkpoint = p["clip"] or manifest.get("model")
        if encode_texts is None:
            if not checkpoint:
                raise UserError(
                    f"{emb_dir}/manifest.json names no CLIP model: set "
                    "evaluate_vqa.clip or evaluate_vqa.zeroshot: false"
                )
            encode_texts, _, revision = load_text_encoder(str(checkpoint))
            want = manifest.get("revision")
            if want and revision and want != revision:
                raise UserError(
                    f"CLIP {checkpoint} (revision {revision}) is not the one the "
                    f"embeddings were made with (revision {want})"
                )
        cache = Path(p["prompt_cache"]) if p["prompt_cache"] else None
        prompts = PromptEncoder(
            encode_texts,
            p["prompt_batch"],
            cache,
            str(manifest.get("model", "")),
            str(manifest.get("revision", "")),
        )

    n = len(rows_all)
    methods = ["model"] + (["zeroshot"] if prompts else []) + ["prior", "majority"]
    pred = {m: np.full((n, TOP_K), -2, dtype=np.int64) for m in methods}
    score = {m: np.full((n, TOP_K), np.nan, dtype=np.float32) for m in ("model", "zeroshot")}
    qtypes = np.array([meta["qtype"][r] for r in rows_all.tolist()], dtype=object)
    all_ids = np.arange(len(vocab.answers))
    for qtype in sorted(set(qtypes.tolist())):
        pos = np.flatnonzero(qtypes == qtype)
        rows = rows_all[pos]
        cand = np.asarray(candidates.get(qtype, all_ids), dtype=np.int64)
        ids, vals = model_rank(head, answer_emb, data, rows, cand, int(p["batch_size"]))
        pred["model"][pos, : ids.shape[1]], score["model"][pos, : ids.shape[1]] = ids, vals
        if prompts:
            template = p["templates"].get(qtype, p["templates"]["default"])
            ids, vals = zeroshot_rank(prompts, template, vocab.answers, data, rows, cand, meta)
            pred["zeroshot"][pos, : ids.shape[1]] = ids
            score["zeroshot"][pos, : ids.shape[1]] = vals
        pred["prior"][pos] = _pad(
            [
                freq.prior(qtype, meta["subject"][r], meta["object"][r], meta["question"][r])
                for r in rows.tolist()
            ]
        )
        pred["majority"][pos] = _pad([freq.majority(qtype)] * len(rows))
    if prompts:
        prompts.save()

    labels = data.label[rows_all]
    metrics: dict[str, Any] = {}
    groups = {q: np.flatnonzero(qtypes == q) for q in sorted(set(qtypes.tolist()))}
    groups["overall"] = np.arange(n)
    for name, pos in groups.items():
        entry: dict[str, Any] = {"n": len(pos), "n_out_of_vocab": int((labels[pos] < 0).sum())}
        for m in methods:
            for k, v in accuracy(pred[m][pos], labels[pos]).items():
                entry[f"{m}_{k}"] = v
        metrics[name] = entry
    metrics["settings"] = {
        "split": str(p["split"]),
        "n_samples": n,
        "max_samples": int(p["max_samples"]),
        "n_answers": len(vocab.answers),
        "image_source": source,
        "image_crops_in_embeddings": store.has_crops,
        "candidates": "vocabulary answers seen for the question type in train",
        "ranking": "cosine similarity (matrix product) over the candidates",
        "out_of_vocab": "counted wrong in top1/top5, left out of mean_class_acc",
        "prior_key": "relation: (subject, object); other types: question text",
        "templates": {k: v for k, v in p["templates"].items()} if prompts else None,
        "clip": manifest.get("model"),
        "clip_revision": manifest.get("revision"),
        "model_loss": head_cfg.get("loss"),
        "prompts": len(prompts.used) if prompts else 0,
        "skipped": dict(sorted(report.skipped.items())),
    }
    write_json(metrics_path, metrics)
    write_predictions(predictions_path, data, rows_all, vocab.answers, pred, score)
    report.written = n
    report.extra["metrics"] = {k: v for k, v in metrics.items() if k != "settings"}
    if prompts:
        report.extra["prompts"] = {
            "used": len(prompts.used),
            "embedded": prompts.new,
            "from_cache": len(prompts.used) - prompts.new,
        }
    return report


def write_predictions(
    path,
    data: VQASplit,
    rows: np.ndarray,
    answers: list[str],
    pred: dict[str, np.ndarray],
    score: dict[str, np.ndarray],
) -> None:
    """One JSON line per evaluated question: the truth and each method's top answers."""
    cols = {
        c: data.column(c)
        for c in ("qid", "image_id", "qtype", "question", "subject", "object", "answer")
    }

    def names(ids: np.ndarray) -> list[str]:
        return [answers[i] for i in ids.tolist() if i >= 0]

    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        for i, r in enumerate(rows.tolist()):
            rec: dict[str, Any] = {c: cols[c][r] for c in cols}
            for m, ids in pred.items():
                rec[m] = names(ids[i])
                if m in score:
                    rec[f"{m}_scores"] = [
                        round(float(s), 4) for s in score[m][i] if not np.isnan(s)
                    ]
            fh.write(json.dumps(rec) + "\n")
