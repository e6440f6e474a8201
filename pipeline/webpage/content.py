"""What the report shows, read from the pipeline's outputs: metric tables with their
intervals, the training curves, and galleries of test images with captions and answers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.webpage.charts import line_chart
from pipeline.webpage.thumbs import thumbnail

CAPTION_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "clipscore", "refclipscore",
                   "ground_p", "ground_r")  # fmt: skip
FORM_COLUMNS = {  # caption form metric (caption_detail.json) -> column head
    "wellformed": "well-formed",
    "repeat4": "repeats a 4-gram",
    "repeat4_rule_off": "... rule off",
    "n_distinct": "distinct",
    "mean_len": "mean words",
    "count_right": "count right",
}
VQA_METHODS = {"head": "model", "zeroshot": "zeroshot", "prior": "prior", "majority": "majority"}
CURVES = {  # plot file stem -> (x column, y columns, title)
    "caption_noada": ("epoch", ("caption_loss", "source_loss", "val_loss"), "caption, noada"),
    "caption_ada": ("epoch", ("caption_loss", "source_loss", "val_loss"), "caption, ada"),
    "vqa": ("epoch", ("train_loss", "val_loss", "val_top1"), "VQA head"),
    "clip": ("epoch", ("heldout_i2t_r1", "heldout_t2i_r1"), "CLIP held-out recall@1"),
}


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def cell(entry: dict[str, Any] | None) -> dict[str, Any]:
    """{value, lo, hi} (or a bare number) as the template shows it."""
    if entry is None:
        return {"text": "–", "ci": ""}
    if not isinstance(entry, dict):
        return {"text": f"{entry:.3f}", "ci": ""}
    return {"text": f"{entry['value']:.3f}", "ci": f"[{entry['lo']:.3f}, {entry['hi']:.3f}]",
            "excludes_zero": entry["lo"] > 0 or entry["hi"] < 0}  # fmt: skip


def clip_rows(detail: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not detail or not detail.get("probes"):
        return []
    rows = []
    for group, labels in detail["probes"].items():
        style, kind = group.split("_", 1)
        rows.append({"style": style, "kind": kind, "n": labels["category"]["n_test"],
                     **{f"{label}_{m}": labels[label][m] for label in ("category", "colour")
                        for m in ("zeroshot", "linear", "chance")}})  # fmt: skip
    return rows


def scene_rows(detail: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per style x label set of the scene probes (recall@k, chance, P / R)."""
    rows = []
    for group, sets in ((detail or {}).get("scene_probes") or {}).items():
        for name, r in sets.items():
            rows.append({**r, "style": group.split("_", 1)[0], "set": name})
    return rows


def _form(entry: dict[str, Any], n_images: int | None) -> dict[str, Any]:
    """A system's form metrics: the headline ones and the `form` breakdown (older detail
    files: `n_distinct` and `mean_len` beside the scores)."""
    out = {"n_captions": n_images, **{k: entry[k] for k in FORM_COLUMNS if k in entry}}
    return out | entry.get("form", {})


def form_text(key: str, form: dict[str, Any]) -> str:
    """One form cell: shares as percentages, distinct as n/N, count right with its n."""
    value = form.get(key)
    if value is None:
        return "–"
    if key == "n_distinct":
        return f"{value}/{form.get('n_captions', '?')}"
    if key == "mean_len":
        return f"{value:.1f}"
    if key == "count_right":
        stated = form.get("count_stated", "?")
        return "none stated" if stated == 0 else f"{value:.1%} of {stated}"
    return f"{value:.1%}"


def caption_tables(detail: dict[str, Any] | None) -> dict[str, Any]:
    if not detail:
        return {"systems": [], "diffs": [], "metrics": []}
    ci = detail.get("intervals", {})
    systems = [k for k in detail if isinstance(detail[k], dict) and "bleu4" in detail[k]]
    metrics = [m for m in CAPTION_METRICS if all(m in detail[s] for s in systems)]
    n_images = detail.get("settings", {}).get("n_images")
    forms = {s: _form(detail[s], n_images) for s in systems}
    refs = (detail.get("form") or {}).get("references")  # their form; scores where measured
    bare_scores = {s: detail[s] for s in systems}
    bare_scores["references"] = (detail.get("clipscore") or {}).get("references") or {}
    form_keys = [k for k in FORM_COLUMNS if any(k in f for f in [*forms.values(), refs or {}])]

    def row(name: str, form: dict[str, Any]) -> dict[str, Any]:
        with_ci, bare = ci.get(name, {}), bare_scores.get(name, {})
        return {"name": name, "cells": [cell(with_ci.get(m) or bare.get(m)) for m in metrics],
                "form": [form_text(k, form) for k in form_keys]}  # fmt: skip

    rows = [row(s, f) for s, f in forms.items()]
    ref_row = row("references", refs or {}) if refs or bare_scores["references"] else None
    diffs = [{"name": k, "cells": [cell(v.get(m)) for m in metrics]}
             for k, v in ci.items() if "-" in k]  # fmt: skip
    return {"systems": rows, "diffs": diffs, "metrics": metrics, "n_images": n_images,
            "references": ref_row, "clipscore": "clipscore" in metrics,
            "form_heads": [FORM_COLUMNS[k] for k in form_keys],
            "method": detail.get("method", {}).get("intervals", ""),
            "gap": gap_rows(detail.get("domain_gap") or {})}  # fmt: skip


def gap_rows(gap: dict[str, Any]) -> list[dict[str, str]]:
    """The domain-gap table: what was compared, d_A [interval], ε (empty if not measured)."""
    if not gap.get("measured"):
        return []
    named = [("CLIP image embeddings", gap["image"]), ("CLIP caption text embeddings", gap["text"])]
    named += [(f"{k} decoder's image prefix", v) for k, v in gap.get("prefix", {}).items()]
    return [{"what": what, "d": f"{g['a_distance']:.3f}",
             "ci": "[{:.3f}, {:.3f}]".format(*g["a_distance_ci"]), "error": f"{g['error']:.3f}",
             "centroid": f"{g['centroid_gap']:.3f}" if "centroid_gap" in g else "–",
             "n": str(g["n_test"])} for what, g in named]  # fmt: skip


def vqa_tables(detail: dict[str, Any] | None) -> dict[str, Any]:
    if not detail:
        return {"groups": [], "methods": [], "diffs": []}
    ci = detail.get("intervals", {})
    groups = [g for g in detail if isinstance(detail[g], dict) and "n" in detail[g]]
    methods = [m for m, key in VQA_METHODS.items() if f"{key}_top1" in detail.get("overall", {})]
    rows = []
    for g in groups:
        cells = [cell(ci.get(g, {}).get(m) or detail[g].get(f"{VQA_METHODS[m]}_top1"))
                 for m in methods]  # fmt: skip
        rows.append({"name": g, "n": detail[g]["n"], "cells": cells})
    diff_names = [f"head-{m}" for m in methods if m != "head"]
    diffs = [{"name": g, "cells": [cell(ci.get(g, {}).get(d)) for d in diff_names]}
             for g in groups if g in ci]  # fmt: skip
    return {"groups": rows, "methods": methods, "diff_names": diff_names, "diffs": diffs,
            "method": detail.get("settings", {}).get("intervals", "")}  # fmt: skip


def curves(plots: Path) -> list[str]:
    """One SVG per known plot TSV that exists."""
    out = []
    for stem, (x, ys, title) in CURVES.items():
        path = plots / f"{stem}.tsv"
        if not path.is_file():
            continue
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        series = {
            y: [(_num(r.get(x)), _num(r.get(y))) for r in rows] for y in ys if rows and y in rows[0]
        }
        out.append(line_chart(title, series, x))
    return out


SWEEPS = "adaptation_*.json"  # the sweep summaries the report shows (`clipda seeds --out`)


def sweeps(folder: Path | None) -> list[dict[str, Any]]:
    """Each sweep summary in `folder` (one world each) as a table: a row per setting (the
    params that vary), a column per metric, `mean ± std` over its seeds and, for a
    difference whose per-seed intervals were counted, how many lie above / below 0; with
    the SVG of the same stem beside it if there is one."""
    out: list[dict[str, Any]] = []
    for path in sorted(folder.glob(SWEEPS)) if folder and folder.is_dir() else []:
        try:
            out.append(_sweep(path, json.loads(path.read_text())))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{path}: not a `clipda seeds` summary ({err!r})") from None
    return out


def _sweep(path: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """One sweep summary as `sweeps` shows it."""
    groups = summary.get("groups") or []
    varying = [k for k in summary.get("by", [])
               if len({str(g["params"].get(k)) for g in groups}) > 1]  # fmt: skip
    metrics = sorted({m for g in groups for m in g["metrics"]})
    rows = []
    for g in groups:
        cells = []
        for m in metrics:
            st, c = g["metrics"].get(m), (g.get("intervals") or {}).get(m)
            text = f"{st['mean']:.3f} ± {st['std']:.3f}" if st else "–"
            cells.append({"text": text, "ci": f"{c['above']}↑ {c['below']}↓ of {c['n']}"
                          if c else "", "excludes_zero": bool(c and c["above"] >= 2)})  # fmt: skip
        rows.append({"setting": ", ".join(f"{k.rsplit('.', 1)[-1]}={g['params'][k]}"
                                          for k in varying) or "all",
                     "seeds": len(g.get("seeds", [])), "cells": cells})  # fmt: skip
    svg = path.with_suffix(".svg")
    return {"name": path.stem.removeprefix("adaptation_"), "metrics": metrics,
            "rows": rows, "svg": svg.read_text() if svg.is_file() else "",
            "note": summary.get("note", "")}  # fmt: skip


def _num(v: str | None) -> float:
    try:
        return float(v) if v not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def spread(n_items: int, k: int) -> list[int]:
    """k indices spread evenly over n_items (all of them when k >= n_items)."""
    if k >= n_items:
        return list(range(n_items))
    return [round(i * (n_items - 1) / max(1, k - 1)) for i in range(k)]


def caption_gallery(
    predictions: Path, flickr30k: Path, systems: list[str], n: int, size: int
) -> tuple[list[dict[str, Any]], int]:
    """Test images (spread over the split) with references and every system's caption;
    the number of images whose file was not found."""
    by_system = {s: read_jsonl(predictions / f"caption_{'nn_baseline' if s == 'nn' else s}.jsonl")
                 for s in systems}  # fmt: skip
    first = next((rows for rows in by_system.values() if rows), [])
    items, missing = [], 0
    for i in spread(len(first), n):
        image_id = first[i]["image_id"]
        src = thumbnail(flickr30k / "flickr30k_images" / f"{image_id}.jpg", size)
        if src is None:
            src = thumbnail(flickr30k / "flickr30k_images" / str(image_id), size)
        missing += src is None
        captions = [(s, rows[i]["prediction"]) for s, rows in by_system.items() if i < len(rows)]
        items.append({"image_id": image_id, "src": src, "references": first[i]["references"][:3],
                      "captions": captions})  # fmt: skip
    return items, missing


def vqa_gallery(
    predictions: Path, qa: Path, vg: Path, n: int, size: int, split: str = "test"
) -> tuple[list[dict[str, Any]], int]:
    """Questions of the evaluated `split` (spread over each question type) with the box
    drawn, the true answer and each method's first answer, correct ones marked; missing
    image files counted."""
    import pyarrow.parquet as pq

    rows = read_jsonl(predictions)
    if not rows:
        return [], 0
    wanted = {r["qid"] for r in rows}
    meta = {}
    path = qa / f"{split}.parquet"
    if path.is_file():
        cols = ["qid", "image_path", "qtype", "subj_box", "obj_box"]
        for rec in pq.read_table(path, columns=cols).to_pylist():
            if rec["qid"] in wanted:
                meta[rec["qid"]] = rec
    qtypes = sorted({r["qtype"] for r in rows})
    chosen = []
    for q in qtypes:
        of_type = [r for r in rows if r["qtype"] == q]
        chosen += [of_type[i] for i in spread(len(of_type), max(1, n // len(qtypes)))]
    items, missing = [], 0
    for r in chosen:
        m = meta.get(r["qid"])
        boxes = [m["subj_box"], m["obj_box"] if r["qtype"] == "relation" else None] if m else []
        src = thumbnail(vg / m["image_path"], size, boxes) if m else None
        missing += src is None
        answers = [(k, (r.get(key) or ["–"])[0]) for k, key in VQA_METHODS.items()
                   if k != "majority" and key in r]  # fmt: skip
        items.append({"src": src, "question": r["question"], "answer": r["answer"],
                      "answers": [(k, a, a == r["answer"]) for k, a in answers],
                      "qtype": r["qtype"]})  # fmt: skip
    return items, missing
