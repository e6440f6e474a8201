"""clip_bootstrap: the CLIP checkpoint every later stage embeds with.

Three modes, chosen by `--pretrained` and `finetune`:

- **passthrough** (`--pretrained <hub id or folder>`, `finetune: false`; the default, with
  `data.clip: models/clip_standin`, the sample world's stand-in CLIP trained once by the
  frozen `clip_standin` stage, used as a downloaded checkpoint is): the checkpoint is
  copied (local folder) or saved (hub id) unchanged.
- **scratch** (`--pretrained scratch`): train a lower-case BPE
  tokenizer on the training captions (LAION + Flickr30k train split), build the small CLIP
  of `model` and train it contrastively (`pipeline.clip.contrastive`) on the LAION pairs.
- **finetune** (`--pretrained <hub id or folder>`, `finetune: true`): the same loss and
  loop, starting from the named checkpoint and its tokenizer / image settings.

In every mode `--out` is a standard Hugging Face checkpoint folder that `load_backbone`
opens like any other, plus `token_embedding.safetensors` (the text model's token table,
tagged with the weights' revision: the caption decoder's token space, one copy for every
stage that reads it, `pipeline.clip.token_table`), `clip_source.json` (where it came from)
and `report.json`.
Image->text / text->image recall@1/@5 on held-out LAION pairs (a seeded split never
trained on), before and after training, and the probes of the CLIP it writes
(`pipeline.clip.probes` on `--probes`, the sample world's probe set: zero-shot and
linear-probe top-1 for object category and colour, single images and object crops, both
styles; and `pipeline.clip.scene_probes` on its whole scenes: what a linear read-out of a
scene's embedding carries) go to `--metrics` (headline keys) and `--detail` (everything).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import ClassVar

from pipeline.clip.checkpoint import ClipModelConfig
from pipeline.clip.pairs import PairSet
from pipeline.compute import Compute
from pipeline.report import Report
from pipeline.settings import Split, as_dict, check, check_device, load

SCRATCH = "scratch"  # the `--pretrained` value that means: train a small CLIP from scratch
TOKENIZER = (
    "BPE trained on LAION train-split + Flickr30k train-split captions (lower-case, "
    "accents stripped, CLIP pre-token split)"
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How the CLIP is trained (or fine-tuned) and measured."""

    SECTION: ClassVar[str] = "clip_bootstrap"
    finetune: bool = False  # with a pretrained CLIP: contrastive fine-tune (true) or pass through
    flickr30k_pairs: bool = False  # also train on Flickr30k train-split image-caption pairs
    max_pairs: int = 0  # cap on LAION pairs read (0 = all)
    heldout_fraction: float = 0.2  # share of LAION pairs held out for recall (never trained on)
    heldout_max: int = 1000  # ... at most this many
    model: ClipModelConfig = dataclasses.field(default_factory=ClipModelConfig)  # scratch CLIP
    epochs: int = 20  # passes over the training pairs
    batch_size: int = 32  # pairs per step (the ragged last batch of an epoch is dropped)
    lr: float = 0.0005  # peak AdamW learning rate
    weight_decay: float = 0.1  # AdamW weight decay (not on gains and biases)
    warmup_steps: int = 30  # linear warm-up steps, then cosine decay to zero
    grad_clip: float = 1.0  # gradient norm clip (0 = none)
    augment_shift: int = 4  # random translation of training images by up to this many pixels
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    threads: int = 1  # torch CPU threads (0 = torch default); 1 keeps CPU runs bit-identical
    seed: int = 0  # top-level `seed`: held-out split, initial weights, batches

    def __post_init__(self) -> None:
        for key in ("max_pairs", "epochs", "weight_decay", "warmup_steps", "grad_clip",
                    "augment_shift", "threads"):  # fmt: skip
            check(getattr(self, key) >= 0, key, "must be >= 0")
        check(0 < self.heldout_fraction < 1, "heldout_fraction", "must be in (0, 1)")
        check(self.heldout_max >= 5, "heldout_max", "must be >= 5 (recall@5 needs 5 pairs)")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.lr > 0, "lr", "must be > 0")
        check_device(self.device)


SETTINGS = (Settings, Split, Compute)


def main(
    laion: Path, flickr30k: Path, pretrained: str, out: Path, metrics: Path, detail: Path,
    plots: Path, params: Path, probes: Path | None = None,
) -> str:  # fmt: skip
    """Write the checkpoint folder `out`, the `metrics`/`detail` JSON and the `plots` curve."""
    import torch

    from pipeline.atomic import write_json
    from pipeline.clip.checkpoint import staged_folder
    from pipeline.clip.contrastive import epoch_row, mean_train_loss, train
    from pipeline.clip.probes import HOW as PROBES_HOW
    from pipeline.clip.probes import TEMPLATES, headline
    from pipeline.clip.retrieval import HOW, evaluate
    from pipeline.clip.scene_probes import HOW as SCENE_HOW
    from pipeline.compute import session as compute_session
    from pipeline.runtime import runtime
    from pipeline.training import cpu_threads, pick_device, seed_everything, write_plot

    s, split = load(Settings, params), load(Split, params)
    mode = "scratch" if pretrained == SCRATCH else ("finetune" if s.finetune else "passthrough")
    report, t0 = Report("clip_bootstrap"), time.perf_counter()
    comp, device = load(Compute, params), pick_device(s.device)
    with cpu_threads(s.threads), compute_session(comp, device), staged_folder(out) as tmp:
        seed_everything(s.seed)
        bb, data, held = _open(mode, pretrained, laion, flickr30k, tmp, s, split, report)
        held_ids = bb.tokenize([caps[0] for caps in held.captions])
        start = epoch_row(bb, 0, mean_train_loss(bb, data, s.batch_size), held, held_ids)
        t1, c1 = time.perf_counter(), time.process_time()
        rows = [] if mode == "passthrough" else train(
            bb, data, held, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
            weight_decay=s.weight_decay, warmup_steps=s.warmup_steps, grad_clip=s.grad_clip,
            augment_shift=s.augment_shift, seed=s.seed,
        )  # fmt: skip
        train_seconds, train_cpu = time.perf_counter() - t1, time.process_time() - c1
        before = {k[len("heldout_") :]: v for k, v in start.items() if k.startswith("heldout_")}
        after = evaluate(bb, held, held_ids) if rows else dict(before)
        _save(mode, pretrained, bb, tmp, data if rows else None, s.seed)
        report.extra.update({"mode": mode, "threads": torch.get_num_threads()})
        ran = runtime(bb.device)
        report.save(tmp / "report.json")  # no timings inside the model: its hash stays stable
        probe_scores, scene_scores, probe_seconds = _probe(bb, probes)

    n, n_flickr30k = len(held), data.count("flickr30k")
    head = {"after": _recalls(after)}  # before and chance: the detail file (a narrow table)
    if probe_scores:
        head.update(headline(probe_scores, scene_scores))
    write_json(metrics, head)
    write_json(detail, {
        "mode": mode,
        "model": SCRATCH if mode == "scratch" else pretrained,
        "train_images": len(data),
        "train_laion_pairs": len(data) - n_flickr30k,
        "train_flickr30k_images": n_flickr30k,
        "heldout_pairs": n,
        "chance_r1": round(1 / n, 6),
        "chance_r5": round(min(5, n) / n, 6),
        "before": before,
        "after": after,
        "loss_per_epoch": [r["train_loss"] for r in rows],
        "train_loss_start": start["train_loss"],
        "train_loss_final": rows[-1]["train_loss"] if rows else start["train_loss"],
        "final_logit_scale": round(float(bb.model.logit_scale.detach().exp()), 4),
        "runtime": ran,
        "how": HOW.format(fraction=s.heldout_fraction, seed=s.seed),
        "probes": probe_scores,
        "probes_how": PROBES_HOW if probe_scores else None,
        "scene_probes": scene_scores,
        "scene_probes_how": SCENE_HOW if scene_scores else None,
        "probe_templates": {k: list(v) for k, v in TEMPLATES.items()},
        "tokenizer": TOKENIZER if mode == "scratch" else f"from {pretrained}",
        "vocab_size": int(bb.model.config.text_config.vocab_size),
        "epochs": len(rows),
        "batch_size": s.batch_size,
        "settings": as_dict(s),
        "split": as_dict(split),
    })  # fmt: skip
    write_plot(plots, [start, *rows])
    zs = headline(probe_scores)["zs_cat"]["crop"] if probe_scores else None
    probe_line = f"; zero-shot category on photo crops {zs:.3f}" if zs is not None else ""
    return (
        f"{report.summary()}; {mode}: i2t r@1 {before['i2t_r1']:.3f} -> {after['i2t_r1']:.3f}, "
        f"t2i r@1 {before['t2i_r1']:.3f} -> {after['t2i_r1']:.3f} (chance {1 / n:.3f}, n={n}), "
        f"training {train_seconds:.1f}s ({train_cpu:.1f}s CPU) of "
        f"{time.perf_counter() - t0:.1f}s{probe_line}"
        + (f" (probes {probe_seconds:.1f}s)" if probe_seconds is not None else "")
    )


def _probe(bb, probes: Path | None) -> tuple[dict | None, dict | None, float | None]:
    """The crop / single-object probe scores and the scene probe scores of `bb` on the
    probe set `probes` (None: not measured), seconds."""
    from pipeline.clip.probes import load_probe_set, run_probes
    from pipeline.clip.scene_probes import scene_probe_scores

    if probes is None:
        return None, None, None
    t = time.perf_counter()
    rows, pixels = load_probe_set(Path(probes), bb)
    if not rows:
        return None, None, None
    crops, scenes = run_probes(bb, rows, pixels), scene_probe_scores(bb, rows, pixels)
    return crops, scenes or None, round(time.perf_counter() - t, 1)


def _open(
    mode: str, pretrained: str, laion: Path, flickr30k: Path, tmp: Path, s: Settings,
    split: Split, report: Report,
):  # fmt: skip
    """The backbone to train (scratch: built in `tmp`), its training and held-out pairs."""
    from pipeline.clip.backbone import load_backbone
    from pipeline.clip.checkpoint import build_scratch_checkpoint
    from pipeline.clip.pairs import decode_pairs, flickr30k_train_items, load_laion, split_heldout
    from pipeline.errors import UserError

    if mode == "scratch":
        size, resize = s.model.image_size, None
    else:
        bb = load_backbone(pretrained, s.device)
        size, resize = bb.image_size, bb.resize_size
    pairs = load_laion(Path(laion), size, resize, report, s.max_pairs)
    train_idx, held_idx = split_heldout(len(pairs), s.heldout_fraction, s.heldout_max, s.seed)
    if len(held_idx) < 5 or len(train_idx) < 2:
        raise UserError(
            f"{laion}: only {len(pairs)} usable LAION pairs; clip_bootstrap needs enough "
            "for training and at least 5 held-out pairs"
        )
    data, held = pairs.subset(train_idx), pairs.subset(held_idx)
    use_flickr30k = mode == "scratch" or (mode == "finetune" and s.flickr30k_pairs)
    flickr30k_items = flickr30k_train_items(Path(flickr30k), split, report) if use_flickr30k else []
    if mode == "scratch":
        texts = [c for caps in data.captions for c in caps]
        texts += [c for item in flickr30k_items for _, c in item.captions]
        build_scratch_checkpoint(texts, s.model, tmp, s.seed)
        bb = load_backbone(tmp, s.device)
    if s.flickr30k_pairs and mode != "passthrough":
        data = data + decode_pairs(flickr30k_items, size, resize, "flickr30k", report)
    report.written = len(data) + len(held)
    return bb, data, held


def _save(mode: str, pretrained: str, bb, tmp: Path, trained_on: PairSet | None, seed: int):
    """The checkpoint files in `tmp` (a pass-through folder: copied), its token table and
    `clip_source.json`."""
    from pipeline.atomic import write_json
    from pipeline.clip.checkpoint import copy_checkpoint, save_backbone
    from pipeline.clip.token_table import save_token_table

    if mode == "passthrough" and Path(pretrained).is_dir():
        copy_checkpoint(pretrained, tmp)
    else:
        save_backbone(bb, tmp, bb.model_id if mode != "scratch" else str(tmp))
    save_token_table(tmp, bb)
    n_flickr30k = trained_on.count("flickr30k") if trained_on is not None else 0
    write_json(tmp / "clip_source.json", {
        "mode": mode,
        "pretrained": None if mode == "scratch" else pretrained,
        "pretrained_revision": bb.revision if mode != "scratch" else None,
        "seed": seed,
        "trained_on": None if trained_on is None else {
            "laion_pairs": len(trained_on) - n_flickr30k, "flickr30k_images": n_flickr30k,
        },
    })  # fmt: skip


def _recalls(scores: dict[str, float]) -> dict[str, float]:
    """The headline recalls of `evaluate`'s scores (the loss goes to the detail file)."""
    return {k: scores[k] for k in ("i2t_r1", "t2i_r1")}
