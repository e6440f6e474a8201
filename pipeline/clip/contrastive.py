"""Contrastive training of a CLIP on image-caption pairs.

CLIP's symmetric contrastive loss with a learnable temperature (Radford et al. 2021,
"Learning Transferable Visual Models From Natural Language Supervision", Fig. 3), AdamW
(no decay on gains and biases), linear warm-up then cosine decay, random translations
as the only augmentation. One row per epoch: train loss, held-out loss and recalls.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.clip.backbone import Backbone, normalize_pixels
from pipeline.clip.pairs import PairSet
from pipeline.clip.retrieval import evaluate

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the temperature at 100


def pad_ids(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask), right-padded to the longest."""
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids, mask


def clip_loss(model, input_ids, mask, pixels, extra=None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: mean of the image->text and text->image cross-entropies
    over the batch's cosine similarities times the learned `logit_scale.exp()` (computed
    in fp32 from the unit embeddings, also under bf16 autocast); plus
    `extra(output)` (a loss on the same forward's `image_embeds`, ...) when given."""
    out = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
    target = torch.arange(len(input_ids), device=out.logits_per_image.device)
    with torch.autocast(target.device.type, enabled=False):  # fp32 logits (scale up to 100)
        text, image = out.text_embeds.float(), out.image_embeds.float()  # unit rows
        logits_t = torch.matmul(text, image.t()) * model.logit_scale.float().exp()
        logits_i = logits_t.t()
    loss = (F.cross_entropy(logits_i, target) + F.cross_entropy(logits_t, target)) / 2
    return loss + extra(out) if extra is not None else loss


def random_shift(pixels: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `shift` pixels (edge pixels repeated): (n, 3, S, S)."""
    n, _, h, w = pixels.shape
    padded = F.pad(pixels.float(), (shift, shift, shift, shift), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets)])


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW as CLIP's (betas 0.9/0.98, eps 1e-6); no weight decay on 1-d parameters."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(
    bb: Backbone,
    data: PairSet,
    held: PairSet,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    grad_clip: float,
    augment_shift: int,
    seed: int,
) -> list[dict[str, float]]:
    """Contrastive training on `data`; one row per epoch (train loss, held-out metrics).

    Each epoch reshuffles the images (dropping the ragged last batch) and picks one of
    each image's captions at random; `grad_clip` 0 and `augment_shift` 0 switch those off.
    """
    from tqdm import tqdm

    model = bb.model
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tokens = [bb.tokenize(caps) for caps in data.captions]  # per image, all its captions
    held_ids = bb.tokenize([caps[0] for caps in held.captions])
    batch = min(batch_size, len(data))
    steps_per_epoch = len(data) // batch  # drop the ragged last batch (reshuffled each epoch)
    total = steps_per_epoch * epochs
    opt = make_optimizer(model, lr, weight_decay)
    rows, step = [], 0
    bar = tqdm(total=total, desc="clip_bootstrap", disable=None, unit="step")
    model.train()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(data), generator=gen)
        pick = torch.randint(0, 1 << 30, (len(data),), generator=gen)
        losses = []
        for b in range(steps_per_epoch):
            idx = perm[b * batch : (b + 1) * batch]
            ids = [tokens[i][int(pick[i]) % len(tokens[i])] for i in idx.tolist()]
            step_lr = lr_at(step, total, warmup_steps, lr)
            losses.append(
                train_step(bb, opt, ids, data.pixels[idx], step_lr, grad_clip, augment_shift, gen)
            )
            step += 1
            bar.update(1)
        rows.append(epoch_row(bb, epoch, float(np.mean(losses)), held, held_ids))
        bar.set_postfix(loss=rows[-1]["train_loss"], r1=rows[-1]["heldout_i2t_r1"])
    bar.close()
    model.eval()
    return rows


def train_step(
    bb: Backbone, opt: torch.optim.Optimizer, ids: list[list[int]], pixels: torch.Tensor,
    lr: float, grad_clip: float, augment_shift: int, gen: torch.Generator, extra=None,
) -> float:  # fmt: skip
    """One optimiser step of the symmetric contrastive loss (plus `clip_loss`'s `extra`) on
    token `ids` and uint8 `pixels` (shifted by up to `augment_shift` pixels with `gen`) at
    learning rate `lr`, clipping every parameter `opt` holds; the temperature stays
    clamped. Returns the batch loss."""
    input_ids, mask = pad_ids(ids, bb.pad_token_id)
    if augment_shift:
        pixels = random_shift(pixels, augment_shift, gen)
    pixels = normalize_pixels(pixels.to(bb.device), bb.mean, bb.std)
    for group in opt.param_groups:
        group["lr"] = lr
    with bb.autocast():
        loss = clip_loss(bb.model, input_ids.to(bb.device), mask.to(bb.device), pixels, extra)
    opt.zero_grad(set_to_none=True)
    grad_scaler = bb.scaler()
    grad_scaler.scale(loss).backward()
    if grad_clip:
        grad_scaler.unscale_(opt)
        params = [p for group in opt.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    grad_scaler.step(opt)
    grad_scaler.update()
    with torch.no_grad():
        bb.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return float(loss.detach())


def epoch_row(
    bb: Backbone, epoch: int, train_loss: float, held: PairSet, held_ids: list[list[int]]
) -> dict[str, float]:
    """One line of the curve: train loss, held-out loss and recalls, temperature."""
    row = {"epoch": epoch, "train_loss": round(train_loss, 6)}
    row.update({f"heldout_{k}": v for k, v in evaluate(bb, held, held_ids).items()})
    row["logit_scale"] = round(float(bb.model.logit_scale.detach().exp()), 4)
    return row


def mean_train_loss(bb: Backbone, data: PairSet, batch_size: int) -> float:
    """Contrastive loss of the current model over the training pairs (first caption each),
    in consecutive batches of `batch_size` as in training: the curve's epoch-0 point."""
    model = bb.model
    model.eval()
    batch = min(batch_size, len(data))
    losses = []
    with torch.inference_mode():
        for start in range(0, len(data) - batch + 1, batch):
            sel = slice(start, start + batch)
            ids, mask = pad_ids(bb.tokenize([c[0] for c in data.captions[sel]]), bb.pad_token_id)
            pixels = normalize_pixels(data.pixels[sel].to(bb.device), bb.mean, bb.std)
            with bb.autocast():
                loss = clip_loss(model, ids.to(bb.device), mask.to(bb.device), pixels)
            losses.append(float(loss))
    return float(np.mean(losses))
