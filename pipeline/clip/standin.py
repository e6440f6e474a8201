"""Contrastive training of the stand-in CLIP on its own web-like pairs, for many steps.

`training_pairs` draws the pairs (`pipeline.synth.webdata.draw`) and decodes them as
`embed` decodes images (`decode`).

The loss, optimiser and schedule are `pipeline.clip.contrastive`'s (CLIP's symmetric
InfoNCE, AdamW, warm-up then cosine decay); what differs is the batches: each batch is
`colour_groups` groups of images whose labelled object has the same colour, so the
colour named in a caption does not identify its image and the model must learn shape
(hard negatives, as in Robinson et al. 2021, "Contrastive Learning with Hard Negative
Samples", here by construction). Training counts steps, not epochs; every `eval_every`
steps the validation probes are scored.

With `truth_weight` > 0 the image tower is also taught what each training image holds: a
linear head on its L2-normalised embedding predicts the shapes, colours and (colour,
shape) objects present (`scene_probes.label_vector`; binary cross-entropy summed over the
labels and averaged over the batch, as the contrastive loss averages its images' terms;
weight `truth_weight`), and is dropped afterwards. A real CLIP learns what is in a scene from
hundreds of millions of pairs; the stand-in cannot in CPU hours from contrastive pairs
alone (issue 19: 0.22 shape recall@k on whole scenes after 9000 steps), so it is told.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.atomic import atomic_path
from pipeline.clip.backbone import Backbone
from pipeline.clip.contrastive import lr_at, make_optimizer, train_step
from pipeline.clip.scene_probes import TRUTH_LABELS, label_vector
from pipeline.synth.webdata import Drawn, draw, shape_twin

TRUTH_SCALE = 10.0  # gain on the unit-norm embedding before the truth head (as the probes')


def decode(d: Drawn, size: int) -> np.ndarray:
    """(3, size, size) uint8 as `embed` decodes it: box crops letterboxed, whole images
    resized and center-cropped."""
    from pipeline.imagedecode import decode_image

    boxes = (d.box,) if d.box is not None else ()
    dec = decode_image(d.jpeg, size, None, boxes=boxes, whole=d.box is None, draft=False)
    if dec.skip or len(dec.pixels) != 1:
        raise RuntimeError(f"a generated image did not decode: {dec.skip or dec.bad_boxes}")
    return dec.pixels[0]


def training_pairs(
    n: int, seed: int, size: int, kinds: dict[str, float], photo_fraction: float,
    canvas: tuple[int, int], objects: tuple[int, int], margin: float, twins: int = 0,
):  # fmt: skip
    """`n` web-like pairs decoded at `size`: (uint8 (n, 3, size, size), captions per image,
    colour of the labelled object per image, kind per image, uint8 (n, labels) of what
    each image holds (`scene_probes.label_vector`)). `kinds` gives each kind's
    share; each scene is followed by `twins` shape twins (kind `twin`, `webdata.shape_twin`:
    same layout and colours, other shapes), counted in `n`; a pure function of its
    arguments."""
    from tqdm import tqdm

    rng = random.Random(f"{seed}-standin")
    nrng = np.random.default_rng([seed, 7])
    names, shares = list(kinds), list(kinds.values())
    pixels = np.zeros((n, 3, size, size), dtype=np.uint8)
    labels = np.zeros((n, len(TRUTH_LABELS)), dtype=np.uint8)
    captions, colours, kind_of = [], [], []
    bar = tqdm(total=n, desc="stand-in data", disable=None, unit="img")
    while len(kind_of) < n:
        kind = rng.choices(names, shares)[0]
        style = "photo" if rng.random() < photo_fraction else "clipart"
        d = draw(rng, nrng, kind, style, canvas, objects, margin=margin)
        drawn = [d]
        if kind == "scene":
            room = n - 1 - len(kind_of)
            drawn += [shape_twin(rng, nrng, d, canvas) for _ in range(min(twins, room))]
        for d in drawn:
            labels[len(kind_of)] = label_vector(d, canvas)
            pixels[len(kind_of)] = decode(d, size)
            captions.append(d.captions)
            colours.append(d.colour)
            kind_of.append(d.kind)
            bar.update(1)
    bar.close()
    return pixels, captions, colours, kind_of, labels


def colour_batch(
    by_colour: list[np.ndarray], batch: int, groups: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of one batch: `groups` colours drawn without replacement, `batch // groups`
    images of each (the remainder from the last); `groups` 0: uniform over all images."""
    if groups == 0:
        every = np.concatenate(by_colour)
        return rng.choice(every, size=batch, replace=False)
    usable = [i for i, ids in enumerate(by_colour) if len(ids)]
    picked = rng.choice(usable, size=min(groups, len(usable)), replace=False)
    sizes = [batch // len(picked)] * len(picked)
    sizes[-1] += batch - sum(sizes)
    parts = [
        rng.choice(by_colour[c], size=min(k, len(by_colour[c])), replace=False)
        for c, k in zip(picked, sizes)
    ]
    return np.concatenate(parts)


def with_twins(idx: np.ndarray, twins: list[int], batch: int) -> np.ndarray:
    """`idx` with each scene's `twins[i]` shape twins (the images after it) right behind it,
    cut to `batch` images."""
    out = [j for i in idx.tolist() for j in range(i, i + 1 + twins[i])]
    return np.array(out[:batch], dtype=idx.dtype)


def train_steps(
    bb: Backbone, pixels: torch.Tensor, captions: list[list[str]], colours: list[str], *,
    steps: int, batch_size: int, colour_groups: int, lr: float, weight_decay: float,
    warmup_steps: int, grad_clip: float, augment_shift: int, seed: int, eval_every: int,
    evaluate: Callable[[], dict], kinds: list[str] | None = None,
    labels: np.ndarray | None = None, truth_weight: float = 0.0,
    resume: Path | None = None, fingerprint: str = "",
) -> list[dict]:  # fmt: skip
    """Train `bb` for `steps` colour-grouped batches; one row per evaluation: step, mean
    train loss since the last row, seconds so far and `evaluate()`'s numbers. An image of
    kind `twin` (`kinds`) goes into a batch only with the scene it follows. With
    `truth_weight` > 0 the loss adds the truth head's on `labels` (module docstring).
    `resume`: a state file written at every evaluation (weights, optimiser, random
    streams, rows) and read back at the start when its `fingerprint` matches, so a run
    stopped after an evaluation goes on from there with the same numbers."""
    from tqdm import tqdm

    model = bb.model
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 11])
    tokens = [bb.tokenize(caps) for caps in captions]
    kinds = kinds or ["scene"] * len(colours)
    names = sorted(set(colours))
    by_colour = [np.array([i for i, c in enumerate(colours) if c == n and kinds[i] != "twin"])
                 for n in names]  # fmt: skip
    twin = [0] * len(kinds)  # per scene: how many shape twins follow it
    for i in range(len(kinds) - 1, 0, -1):
        if kinds[i] == "twin":
            twin[i - 1] = twin[i] + 1
    opt = make_optimizer(model, lr, weight_decay)
    extra, batch_truth = None, {}
    if truth_weight > 0 and labels is not None:
        head = torch.nn.Linear(model.config.projection_dim, labels.shape[1]).to(bb.device)
        opt.add_param_group({"params": list(head.parameters()), "weight_decay": 0.0})

        def extra(out) -> torch.Tensor:
            emb = F.normalize(out.image_embeds.float(), dim=-1)
            logits = head(TRUTH_SCALE * emb)
            bce = F.binary_cross_entropy_with_logits(logits, batch_truth["y"], reduction="none")
            return truth_weight * bce.sum(1).mean()

    head_state = head.state_dict if extra is not None else dict
    rows, losses, t0, start = [], [], time.perf_counter(), 0
    if resume is not None and resume.exists():
        state = torch.load(resume, weights_only=True)
        if state["fingerprint"] == fingerprint:
            model.load_state_dict(state["model"])
            if extra is not None:
                head.load_state_dict(state["head"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            torch.set_rng_state(state["torch_rng"])
            rng.bit_generator.state = state["np_rng"]
            rows, start, t0 = state["rows"], state["step"], t0 - state["seconds"]
    bar = tqdm(total=steps, initial=start, desc="clip_standin", disable=None, unit="step")
    model.train()
    for step in range(start, steps):
        idx = colour_batch(by_colour, min(batch_size, len(colours)), colour_groups, rng)
        idx = with_twins(idx, twin, min(batch_size, len(colours)))
        ids = [tokens[i][int(rng.integers(len(tokens[i])))] for i in idx.tolist()]
        px = pixels[torch.from_numpy(idx)]
        step_lr = lr_at(step, steps, warmup_steps, lr)
        if extra is not None:
            batch_truth["y"] = torch.from_numpy(labels[idx]).float().to(bb.device)
        losses.append(train_step(bb, opt, ids, px, step_lr, grad_clip, augment_shift, gen,
                                 extra))  # fmt: skip
        bar.update(1)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            row = {"step": step + 1, "train_loss": round(float(np.mean(losses)), 5),
                   "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            row.update(evaluate())
            row["logit_scale"] = round(float(model.logit_scale.detach().exp()), 3)
            rows.append(row)
            losses = []
            if resume is not None:
                with atomic_path(resume) as tmp:
                    torch.save({"fingerprint": fingerprint, "step": step + 1, "rows": rows,
                                "seconds": row["seconds"], "model": model.state_dict(),
                                "head": head_state(), "opt": opt.state_dict(),
                                "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                                "np_rng": rng.bit_generator.state}, tmp)  # fmt: skip
            bar.set_postfix({k: v for k, v in row.items() if k in ("train_loss", "zs_cat_crop")})
            model.train()
    bar.close()
    model.eval()
    return rows
