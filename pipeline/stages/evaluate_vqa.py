"""evaluate_vqa: the trained head against zero-shot CLIP, a text prior and the majority answer.

On one split (test by default), per question type and overall, for each method: top-1 and
top-5 accuracy and mean per-class accuracy (`pipeline.vqa.scores`). Every method ranks
the vocabulary answers seen for the question type in train.

- head (`model` in the detail and predictions): the head's classifier, its scores the
  probability among the candidates (a head trained with the cosine loss alone: the answer
  embedding nearest to its prediction, its scores cosines);
- zeroshot: CLIP ranks the answers by image-prompt similarity (`pipeline.vqa.zeroshot`),
  prompts embedded with `--clip`, which must be the CLIP of the embeddings;
- prior, majority: the text-only frequency baselines (`pipeline.vqa.baselines`).

Each top-1 has a 95% bootstrap interval over the questions (`bootstrap`), and so does each
paired difference head - baseline. `--metrics` is a folder of headline rows
(`pipeline.metrics.layout`): overall, object and relation top-1s, and `overall_diff` (the
overall differences); `--detail` holds everything (the full table and `intervals`), and
`--predictions` one JSON line per question with each method's top answers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from pipeline.atomic import write_json
from pipeline.compute import Compute
from pipeline.compute import session as compute_session
from pipeline.embedding.provenance import check_trained_on
from pipeline.errors import UserError
from pipeline.metrics.layout import write_rows
from pipeline.nn.vqa_head import load_head
from pipeline.report import Report
from pipeline.runtime import runtime
from pipeline.settings import Bootstrap, check, load
from pipeline.training import pick_device
from pipeline.vqa import zeroshot
from pipeline.vqa.baselines import FrequencyPrior
from pipeline.vqa.data import (
    ImageSource,
    load_split,
    load_vocab,
    open_embeddings,
    qtype_candidates,
    read_train_answers,
)
from pipeline.vqa.scores import (
    HEADLINE,
    METHOD,
    PAD,
    TOP_K,
    accuracy_by_qtype,
    headline,
    headline_diffs,
    model_rank,
    pad_ranks,
    sample_rows,
    top1_intervals,
    write_predictions,
)


@dataclass(frozen=True)
class Settings:
    """What is evaluated, and how zero-shot CLIP is prompted."""

    SECTION: ClassVar[str] = "evaluate_vqa"
    split: Literal["train", "val", "test"] = "test"  # the QA split evaluated
    zeroshot: bool = True  # also rank with zero-shot CLIP (needs `--clip`)
    # prompt per question type (`default`: the others) with {answer} and any of {subject},
    # {object}, {question}; the keys given replace these, the rest stay
    templates: dict[str, str] = field(default_factory=lambda: dict(zeroshot.TEMPLATES))
    prompt_batch: int = 256  # prompts per CLIP text forward
    # prompts embedded and scored together (memory: about this many CLIP embeddings); the
    # prompt cache is reused block by block, so a new value re-embeds every prompt once
    prompt_block: int = 65536
    max_samples: int = 0  # 0: the whole split; else a seeded random subset of that size
    batch_size: int = 4096  # questions per head forward
    image_source: ImageSource | None = None  # auto | whole | crop; null: what train_vqa used
    seed: int = 0  # top-level `seed`: the max_samples subset

    def __post_init__(self) -> None:
        object.__setattr__(self, "templates", {**zeroshot.TEMPLATES, **self.templates})
        for qtype, template in self.templates.items():
            problem = zeroshot.template_problem(template)
            check(problem is None, f"templates.{qtype}", str(problem))
        check(self.prompt_batch >= 1, "prompt_batch", "must be >= 1")
        check(self.prompt_block >= 1, "prompt_block", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.max_samples >= 0, "max_samples", "must be >= 0 (0: the whole split)")


SETTINGS = (Settings, Bootstrap, Compute)


def main(
    qa: Path, emb: Path, model: Path, clip: str, metrics: Path, detail: Path,
    predictions: Path, prompt_cache: Path | None, params: Path,
) -> str:  # fmt: skip
    """Evaluate on `split`; write the metrics, the detail and the predictions; the summary."""
    with compute_session(load(Compute, params), pick_device("auto")):  # the CLIP's device
        return _evaluate(qa, emb, model, clip, metrics, detail, predictions, prompt_cache, params)


def _evaluate(
    qa: Path, emb: Path, model: Path, clip: str, metrics: Path, detail: Path,
    predictions: Path, prompt_cache: Path | None, params: Path,
) -> str:  # fmt: skip
    s, boot = load(Settings, params), load(Bootstrap, params)
    report = Report("evaluate_vqa")
    store = open_embeddings(emb)
    vocab = load_vocab(qa, store)
    head, answer_emb, head_cfg = load_head(model)
    made_with = {"model": head_cfg.get("clip"), "revision": head_cfg.get("clip_revision")}
    check_trained_on(made_with, store.manifest, model, emb)
    answer_emb = answer_emb.numpy()
    if head_cfg.get("answers") != vocab.answers:
        raise UserError(f"{model} was trained on another answer vocabulary than "
                        f"{qa}/answers.json: re-run train_vqa")  # fmt: skip
    train = read_train_answers(qa, vocab)
    freq = FrequencyPrior(train)
    candidates = qtype_candidates(
        train.column("qtype").to_pylist(), train.column("label").to_pylist()
    )
    source = s.image_source or head_cfg.get("train", {}).get("image_source", "auto")
    data = load_split(qa, s.split, store, vocab, report, image_source=source)
    rows_all = sample_rows(len(data), s.max_samples, s.seed)
    if len(rows_all) < len(data):
        report.note("not_sampled", None, n=len(data) - len(rows_all))
    meta = {c: data.column(c) for c in ("qtype", "subject", "object", "question")}
    prompts = None
    if s.zeroshot:  # a context manager: the prompt cache is replaced when the loop is done
        prompts = zeroshot.open_prompts(clip, store.manifest, s.prompt_batch, prompt_cache)

    n, all_ids = len(rows_all), np.arange(len(vocab.answers))
    methods = ["model"] + (["zeroshot"] if prompts else []) + ["prior", "majority"]
    pred = {m: np.full((n, TOP_K), PAD, dtype=np.int64) for m in methods}
    score = {m: np.full((n, TOP_K), np.nan, dtype=np.float32) for m in ("model", "zeroshot")}
    qtypes = np.array([meta["qtype"][r] for r in rows_all.tolist()], dtype=object)
    with prompts or contextlib.nullcontext():
        for qtype in sorted(set(qtypes.tolist())):
            pos = np.flatnonzero(qtypes == qtype)
            rows = rows_all[pos]
            cand = np.asarray(candidates.get(qtype, all_ids), dtype=np.int64)
            ids, vals = model_rank(head, answer_emb, data, rows, cand, s.batch_size)
            pred["model"][pos, : ids.shape[1]], score["model"][pos, : ids.shape[1]] = ids, vals
            if prompts:
                template = zeroshot.template_for(s.templates, qtype)
                ids, vals = zeroshot.zeroshot_rank(
                    prompts, template, vocab.answers, data, rows, cand, meta, s.prompt_block
                )
                pred["zeroshot"][pos, : ids.shape[1]] = ids
                score["zeroshot"][pos, : ids.shape[1]] = vals
            pred["prior"][pos] = pad_ranks([
                freq.prior(qtype, meta["subject"][r], meta["object"][r], meta["question"][r])
                for r in rows.tolist()
            ])  # fmt: skip
            pred["majority"][pos] = pad_ranks([freq.majority(qtype)] * len(rows))

    labels = data.label[rows_all]
    table = accuracy_by_qtype(pred, labels, qtypes)
    ci = {}
    if boot.resamples:
        ci = top1_intervals(pred, labels, qtypes, boot.resamples, boot.level, boot.seed)
    manifest = store.manifest
    how = {
        "split": s.split, "n_samples": n, "max_samples": s.max_samples,
        "n_answers": len(vocab.answers), "image_source": source,
        "image_crops_in_embeddings": store.has_crops, **METHOD,
        "templates": dict(s.templates) if prompts else None,
        "clip": manifest.get("model"), "clip_revision": manifest.get("revision"),
        "model_loss": head_cfg.get("loss"),
        "model_best_epoch": head_cfg.get("train", {}).get("best_epoch"),
        "prompts": prompts.prompts if prompts else 0,  # summed over the blocks
        "skipped": dict(sorted(report.skipped.items())),
        "intervals": f"{boot.level:.0%} percentile bootstrap of top-1 over the questions of "
        f"each group, {boot.resamples} resamples (seed {boot.seed}); head-x: the paired "
        "difference on the same resamples" if boot.resamples else "none",
    }  # fmt: skip
    top = headline(table)
    if ci:
        top["overall_diff"] = headline_diffs(ci)
    write_rows(metrics, top)
    how["runtime"] = runtime(pick_device("auto") if prompts else "cpu")  # CLIP's, the head's
    write_json(detail, {**table, "intervals": ci, "settings": how})
    write_predictions(predictions, data, rows_all, vocab.answers, pred, score)
    report.written = n

    lines = [report.summary()]
    if prompts:
        lines[0] += (
            f"; prompts {prompts.prompts} ({prompts.embedded} embedded, {prompts.cached} cached)"
        )
    for group, entry in table.items():
        tops = ", ".join(f"{name} {entry[f'{m}_top1']:.3f}" for name, m in HEADLINE.items()
                         if entry.get(f"{m}_top1") is not None)  # fmt: skip
        lines.append(f"  {group} (n={entry['n']}) top-1: {tops}")
    return "\n".join(lines)
