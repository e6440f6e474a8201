"""evaluate_caption: caption the Flickr30k test images with each trained decoder and a
nearest-neighbour baseline; score them with BLEU-1..4, CIDEr-D and, where the scene
truth exists (the sample world's `scenes.json`), grounding.

Each `--model` folder is one system, named by its folder name (`noada`, `ada`); the
baseline is `nn` (see `pipeline.caption.evaluation`). Outputs: `metrics` (headline only:
{system: {bleu4, cider, ground_p, ground_r}} and the paired differences {"ada-noada",
"noada-nn", "ada-nn": {bleu4, cider, ground_p}}), `detail` (every score, the 95%
bootstrap intervals of every score and difference (`intervals`), the grounding
breakdown, the references' own grounding, the settings, how it was computed),
`<predictions>/caption_<system>.jsonl` (image_id, prediction, references) and
`<predictions>/caption_report.json` (rows read, written, skipped by reason).

Grounding (`pipeline.metrics.grounding`): `scenes` names the truth file; where it does
not exist (real Flickr30k) grounding is left out and the detail file says why. Images
without a scene in the file are left out of grounding only (counted in the report).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from pipeline.atomic import write_json
from pipeline.caption.data import read_manifest
from pipeline.caption.decode import caption_embeddings, load_caption_model
from pipeline.caption.evaluation import (
    BASELINE,
    BASELINE_FILE,
    PAPER_BLEU,
    PAPER_NOTE,
    SceneTruth,
    check_clip,
    comparisons,
    drop_empty_references,
    intervals,
    load_image_captions,
    load_tokenizer,
    nearest_neighbour_captions,
    score,
    system_names,
    write_predictions,
)
from pipeline.embedding.files import read_dataset
from pipeline.embedding.provenance import check_trained_on
from pipeline.errors import UserError
from pipeline.metrics import (
    BLEU_DETAIL,
    BLEU_SETTINGS,
    CIDER_DETAIL,
    CIDER_SETTINGS,
    GROUNDING_DETAIL,
    TOKENIZATION,
    TOKENIZATION_DETAIL,
)
from pipeline.nn.caption_decoder import read_model_info
from pipeline.report import Report
from pipeline.settings import Bootstrap, check, load

HEADLINE = ("bleu4", "cider", "ground_p", "ground_r")  # in the metrics file (if scored)
HEADLINE_DIFFS = ("bleu4", "cider", "ground_p")  # of each comparison (with intervals)


@dataclass(frozen=True)
class Settings:
    """How the captions are made and which rows are scored."""

    SECTION: ClassVar[str] = "evaluate_caption"
    beam_size: int = 3  # beam search width (1: greedy)
    max_len: int = 30  # tokens after BOS; decode also caps at the model's max_len - 1
    batch_size: int = 64  # images per decoding batch
    split: str = "test"  # split whose images are captioned and scored
    baseline_split: str = "train"  # split the nearest-neighbour baseline searches

    def __post_init__(self) -> None:
        for key in ("beam_size", "max_len", "batch_size"):
            check(getattr(self, key) >= 1, key, "must be >= 1")


SETTINGS = (Settings, Bootstrap)


def main(
    emb: Path,
    clip: str,
    models: list[Path],
    metrics: Path,
    detail: Path,
    predictions: Path,
    params: Path | dict[str, Any],
    scenes: Path | None = None,
) -> str:
    """Caption `split` of `emb` with every model and the baseline; write scores + predictions
    (+ grounding against `scenes` where that file exists)."""
    s, boot = load(Settings, params), load(Bootstrap, params)
    systems = system_names(models)
    emb, predictions = Path(emb), Path(predictions)
    if not emb.is_dir():
        raise UserError(f"embeddings folder not found: {emb}")
    manifest = read_manifest(emb)
    check_clip(clip, manifest, emb)
    for name, folder in systems.items():
        if not (folder / "config.json").is_file():
            raise UserError(f"caption model '{name}' not found: {folder}/config.json "
                            "(run `clipda train-caption` first)")  # fmt: skip
        check_trained_on(read_model_info(folder).get("clip") or {}, manifest, folder, emb)

    report = Report("evaluate_caption")
    table = read_dataset(emb)
    test = load_image_captions(table, s.split)
    report.read = sum(len(c) for c in test.captions)
    if not len(test):
        raise UserError(f"no '{s.split}' rows in {emb}")
    test = drop_empty_references(test, report)
    if not len(test):
        raise UserError(f"no '{s.split}' image in {emb} has a reference with words")
    train = load_image_captions(table, s.baseline_split)
    if not len(train):
        raise UserError(f"no '{s.baseline_split}' rows in {emb} for the nearest-neighbour baseline")
    tokenizer = load_tokenizer(clip)
    truth = SceneTruth.load(scenes, test, report)

    scores: dict[str, dict[str, Any]] = {}
    captions: dict[str, list[str]] = {}
    image_emb = torch.from_numpy(test.emb)
    for name, folder in systems.items():
        model = load_caption_model(folder)
        preds = caption_embeddings(model, image_emb, tokenizer, s.beam_size, s.max_len,
                                   s.batch_size, name)  # fmt: skip
        scores[name], captions[name] = score(preds, test.captions) | truth.score(preds), preds
        write_predictions(predictions / f"caption_{name}.jsonl", test, preds)
    preds, neighbours = nearest_neighbour_captions(train, test)
    scores[BASELINE], captions[BASELINE] = score(preds, test.captions) | truth.score(preds), preds
    write_predictions(predictions / BASELINE_FILE, test, preds, neighbours)

    headline = {name: {k: v[k] for k in HEADLINE if k in v} for name, v in scores.items()}
    ci: dict[str, Any] = {}
    if boot.resamples:
        ci = intervals(captions, test.captions, truth, boot.resamples, boot.level, boot.seed)
        for a, b in comparisons(list(scores)):
            headline[f"{a}-{b}"] = {k: ci[f"{a}-{b}"][k]["value"] for k in HEADLINE_DIFFS
                                    if k in ci[f"{a}-{b}"]}  # fmt: skip
    write_json(metrics, headline)
    settings = {
        "split": s.split, "n_images": len(test),
        "n_references": sum(len(c) for c in test.captions), "tokenization": TOKENIZATION,
        **BLEU_SETTINGS, **CIDER_SETTINGS, "beam_size": s.beam_size, "max_len": s.max_len,
        "baseline": f"nn-{s.baseline_split}-first-caption", "baseline_n_images": len(train),
        **PAPER_BLEU,
    }  # fmt: skip
    method = {
        "tokenization": TOKENIZATION_DETAIL, **BLEU_DETAIL, **CIDER_DETAIL,
        "image_emb": "image embedding of the first row of each image_id",
        "references": "all captions of the image with at least one word after tokenisation",
        "baseline": f"first caption (first row in the files) of the nearest "
        f"'{s.baseline_split}' image by cosine of CLIP image embeddings "
        "(faiss IndexFlatIP on L2-normalised vectors)",
        "clip_model": clip, "paper_note": PAPER_NOTE, **GROUNDING_DETAIL,
    }  # fmt: skip
    method["intervals"] = (
        f"{boot.level:.0%} percentile bootstrap over the {len(test)} test images, "
        f"{boot.resamples} resamples (seed {boot.seed}), corpus BLEU and CIDEr-D (idf "
        "included) recomputed on each resample; a-b: the paired difference on the same "
        "resamples"
        if boot.resamples
        else "none (bootstrap.resamples: 0)"
    )
    write_json(detail, {**scores, "intervals": ci, "grounding": truth.summary(),
                        "settings": settings, "method": method})  # fmt: skip
    report.written = len(test)
    report.save(predictions / "caption_report.json")
    parts = [f"{k}: " + " ".join(f"{m}={x:.4f}" for m, x in v.items()) for k, v in headline.items()]
    return f"{report.summary()}; " + "; ".join(parts)
