"""Caption evaluation: the images of a split with all their references, the
nearest-neighbour baseline, scoring and the predictions files.

The `embed` output for Flickr30k holds one row per caption (`image_id`, `split`,
`image_emb`, `caption`). One prediction is made per image, from the image embedding of
the image's first row; its references are all captions of that image. The baseline
answers with the first caption (first row in the embedding files) of the training image
whose CLIP image embedding is closest by cosine (faiss `IndexFlatIP` on L2-normalised
vectors). `SceneTruth` holds the scenes of the scored images for the grounding scores
(`pipeline.metrics.grounding`), or why there are none; with them, `form_scores` also
reads the captions against the sample world's grammar (`pipeline.synth.grammar`) and the
scenes' object counts (`pipeline.metrics.form`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.atomic import write_text
from pipeline.embedding.files import vectors
from pipeline.errors import UserError
from pipeline.metrics import cider_d, corpus_bleu_1to4, grounding, load_scenes, tokenize, vocabulary
from pipeline.metrics.bootstrap import (
    CiderBootstrap,
    Metric,
    bleu_metric,
    bleu_stats,
    mean_metric,
    ratio_metric,
    summarise,
)
from pipeline.metrics.form import form
from pipeline.metrics.grounding import Scene, Vocabulary, counts, headline_parts, kind_parts
from pipeline.report import Report
from pipeline.synth.grammar import parses

BASELINE = "nn"  # the baseline's name among the systems (metrics keys)
BASELINE_FILE = "caption_nn_baseline.jsonl"  # ... and its predictions file
REFERENCES = "references"  # the references' own CLIPScore among the intervals
# The source paper reports one "BLEU" without its n-gram order; bleu1..bleu4 are recorded
# so a reader can compare with whichever order it was.
PAPER_BLEU = {"paper_bleu_noada": 0.2805, "paper_bleu_ada": 0.4116}
PAPER_NOTE = "the source paper reports one BLEU of unstated n-gram order (see paper_bleu_*)"


@dataclass
class ImageSet:
    """One entry per image of a split: its id, embedding (first row) and captions."""

    image_ids: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    emb: np.ndarray | None = None  # (n, d) float32

    def __len__(self) -> int:
        return len(self.image_ids)


def load_image_captions(table: pa.Table, split: str) -> ImageSet:
    """Group the rows of `split` by image_id (file order); embedding of each image's first row."""
    for col in ("image_id", "split", "image_emb", "caption"):
        if col not in table.column_names:
            raise UserError(f"embedding files lack column '{col}' (need Flickr30k captions)")
    out = ImageSet()
    index: dict[str, int] = {}
    ids = table.column("image_id").to_pylist()
    splits = table.column("split").to_pylist()
    captions = table.column("caption").to_pylist()
    for row, (image_id, row_split, caption) in enumerate(zip(ids, splits, captions)):
        if row_split != split:
            continue
        k = index.get(image_id)
        if k is None:
            k = index[image_id] = len(out.image_ids)
            out.image_ids.append(image_id)
            out.rows.append(row)
            out.captions.append([])
        out.captions[k].append(caption or "")
    emb = vectors(table.column("image_emb"))
    out.emb = np.ascontiguousarray(emb[np.asarray(out.rows, dtype=np.int64)], dtype=np.float32)
    return out


def drop_empty_references(images: ImageSet, report: Report) -> ImageSet:
    """References with no word after tokenisation are dropped; images left without any too
    (both counted in `report`)."""
    keep = ImageSet()
    keep_rows = []
    for k, (image_id, caps) in enumerate(zip(images.image_ids, images.captions)):
        good = [c for c in caps if tokenize(c)]
        if len(good) < len(caps):
            report.note("empty_reference", image_id, n=len(caps) - len(good))
        if not good:
            report.skip("no_reference_with_words", image_id)
            continue
        keep.image_ids.append(image_id)
        keep.rows.append(images.rows[k])
        keep.captions.append(good)
        keep_rows.append(k)
    keep.emb = images.emb[np.asarray(keep_rows, dtype=np.int64)]
    return keep


def nearest_neighbour_captions(train: ImageSet, test: ImageSet) -> tuple[list[str], list[str]]:
    """First caption and id of the most similar (cosine) training image for each test image."""
    import faiss

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.array(x, dtype=np.float32, copy=True)
        faiss.normalize_L2(x)
        return x

    index = faiss.IndexFlatIP(train.emb.shape[1])
    index.add(unit(train.emb))
    _, nbr = index.search(unit(test.emb), 1)
    nbr = nbr[:, 0]
    return [train.captions[j][0] for j in nbr], [train.image_ids[j] for j in nbr]


def score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4, CIDEr-D and the number of captions under 4 words (BLEU-4 scores them 0)."""
    hyps = [tokenize(p) for p in predictions]
    refs = [[tokenize(r) for r in rs] for rs in references]
    out = corpus_bleu_1to4(refs, hyps)
    out["cider"] = cider_d(refs, hyps)[0]
    out = {k: round(float(v), 6) for k, v in out.items()}
    out["n_pred_under4"] = sum(len(h) < 4 for h in hyps)
    return out


@dataclass
class SceneTruth:
    """The scenes of the scored images, or why there are none (grounding is then absent)."""

    scenes: list[Scene | None]  # one per image of the scored set (None: no scene)
    references: list[list[str]]
    vocab: Vocabulary | None = None
    source: str | None = None
    absent: str | None = None  # why grounding is not scored

    @classmethod
    def load(cls, path: Path | None, images: ImageSet, report: Report) -> SceneTruth:
        """Scenes of `images` from `path` (scenes.json); none if no path or no such file."""
        refs = images.captions
        if path is None:
            return cls([], refs, absent="no scene truth given (--scenes)")
        path = Path(path)
        if not path.is_file():
            return cls([], refs, source=str(path), absent=f"{path} does not exist (only "
                       "the sample world has scene truth; real Flickr30k has none)")  # fmt: skip
        by_id = load_scenes(path)
        scenes = [by_id.get(i) for i in images.image_ids]
        for image_id, scene in zip(images.image_ids, scenes):
            if scene is None:
                report.note("no_scene_for_grounding", image_id)
        if not any(scenes):
            return cls([], refs, source=str(path),
                       absent=f"no scored image has a scene in {path}")  # fmt: skip
        return cls(scenes, refs, vocabulary(by_id), str(path))

    def _score(self, captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, Any]:
        assert self.vocab is not None
        return grounding(captions, scenes, self.vocab)

    def _kept(self) -> list[int]:
        """Indices of the scored images that have a scene."""
        return [k for k, sc in enumerate(self.scenes) if sc is not None]

    def _pairs(self, captions: Sequence[str]) -> tuple[list[str], list[Scene]]:
        keep = self._kept()
        return [captions[k] for k in keep], [self.scenes[k] for k in keep]

    def score(self, predictions: Sequence[str]) -> dict[str, Any]:
        """`ground_p`, `ground_r` and the breakdown (`grounding`) of one system; {} if absent."""
        if self.absent:
            return {}
        g = self._score(*self._pairs(predictions))
        return {"ground_p": g.pop("ground_p"), "ground_r": g.pop("ground_r"), "grounding": g}

    def count_rows(self, predictions: Sequence[str]) -> tuple[list[str], np.ndarray] | None:
        """(count names, (n, k) per-image grounding counts; zeros for an image without a
        scene) of one system's captions, for the bootstrap; None if grounding is absent."""
        if self.absent:
            return None
        assert self.vocab is not None
        keep = self._kept()
        rows = counts(*self._pairs(predictions), self.vocab)
        keys = list(rows[0])
        out = np.zeros((len(self.scenes), len(keys)))
        out[keep] = [[r[k] for k in keys] for r in rows]
        return keys, out

    def summary(self) -> dict[str, Any]:
        """For the detail file: the source, the image count, the references' own scores
        (upper bound) and those of the next image's references (chance); or why absent."""
        if self.absent:
            return {"scored": False, "why": self.absent}
        keep = self._kept()
        refs = [(r, self.scenes[k]) for k in keep for r in self.references[k]]
        nxt = [(r, self.scenes[k]) for j, k in enumerate(keep)
               for r in self.references[keep[(j + 1) % len(keep)]]]  # fmt: skip
        return {
            "scored": True,
            "scenes": self.source,
            "n_images": len(keep),
            "n_images_without_scene": len(self.scenes) - len(keep),
            "references": self._score([r for r, _ in refs], [sc for _, sc in refs]),
            "shuffled_references": self._score([r for r, _ in nxt], [sc for _, sc in nxt]),
        }


def _form_inputs(truth: SceneTruth) -> tuple[Any, list[int | None] | None]:
    """The grammar and each scored image's object count (None without a scene): only the
    sample world has them (both None where `truth` is absent)."""
    if truth.absent:
        return None, None
    return parses, [None if sc is None else len(sc.objects) for sc in truth.scenes]


def form_scores(
    predictions: Sequence[str], truth: SceneTruth, rule_off: Sequence[str] | None = None
) -> dict[str, Any]:
    """`wellformed` (the sample world only) and `repeat4` of one system's captions and the
    rest of their form (`form`, `pipeline.metrics.form`), with `repeat4_rule_off`: the
    share of `rule_off` (the same images decoded without the repetition rule) that repeat
    a 4-gram, where given."""
    out = form(predictions, *_form_inputs(truth))
    if rule_off is not None:
        out["repeat4_rule_off"] = form(rule_off)["repeat4"]
    head = {k: out.pop(k) for k in ("wellformed", "repeat4") if k in out}
    return {**head, "form": out}


def form_summary(truth: SceneTruth) -> dict[str, Any]:
    """For the detail file: the form of the references themselves (every reference of every
    scored image) and whether the grammar and the counts were scored, or why not."""
    grammar, n_objects = _form_inputs(truth)
    refs = [r for rs in truth.references for r in rs]
    per_ref = None
    if n_objects is not None:
        per_ref = [k for rs, k in zip(truth.references, n_objects) for _ in rs]
    if truth.absent:
        scored = {"scored": False, "why": f"grammar and counts: {truth.absent}"}
    else:
        scored = {"scored": True, "grammar": "pipeline.synth.grammar (the sentences synth "
                  "writes as Flickr30k references)", "scenes": truth.source}  # fmt: skip
    return {**scored, "references": form(refs, grammar, per_ref)}


def comparisons(systems: Sequence[str]) -> list[tuple[str, str]]:
    """The paired differences that matter: each later model - the first (ada - noada),
    each model - the nearest-neighbour baseline."""
    models = [m for m in systems if m != BASELINE]
    return [(m, models[0]) for m in models[1:]] + [(m, BASELINE) for m in models]


def intervals(
    predictions: dict[str, Sequence[str]], references: Sequence[Sequence[str]],
    truth: SceneTruth, resamples: int, level: float, seed: int,
    per_image: dict[str, dict[str, np.ndarray]] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    """Bootstrap intervals over the images (`pipeline.metrics.bootstrap`: corpus BLEU-1..4
    and CIDEr-D recomputed on each resample; grounding where scored: `ground_p`,
    `ground_r` and each kind's precision and recall, `colours_p` ... `relations_r`) of
    every system and of each `comparisons` difference: {system or "a-b": {metric: {value,
    lo, hi}}}. `per_image` adds means of per-image scores ({name: {metric: (n,) values}},
    NaN: not scored), e.g. CLIPScore; a name that is not a system (the references) gets
    intervals but no differences. `pairs` replaces the `comparisons` differences."""
    refs = [[tokenize(r) for r in rs] for rs in references]
    by_metric: dict[str, dict[str, Metric]] = {}
    for name, preds in predictions.items():
        hyps = [tokenize(p) for p in preds]
        stats = bleu_stats(refs, hyps)
        for k in range(1, 5):
            by_metric.setdefault(f"bleu{k}", {})[name] = bleu_metric(stats, k)
        by_metric.setdefault("cider", {})[name] = CiderBootstrap(refs, hyps)
        rows = truth.count_rows(preds)
        if rows is not None:
            for metric, parts in (headline_parts(rows[0]) | kind_parts(rows[0])).items():
                by_metric.setdefault(metric, {})[name] = ratio_metric(rows[1], parts)
    for name, scores in (per_image or {}).items():
        for metric, values in scores.items():
            scored = ~np.isnan(values)
            if scored.any():
                mask = None if scored.all() else scored
                by_metric.setdefault(metric, {})[name] = mean_metric(values, mask)
    pairs = comparisons(list(predictions)) if pairs is None else pairs
    out: dict[str, dict[str, dict[str, float]]] = {}
    for metric, systems in by_metric.items():
        summary = summarise(systems, len(refs), resamples, level, seed, pairs)
        for name, value in summary.items():
            out.setdefault(name, {})[metric] = value
    return out


def write_predictions(
    path: Path, test: ImageSet, predictions: Sequence[str], neighbours: Sequence[str] | None = None,
    rule_off: Sequence[str] | None = None,
) -> None:  # fmt: skip
    """One JSON line per image: image_id, prediction, references (+ the baseline's neighbour;
    + `prediction_rule_off`, the caption decoded without the repetition rule)."""
    lines = []
    for k, (image_id, pred, refs) in enumerate(zip(test.image_ids, predictions, test.captions)):
        rec: dict[str, Any] = {"image_id": image_id, "prediction": pred, "references": refs}
        if neighbours is not None:
            rec["neighbour_id"] = neighbours[k]
        if rule_off is not None:
            rec["prediction_rule_off"] = rule_off[k]
        lines.append(json.dumps(rec, ensure_ascii=False))
    write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def system_names(models: Sequence[Path]) -> dict[str, Path]:
    """Each caption model folder under its folder name; a clash is a `UserError`."""
    systems: dict[str, Path] = {}
    for folder in map(Path, models):
        name = folder.name
        if name in (BASELINE, "nn_baseline", REFERENCES):  # the baseline's names, the refs'
            raise UserError(f"model folder name '{name}' is reserved: {folder}")
        if name in systems:
            raise UserError(f"two caption models named '{name}': {systems[name]} and {folder}")
        systems[name] = folder
    if not systems:
        raise UserError("no caption model given (--model FOLDER, once per variant)")
    return systems


def load_tokenizer(clip: str):
    """The tokenizer of CLIP checkpoint `clip` (a folder or a hub id)."""
    from transformers import AutoTokenizer

    local = Path(clip).expanduser()
    if not local.is_dir() and (clip.startswith((".", "/", "~")) or clip.count("/") > 1):
        raise UserError(f"CLIP folder not found: {clip}")
    try:
        return AutoTokenizer.from_pretrained(str(local) if local.is_dir() else clip)
    except OSError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot load the tokenizer of '{clip}': {msg}") from None


class TextEncoder:
    """The text encoder of CLIP `clip` (`pipeline.clip.backbone`): texts -> (n, d) numpy,
    a `pipeline.metrics.clipscore.Encoder`. A CLIP whose embeddings are not `dim`-d (the
    image embeddings') is a `UserError`."""

    def __init__(self, clip: str, dim: int, device: str = "auto"):
        from pipeline.clip.backbone import load_backbone

        self.backbone = load_backbone(clip, device)
        self.context_length = self.backbone.context_length
        if self.backbone.dim != dim:
            raise UserError(f"CLIP {clip} gives {self.backbone.dim}-d text embeddings; the "
                            f"image embeddings are {dim}-d (not made with this CLIP)")  # fmt: skip

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.backbone.encode_texts(list(texts)).float().cpu().numpy()

    def count_truncated(self, texts: Sequence[str]) -> int:
        """How many of `texts` are longer than the CLIP's context (cut when encoded)."""
        n = self.context_length
        ids = self.backbone.tokenizer(list(texts), truncation=True, max_length=n + 1)
        return sum(len(x) > n for x in ids["input_ids"])


def check_clip(clip: str, manifest: dict[str, Any], emb: Path) -> None:
    """`clip` must be the CLIP the embeddings in `emb` were made with: for a folder, the
    same weights as the manifest's `sha256:` revision; for a hub id, the manifest's name.
    (A folder against a hub-made manifest, or a manifest without either, is not checked.)"""
    from pipeline.clip.backbone import weights_sha256

    want, named = str(manifest.get("revision") or ""), manifest.get("model")
    if Path(clip).expanduser().is_dir():
        have = weights_sha256(Path(clip).expanduser())
        if want.startswith("sha256:") and have != want:
            raise UserError(
                f"CLIP {clip} ({have}) is not the one the embeddings in {emb} were made "
                f"with ({named}, {want})"
            )
    elif named and clip != named:
        raise UserError(f"CLIP {clip} is not the one the embeddings in {emb} name ({named})")
