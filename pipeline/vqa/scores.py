"""Ranking answers, accuracy, and the predictions file of `evaluate_vqa`.

Every method ranks the same candidates: the vocabulary answers seen for the question type
in train. A ranking is TOP_K class ids per row (-2 pads a shorter one). Rows whose answer
is outside the vocabulary (label -1) stay in: always wrong for top-k, left out of the
mean per-class accuracy (a class no method can output).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.atomic import atomic_path
from pipeline.metrics.bootstrap import mean_metric, summarise
from pipeline.nn.vqa_head import VQAHead
from pipeline.vqa.data import SOURCE_ID, VQASplit

TOP_K = 5
PAD = -2  # class id of an empty ranking slot


def topk_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of each row's k best scores (stable: ties by index)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def pad_ranks(ids: list[list[int]], k: int = TOP_K) -> np.ndarray:
    """Rankings of uneven length as one (n, k) array padded with PAD."""
    return np.array([(r + [PAD] * k)[:k] for r in ids], dtype=np.int64)


@torch.no_grad()
def head_scores(
    head: VQAHead,
    image: torch.Tensor,
    question: torch.Tensor,
    answer_emb: torch.Tensor,
    cand: torch.Tensor,
) -> torch.Tensor:
    """(n, len(cand)) scores of the candidate answers `cand` (class ids): a head with a
    classifier gives P(answer | image, question) among the candidates (softmax of their
    logits), a cosine head the cosine of its prediction to each answer embedding."""
    scores = head.scores(image, question, answer_emb)[:, cand]
    return F.softmax(scores, dim=-1) if head.classifier is not None else scores


@torch.no_grad()
def model_rank(
    head: torch.nn.Module,
    answer_emb: np.ndarray,
    data: VQASplit,
    rows: np.ndarray,
    cand: np.ndarray,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k candidate ids of the head for `rows` of `data`, with their scores
    (`head_scores`: the probability among the candidates, or the cosine)."""
    answers = torch.from_numpy(answer_emb)
    cand_ids = torch.from_numpy(cand)
    ids, vals = [], []
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        image, question, _ = data.batch(idx)
        scores = head_scores(head, image, question, answers, cand_ids)
        order, top = topk_rows(scores.numpy(), TOP_K)
        ids.append(cand[order])
        vals.append(top)
    return np.concatenate(ids), np.concatenate(vals)


def sample_rows(n: int, max_samples: int, seed: int) -> np.ndarray:
    """All of range(n), or a seeded sorted random subset of `max_samples` (0: all)."""
    if max_samples and n > max_samples:
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(n, max_samples, replace=False))
    return np.arange(n)


def accuracy(pred: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
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


def accuracy_by_qtype(
    pred: dict[str, np.ndarray], labels: np.ndarray, qtypes: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Per question type (sorted) and `overall`: n, n_out_of_vocab, `<method>_<metric>`."""
    groups = {q: np.flatnonzero(qtypes == q) for q in sorted(set(qtypes.tolist()))}
    groups["overall"] = np.arange(len(labels))
    out: dict[str, dict[str, Any]] = {}
    for name, pos in groups.items():
        entry: dict[str, Any] = {"n": len(pos), "n_out_of_vocab": int((labels[pos] < 0).sum())}
        for method, ids in pred.items():
            for k, v in accuracy(ids[pos], labels[pos]).items():
                entry[f"{method}_{k}"] = v
        out[name] = entry
    return out


def top1_intervals(
    pred: dict[str, np.ndarray], labels: np.ndarray, qtypes: np.ndarray,
    resamples: int, level: float, seed: int,
) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    """Bootstrap intervals of top-1 over the questions of each question type and overall,
    per method (headline names) and for head - each baseline on the same resamples:
    {group: {method or "head-<baseline>": {value, lo, hi}}}."""
    names = {k: m for k, m in HEADLINE.items() if m in pred}
    pairs = [("head", k) for k in names if k != "head"]
    groups = {q: np.flatnonzero(qtypes == q) for q in sorted(set(qtypes.tolist()))}
    groups["overall"] = np.arange(len(labels))
    out = {}
    for group, pos in groups.items():
        if not len(pos):
            continue
        hits = {k: mean_metric(pred[m][pos, 0] == labels[pos]) for k, m in names.items()}
        out[group] = summarise(hits, len(pos), resamples, level, seed, pairs)
    return out


def write_predictions(
    path: str | Path,
    data: VQASplit,
    rows: np.ndarray,
    answers: list[str],
    pred: dict[str, np.ndarray],
    score: dict[str, np.ndarray],
) -> None:
    """One JSON line per evaluated question: the truth and each method's top answers."""
    columns = ["qid", "image_id", "qtype", "question", "subject", "object", "answer"]
    columns += [SOURCE_ID] if SOURCE_ID in data.meta.column_names else []
    cols = {c: data.column(c) for c in columns}

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


# How the numbers above are computed, as the detail file records it.
METHOD = {
    "candidates": "vocabulary answers seen for the question type in train",
    "ranking": "head: its classifier's probability among the candidates (a cosine-loss head: "
    "cosine of its prediction to the answer embeddings); zeroshot: image-prompt cosine",
    "out_of_vocab": "counted wrong in top1/top5, left out of mean_class_acc",
    "prior_key": "relation: (subject, object); other types: question text",
}
# Headline name -> method name of the detail keys; per question type the first two only,
# so that `dvc metrics show` stays within 200 columns.
HEADLINE = {"head": "model", "zeroshot": "zeroshot", "prior": "prior", "majority": "majority"}
PER_QTYPE = ("head", "zeroshot")


def headline(table: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Top-1 of each method overall, and of the head and zero-shot CLIP per question type
    (the stage adds `overall_diff`: head - each baseline)."""

    def top1(group: str, names) -> dict[str, float | None]:
        entry = table[group]
        return {k: entry[f"{HEADLINE[k]}_top1"] for k in names if f"{HEADLINE[k]}_top1" in entry}

    out = {"overall": top1("overall", HEADLINE)}
    out.update({q: top1(q, PER_QTYPE) for q in table if q != "overall"})
    return out


def headline_diffs(ci: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """The overall paired differences head - each baseline (their intervals: detail)."""
    return {k: v["value"] for k, v in ci.get("overall", {}).items() if k.startswith("head-")}
