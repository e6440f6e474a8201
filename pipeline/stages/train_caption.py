"""train_caption: the embedding-space caption decoders (noada, ada), three phases each.

`pretrain` on LAION captions, `adapt` (LAION captions + the domain discriminator behind
the GRL on LAION vs Flickr30k images), `finetune` on the captions of the labelled
Flickr30k train images (`labelled_fraction`) plus `source_weight` times the LAION caption
loss (the domain loss continues); `noada` runs the same steps with λ = 0. See
`pipeline.caption.training` for the schedule and the torchrun behaviour,
`pipeline.nn.caption_decoder` for the model.

The frozen token-embedding table is the CLIP's (`--clip`, `pipeline.clip.token_table`),
checked against the one the embedding manifests record. `target_shift` (params; off by
default) is the offset control of `pipeline.caption.shift`.

The kept epoch (`keep: best_val_loss`) is the one with the lowest loss on a selection set
that holds no more target labels than training had (`selection_set`): the Flickr30k val
captions of as many val images as there are labelled train images (at least 16), or, with
none labelled, the captions of `laion_val_images` LAION images held out of training (with
a text arm and none labelled: the Flickr30k val captions decoded from their text embeddings).

Outputs: the model folder (model.safetensors + config.json: the `DecoderConfig`, the
CLIP the embeddings came from and a training summary) and the per-epoch `plots` TSV.
Under torchrun only rank 0 writes, and each rank's summary names its rank and a digest of
its weights (the decoder's and the discriminator's).

`run` trains several variants. On the CPU, given `threads` cores for each, they train at
once, one process each: every run is single-process and seeded, so its numbers are those
it has alone (tests check the weights), in the time of the slowest. Otherwise (CUDA,
torchrun, `threads: 0`, too few cores) one after another.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from tqdm import tqdm

from pipeline import distributed
from pipeline.caption.data import CaptionSet, TrainingData, load_training_data, split_images
from pipeline.caption.shift import TargetShift
from pipeline.caption.training import (
    PLOT_COLUMNS,
    Adversary,
    Arm,
    Trainer,
    grl_strength,
    run_record,
    steps_per_epoch,
)
from pipeline.compute import Compute
from pipeline.compute import session as compute_session
from pipeline.errors import UserError
from pipeline.nn.caption_decoder import (
    SOURCE,
    TARGET,
    CaptionDecoder,
    DecoderConfig,
    DecoderSettings,
    save_caption_model,
)
from pipeline.settings import as_dict, check, check_device, load
from pipeline.training import (
    BestEpoch,
    cpu_threads,
    pick_device,
    seed_everything,
    spare_cores,
    write_plot,
)

LOSS_NAMES = {"caption_loss": "caption", "source_loss": "LAION", "text_loss": "text"}  # summary
MIN_SELECT_IMAGES = 16  # fewest Flickr30k val images the kept epoch is chosen on


@dataclasses.dataclass(frozen=True)
class Settings:
    """The decoder, its three training phases and the domain adversary."""

    SECTION: ClassVar[str] = "train_caption"
    seed: int = 0  # top-level `seed`: init + caption order (seed), domain draws (seed+1),
    # labelled images (seed+2), LAION batches of finetune (seed+3), kept-epoch selection
    # images (seed+4), text-arm batches and noise (seed+5)
    model: DecoderSettings = dataclasses.field(default_factory=DecoderSettings)  # the decoder
    batch_size: int = 32  # captions per step (per rank under torchrun)
    lr: float = 1e-3  # AdamW learning rate of pretrain and adapt
    finetune_lr: float = 5e-4  # ... of finetune
    weight_decay: float = 0.01  # AdamW weight decay of the decoder
    warmup_steps: int = 50  # linear learning-rate warm-up (steps of the whole run)
    grad_clip: float = 1.0  # max gradient norm of the decoder (0: no clipping)
    pretrain_epochs: int = 5  # epochs on LAION captions
    adapt_epochs: int = 3  # epochs on LAION captions with the domain loss
    finetune_epochs: int = 8  # epochs (passes over all Flickr30k train captions) of finetune
    source_weight: float = 1.0  # weight of the LAION caption loss in finetune (0: none)
    text_weight: float = 0.0  # weight of the text arm in finetune: all Flickr30k train
    # captions decoded from their noisy CLIP text embeddings, no image (CapDec; 0: off;
    # 1 is better on validation but over the default run's time budget: docs/results.md)
    text_noise: float = 0.016  # variance of the text arm's Gaussian noise (CapDec: 0.016)
    labelled_fraction: float = 1.0  # share of Flickr30k train images keeping captions (0: none)
    adv_weight: float = 1.0  # peak λ of the GRL (ada; noada uses λ = 0)
    grl_gamma: float = 10.0  # steepness of λ's warm start (Ganin & Lempitsky: 10)
    disc_hidden: int = 128  # hidden width of the domain discriminator
    disc_dropout: float = 0.0  # dropout in the discriminator
    disc_lr: float = 1e-3  # AdamW learning rate of the discriminator
    disc_penalty: float = 10.0  # γ of the discriminator's zero-centred gradient penalty
    # (R1 on both domains, Mescheder et al. 2018): without it the GRL game can diverge
    # (pipeline/nn/discriminator.py; docs/results.md, the offset control; 0: off, the paper)
    domain_batch: int = 32  # images of each domain per step (per rank)
    target_splits: tuple[str, ...] = ("train",)  # Flickr30k splits of the target-domain images
    # the epoch saved: the one with the lowest selection loss, or the last (recorded as
    # training.kept_epoch); the selection loss: module docstring
    keep: Literal["last", "best_val_loss"] = "best_val_loss"
    laion_val_images: int = (
        64  # LAION images held out of training (the selection set at fraction 0)
    )
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 1  # CPU threads, fixed so CPU runs are bit-reproducible (0: torch default)

    def __post_init__(self) -> None:
        check(self.laion_val_images >= 0, "laion_val_images", "must be >= 0")
        for key in ("batch_size", "domain_batch", "disc_hidden"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("lr", "finetune_lr", "disc_lr"):
            check(getattr(self, key) > 0, key, "must be > 0")
        for key in ("weight_decay", "warmup_steps", "grad_clip", "adv_weight", "grl_gamma",
                    "pretrain_epochs", "adapt_epochs", "finetune_epochs", "threads",
                    "source_weight", "text_weight", "text_noise", "disc_penalty"):  # fmt: skip
            check(getattr(self, key) >= 0, key, "must be >= 0")
        check(0 <= self.labelled_fraction <= 1, "labelled_fraction", "must be in [0, 1]")
        check(self.labelled_fraction > 0 or self.source_weight > 0 or self.text_weight > 0
              or not self.finetune_epochs, "source_weight", "must be > 0 when "
              "labelled_fraction and text_weight are 0 (finetune would have no caption to "
              "learn)")  # fmt: skip
        epochs = self.pretrain_epochs + self.adapt_epochs + self.finetune_epochs
        check(epochs >= 1, "finetune_epochs", "the three phases need at least one epoch")
        check(0 <= self.disc_dropout < 1, "disc_dropout", "must be in [0, 1)")
        check(len(self.target_splits) >= 1, "target_splits", "must name a split")
        check(self.labelled_fraction > 0 or self.laion_val_images > 0 or self.keep == "last",
              "laion_val_images", "must be > 0 when labelled_fraction is 0 and keep is "
              "best_val_loss (the kept epoch is chosen on held-out LAION captions)")  # fmt: skip
        check_device(self.device)


SETTINGS = (Settings, TargetShift, Compute)


def selection_set(data, seed: int):
    """The captions whose loss chooses the kept epoch, and what they are: the Flickr30k
    val captions of as many val images as there are labelled train images (at least 16,
    at most all; a seeded draw), or with none labelled the held-out LAION captions, so
    the choice never uses more target labels than training had. A text arm without
    labelled images (`text_weight` > 0, fraction 0) trains on unpaired Flickr30k text, so
    it is chosen on the same kind of label: the val captions decoded from their own unit
    text embeddings (no image, no noise) with the target token; LAION's loss would keep
    the epoch before the text arm starts."""
    n_labelled = len(data.flickr30k_labelled.image_ids)
    if n_labelled == 0 and data.flickr30k_val_text is not None:
        return data.flickr30k_val_text, {"on": "flickr30k_val_text", "domain": TARGET,
                                         "images": len(data.flickr30k_val_text.image_ids)}  # fmt: skip
    if n_labelled == 0:
        return data.laion_val, {"on": "laion_val", "images": len(data.laion_val.image_ids),
                                "domain": SOURCE}  # fmt: skip
    n_val = len(data.flickr30k_val.image_ids)
    k = min(n_val, max(MIN_SELECT_IMAGES, n_labelled))
    chosen = split_images(data.flickr30k_val, k, seed)[1] if k < n_val else data.flickr30k_val
    return chosen, {"on": "flickr30k_val", "images": k, "of": n_val, "domain": TARGET}


@dataclasses.dataclass
class Phase:
    """One phase of training: its captions (and their domain token), rows per epoch, the
    arms trained beside, epochs, lr, and the adversary (None: no domain loss)."""

    name: str
    captions: CaptionSet
    domain: int
    rows: int
    beside: list[Arm]
    epochs: int
    lr: float
    adversary: Adversary | None = None

    def steps(self, batch_size: int) -> int:
        return self.epochs * steps_per_epoch(self.rows, batch_size)


def training_plan(s: Settings, data: TrainingData, strength: float) -> list[Phase]:
    """pretrain (LAION captions), adapt (the same + the domain loss) and finetune (the
    labelled Flickr30k captions; one epoch = as many rows as all train captions, the same
    steps whatever the fraction; the LAION captions and the text arm beside). Adapt and
    finetune share one adversary, its λ schedule over their steps (`strength` 0: noada's
    λ = 0)."""
    beside = []
    if s.source_weight > 0:
        beside.append(Arm("source_loss", s.source_weight, SOURCE, data.laion,
                          torch.Generator().manual_seed(s.seed + 3)))  # fmt: skip
    if data.flickr30k_text is not None:
        beside.append(Arm("text_loss", s.text_weight, TARGET, data.flickr30k_text,
                          torch.Generator().manual_seed(s.seed + 5), s.text_noise**0.5))  # fmt: skip
    plan = [
        Phase("pretrain", data.laion, SOURCE, len(data.laion), [], s.pretrain_epochs, s.lr),
        Phase("adapt", data.laion, SOURCE, len(data.laion), [], s.adapt_epochs, s.lr),
        Phase("finetune", data.flickr30k_labelled, TARGET, len(data.flickr30k_train), beside,
              s.finetune_epochs, s.finetune_lr),
    ]  # fmt: skip
    adversary = Adversary(
        data.source_images, data.target_images, s.domain_batch,
        torch.Generator().manual_seed(s.seed + 1), strength, s.grl_gamma, s.adv_weight,
        total_steps=sum(p.steps(s.batch_size) for p in plan[1:]),
    )  # fmt: skip
    for p in plan[1:]:
        p.adversary = adversary
    return plan


def main(
    variant: str,
    laion: Path,
    flickr30k: Path,
    out: Path,
    plots: Path,
    params: Path | dict[str, Any],
    clip: str | Path | None = None,
) -> str:
    """Train `variant` (noada | ada) on the two embedding folders with the token table of
    the CLIP `clip` (None: the one their manifests name); write `out/` and `plots`."""
    s, shift, comp = load(Settings, params), load(TargetShift, params), load(Compute, params)
    strength = grl_strength(variant)
    with (
        distributed.session(s.device) as device,
        cpu_threads(s.threads if device.type == "cpu" else 0),  # CUDA runs: torch's default
        compute_session(comp, device),
    ):
        seed_everything(s.seed)
        data = load_training_data(laion, flickr30k, clip, s.model.max_len, s.target_splits,
                                  device, s.labelled_fraction, s.seed + 2, shift,
                                  s.laion_val_images, text=s.text_weight > 0)  # fmt: skip
        select, selection = selection_set(data, s.seed + 4)
        config = DecoderConfig.for_data(
            s.model, image_dim=data.image_dim, token_table=data.token_table, **data.special_ids
        )
        trainer = Trainer(CaptionDecoder(config, data.token_table), s, device)
        distributed.broadcast_params(trainer.model, trainer.disc)  # same start on every rank
        g_data = torch.Generator().manual_seed(s.seed)
        plan = training_plan(s, data, strength)
        total = sum(p.steps(s.batch_size) for p in plan)
        bar = tqdm(total=total, desc=f"train_caption[{variant}]",
                   disable=None if distributed.is_main() else True)  # fmt: skip
        rows, best = [], BestEpoch()
        for phase in plan:
            for _ in range(phase.epochs):
                stats = trainer.epoch(phase.captions, phase.lr, g_data, phase.adversary, bar,
                                      rows=phase.rows, beside=phase.beside,
                                      data_domain=phase.domain)  # fmt: skip
                val_loss = trainer.eval_loss(data.flickr30k_val)
                laion_val = trainer.eval_loss(data.laion_val, domain=SOURCE)
                chosen_on = (val_loss if select is data.flickr30k_val
                             else trainer.eval_loss(select, domain=selection["domain"]))  # fmt: skip
                row = {"epoch": len(rows) + 1, "phase": phase.name, **stats, "val_loss": val_loss,
                       "laion_val_loss": laion_val, "select_loss": chosen_on}  # fmt: skip
                rows.append({c: row[c] for c in PLOT_COLUMNS})
                if s.keep == "best_val_loss":
                    best.update(len(rows), trainer.model, -chosen_on)
                bar.set_postfix(phase=phase.name, loss=f"{stats['caption_loss']:.4f}",
                                source=f"{stats['source_loss']:.4f}",
                                val=f"{val_loss:.4f}")  # fmt: skip
        bar.close()

        if best.state is not None:
            trainer.model.load_state_dict(best.state)
        kept = best.epoch if best.state is not None else len(rows)
        selection["loss"] = rows[kept - 1]["select_loss"]  # the kept epoch's: comparable across
        # runs of one objective (the trade-off is chosen on it, `clipda seeds --choose`)
        last = rows[-1]
        training = {"variant": variant, "device": str(device), **run_record(trainer, rows, data),
                    "keep": s.keep, "kept_epoch": kept, "selection": selection,
                    "settings": as_dict(s),
                    "target_shift": as_dict(shift)}  # fmt: skip
        trainer.model.cpu()
        if distributed.is_main():  # no timings inside: the folder is reproducible
            save_caption_model(trainer.model, out, {"clip": data.clip, "training": training})
            write_plot(plots, rows)

    final = next((p for p in reversed(plan) if p.epochs), plan[-1])  # `last`'s phase
    trained = (["caption_loss"] if len(final.captions) else []) + [a.name for a in final.beside]
    losses = [(LOSS_NAMES[k], last[k]) for k in trained]
    summary = (
        f"train_caption[{variant}]: {trainer.step_no} steps, {len(rows)} epochs on {device}, "
        + "".join(f"{name} loss {v:.4f}, " for name, v in losses)
        + f"val loss {last['val_loss']:.4f}, selection {selection['on']} "
        f"({selection['images']} images), "
        f"disc acc {last['disc_acc']:.3f}; kept epoch {kept} ({s.keep})"
    )
    if distributed.is_distributed():
        digest = "".join(distributed.weights_digest(m) for m in (trainer.model, trainer.disc))
        summary += f"; rank {distributed.rank()}/{distributed.world_size()}, weights {digest}"
    return summary


VARIANT_FIELD = "{variant}"  # in `run`'s out and plots paths: the variant's name


def at_once(s: Settings, n: int) -> bool:
    """Whether `n` variants train at once: on the CPU, outside torchrun, with `threads`
    cores for each."""
    return (n > 1 and s.threads >= 1 and not distributed.is_distributed()
            and pick_device(s.device).type == "cpu" and spare_cores(0) >= n * s.threads)  # fmt: skip


def run(
    variants: list[str],
    laion: Path,
    flickr30k: Path,
    out: str | Path,
    plots: str | Path,
    params: Path | dict[str, Any],
    clip: str | Path | None = None,
) -> list[str]:
    """Train each of `variants` (`main`), at once where `at_once` allows; `out` and `plots`
    name each variant's folder and TSV with "{variant}" (required for more than one).
    Returns the summaries, in the order of `variants`."""
    if not variants:
        raise UserError("name at least one --variant")
    if len(set(variants)) < len(variants):
        raise UserError(f"a variant is named twice: {', '.join(variants)}")
    for v in variants:
        grl_strength(v)  # an unknown variant fails before any training
    for name, path in (("--out", out), ("--plots", plots)):
        if len(variants) > 1 and VARIANT_FIELD not in str(path):
            raise UserError(f"{name} {path}: with several variants it must hold {VARIANT_FIELD}")
    common = {"laion": laion, "flickr30k": flickr30k, "params": params, "clip": clip}
    jobs = [{**common, "variant": v, "out": Path(str(out).replace(VARIANT_FIELD, v)),
             "plots": Path(str(plots).replace(VARIANT_FIELD, v))} for v in variants]  # fmt: skip
    if not at_once(load(Settings, params), len(jobs)):
        return [main(**job) for job in jobs]
    spawn = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with ProcessPoolExecutor(len(jobs), mp_context=spawn) as pool:
        futures = [pool.submit(main, **job) for job in jobs]
        return [f.result() for f in futures]
