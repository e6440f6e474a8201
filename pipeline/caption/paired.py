"""Paired differences between the captions of two runs on the same test images.

`evaluate_caption` pairs the systems of one run (ada - noada). Arms that differ in a
setting both variants read (the domain token, the text arm) live in different runs, so
comparing them needs the pairing across runs: the two predictions files must caption the
same images against the same references (same world, same split), and the difference
`b - a` is taken on the same bootstrap resamples (`pipeline.metrics.bootstrap`).

A side is a predictions JSONL file (`data/eval/caption_<system>.jsonl`) or `REV:PATH`,
that file at a git revision or DVC experiment (read from the DVC cache with `dvc.api`).

Labels (`--label arm=token --label seed=0`) travel in the result, so that a folder of
results summarises over seeds like experiments do (`clipda seeds --diffs`, `diff_rows`):
the labels are the params, the metrics `diff.a.<m>`, `diff.b.<m>` and `diff.b-a.<m>`, and
each seed's interval of b - a is counted above / below 0.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.caption.evaluation import ImageSet, SceneTruth, intervals
from pipeline.compare import resolve
from pipeline.errors import UserError
from pipeline.experiments import key_value
from pipeline.report import Report

METRICS = ("bleu4", "cider", "ground_p", "ground_r")  # printed; the JSON keeps all


def read_text(spec: str, repo: Path) -> str:
    """The text of a file, or of `REV:PATH` (a DVC-tracked or git file at that revision)."""
    if Path(spec).is_file():
        try:
            return Path(spec).read_text()
        except UnicodeDecodeError:
            raise UserError(f"{spec}: not a text file") from None
    if ":" not in spec or Path(spec).exists():
        raise UserError(f"{spec}: no such file")
    rev, path = spec.split(":", 1)
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        sha = resolve(repo, rev)
    except UserError:
        raise UserError(f"{spec}: no such file, and {rev!r} is not a git revision or DVC "
                        "experiment") from None  # fmt: skip
    try:
        return dvc.api.read(path, repo=str(repo), rev=sha)
    except (DvcException, OSError, UnicodeDecodeError) as exc:  # not there, not cached, ...
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
    if spec is None or Path(spec).is_file():
        return SceneTruth.load(spec and Path(spec), images, Report("caption-diff"))
    with tempfile.TemporaryDirectory() as tmp:  # REV:PATH
        path = Path(tmp) / "scenes.json"
        path.write_text(read_text(spec, repo))
        return SceneTruth.load(path, images, Report("caption-diff"))


def paired(
    a: str, b: str, resamples: int, level: float, seed: int, scenes: str | None = None,
    repo: Path = Path("."),
) -> dict[str, Any]:  # fmt: skip
    """{"a", "b", "n", "resamples", "level", "seed", "grounding" ("scored" or why not),
    "scores": {"a"|"b"|"b-a": {metric: {value, lo, hi}}}}: BLEU-1..4, CIDEr-D (and
    grounding with `scenes`) of both sides and of b - a on the same resamples."""
    if resamples < 1:
        raise UserError("bootstrap.resamples is 0: a paired difference needs resamples")
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


def parse_labels(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` items as {KEY: VALUE} (`key_value`: 0.01, true, token), scalars only."""
    out = {}
    for item in items:
        key, value = key_value(item, "--label")
        raw = item.partition("=")[2]
        if isinstance(value, list | dict) or (value is None and raw.strip() not in ("", "null")):
            raise UserError(f"--label {item!r}: VALUE must be one number, word or boolean")
        out[key] = value
    return out


def diff_rows(folder: Path) -> list[dict[str, Any]]:
    """Each result JSON in `folder` as `clipda seeds` takes an experiment: {name, params
    (its labels, `seed` among them), metrics, intervals (b - a's)}."""
    files = sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []
    if not files:
        raise UserError(f"--diffs {folder}: no caption-diff results (*.json) there")
    rows = []
    for f in files:
        try:
            res = json.loads(f.read_text())
            labels, scores = res["labels"], res["scores"]
            metrics = {f"diff.{side}.{m}": v["value"] for side in ("a", "b", "b-a")
                       for m, v in scores[side].items()}  # fmt: skip
            ivs = {f"diff.b-a.{m}": (v["lo"], v["hi"]) for m, v in scores["b-a"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{f}: not a caption-diff result with labels") from None
        if "seed" not in labels:
            raise UserError(f"{f}: no seed label (caption-diff --label seed=N)")
        rows.append({"name": f.stem, "params": labels, "metrics": metrics, "intervals": ivs})
    return rows


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
