"""evaluate_caption: caption the Flickr30k test images with each trained decoder and a
nearest-neighbour baseline; score them with BLEU-1..4, CIDEr-D, CLIPScore and
RefCLIPScore (`pipeline.metrics.clipscore`; text embeddings from `clip`, image embeddings
from `emb`) and, where the scene truth exists (the sample world's `scenes.json`), grounding.

Each `--model` folder is one system, named by its folder name (`noada`, `ada`); the
baseline is `nn` (see `pipeline.caption.evaluation`). Outputs: `metrics`, a folder of
headline rows (`pipeline.metrics.layout`): one file per system ({bleu4, cider, clipscore,
refclipscore, ground_p, ground_r, wellformed, repeat4, select_loss}) and per paired
difference ("ada-noada", "noada-nn", "ada-nn": bleu4 ... ground_p), `detail` (every
score, the 95% bootstrap intervals of every score and difference (`intervals`, grounding
precision and recall per kind included), the grounding breakdown, the references' own
grounding and CLIPScore, the settings, how it was computed),
`<predictions>/caption_<system>.jsonl` (image_id, prediction, references) and
`<predictions>/caption_report.json` (rows read, written, skipped by reason).

Grounding (`pipeline.metrics.grounding`): `scenes` names the truth file; where it does
not exist (real Flickr30k) grounding is left out and the detail file says why. Images
without a scene in the file are left out of grounding only (counted in the report).

Form (`pipeline.metrics.form`), per system and for the references themselves (`form` in
the detail file): the share of captions that repeat a 4-gram (`repeat4`, headline), also
for each model's captions decoded a second time with the repetition rule off
(`repeat4_rule_off`: the model's own looping; those captions are scored for nothing else
and written as `prediction_rule_off` in its predictions file), distinct captions, mean
length; with the scenes also the share that parse under the sample world's caption
grammar (`wellformed`, headline; `pipeline.synth.grammar`) and, of the captions that state
a count of shapes, the share that is right.

Decoding: beam search (`beam_size`, `no_repeat_ngram_size`, `length_penalty`); with
`mbr_samples` > 0, each caption is chosen by minimum Bayes risk (`pipeline.caption.mbr`)
among that many captions sampled from the model at `mbr_temperature` (seeded by the
top-level `seed`) and the beam's. Every decoding of this stage (rule off, source token)
uses the same settings.

Domain gap (`pipeline.metrics.domain_gap`, `domain_gap` in the detail file), where `laion`
(the source domain's embeddings) is given: the proxy A-distance between the LAION and the
Flickr30k images (all rows, every split: unique images) on the raw CLIP image embeddings,
on each decoder's image prefix (the discriminator's input), and between the two datasets'
caption text embeddings.
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
    REFERENCES,
    SceneTruth,
    TextEncoder,
    check_clip,
    comparisons,
    drop_empty_references,
    form_scores,
    form_summary,
    intervals,
    load_image_captions,
    load_tokenizer,
    nearest_neighbour_captions,
    score,
    system_names,
    write_predictions,
)
from pipeline.caption.shift import TargetShift
from pipeline.compute import Compute
from pipeline.compute import session as compute_session
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
from pipeline.metrics.clipscore import CLIPSCORE_DETAIL, PROMPT, ClipScorer, W, corpus
from pipeline.metrics.form import FORM_DETAIL
from pipeline.metrics.layout import write_rows
from pipeline.nn.caption_decoder import SOURCE, read_model_info
from pipeline.report import Report
from pipeline.runtime import runtime
from pipeline.settings import Bootstrap, as_dict, check, check_device, load
from pipeline.training import pick_device

HEADLINE = ("bleu4", "cider", "clipscore", "refclipscore", "ground_p", "ground_r",
            "wellformed", "repeat4", "select_loss")  # in the metrics file (if scored)  # fmt: skip
HEADLINE_DIFFS = ("bleu4", "cider", "clipscore", "refclipscore", "ground_p")  # of comparisons


@dataclass(frozen=True)
class Settings:
    """How the captions are made and which rows are scored."""

    SECTION: ClassVar[str] = "evaluate_caption"
    beam_size: int = 3  # beam search width (1: greedy)
    max_len: int = 30  # tokens after BOS; decode also caps at the model's max_len - 1
    batch_size: int = 64  # images per decoding batch
    split: str = "test"  # split whose images are captioned and scored
    baseline_split: str = "train"  # split the nearest-neighbour baseline searches
    no_repeat_ngram_size: int = 4  # no token may complete an n-gram already in the caption (0: off)
    length_penalty: float = 1.0  # beam: finished captions ranked by log-score / length**this
    mbr_samples: int = 0  # captions sampled per image; > 0: chosen among them + beam's by MBR
    mbr_temperature: float = 0.7  # their sampling temperature, a multiple of the model's own
    device: str = "auto"  # auto | cpu | cuda | cuda:N (decoders and the CLIP text encoder)
    seed: int = 0  # top-level `seed`: the samples

    def __post_init__(self) -> None:
        for key in ("beam_size", "max_len", "batch_size"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        check(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", "must be >= 0 (0: off)")
        check(self.length_penalty >= 0, "length_penalty", "must be >= 0 (0: summed log-scores)")
        check(self.mbr_samples >= 0, "mbr_samples", "must be >= 0 (0: beam search alone)")
        check(self.mbr_temperature > 0, "mbr_temperature", "must be > 0")
        check_device(self.device)


SETTINGS = (Settings, Bootstrap, TargetShift, Compute)


def main(
    emb: Path,
    clip: str,
    models: list[Path],
    metrics: Path,
    detail: Path,
    predictions: Path,
    params: Path | dict[str, Any],
    scenes: Path | None = None,
    laion: Path | None = None,
) -> str:
    """Caption `split` of `emb` with every model and the baseline; write scores + predictions
    (+ grounding against `scenes` where that file exists, the domain gap to `laion`)."""
    device = pick_device(load(Settings, params).device)
    with compute_session(load(Compute, params), device):
        return _evaluate(emb, clip, models, metrics, detail, predictions, params, scenes, laion)


def _evaluate(
    emb: Path, clip: str, models: list[Path], metrics: Path, detail: Path, predictions: Path,
    params: Path | dict[str, Any], scenes: Path | None, laion: Path | None,
) -> str:  # fmt: skip
    s, boot, shift = load(Settings, params), load(Bootstrap, params), load(TargetShift, params)
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
    encoder = TextEncoder(clip, test.emb.shape[1], s.device)
    clip_scorer = ClipScorer(encoder, test.emb, test.captions)  # the CLIP's own embeddings
    test.emb, train.emb = shift.apply(test.emb), shift.apply(train.emb)  # what decoders read

    scores: dict[str, dict[str, Any]] = {}
    captions: dict[str, list[str]] = {}
    image_emb = torch.from_numpy(test.emb)
    mbr = {"mbr_samples": s.mbr_samples, "mbr_temperature": s.mbr_temperature, "seed": s.seed}
    for name, folder in systems.items():
        model = load_caption_model(folder, s.device)
        preds = caption_embeddings(model, image_emb, tokenizer, s.beam_size, s.max_len,
                                   s.batch_size, name, s.no_repeat_ngram_size,
                                   s.length_penalty, **mbr)  # fmt: skip
        loose = preds  # the same decoded with the repetition rule off (form only)
        if s.no_repeat_ngram_size:
            loose = caption_embeddings(model, image_emb, tokenizer, s.beam_size, s.max_len,
                                       s.batch_size, f"{name} rule off", 0,
                                       s.length_penalty, **mbr)  # fmt: skip
        scores[name] = (score(preds, test.captions) | truth.score(preds)
                        | form_scores(preds, truth, loose))  # fmt: skip
        if model.config.domain_token:  # does the source token bring back LAION's style?
            src = caption_embeddings(model, image_emb, tokenizer, s.beam_size, s.max_len,
                                     s.batch_size, f"{name} source token",
                                     s.no_repeat_ngram_size, s.length_penalty, SOURCE,
                                     **mbr)  # fmt: skip
            f = form_scores(src, truth)
            scores[name]["form"]["source_token"] = {
                "wellformed": f.get("wellformed"), "alt_text": f["form"].get("alt_text"),
                "examples": src[:3]}  # fmt: skip
        captions[name] = preds
        write_predictions(predictions / f"caption_{name}.jsonl", test, preds, rule_off=loose)
    preds, neighbours = nearest_neighbour_captions(train, test)
    scores[BASELINE] = score(preds, test.captions) | truth.score(preds) | form_scores(preds, truth)
    captions[BASELINE] = preds
    write_predictions(predictions / BASELINE_FILE, test, preds, neighbours)

    per_image = {name: clip_scorer.score(preds) for name, preds in captions.items()}
    for name, values in per_image.items():
        scores[name] |= corpus(values)
    per_image[REFERENCES] = clip_scorer.references()

    for name, folder in systems.items():  # what the kept epoch was chosen on, and its loss
        chosen = (read_model_info(folder).get("training") or {}).get("selection") or {}
        if "loss" in chosen:
            scores[name] |= {"select_loss": chosen["loss"], "select_on": chosen["on"],
                             "select_images": chosen["images"]}  # fmt: skip
    headline = {name: {k: v[k] for k in HEADLINE if k in v} for name, v in scores.items()}
    ci: dict[str, Any] = {}
    if boot.resamples:
        ci = intervals(captions, test.captions, truth, boot.resamples, boot.level, boot.seed,
                       per_image)  # fmt: skip
        for a, b in comparisons(list(scores)):
            headline[f"{a}-{b}"] = {k: ci[f"{a}-{b}"][k]["value"] for k in HEADLINE_DIFFS
                                    if k in ci[f"{a}-{b}"]}  # fmt: skip
    write_rows(metrics, headline)
    settings = {
        "split": s.split, "n_images": len(test),
        "n_references": sum(len(c) for c in test.captions), "tokenization": TOKENIZATION,
        **BLEU_SETTINGS, **CIDER_SETTINGS, "beam_size": s.beam_size, "max_len": s.max_len,
        "no_repeat_ngram_size": s.no_repeat_ngram_size, "length_penalty": s.length_penalty,
        "mbr_samples": s.mbr_samples, "mbr_temperature": s.mbr_temperature, "mbr_seed": s.seed,
        "baseline": f"nn-{s.baseline_split}-first-caption", "baseline_n_images": len(train),
        "target_shift": as_dict(shift), "runtime": runtime(pick_device(s.device)),
        **PAPER_BLEU,
    }  # fmt: skip
    method = {
        "tokenization": TOKENIZATION_DETAIL, **BLEU_DETAIL, **CIDER_DETAIL,
        "image_emb": "image embedding of the first row of each image_id",
        "references": "all captions of the image with at least one word after tokenisation",
        "baseline": f"first caption (first row in the files) of the nearest "
        f"'{s.baseline_split}' image by cosine of CLIP image embeddings "
        "(faiss IndexFlatIP on L2-normalised vectors)",
        "clip_model": clip, "paper_note": PAPER_NOTE, **CLIPSCORE_DETAIL, **GROUNDING_DETAIL,
        **FORM_DETAIL,
    }  # fmt: skip
    method["intervals"] = (
        f"{boot.level:.0%} percentile bootstrap over the {len(test)} test images, "
        f"{boot.resamples} resamples (seed {boot.seed}), corpus BLEU and CIDEr-D (idf "
        "included) recomputed on each resample, CLIPScore and RefCLIPScore the weighted means "
        "of per-image scores, grounding the ratios of summed counts (ground_p, ground_r and "
        "each kind's precision and recall: colours_p, ..., relations_r); a-b: the paired "
        "difference on the same resamples"
        if boot.resamples
        else "none (bootstrap.resamples: 0)"
    )
    refs_clip = {**corpus(per_image[REFERENCES]), "n_images_leave_one_out":
                 int(sum(len(c) > 1 for c in test.captions))}  # fmt: skip
    texts = {**captions, REFERENCES: [r for rs in test.captions for r in rs]}
    clip_detail = {"references": refs_clip, "prompt": PROMPT, "w": W,
                   "context_length": encoder.context_length,
                   "truncated": {k: encoder.count_truncated([PROMPT + t for t in v])
                                 for k, v in texts.items()}}  # fmt: skip
    gap = domain_gaps(laion, emb, table, systems, boot, shift) if laion else {
        "measured": False, "why": "no --laion embeddings given"}  # fmt: skip
    write_json(detail, {**scores, "intervals": ci, "grounding": truth.summary(), "domain_gap": gap,
                        "form": form_summary(truth), "clipscore": clip_detail, "settings": settings,
                        "method": method})  # fmt: skip
    report.written = len(test)
    report.save(predictions / "caption_report.json")
    parts = [f"{k}: " + " ".join(f"{m}={x:.4f}" for m, x in v.items()) for k, v in headline.items()]
    return f"{report.summary()}; " + "; ".join(parts)


def domain_gaps(
    laion: Path, emb: Path, table, systems: dict[str, Path], boot, shift: TargetShift
) -> dict[str, Any]:
    """The proxy A-distance of LAION vs Flickr30k (module docstring) for the image (as the
    decoders read them: `shift` applied) and caption text embeddings and for each model's
    prefix."""
    import numpy as np

    from pipeline.caption.data import load_images
    from pipeline.embedding.files import vectors
    from pipeline.metrics.domain_gap import HOW, centroid_gap, proxy_a_distance

    laion = Path(laion)
    if not laion.is_dir():
        raise UserError(f"LAION embeddings folder not found: {laion}")
    source_table = read_dataset(laion)
    images = []
    for folder, t in ((laion, source_table), (emb, table)):
        images.append(load_images(folder, sorted(set(t.column("split").to_pylist())))[1])
    images[1] = shift.apply(images[1])

    def gap(a, b) -> dict[str, Any]:
        a, b = np.asarray(a), np.asarray(b)
        return proxy_a_distance(a, b, boot.seed, boot.level) | {"centroid_gap": centroid_gap(a, b)}

    text = [vectors(t.column("text_emb")) for t in (source_table, table)]
    out: dict[str, Any] = {"measured": True, "how": HOW, "source": str(laion), "target": str(emb),
                           "image": gap(*images), "text": gap(*text), "prefix": {}}  # fmt: skip
    for name, folder in systems.items():
        model = load_caption_model(folder, "cpu")
        with torch.no_grad():
            feats = [model.prefix(x.float()).flatten(1).float() for x in images]
        out["prefix"][name] = gap(*feats)
    return out
