"""Stage `evaluate_caption`: caption the Flickr30k test images with each trained decoder
variant and a nearest-neighbour baseline; score them with BLEU-1..4 and CIDEr-D.

Inputs: the `embed` output for Flickr30k (`data/emb/flickr30k/`, one row per caption with
`image_id`, `split`, `image_emb`, `caption`) and `models/caption/<variant>/`.
One prediction per test image, from the image embedding of the image's first row; its
references are all captions of that image. The baseline (`nn_baseline`) answers with the
first caption (first row in the embedding files) of the training image whose CLIP image
embedding is closest by cosine (faiss `IndexFlatIP` on L2-normalised vectors).

Outputs: `metrics/caption.json` ({variant: {bleu1..bleu4, cider, ...}, "settings": {...}}),
`<pred_dir>/caption_<variant>.jsonl` (image_id, prediction, references) for every variant
and the baseline, and `<pred_dir>/caption_report.json`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import write_json, write_text
from pipeline.errors import UserError
from pipeline.metrics import (
    BLEU_DETAIL,
    BLEU_SETTINGS,
    CIDER_DETAIL,
    CIDER_SETTINGS,
    TOKENIZATION,
    TOKENIZATION_DETAIL,
    cider_d,
    corpus_bleu_1to4,
    tokenize,
)
from pipeline.params import typed
from pipeline.readers import read_json
from pipeline.report import Report

BASELINE = "nn_baseline"
DEFAULTS: dict[str, Any] = {
    "variants": ["noada", "ada"],
    "beam_size": 3,
    "max_len": 30,
    "batch_size": 64,
    "split": "test",
    "baseline_split": "train",
}
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
    emb: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.image_ids)


def load_images(table, split: str) -> ImageSet:
    """Group the rows of `split` by image_id (file order); embedding of each image's first row."""
    from pipeline.embfile import vectors

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


def load_tokenizer(model: str):
    """The tokenizer of the CLIP checkpoint the embeddings were made with (folder or hub id)."""
    from transformers import AutoTokenizer

    if not model:
        raise UserError("the embeddings' manifest.json names no CLIP 'model' (needed to decode)")
    local = Path(model).expanduser()
    if not local.is_dir() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise UserError(f"CLIP folder named in the embeddings' manifest not found: {model}")
    try:
        return AutoTokenizer.from_pretrained(str(local) if local.is_dir() else model)
    except OSError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot load the tokenizer of '{model}': {msg}") from None


def ids_to_text(tokenizer, ids: Sequence[int]) -> str:
    """Decode generated ids: drop a leading BOS, cut at the first EOS, skip special tokens."""
    ids = [int(i) for i in ids]
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())


def caption_with_model(
    folder: Path,
    emb: np.ndarray,
    tokenizer,
    beam_size: int,
    max_len: int,
    batch_size: int,
    label: str = "",
) -> list[str]:
    """Captions for the rows of `emb` from the decoder saved in `folder`."""
    import torch
    from tqdm import tqdm

    from pipeline.decode import generate, load_caption_model

    model = load_caption_model(folder)
    texts: list[str] = []
    starts = range(0, len(emb), batch_size)
    for start in tqdm(starts, desc=f"caption {label}", disable=not sys.stderr.isatty()):
        batch = torch.from_numpy(emb[start : start + batch_size])
        with torch.no_grad():
            out = generate(model, batch, beam_size, max_len)
        texts.extend(ids_to_text(tokenizer, ids) for ids in out)
    return texts


def score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4, CIDEr-D and a few shape statistics of one system's captions."""
    hyps = [tokenize(p) for p in predictions]
    refs = [[tokenize(r) for r in rs] for rs in references]
    out = corpus_bleu_1to4(refs, hyps)
    out["cider"] = cider_d(refs, hyps)[0]
    out = {k: round(float(v), 6) for k, v in out.items()}
    out["mean_len"] = round(float(np.mean([len(h) for h in hyps])), 3)
    out["n_distinct"] = len({" ".join(h) for h in hyps})
    out["n_pred_under4"] = sum(len(h) < 4 for h in hyps)
    return out


def write_predictions(
    path: Path, test: ImageSet, predictions: Sequence[str], neighbours: Sequence[str] | None = None
) -> None:
    lines = []
    for k, (image_id, pred, refs) in enumerate(zip(test.image_ids, predictions, test.captions)):
        rec: dict[str, Any] = {"image_id": image_id, "prediction": pred, "references": refs}
        if neighbours is not None:
            rec["neighbour_id"] = neighbours[k]
        lines.append(json.dumps(rec, ensure_ascii=False))
    write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def _drop_empty_references(test: ImageSet, report: Report) -> ImageSet:
    """References with no word after tokenisation are dropped; images left without any too."""
    keep = ImageSet()
    keep_rows = []
    for k, (image_id, caps) in enumerate(zip(test.image_ids, test.captions)):
        good = [c for c in caps if tokenize(c)]
        if len(good) < len(caps):
            report.note("empty_reference", image_id, n=len(caps) - len(good))
        if not good:
            report.skip("no_reference_with_words", image_id)
            continue
        keep.image_ids.append(image_id)
        keep.rows.append(test.rows[k])
        keep.captions.append(good)
        keep_rows.append(k)
    keep.emb = test.emb[np.asarray(keep_rows, dtype=np.int64)]
    return keep


PATH_KEYS = {"emb", "models", "out", "pred_dir", "seed"}  # read by the CLI / shared


def _check_params(p: dict[str, Any]) -> dict[str, Any]:
    unknown = set(p) - set(DEFAULTS) - PATH_KEYS
    if unknown:
        raise UserError(f"unknown evaluate_caption params: {sorted(unknown)}")
    p = {**DEFAULTS, **{k: v for k, v in p.items() if v is not None}}
    p = typed(p, DEFAULTS, "evaluate_caption")
    for key in ("beam_size", "max_len", "batch_size"):
        if not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] < 1:
            raise UserError(f"evaluate_caption.{key} must be a positive integer, got {p[key]!r}")
    variants = p["variants"]
    if isinstance(variants, str):
        variants = [v for v in variants.split(",") if v]
    if not isinstance(variants, list) or not all(isinstance(v, str) and v for v in variants):
        raise UserError(f"evaluate_caption.variants must be a list of names, got {variants!r}")
    if BASELINE in variants:
        raise UserError(f"'{BASELINE}' is reserved for the nearest-neighbour baseline")
    p["variants"] = variants
    return p


def run(
    emb: str | Path,
    models: str | Path,
    out: str | Path,
    pred_dir: str | Path,
    params: dict[str, Any],
    captioner: Callable[..., list[str]] = caption_with_model,
) -> Report:
    """Evaluate every variant in `models/<variant>/` and the baseline; write metrics + predictions.

    `captioner(folder, emb, tokenizer, beam_size, max_len, batch_size, label)` makes the
    captions (the default loads the decoder and runs `pipeline.decode.generate`).
    """
    from pipeline.embfile import read_dataset

    p = _check_params(params)
    emb, models, out, pred_dir = Path(emb), Path(models), Path(out), Path(pred_dir)
    if not emb.is_dir():
        raise UserError(f"embeddings folder not found: {emb}")
    manifest_path = emb / "manifest.json"
    if not manifest_path.exists():
        raise UserError(f"{manifest_path} not found (run `clipda embed` first)")
    manifest = read_json(manifest_path)
    folders = {v: models / v for v in p["variants"]}
    for variant, folder in folders.items():
        if not (folder / "config.json").exists():
            raise UserError(
                f"caption model '{variant}' not found: {folder}/config.json "
                "(run `clipda train-caption` first)"
            )

    report = Report("evaluate_caption")
    table = read_dataset(emb)
    test = load_images(table, p["split"])
    report.read = sum(len(c) for c in test.captions)
    if not len(test):
        raise UserError(f"no '{p['split']}' rows in {emb}")
    test = _drop_empty_references(test, report)
    if not len(test):
        raise UserError(f"no '{p['split']}' image in {emb} has a reference with words")
    train = load_images(table, p["baseline_split"])
    if not len(train):
        raise UserError(
            f"no '{p['baseline_split']}' rows in {emb} for the nearest-neighbour baseline"
        )

    tokenizer = load_tokenizer(str(manifest.get("model", "")))
    metrics: dict[str, Any] = {}
    for variant, folder in folders.items():
        preds = captioner(
            folder, test.emb, tokenizer, p["beam_size"], p["max_len"], p["batch_size"], variant
        )
        if len(preds) != len(test):
            raise RuntimeError(f"{variant}: {len(preds)} captions for {len(test)} images")
        metrics[variant] = score(preds, test.captions)
        write_predictions(pred_dir / f"caption_{variant}.jsonl", test, preds)
    preds, neighbours = nearest_neighbour_captions(train, test)
    metrics[BASELINE] = score(preds, test.captions)
    write_predictions(pred_dir / f"caption_{BASELINE}.jsonl", test, preds, neighbours)

    n_refs = sum(len(c) for c in test.captions)
    # short values only: `dvc metrics show` prints every key as a column
    metrics["settings"] = {
        "split": p["split"],
        "n_images": len(test),
        "n_references": n_refs,
        "tokenization": TOKENIZATION,
        **BLEU_SETTINGS,
        **CIDER_SETTINGS,
        "beam_size": p["beam_size"],
        "max_len": p["max_len"],
        "baseline": f"nn-{p['baseline_split']}-first-caption",
        "baseline_n_images": len(train),
        **PAPER_BLEU,
    }
    write_json(out, metrics)
    report.written = len(test)
    report.extra["systems"] = {k: v for k, v in metrics.items() if k != "settings"}
    report.extra["method"] = {
        "tokenization": TOKENIZATION_DETAIL,
        **BLEU_DETAIL,
        **CIDER_DETAIL,
        "image_emb": "image embedding of the first row of each image_id",
        "references": "all captions of the image with at least one word after tokenisation",
        "baseline": f"first caption (first row in the files) of the nearest "
        f"'{p['baseline_split']}' image by cosine of CLIP image embeddings "
        "(faiss IndexFlatIP on L2-normalised vectors)",
        "clip_model": str(manifest.get("model", "")),
        "paper_note": PAPER_NOTE,
    }
    report.save(pred_dir / "caption_report.json")
    return report


def summary(report: Report) -> str:
    """One line: BLEU-4 and CIDEr per system."""
    parts = [
        f"{k}: bleu4={v['bleu4']:.4f} cider={v['cider']:.4f}"
        for k, v in report.extra.get("systems", {}).items()
    ]
    return f"{report.summary()}; " + "; ".join(parts)
