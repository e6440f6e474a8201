"""train_vqa stage: the VQA_CLIP head on cached image + question embeddings.

Recipe of the source paper (section 2.2.1), every number a param: batch 32, AdamW
(lr 5e-5, weight decay 1e-4), 3 epochs, gradient accumulation 2, a step learning-rate
schedule (StepLR, stepped once per epoch), bf16 autocast on CUDA. Loss `cosine`
(1 - cos(pred, answer embedding)), `ce` (softmax over the vocabulary, logits = scale *
cosine) or `both`. Train and validation loss per epoch go to `<plots>/vqa.tsv`.

Under `torchrun` (pipeline.distributed) the head is wrapped in DistributedDataParallel:
every rank draws the same shuffled order each epoch and trains on its strided slice of it
(`batch_size` is per rank), gradients are all-reduced; validation rows are split the same
way and the loss / accuracy sums all-reduced, so every rank logs the global numbers. Only
rank 0 writes the model folder, the plots and the report.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from pipeline import distributed
from pipeline.atomic import write_text
from pipeline.errors import UserError
from pipeline.nn.vqa_head import LOSSES, VQAHead, answer_logits, build_head, save_head, vqa_loss
from pipeline.params import torch_device, typed
from pipeline.report import Report
from pipeline.vqa_data import (
    VQASplit,
    load_split,
    load_vocab,
    open_embeddings,
    qtype_candidates,
    read_train_answers,
)

DEFAULTS: dict[str, Any] = {
    "batch_size": 32,
    "lr": 5e-5,
    "weight_decay": 1e-4,
    "epochs": 3,
    "grad_accum": 2,
    "lr_step_size": 1,  # epochs between learning-rate decays (StepLR)
    "lr_gamma": 0.5,
    "amp": True,  # bf16 autocast on CUDA (ignored on CPU)
    "loss": "cosine",
    "ce_scale": 20.0,
    "fusion": "concat",
    "hidden": [512],
    "dropout": 0.1,
    "device": "auto",
    "eval_batch_size": 4096,
    "image_source": "auto",  # auto | whole | crop (box crops when embed wrote them)
}


def settings(params: dict[str, Any]) -> dict[str, Any]:
    """Params merged over the defaults, validated."""
    p = {**DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    p = typed(p, DEFAULTS, "train_vqa", positive=("lr_gamma", "ce_scale", "eval_batch_size"))
    if p["loss"] not in LOSSES:
        raise UserError(f"train_vqa.loss must be one of {', '.join(LOSSES)}, got {p['loss']!r}")
    for key in ("batch_size", "epochs", "grad_accum", "lr_step_size"):
        if int(p[key]) < 1:
            raise UserError(f"train_vqa.{key} must be >= 1, got {p[key]}")
    return p


def pick_device(name: str = "auto") -> torch.device:
    return torch_device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when asked, a no-op otherwise (CPU stays fp32)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(
    model: VQAHead,
    data: VQASplit,
    answer_emb: torch.Tensor,
    p: dict[str, Any],
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
    bs = int(p["eval_batch_size"])
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
        with autocast(device, bool(p["amp"])):
            pred = model(image, question)
        pred = pred.float()
        loss = vqa_loss(p["loss"], pred, answer_emb, label, float(p["ce_scale"]))
        total += float(loss) * len(idx)
        logits = answer_logits(pred, answer_emb, 1.0)
        if masks:
            zero = torch.zeros(n_answers, device=device)
            logits = logits + torch.stack([masks.get(q, zero) for q in qtypes[idx]])
        correct += int((logits.argmax(dim=1) == label).sum())
    if distributed.is_distributed():
        total, correct_f = distributed.all_reduce_sum([total, correct])
        correct = round(correct_f)
    return total / len(data), correct / len(data)


def train_epoch(
    model: VQAHead,
    data: VQASplit,
    answer_emb: torch.Tensor,
    opt: torch.optim.Optimizer,
    p: dict[str, Any],
    device: torch.device,
    gen: torch.Generator,
    desc: str,
) -> float:
    """One pass over `data` in shuffled batches with gradient accumulation; mean loss.

    Under torchrun: this rank's slice of the shared permutation (`distributed.shard`), and
    the mean loss over all ranks.
    """
    model.train()
    bs, accum = int(p["batch_size"]), int(p["grad_accum"])
    perm = torch.randperm(len(data), generator=gen).numpy()
    perm = distributed.shard(perm)
    starts = list(range(0, len(perm), bs))
    total = 0.0
    opt.zero_grad(set_to_none=True)
    bar = tqdm(starts, desc=desc, unit="batch", disable=not sys.stderr.isatty(), leave=False)
    for step, start in enumerate(bar):
        idx = perm[start : start + bs]
        image, question, label = data.batch(idx, device)
        stepping = (step + 1) % accum == 0 or step == len(starts) - 1
        # DDP: all-reduce gradients only on the micro-batch that steps the optimizer
        skip_sync = isinstance(model, DDP) and not stepping
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            with autocast(device, bool(p["amp"])):
                pred = model(image, question)
            loss = vqa_loss(p["loss"], pred.float(), answer_emb, label, float(p["ce_scale"]))
            (loss / accum).backward()
        if stepping:
            opt.step()
            opt.zero_grad(set_to_none=True)
        total += float(loss.detach()) * len(idx)
    if distributed.is_distributed():
        total, seen = distributed.all_reduce_sum([total, len(perm)])
        return total / max(seen, 1)
    return total / max(len(data), 1)


def run(
    qa_dir: str | Path,
    emb_dir: str | Path,
    out_dir: str | Path,
    plots_dir: str | Path,
    params: dict[str, Any],
) -> Report:
    """Train the head on data/qa train (validated on val) and save it to `out_dir`.

    Under torchrun: DDP over the ranks, rank 0 writes (see the module docstring).
    """
    p = settings(params)
    with distributed.session(str(p["device"])) as device:
        return _run(qa_dir, emb_dir, out_dir, plots_dir, p, device)


def _run(
    qa_dir: str | Path,
    emb_dir: str | Path,
    out_dir: str | Path,
    plots_dir: str | Path,
    p: dict[str, Any],
    device: torch.device,
) -> Report:
    seed = int(p.get("seed", 0))
    seed_everything(seed)
    main = distributed.is_main()
    report = Report("train_vqa")
    store = open_embeddings(emb_dir)
    vocab = load_vocab(qa_dir, store)
    source = str(p["image_source"])
    train = load_split(qa_dir, "train", store, vocab, report, True, source)
    val = load_split(qa_dir, "val", store, vocab, report, True, source)
    if len(train) == 0:
        raise UserError(f"no usable training rows in {qa_dir}/train.parquet (see skipped reasons)")
    train_text = read_train_answers(qa_dir, vocab)
    candidates = qtype_candidates(
        train_text.column("qtype").to_pylist(), train_text.column("label").to_pylist()
    )

    model = build_head(p, store.dim, vocab.emb.shape[1]).to(device)
    answer_emb = torch.from_numpy(vocab.emb).to(device)
    net: torch.nn.Module = model
    if distributed.is_distributed():
        torch.manual_seed(seed + distributed.rank())  # own dropout masks per rank
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(
        model.parameters(), lr=float(p["lr"]), weight_decay=float(p["weight_decay"])
    )
    sched = torch.optim.lr_scheduler.StepLR(
        opt, step_size=int(p["lr_step_size"]), gamma=float(p["lr_gamma"])
    )
    gen = torch.Generator().manual_seed(seed)
    rows = ["epoch\ttrain_loss\tval_loss\tval_top1\tlr"]
    history = []
    t0 = time.perf_counter()
    for epoch in range(1, int(p["epochs"]) + 1):
        lr = opt.param_groups[0]["lr"]
        train_loss = train_epoch(
            net, train, answer_emb, opt, p, device, gen, f"train_vqa epoch {epoch}"
        )
        val_loss, val_top1 = evaluate_loss(model, val, answer_emb, p, device, candidates)
        sched.step()
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "lr": lr,
                "val_loss": None if np.isnan(val_loss) else val_loss,
                "val_top1": None if np.isnan(val_top1) else val_top1,
            }
        )
        rows.append(f"{epoch}\t{train_loss:.6f}\t{val_loss:.6f}\t{val_top1:.6f}\t{lr:.3g}")
        if main:
            print(
                f"epoch {epoch}: train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
                f"val_top1 {val_top1:.4f}",
                file=sys.stderr,
            )
    if main:
        write_text(Path(plots_dir) / "vqa.tsv", "\n".join(rows) + "\n")

    manifest = store.manifest
    meta = {
        "answers": vocab.answers,
        "qtype_candidates": candidates,
        "clip": manifest.get("model"),
        "clip_revision": manifest.get("revision"),
        "loss": p["loss"],
        "ce_scale": float(p["ce_scale"]),
        "train": {k: p[k] for k in DEFAULTS if k not in ("device",)}
        | {
            "seed": seed,
            "n_train": len(train),
            "n_val": len(val),
            "device": device.type,
            "history": history,
        },
    }
    if main:
        save_head(model.cpu(), out_dir, answer_emb.cpu(), meta)
    report.written = len(train) + len(val)
    report.extra.update(
        {
            "n_train": len(train),
            "n_val": len(val),
            "n_answers": len(vocab.answers),
            "final_train_loss": history[-1]["train_loss"],
            "final_val_loss": history[-1]["val_loss"],
            "device": device.type,
        }
    )
    if main:
        report.save(Path(out_dir) / "report.json")  # no timings inside the model folder
    if distributed.is_distributed():
        report.extra["rank"] = distributed.rank()
        report.extra["world_size"] = distributed.world_size()
        report.extra["weights_sha256"] = distributed.weights_digest(model)
    report.extra["seconds"] = round(time.perf_counter() - t0, 2)
    return report
