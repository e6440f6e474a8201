"""Paired differences between the captions of two runs on the same test images.

`evaluate_caption` pairs the systems of one run (ada - noada). Arms that differ in a
setting both variants read (the domain token, the text arm) live in different runs, so
comparing them needs the pairing across runs: the two predictions files must caption the
same images against the same references (same world, same split), and the difference
`b - a` is taken on the same bootstrap resamples (`pipeline.metrics.bootstrap`).

A side is a predictions JSONL file (`data/eval/caption_<system>.jsonl`) or `REV:PATH`,
that file at a git revision or DVC experiment (read from the DVC cache with `dvc.api`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline.caption.evaluation import ImageSet, SceneTruth, intervals
from pipeline.compare import resolve
from pipeline.errors import UserError
from pipeline.report import Report

METRICS = ("bleu4", "cider", "ground_p", "ground_r")  # printed; the JSON keeps all


def read_text(spec: str, repo: Path) -> str:
    """The text of a file, or of `REV:PATH` (a DVC-tracked or git file at that revision)."""
    if Path(spec).is_file() or ":" not in spec:
        return Path(spec).read_text()
    rev, path = spec.split(":", 1)
    import dvc.api
    from dvc.exceptions import DvcException

    sha = resolve(repo, rev)
    try:
        return dvc.api.read(path, repo=str(repo), rev=sha)
    except (DvcException, OSError) as exc:  # not at that revision, not in the cache, ...
        raise UserError(f"{spec}: cannot read {path} at {rev} ({type(exc).__name__})") from None


def read_predictions(spec: str, repo: Path) -> tuple[list[str], list[str], list[list[str]]]:
    """(image ids, predictions, references) of a predictions JSONL."""
    ids, preds, refs = [], [], []
    for n, line in enumerate(read_text(spec, repo).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ids.append(str(rec["image_id"]))
            preds.append(rec["prediction"])
            refs.append(list(rec["references"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{spec}: line {n} is not a predictions record "
                            "(image_id, prediction, references)") from None  # fmt: skip
    if not ids:
        raise UserError(f"{spec}: no predictions")
    return ids, preds, refs


def scene_truth(spec: str | None, images: ImageSet, repo: Path) -> SceneTruth:
    if spec is None:
        return SceneTruth.load(None, images, Report("caption-diff"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scenes.json"
        path.write_text(read_text(spec, repo))
        return SceneTruth.load(path, images, Report("caption-diff"))


def paired(
    a: str, b: str, resamples: int, level: float, seed: int, scenes: str | None = None,
    repo: Path = Path("."),
) -> dict[str, Any]:  # fmt: skip
    """{"a", "b", "n", "scores": {"a"|"b"|"b-a": {metric: {value, lo, hi}}}}: BLEU-1..4,
    CIDEr-D (and grounding with `scenes`) of both sides and of b - a on the same resamples."""
    ids_a, preds_a, refs_a = read_predictions(a, repo)
    ids_b, preds_b, refs_b = read_predictions(b, repo)
    if ids_a != ids_b:
        raise UserError(f"{a} and {b} caption different images: not the same world and split")
    if refs_a != refs_b:
        raise UserError(f"{a} and {b} have different references: not the same world")
    images = ImageSet(image_ids=ids_a, captions=refs_a)
    truth = scene_truth(scenes, images, repo)
    ci = intervals(
        {"a": preds_a, "b": preds_b}, refs_a, truth, resamples, level, seed, pairs=[("b", "a")]
    )
    return {"a": a, "b": b, "n": len(ids_a), "resamples": resamples, "level": level,
            "seed": seed, "grounding": truth.absent or "scored",
            "scores": {"a": ci["a"], "b": ci["b"], "b-a": ci["b-a"]}}  # fmt: skip


def render(result: dict[str, Any]) -> str:
    s = result["scores"]
    lines = [f"a = {result['a']}", f"b = {result['b']}",
             (f"{result['n']} images, {result['resamples']} resamples, "
              f"{result['level']:.0%} intervals"),
             f"{'metric':10} {'a':>8} {'b':>8} {'b - a':>8}  interval"]  # fmt: skip
    for m in METRICS:
        if m in s["b-a"]:
            d = s["b-a"][m]
            lines.append(f"{m:10} {s['a'][m]['value']:8.4f} {s['b'][m]['value']:8.4f} "
                         f"{d['value']:+8.4f}  [{d['lo']:+.4f}, {d['hi']:+.4f}]")  # fmt: skip
    return "\n".join(lines)
