"""What a CLIP's embedding of a *whole scene* carries: multi-label linear probes.

A caption decoder reads one embedding of the whole image, so whatever a linear read-out
of that embedding cannot recover, a decoder rarely names. For each held-out scene of the
probe set (`kind: scene`, both drawing styles, `train` / `test` halves) the labels present
are, per label set:

- `shape`: the categories of its objects (22 labels);
- `colour`: their colours (11);
- `object`: the (colour, category) pairs (242);
- `relation`: (category, direction) for direction in left of / right of / above / below:
  an object of that category whose box lies wholly on that side of another object's box
  (its right edge left of the other's left edge, and so on; 88 labels). It asks whether
  the embedding binds a shape to where it is relative to the others.

Only what the CLIP can see counts: an object is present when at least half of its box
width and height lies inside the centre square that the preprocessing keeps (whole images
are resized and center-cropped).

The probe: one logistic regression per label on the L2-normalised image embeddings, fit
jointly (binary cross-entropy, L2 penalty, L-BFGS) on the style's `train` half, scored on
its `test` half: recall@k (the top-k labels by score, k = the number present; the mean
over images of the share found) and micro precision / recall of the labels scored above
0.5. Chance recall@k: k / the number of labels, averaged over images (a random ranking).
The L2 penalty is chosen per label set and style by `LP_FOLDS`-fold cross-validation on
the train half (the recall@k of the held-out folds, over `LP_L2_GRID`), as the CLIP
paper's linear probes choose theirs on a validation split; the test half never chooses.
One fixed penalty does not fit all sets: 242 object labels with ~15 positives each want
less of it than 22 shapes.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.metrics.bootstrap import mean_metric, summarise
from pipeline.synth.scene import CATEGORIES, COLOURS

DIRECTIONS = ("left of", "right of", "above", "below")
LABEL_SETS = ("shape", "colour", "object", "relation")
LP_L2_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)  # L2 penalties tried (on the mean loss)
LP_FOLDS = 2  # folds of the train half that choose the penalty, per label set and style
LP_ITERS = 300  # L-BFGS iterations
HOW = (
    "multi-label linear probe per label set on L2-normalised embeddings of whole scenes "
    "(one logistic regression per label, BCE, L2 penalty on the mean loss chosen per label "
    f"set and style from {list(LP_L2_GRID)} by {LP_FOLDS}-fold cross-validation of recall@k "
    f"on the train half, the folds' fits warm-started along the grid, L-BFGS {LP_ITERS} "
    "iterations), refit from a cold start on each style's train half, "
    "scored on its test half: "
    "recall@k = share of the k present labels among the k top-scored (k = number present, "
    "mean over images), 95% interval by the percentile bootstrap over the scored scenes "
    "(1,000 resamples, the fit held fixed); precision / recall at score > 0.5 (micro); "
    "chance = mean k / labels; "
    "present = at least half the box's width and height inside the centre square kept by "
    "the preprocessing; relation label (category, d), d in left of / right of / above / "
    "below: an object of that category whose box lies wholly on side d of another object's "
    "box (e.g. left of: its right edge <= the other's left edge)"
)


def vocabulary() -> dict[str, list[str]]:
    """Every label of each label set, in a fixed order."""
    cats, cols = list(CATEGORIES), list(COLOURS)
    return {
        "shape": cats,
        "colour": cols,
        "object": [f"{c} {k}" for c in cols for k in cats],
        "relation": [f"{k} {d}" for k in cats for d in DIRECTIONS],
    }


TRUTH_SETS = ("shape", "colour", "object")  # what the stand-in may be taught directly
TRUTH_LABELS = [(name, lab) for name in TRUTH_SETS for lab in vocabulary()[name]]
TRUTH_INDEX = {key: i for i, key in enumerate(TRUTH_LABELS)}


def visible(box: list[int], canvas: tuple[int, int]) -> bool:
    """At least half of the box's width and height inside the centre square of `canvas`."""
    w, h = canvas
    side = min(w, h)
    x0, y0 = (w - side) / 2, (h - side) / 2
    x, y, bw, bh = box
    vis_w = min(x + bw, x0 + side) - max(x, x0)
    vis_h = min(y + bh, y0 + side) - max(y, y0)
    return vis_w >= 0.5 * bw and vis_h >= 0.5 * bh


def _side(a: list[int], b: list[int]) -> list[str]:
    """The directions in which box `a` lies wholly beside box `b`."""
    out = []
    if a[0] + a[2] <= b[0]:
        out.append("left of")
    if b[0] + b[2] <= a[0]:
        out.append("right of")
    if a[1] + a[3] <= b[1]:
        out.append("above")
    if b[1] + b[3] <= a[1]:
        out.append("below")
    return out


def scene_labels(objects: list[dict], canvas: tuple[int, int]) -> dict[str, set[str]]:
    """The labels of each set present in a scene (objects: category, colour, box)."""
    seen = [o for o in objects if visible(o["box"], canvas)]
    rel = {f"{a['category']} {d}" for a in seen for b in seen if a is not b
           for d in _side(a["box"], b["box"])}  # fmt: skip
    return {
        "shape": {o["category"] for o in seen},
        "colour": {o["colour"] for o in seen},
        "object": {f"{o['colour']} {o['category']}" for o in seen},
        "relation": rel,
    }


def label_vector(d, canvas: tuple[int, int]) -> np.ndarray:
    """The shape, colour and object labels present in a drawn image `d`
    (`pipeline.synth.webdata.Drawn`) as one 0/1 vector over `TRUTH_LABELS`: a scene's
    visible objects (`scene_labels`), a single object's or crop's labelled object."""
    if d.objects:
        present = scene_labels(d.objects, canvas)
    else:
        present = {"shape": {d.category}, "colour": {d.colour},
                   "object": {f"{d.colour} {d.category}"}}  # fmt: skip
    out = np.zeros(len(TRUTH_LABELS), dtype=np.uint8)
    for name in TRUTH_SETS:
        for lab in present[name]:
            out[TRUTH_INDEX[name, lab]] = 1
    return out


def fit_multilabel(x: torch.Tensor, y: torch.Tensor, l2: float, seed: int = 0,
                   init: tuple[torch.Tensor, torch.Tensor] | None = None):  # fmt: skip
    """(w, b) of per-label logistic regressions fit jointly on (x, y in {0, 1}) with L2
    penalty `l2` on the mean loss, from small random weights or from `init` (an earlier
    fit's (w, b): a warm start along a path of penalties)."""
    scale = 10.0  # unit-norm features: a fixed gain keeps the logits in a workable range
    if init is None:
        gen = torch.Generator().manual_seed(seed)
        w = (torch.randn(x.shape[1], y.shape[1], generator=gen) * 0.01).requires_grad_()
        b = torch.zeros(y.shape[1], requires_grad=True)
    else:
        w, b = (init[0] / scale).clone().requires_grad_(), init[1].clone().requires_grad_()
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=LP_ITERS, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = scale * x @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach() * scale, b.detach()


def choose_l2(x: torch.Tensor, y: np.ndarray, seed: int = 0) -> tuple[float, float | None]:
    """The penalty of `LP_L2_GRID` with the best mean held-out recall@k over `LP_FOLDS`
    folds of (x, y) (ties: the larger penalty), and that recall (None: fewer than two
    scenes a fold, the grid's middle penalty). Each fold walks the grid from the largest
    penalty down, each fit warm-started from the one before; the caller refits the chosen
    penalty from a cold start."""
    if len(y) < 2 * LP_FOLDS:  # too few scenes to hold any out: the grid's middle
        return sorted(LP_L2_GRID)[len(LP_L2_GRID) // 2], None
    fold = np.random.default_rng([seed, 7]).permutation(len(y)) % LP_FOLDS
    grid = sorted(LP_L2_GRID, reverse=True)
    got = np.zeros((LP_FOLDS, len(grid)))
    for f in range(LP_FOLDS):
        tr, ho = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        fit = None
        for j, l2 in enumerate(grid):
            fit = fit_multilabel(x[tr], torch.from_numpy(y[tr]), l2, seed, init=fit)
            got[f, j] = score_multilabel((x[ho] @ fit[0] + fit[1]).numpy(), y[ho], 0)["recall_at_k"]
    j = int(np.argmax(got.mean(0)))  # the first best: the larger penalty on a tie
    return grid[j], round(float(got.mean(0)[j]), 4)


def score_multilabel(scores: np.ndarray, y: np.ndarray, resamples: int = 1000) -> dict:
    """recall@k (k = labels present) with its 95% percentile-bootstrap interval over the
    scenes (`resamples`; 0: none), micro precision / recall above 0.5, chance."""
    k = y.sum(1).astype(int)
    keep = k > 0
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = [y[i, order[i, : k[i]]].sum() / k[i] for i in np.flatnonzero(keep)]
    pred = scores > 0
    tp = float((pred & (y > 0)).sum())
    ci = None
    if hits and resamples:
        ci = summarise({"r": mean_metric(np.array(hits))}, len(hits), resamples, 0.95, 0)["r"]
    return {
        "recall_at_k": round(float(np.mean(hits)) if hits else 0.0, 4),
        "recall_at_k_ci": [round(ci["lo"], 4), round(ci["hi"], 4)] if ci else None,
        "precision": round(tp / max(1, int(pred.sum())), 4),
        "recall": round(tp / max(1, int(y.sum())), 4),
        "chance_recall_at_k": round(float(np.mean(k[keep] / y.shape[1])) if keep.any() else 0, 4),
        "mean_present": round(float(k[keep].mean()) if keep.any() else 0.0, 3),
    }


def scene_probe_scores(bb, rows: list[dict], pixels: torch.Tensor) -> dict:
    """`run_scene_probes` on the rows of kind `scene` ({} if none), embedded by `bb`."""
    from pipeline.clip.probes import embed_pixels

    keep = [i for i, r in enumerate(rows) if r["kind"] == "scene"]
    if not keep:
        return {}
    return run_scene_probes(embed_pixels(bb, pixels[keep]), [rows[i] for i in keep])


def run_scene_probes(emb: torch.Tensor, rows: list[dict]) -> dict:
    """`{style_scene: {label_set: scores, n_train, n_test}}` over the rows of kind `scene`
    (`emb`: their L2-normalised embeddings, row for row). The (style, label set) probes are
    independent: they run on as many threads as there are CPU cores, each with the same
    single-threaded numbers it would give alone (every fit seeds its own generator)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    vocab = vocabulary()
    jobs = []
    for style in sorted({r["style"] for r in rows if r["kind"] == "scene"}):
        idx = [i for i, r in enumerate(rows) if r["kind"] == "scene" and r["style"] == style]
        tr = [i for i in idx if rows[i]["split"] == "train"]
        te = [i for i in idx if rows[i]["split"] == "test"]
        if not tr or not te:
            continue
        labels = {i: scene_labels(rows[i]["objects"], tuple(rows[i]["canvas"])) for i in idx}
        x_fit, x_test = emb[tr].float(), emb[te].float()  # shared by the style's label sets
        for name in LABEL_SETS:
            pos = {lab: j for j, lab in enumerate(vocab[name])}
            y = np.zeros((len(rows), len(pos)), dtype=np.float32)
            for i in idx:
                for lab in labels[i][name]:
                    y[i, pos[lab]] = 1.0
            jobs.append((style, name, x_fit, y[tr], x_test, y[te]))

    def probe(job) -> dict:
        _, _, x, y, x_test, y_test = job
        l2, cv = choose_l2(x, y)
        w, b = fit_multilabel(x, torch.from_numpy(y), l2)
        return {**score_multilabel((x_test @ w + b).numpy(), y_test), "labels": y.shape[1],
                "l2": l2, "cv_recall_at_k": cv, "n_train": len(y), "n_test": len(y_test)}  # fmt: skip

    workers = max(1, min(len(jobs), len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(probe, jobs))
    out: dict = {}
    for (style, name, *_), res in zip(jobs, results):
        out.setdefault(f"{style}_scene", {})[name] = res
    return out
