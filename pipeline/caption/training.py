"""Training the caption decoder: one optimiser step, one epoch, the GRL schedule.

The stage (`pipeline.stages.train_caption`) runs three phases (source paper 3.1):

1. `pretrain`: caption loss on LAION captions.
2. `adapt`: caption loss on LAION continues; a domain discriminator on the adapter's
   features (the image prefix) behind a gradient-reversal layer separates LAION images
   (source) from Flickr30k images (target).
3. `finetune`: caption loss on the labelled Flickr30k train captions
   (`labelled_fraction` of the train images keep their captions) plus `source_weight`
   times the LAION caption loss (DANN trains the source task throughout; 0: Flickr30k
   captions only, the schedule before issue 10); the domain loss keeps using LAION +
   Flickr30k images. An epoch of fine-tuning is as many steps as one pass over *all*
   Flickr30k train captions, whatever the labelled fraction: the labelled captions and
   the LAION captions are each drawn in reshuffled passes to fill it, so every fraction
   gets the same steps and the same λ schedule (fraction 1, weight 0: exactly the old
   epochs). With no labelled image (`labelled_fraction: 0`) fine-tuning is unsupervised
   adaptation: LAION captions only, Flickr30k train images only as unlabelled targets.
   With `text_weight` > 0 fine-tuning also decodes *all* Flickr30k train captions from
   their own CLIP text embeddings, unit-normalised plus Gaussian noise of variance
   `text_noise` (CapDec, Nukrai et al. 2022, arXiv 2211.00575: 0.016), no image paired:
   target-domain text without images, a different kind of label than captioned images.

The λ of the GRL follows Ganin & Lempitsky's warm start over phases 2-3 (`grl_gamma`,
peak `adv_weight`). Variant `noada` runs the very same steps, batches and discriminator
with λ = 0: the discriminator still trains (so its accuracy shows how separable the
domains stay) but the features get no gradient from it. Each step's domain batches come
from their own seeded generator, caption batches from another, the fine-tuning LAION
batches from a third, so both variants see the same data in the same order.

Under `torchrun` (pipeline.distributed): every rank draws the same caption order and the
same domain draws and takes its strided slice of both (`batch_size` and `domain_batch` are
per rank); the decoder's and the discriminator's gradients are averaged over ranks after
each backward (one flat all-reduce: the decoder is called through `prefix` as well as
`forward`, so it is not wrapped in DistributedDataParallel). Epoch statistics are
all-reduced means; the validation loss is computed on every rank over the whole val set
(weights are identical, so are the results).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from pipeline import distributed
from pipeline.caption.data import CaptionSet, TrainingData
from pipeline.compute import autocast, scaler
from pipeline.errors import UserError
from pipeline.nn.caption_decoder import SOURCE, TARGET, CaptionDecoder, split_batch
from pipeline.nn.discriminator import DomainDiscriminator, domain_adversarial_loss
from pipeline.nn.grl import warm_start_coeff

if TYPE_CHECKING:
    from pipeline.stages.train_caption import Settings

VARIANTS = {"noada": 0.0, "ada": 1.0}  # multiplier of the GRL coefficient
PLOT_COLUMNS = (
    "epoch",
    "phase",
    "caption_loss",  # the phase's captions: LAION (pretrain, adapt), labelled Flickr30k (finetune)
    "disc_loss",
    "adv_loss",
    "disc_acc",
    "val_loss",
    "lambda",
    "source_loss",  # the LAION caption loss added in finetune (its weight: source_weight)
    "laion_val_loss",  # the held-out LAION captions' loss
    "select_loss",  # the loss the kept epoch is chosen on (train_caption.selection_set)
    "text_loss",  # the loss on Flickr30k captions from noisy text embeddings (text_weight)
)


def grl_strength(variant: str) -> float:
    """The multiplier of λ for `variant` (`noada`: 0, `ada`: 1)."""
    if variant not in VARIANTS:
        raise UserError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    return VARIANTS[variant]


def batches(
    n: int, batch_size: int, gen: torch.Generator, rows: int | None = None
) -> list[torch.Tensor]:
    """Shuffled index batches over `rows` draws (default `n`: one pass) from `n` items,
    reshuffled after each pass; under torchrun this rank's slice of the shared order."""
    rows = n if rows is None else rows
    if n == 0 or rows == 0:
        return []
    perm = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(rows / n))])
    perm, n = perm[:rows], rows
    if distributed.is_distributed():
        perm = torch.from_numpy(distributed.shard(perm.numpy()))
        n = len(perm)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps of one epoch over `n` captions on this rank."""
    return math.ceil(math.ceil(n / distributed.world_size()) / batch_size)


@dataclass
class Adversary:
    """Domain batches (LAION images vs Flickr30k images) and the GRL's λ for each step.

    λ = strength · warm_start_coeff(done / total_steps, gamma, peak); `done` counts the
    adversarial steps taken so far. Under torchrun each rank keeps its strided part of a
    global batch drawn identically on every rank.
    """

    source: torch.Tensor  # (n_source, d) image embeddings
    target: torch.Tensor  # (n_target, d)
    batch: int  # rows of each domain per step and rank
    gen: torch.Generator
    strength: float  # 0 for noada, 1 for ada
    gamma: float
    peak: float
    total_steps: int
    done: int = 0

    def draw(self) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
        """The next (source rows, target rows) pair and its λ."""
        world = distributed.world_size()
        s = torch.randint(len(self.source), (self.batch * world,), generator=self.gen)
        t = torch.randint(len(self.target), (self.batch * world,), generator=self.gen)
        if world > 1:  # this rank's part of the shared global domain batch
            s, t = s[distributed.rank() :: world], t[distributed.rank() :: world]
        progress = self.done / max(self.total_steps, 1)
        coeff = self.strength * warm_start_coeff(progress, self.gamma, self.peak)
        self.done += 1
        return (self.source[s], self.target[t]), coeff


@dataclass
class Arm:
    """Captions trained beside a phase's own, a batch of them each step: the LAION captions
    of finetune (`source_loss`), or the Flickr30k train captions decoded from their text
    embeddings (`text_loss`, `noise_std` > 0: unit-normalised, then Gaussian noise)."""

    name: str  # its statistic
    weight: float
    domain: int  # the domain token it is decoded with
    data: CaptionSet
    gen: torch.Generator  # its batch order and noise
    noise_std: float = 0.0

    def batch(self, idx: torch.Tensor) -> tuple:
        """(name, weight, domain, inputs, ids, lengths) of rows `idx`, as `Trainer.step` takes."""
        emb = self.data.image_emb[idx]
        if self.noise_std:
            emb = F.normalize(emb.float(), dim=-1)
            noise = torch.randn(emb.shape, generator=self.gen).to(emb.device)
            emb = emb + self.noise_std * noise
        return self.name, self.weight, self.domain, emb, self.data.ids[idx], self.data.lengths[idx]


class Trainer:
    """Model, discriminator, optimisers, one training step and one epoch (also bench/'s)."""

    def __init__(self, model: CaptionDecoder, settings: Settings, device: torch.device):
        self.model, self.settings, self.device = model.to(device), settings, device
        feat_dim = model.config.prefix_len * model.config.width
        self.disc = DomainDiscriminator(feat_dim, settings.disc_hidden, settings.disc_dropout)
        self.disc.to(device)
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        self.dopt = torch.optim.AdamW(self.disc.parameters(), lr=settings.disc_lr)
        self.scaler = scaler(device)  # fp16 on CUDA: a scaled loss; else a pass-through
        self.step_no = 0

    def set_lr(self, base: float) -> float:
        """Linear warm-up over the first `warmup_steps` steps of the whole run."""
        warm = self.settings.warmup_steps
        lr = base * min(1.0, (self.step_no + 1) / warm) if warm > 0 else base
        for group in self.opt.param_groups:
            group["lr"] = lr
        return lr

    def step(
        self,
        image_emb: torch.Tensor | None,
        ids: torch.Tensor | None,
        lengths: torch.Tensor | None,
        domain: tuple[torch.Tensor, torch.Tensor] | None,
        coeff: float,
        beside: Iterable[tuple] = (),
        data_domain: int = SOURCE,
    ) -> dict[str, torch.Tensor]:
        """One optimiser step on a caption batch (None: none; of domain `data_domain`, whose
        token the decoder reads with `domain_token`) + each `beside` batch's caption loss
        times its weight ((name, weight, domain, inputs, ids, lengths), as `Arm.batch`
        gives) + the domain loss of a domain batch pair if given. All caption batches go
        through one forward.

        Returns detached scalar tensors (no device sync per step): `caption_loss`, each
        beside batch's loss under its name, and the domain statistics, where computed."""
        dev = self.device
        self.model.train()
        self.disc.train()
        parts = []  # (stat name, weight, domain id, image_emb, ids, lengths)
        if image_emb is not None:
            parts.append(("caption_loss", 1.0, data_domain, image_emb, ids, lengths))
        parts.extend((name, float(w), *rest) for name, w, *rest in beside)
        width = max(int(p[5].max()) for p in parts)  # drop all-padding columns
        pad = self.model.config.pad_token_id
        ids = torch.cat([F.pad(p[4][:, :width], (0, width - min(width, p[4].shape[1])),
                               value=pad) for p in parts])  # fmt: skip
        lengths = torch.cat([p[5] for p in parts])
        domains = torch.cat([torch.full((len(p[3]),), p[2]) for p in parts]).to(dev)
        inputs, targets, mask = split_batch(ids.to(dev), lengths.to(dev))
        out: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=dev)
        with autocast(dev):
            pred = self.model(torch.cat([p[3] for p in parts]).to(dev).float(), inputs, domains)
            start = 0
            for name, weight, _, emb, *_ in parts:
                rows = slice(start, start + len(emb))
                part = self.model.caption_loss(pred[rows], targets[rows], mask[rows])
                out[name] = part.detach()
                loss = part if (len(parts), weight) == (1, 1.0) else loss + weight * part
                start += len(emb)
            if domain is not None:
                src, tgt = (x.to(dev).float() for x in domain)
                feats = self.model.prefix(torch.cat([src, tgt]))
                d = domain_adversarial_loss(self.disc, feats[: len(src)], feats[len(src) :],
                                            coeff, self.settings.disc_penalty)  # fmt: skip
                loss = loss + d.loss
                out |= {
                    "disc_loss": d.loss.detach(),
                    "adv_loss": d.confusion,
                    "disc_acc": d.accuracy,
                }
        self.opt.zero_grad(set_to_none=True)
        self.dopt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        distributed.all_reduce_grads(self.model, self.disc)  # no-op without torchrun
        if self.settings.grad_clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.scaler.step(self.opt)
        if domain is not None:
            self.scaler.step(self.dopt)
        self.scaler.update()
        self.step_no += 1
        return out

    def epoch(
        self,
        data: CaptionSet,
        lr: float,
        gen: torch.Generator,
        adversary: Adversary | None,
        progress: Iterable | None = None,
        *,
        rows: int | None = None,
        beside: Iterable[Arm] = (),
        data_domain: int = SOURCE,
    ) -> dict[str, float]:
        """`rows` caption draws from `data` (default: one pass over it; more: it is passed
        over again, reshuffled) in steps of `batch_size`, with a domain batch per step from
        `adversary` and a batch of each `beside` arm (drawn alike from its own generator)
        if given. An empty `data` leaves the beside batches alone.

        Returns the epoch means of the step statistics (over ranks under torchrun; nan
        for those not computed) and `lambda`, the last step's λ.
        `progress` (a tqdm bar) is advanced by one per step.
        """
        bs = self.settings.batch_size
        rows = len(data) if rows is None else rows
        main = batches(len(data), bs, gen, rows)
        arms = [(arm, batches(len(arm.data), bs, arm.gen, rows)) for arm in beside]
        sums: dict[str, list[torch.Tensor]] = {}
        coeff = 0.0
        for k in range(max([len(main), *(len(b) for _, b in arms)])):
            self.set_lr(lr)
            domain = None
            if adversary is not None:
                domain, coeff = adversary.draw()
            batch: tuple = (None, None, None)
            if main:
                idx = main[k]
                batch = (data.image_emb[idx], data.ids[idx], data.lengths[idx])
            more = [arm.batch(b[k]) for arm, b in arms if k < len(b)]
            stats = self.step(*batch, domain, coeff, more, data_domain)
            for key, val in stats.items():
                sums.setdefault(key, []).append(val)
            if progress is not None:
                progress.update(1)
        mean = {k: torch.stack(v).float().mean().item() for k, v in sums.items()}
        world = distributed.world_size()
        if world > 1:
            keys = sorted(mean)
            reduced = distributed.all_reduce_sum([mean[k] for k in keys])
            mean = {k: v / world for k, v in zip(keys, reduced, strict=True)}
        nan = float("nan")
        names = ("caption_loss", "source_loss", "text_loss", "disc_loss", "adv_loss", "disc_acc")
        return {**{k: mean.get(k, nan) for k in names}, "lambda": coeff}

    @torch.no_grad()
    def eval_loss(self, data: CaptionSet, batch_size: int = 256, domain: int = TARGET) -> float:
        """Token-weighted mean caption loss over a whole set of domain `domain` (eval mode)."""
        if len(data) == 0:
            return float("nan")
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(data), batch_size):
            inputs, targets, mask = split_batch(
                data.ids[i : i + batch_size].to(self.device),
                data.lengths[i : i + batch_size].to(self.device),
            )
            with autocast(self.device):
                pred = self.model(
                    data.image_emb[i : i + batch_size].to(self.device).float(), inputs, domain
                )
                n = int(mask.sum())
                total += self.model.caption_loss(pred, targets, mask).item() * n
            count += n
        return total / max(count, 1)


def run_record(trainer: Trainer, rows: list[dict[str, Any]], data: TrainingData) -> dict[str, Any]:
    """What a finished run saves about itself: steps, final and best losses, data counts."""
    sets = (data.laion, data.flickr30k_train, data.flickr30k_val)  # (subsets share their counts)
    skipped: dict[str, int] = {}
    for cs in sets:
        for reason, n in cs.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    last = rows[-1]
    return {
        "epochs": len(rows),
        "steps": trainer.step_no,
        "final_caption_loss": last["caption_loss"],
        "final_source_loss": last["source_loss"],
        "final_val_loss": last["val_loss"],
        "final_disc_acc": last["disc_acc"],
        "best_val_loss": min(r["val_loss"] for r in rows),
        "n_laion_captions": len(data.laion),
        "n_laion_val_images": len(data.laion_val.image_ids),
        "n_flickr30k_train_captions": len(data.flickr30k_train),
        "n_flickr30k_train_images": len(data.flickr30k_train.image_ids),
        "n_flickr30k_labelled_captions": len(data.flickr30k_labelled),
        "n_flickr30k_labelled_images": len(data.flickr30k_labelled.image_ids),
        "n_flickr30k_val_captions": len(data.flickr30k_val),
        "n_source_images": len(data.source_images),
        "n_target_images": len(data.target_images),
        "truncated_captions": sum(cs.truncated for cs in sets),
        "skipped_rows": skipped,
    }
