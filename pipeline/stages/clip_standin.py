"""clip_standin: train the sample world's stand-in CLIP once, long (a frozen DVC stage).

A real CLIP is trained once on web data and then downloaded; the stand-in is treated the
same way. This stage draws its own web-like pairs (`pipeline.synth.webdata`: single
objects, object crops and whole scenes, clipart and photo style, alt-text and sentences;
not the sample datasets), trains a BPE tokenizer on them plus the sample world's whole
vocabulary, and trains the small CLIP of `model` contrastively on colour-grouped batches
(`pipeline.clip.standin`) for `steps` steps at `base_image_size`; with `hires_steps`, a
second phase (a fresh learning-rate cycle, another draw of images) trains it on a
scene-heavy mix at `model.image_size`, moved there by `pipeline.clip.resolution` when it
differs from `base_image_size`, each scene followed by `twins` shape twins in its batch;
`hires_rounds` repeats that phase, each round on its own draw of images with its own
learning-rate cycle (a warm restart). `--out` is a
Hugging Face checkpoint folder of a few MB, committed to git, that `data.clip` names by
default; beside the weights,
`standin.json` holds the settings, the training time and the validation probes (a probe
set drawn from another seed than synth's), and `train_curve.tsv` the curve.

Rebuild: `dvc unfreeze clip_standin && dvc repro clip_standin` (then `dvc freeze`). A run
that stops (a session's end) goes on from its last evaluation when started again with the
same settings: each phase (`base`, `hires`, `hires2`, ...) keeps its state in
`.<out>.<phase>.resume.pt` beside `--out`, and keeps it when finished. A phase's state
holds for any `hires_rounds` (the fingerprint leaves it out), so raising `hires_rounds`
after a finished run trains the new rounds only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

from pipeline.clip.checkpoint import ClipModelConfig
from pipeline.settings import as_dict, check, check_device, load

VAL_TAG = "validation"  # the validation probes' seed tag (synth's probe set uses "probes")
KINDS = ("single", "crop", "scene", "twin")  # kinds of training image


@dataclasses.dataclass(frozen=True)
class Settings:
    """The stand-in's web data and its long contrastive training."""

    SECTION: ClassVar[str] = "clip_standin"
    model: ClipModelConfig = dataclasses.field(default_factory=ClipModelConfig)  # architecture
    base_image_size: int = 64  # input size of the base phase (model.image_size: the final one)
    images: int = 60000  # base phase: web-like training images drawn (each with 4 captions)
    single_share: float = 0.2  # base phase: share of single-object images
    crop_share: float = 0.2  # base phase: share of object crops cut from scenes (letterboxed)
    hires_steps: int = 50000  # second phase at model.image_size (the same size: no resize; 0: none)
    hires_images: int = 40000  # its training images (another draw)
    hires_single_share: float = 0.1  # its share of single-object images
    hires_crop_share: float = 0.2  # its share of object crops (the rest: whole scenes)
    twins: int = 0  # shape twins drawn after each of its scenes, in the same batch
    hires_lr: float = 5e-4  # its peak learning rate
    hires_warmup_steps: int = 500  # its warm-up steps, then cosine decay to zero
    hires_rounds: int = 1  # rounds of the second phase, each a new draw and lr cycle
    photo_share: float = 0.5  # share drawn photo-style (the rest clipart)
    canvas: tuple[int, int] = (192, 144)  # width, height of the scenes crops are cut from
    objects_per_image: tuple[int, int] = (2, 4)  # fewest, most objects in those scenes
    crop_margin: float = 0.15  # crop boxes widened by up to this share per side
    steps: int = 60000  # base phase: optimiser steps
    batch_size: int = 64  # pairs per step
    colour_groups: int = 4  # same-colour groups per batch (0 = uniform batches)
    lr: float = 0.001  # peak AdamW learning rate
    truth_weight: float = 1.0  # weight of the loss telling the image tower what each image holds
    weight_decay: float = 0.1  # AdamW weight decay (not on gains and biases)
    warmup_steps: int = 500  # linear warm-up steps, then cosine decay to zero
    grad_clip: float = 1.0  # gradient norm clip (0 = none)
    augment_shift: int = 4  # random translation of training images by up to this many pixels
    val_probes: int = 88  # validation probe images per style x kind group
    val_scenes: int = 1000  # validation probe scenes per style (half fit, half scored)
    eval_every: int = 2000  # steps between validation probe scores
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    threads: int = 2  # torch CPU threads (0 = torch default); bit-identical per CPU kind
    seed: int = 0  # top-level `seed`: data, tokenizer, initial weights, batches

    def __post_init__(self) -> None:
        for key in ("weight_decay", "truth_weight", "warmup_steps", "grad_clip", "augment_shift",
                    "colour_groups", "threads", "hires_steps", "hires_warmup_steps", "twins",
                    "hires_rounds"):  # fmt: skip
            check(getattr(self, key) >= 0, key, "must be >= 0")
        for key in ("images", "steps", "batch_size", "eval_every", "val_scenes", "hires_images"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        check(self.val_probes >= 44, "val_probes", "must be >= 44 (2 per category: train, test)")
        for key in ("single_share", "crop_share", "photo_share", "crop_margin",
                    "hires_single_share", "hires_crop_share"):  # fmt: skip
            check(0 <= getattr(self, key) <= 1, key, "must be in [0, 1]")
        for pre in ("", "hires_"):
            check(getattr(self, pre + "single_share") + getattr(self, pre + "crop_share") <= 1,
                  pre + "crop_share", f"{pre}single_share + {pre}crop_share must be <= 1 "
                  "(the rest are whole scenes)")  # fmt: skip
        check(self.base_image_size % self.model.patch_size == 0, "base_image_size",
              f"must be a multiple of model.patch_size ({self.model.patch_size})")  # fmt: skip
        check(self.hires_steps > 0 or self.base_image_size == self.model.image_size,
              "base_image_size", "must equal model.image_size when hires_steps is 0")  # fmt: skip
        check(min(self.canvas) >= 32, "canvas", "must be at least 32 x 32 pixels")
        lo, hi = self.objects_per_image
        check(1 <= lo <= hi, "objects_per_image", "must be [fewest, most] with 1 <= fewest <= most")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.hires_lr > 0, "hires_lr", "must be > 0")
        check_device(self.device)


SETTINGS = (Settings,)


def _shares(single: float, crop: float) -> dict[str, float]:
    return {"single": single, "crop": crop, "scene": 1 - single - crop}


def fingerprint(s: Settings, phase: str) -> str:
    """What a phase's resumable state must match: every setting but `hires_rounds` (a round
    does not depend on how many follow it), and the phase."""
    settings = {k: v for k, v in as_dict(s).items() if k != "hires_rounds"}
    return hashlib.sha256(json.dumps([settings, phase], sort_keys=True).encode()).hexdigest()


def hires_phases(s: Settings) -> list[str]:
    """The second phase's rounds: hires, hires2, hires3, ... (none without hires_steps)."""
    return (
        [f"hires{r if r > 1 else ''}" for r in range(1, s.hires_rounds + 1)]
        if s.hires_steps
        else []
    )


def resume_file(out: Path, phase: str) -> Path:
    """Where a phase's resumable state lives while the stage runs (beside `out`)."""
    return out.parent / f".{out.name}.{phase}.resume.pt"


def main(out: Path, params: Path) -> str:
    """Write the stand-in checkpoint folder `out`; the one-line summary."""
    import numpy as np
    import torch

    from pipeline.atomic import write_json
    from pipeline.clip.backbone import load_backbone
    from pipeline.clip.checkpoint import build_scratch_checkpoint, save_backbone, staged_folder
    from pipeline.clip.probes import HOW, TEMPLATES, headline, run_probes
    from pipeline.clip.resolution import resize_checkpoint
    from pipeline.clip.scene_probes import HOW as SCENE_HOW
    from pipeline.clip.scene_probes import scene_probe_scores
    from pipeline.clip.standin import decode, train_steps, training_pairs
    from pipeline.synth.captions import vocabulary_text
    from pipeline.synth.webdata import probe_items
    from pipeline.training import cpu_threads, pick_device, seed_everything, write_plot

    s = load(Settings, params)
    t0, c0 = time.perf_counter(), time.process_time()
    with cpu_threads(s.threads), staged_folder(out) as tmp:
        seed_everything(s.seed)
        pixels, captions, colours, kinds, labels = training_pairs(
            s.images, s.seed, s.base_image_size, _shares(s.single_share, s.crop_share),
            s.photo_share, s.canvas, s.objects_per_image, s.crop_margin,
        )  # fmt: skip
        texts = [c for caps in captions for c in caps] + vocabulary_text() * 20
        build_scratch_checkpoint(texts, replace(s.model, image_size=s.base_image_size), tmp,
                                 s.seed)  # fmt: skip
        val = list(probe_items(s.val_probes, s.seed, s.canvas, s.objects_per_image, VAL_TAG,
                               n_scenes=s.val_scenes))  # fmt: skip
        val_rows = [{"category": d.category, "colour": d.colour, "style": d.style,
                     "kind": d.kind, "split": split, "objects": d.objects,
                     "canvas": list(s.canvas)} for d, split in val]  # fmt: skip
        t_data = time.perf_counter() - t0
        common = {"batch_size": s.batch_size, "colour_groups": s.colour_groups,
                  "weight_decay": s.weight_decay, "grad_clip": s.grad_clip,
                  "augment_shift": s.augment_shift, "eval_every": s.eval_every}  # fmt: skip

        def phase(name: str, pairs, steps: int, lr: float, warmup: int, seed: int):
            """Train the checkpoint in `tmp` on `pairs` at its own size; save it; its rows."""
            bb = load_backbone(tmp, s.device)
            val_px = torch.from_numpy(np.stack([decode(d, bb.image_size) for d, _ in val]))

            def evaluate() -> dict:
                probes = run_probes(bb, val_rows, val_px)
                head = headline(probes, scene_probe_scores(bb, val_rows, val_px))
                return {f"{k}_{g}": v for k, d in head.items() for g, v in d.items()}

            px, caps, cols, kinds, labels = pairs
            rows = train_steps(bb, torch.from_numpy(px), caps, cols, steps=steps, lr=lr,
                               warmup_steps=warmup, seed=seed, evaluate=evaluate, kinds=kinds,
                               labels=labels, truth_weight=s.truth_weight,
                               resume=resume_file(out, name), fingerprint=fingerprint(s, name),
                               **common)  # fmt: skip
            save_backbone(bb, tmp, str(tmp))
            final = run_probes(bb, val_rows, val_px), scene_probe_scores(bb, val_rows, val_px)
            return [{"phase": name, **r} for r in rows], final, kinds

        rows, (probes, scenes), _ = phase("base", (pixels, captions, colours, kinds, labels), s.steps,
                                          s.lr, s.warmup_steps, s.seed)  # fmt: skip
        del pixels, labels
        hires_kinds: list[str] = []
        if s.hires_steps and s.model.image_size != s.base_image_size:
            resize_checkpoint(tmp, s.model.image_size)
        for k, name in enumerate(hires_phases(s), start=1):  # round k: seed + k
            pairs = training_pairs(
                s.hires_images, s.seed + k, s.model.image_size,
                _shares(s.hires_single_share, s.hires_crop_share), s.photo_share, s.canvas,
                s.objects_per_image, s.crop_margin, s.twins,
            )  # fmt: skip
            more, (probes, scenes), kinds_r = phase(
                name, pairs, s.hires_steps, s.hires_lr, s.hires_warmup_steps, s.seed + k
            )  # fmt: skip
            hires_kinds += kinds_r
            del pairs
            last = rows[-1]["step"]
            rows += [{**r, "step": r["step"] + last} for r in more]
        # each phase's rows count its own seconds, across resumes (the wall clock would not)
        t_train = sum(r["seconds"] for i, r in enumerate(rows)
                      if i + 1 == len(rows) or rows[i + 1]["phase"] != r["phase"])  # fmt: skip
        write_plot(tmp / "train_curve.tsv", rows)
        write_json(tmp / "standin.json", {
            "what": "the sample world's stand-in CLIP (pipeline/stages/clip_standin.py)",
            "validation_probes": probes,
            "validation_scene_probes": scenes,
            "validation_headline": headline(probes, scenes),
            "probes_how": HOW,
            "scene_probes_how": SCENE_HOW,
            "probe_templates": {k: list(v) for k, v in TEMPLATES.items()},
            "train_images": {k: kinds.count(k) for k in ("single", "crop", "scene")},
            "hires_train_images": {k: hires_kinds.count(k) for k in KINDS},
            "data_seconds": round(t_data, 1),
            "train_seconds": round(t_train, 1),
            "total_cpu_seconds": round(time.process_time() - c0, 1),
            "threads": torch.get_num_threads(),
            "device": str(pick_device(s.device)),
            "settings": as_dict(s),
        })  # fmt: skip
    h = headline(probes, scenes)
    steps, images = f"{s.steps}", f"{s.images}"
    rounds = len(hires_phases(s))
    if rounds:
        times = f"{rounds} x " if rounds > 1 else ""
        steps, images = f"{steps} + {times}{s.hires_steps}", f"{images} + {times}{s.hires_images}"
    return (
        f"clip_standin: {steps} steps on {images} images in {t_train:.0f}s "
        f"(data {t_data:.0f}s); validation zero-shot category photo crops "
        f"{h['zs_cat']['crop']:.3f}, single {h['zs_cat']['single']:.3f}; colour "
        f"{h['zs_col']['crop']:.3f}; linear category {h['lp_cat']['crop']:.3f}; photo scenes "
        f"recall@k shape {h['scene_rk']['shape']:.3f}, object {h['scene_rk']['object']:.3f} "
        f"-> {out}"
    )
