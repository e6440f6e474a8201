"""The VQA head's training pass and validation pass (the `train_vqa` stage runs the epochs).

One epoch: shuffled batches, gradient accumulation over `grad_accum` batches, bf16
autocast at `compute.precision` on CUDA (`pipeline.compute`), the loss of `pipeline.nn.vqa_head.vqa_loss`. Validation: the
same loss and the top-1 accuracy among the question type's candidate answers (ranked as
`evaluate_vqa` ranks them, `pipeline.nn.vqa_head.answer_scores`), the two numbers early
stopping can watch. Under torchrun
(pipeline.distributed) every rank draws the same permutation and trains on its strided
slice of it (`batch_size` is per rank); DDP all-reduces the gradients only on the
micro-batch that steps the optimizer. Validation rows are split the same way and the loss
/ accuracy sums all-reduced, so every rank sees the global numbers.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from pipeline import distributed
from pipeline.compute import autocast, scaler
from pipeline.nn.vqa_head import answer_scores, vqa_loss
from pipeline.vqa.data import VQASplit

if TYPE_CHECKING:
    from pipeline.stages.train_vqa import Settings


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    data: VQASplit,
    answer_emb: torch.Tensor,
    settings: Settings,
    device: torch.device,
    candidates: dict[str, list[int]] | None = None,
) -> tuple[float, float]:
    """(mean loss, top-1 accuracy among the qtype's candidates) of `data` in eval mode.

    Under torchrun each rank scores its strided slice and the sums are all-reduced.
    """
    if len(data) == 0:
        return float("nan"), float("nan")
    if isinstance(model, DDP):
        model = model.module
    model.eval()
    total, correct = 0.0, 0
    qtypes = np.array(data.column("qtype"), dtype=object)
    bs = settings.eval_batch_size
    n_answers = answer_emb.shape[0]
    masks = {}
    for q, ids in (candidates or {}).items():
        m = torch.full((n_answers,), float("-inf"), device=device)
        m[ids] = 0.0
        masks[q] = m
    rows = np.arange(len(data))
    if distributed.is_distributed():
        rows = rows[distributed.rank() :: distributed.world_size()]
    for start in range(0, len(rows), bs):
        idx = rows[start : start + bs]
        image, question, label = data.batch(idx, device)
        with autocast(device):
            out = model(image, question)
        loss = vqa_loss(settings.loss, out, answer_emb, label)
        total += float(loss) * len(idx)
        logits = answer_scores(out, answer_emb)
        if masks:
            zero = torch.zeros(n_answers, device=device)
            logits = logits + torch.stack([masks.get(q, zero) for q in qtypes[idx]])
        correct += int((logits.argmax(dim=1) == label).sum())
    if distributed.is_distributed():
        total, correct_f = distributed.all_reduce_sum([total, correct])
        correct = round(correct_f)
    return total / len(data), correct / len(data)


def train_epoch(
    model: torch.nn.Module,
    data: VQASplit,
    answer_emb: torch.Tensor,
    opt: torch.optim.Optimizer,
    settings: Settings,
    device: torch.device,
    gen: torch.Generator,
    desc: str,
) -> float:
    """One pass over `data` in shuffled batches with gradient accumulation; mean loss.

    Under torchrun: this rank's slice of the shared permutation (`distributed.shard`), and
    the mean loss over all ranks.
    """
    model.train()
    bs, accum = settings.batch_size, settings.grad_accum
    perm = torch.randperm(len(data), generator=gen).numpy()
    perm = distributed.shard(perm)
    starts = list(range(0, len(perm), bs))
    total = 0.0
    grad_scaler = scaler(device)  # fp16: scaled loss; else a pass-through
    opt.zero_grad(set_to_none=True)
    bar = tqdm(starts, desc=desc, unit="batch", disable=not sys.stderr.isatty(), leave=False)
    for step, start in enumerate(bar):
        idx = perm[start : start + bs]
        image, question, label = data.batch(idx, device)
        stepping = (step + 1) % accum == 0 or step == len(starts) - 1
        # DDP: all-reduce gradients only on the micro-batch that steps the optimizer
        skip_sync = isinstance(model, DDP) and not stepping
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            with autocast(device):
                out = model(image, question)
            loss = vqa_loss(settings.loss, out, answer_emb, label)
            grad_scaler.scale(loss / accum).backward()
        if stepping:
            grad_scaler.step(opt)
            grad_scaler.update()
            opt.zero_grad(set_to_none=True)
        total += float(loss.detach()) * len(idx)
    if distributed.is_distributed():
        total, seen = distributed.all_reduce_sum([total, len(perm)])
        return total / max(seen, 1)
    return total / max(len(data), 1)
