"""train_vqa: the VQA_CLIP head on cached image + question embeddings.

Recipe of the source paper (section 2.2.1), every number a setting: batch 32, AdamW
(lr 5e-5, weight decay 1e-4), 3 epochs, gradient accumulation 2, a step learning-rate
schedule (StepLR, stepped once per epoch), bf16 autocast on CUDA. Loss `cosine`
(1 - cos(pred, answer embedding)), `ce` (softmax over the vocabulary, logits = scale *
cosine) or `both`. Train and validation loss per epoch go to the `plots` TSV.

Under `torchrun` (pipeline.distributed) the head is wrapped in DistributedDataParallel
(see `pipeline.vqa.training`); only rank 0 writes the model folder, the plot and the
report, and each rank's summary names its rank and a digest of its weights.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline import distributed
from pipeline.errors import UserError
from pipeline.nn.vqa_head import Fusion, Loss, VQAHead, VQAHeadConfig, save_head
from pipeline.report import Report
from pipeline.settings import as_dict, check, check_device, load
from pipeline.training import seed_everything, write_plot
from pipeline.vqa.data import (
    ImageSource,
    load_split,
    load_vocab,
    open_embeddings,
    qtype_candidates,
    read_train_answers,
)
from pipeline.vqa.training import evaluate_loss, train_epoch


@dataclass(frozen=True)
class Settings:
    """The head (fusion, MLP) and its optimisation."""

    SECTION: ClassVar[str] = "train_vqa"
    batch_size: int = 32  # questions per batch (per rank under torchrun)
    lr: float = 5e-5  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    epochs: int = 3  # passes over the train split
    grad_accum: int = 2  # batches per optimizer step
    lr_step_size: int = 1  # epochs between learning-rate decays (StepLR)
    lr_gamma: float = 0.5  # StepLR decay factor
    amp: bool = True  # bf16 autocast on CUDA (the CPU stays fp32)
    loss: Loss = "cosine"  # cosine (paper) | ce (softmax over the vocabulary) | both
    ce_scale: float = 20.0  # ce logits = ce_scale * cosine to each answer
    fusion: Fusion = "concat"  # image i, question q -> concat [i, q] | product i*q | both
    hidden: tuple[int, ...] = (512,)  # hidden layer widths (Linear -> ReLU -> Dropout each)
    dropout: float = 0.1  # after each hidden layer
    image_source: ImageSource = "auto"  # auto: the box crop when embed wrote it | whole | crop
    eval_batch_size: int = 4096  # rows per validation forward
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # top-level `seed`: initialisation, dropout, batch order

    def __post_init__(self) -> None:
        for key in ("batch_size", "epochs", "grad_accum", "lr_step_size", "eval_batch_size"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("lr", "lr_gamma", "ce_scale"):
            check(getattr(self, key) > 0, key, "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(all(h >= 1 for h in self.hidden), "hidden", "widths must be >= 1")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        check_device(self.device)


SETTINGS = (Settings,)


def main(qa: Path, emb: Path, out: Path, plots: Path, params: Path) -> str:
    """Train on `qa` train (validated on val), write `out/` and the `plots` TSV; the summary."""
    s = load(Settings, params)
    with distributed.session(s.device) as device:
        seed_everything(s.seed)
        report = Report("train_vqa")
        store = open_embeddings(emb)
        vocab = load_vocab(qa, store)
        train = load_split(qa, "train", store, vocab, report, True, s.image_source)
        val = load_split(qa, "val", store, vocab, report, True, s.image_source)
        if len(train) == 0:
            raise UserError(f"no usable training rows in {qa}/train.parquet (see skipped reasons)")
        text = read_train_answers(qa, vocab)
        candidates = qtype_candidates(
            text.column("qtype").to_pylist(), text.column("label").to_pylist()
        )

        config = VQAHeadConfig(store.dim, vocab.emb.shape[1], s.fusion, list(s.hidden), s.dropout)
        model = VQAHead(config).to(device)
        answer_emb = torch.from_numpy(vocab.emb).to(device)
        net: torch.nn.Module = model
        if distributed.is_distributed():
            torch.manual_seed(s.seed + distributed.rank())  # own dropout masks per rank
            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=s.lr_step_size, gamma=s.lr_gamma)
        gen = torch.Generator().manual_seed(s.seed)
        rows = []
        for epoch in range(1, s.epochs + 1):
            lr = opt.param_groups[0]["lr"]
            loss = train_epoch(net, train, answer_emb, opt, s, device, gen, f"epoch {epoch}")
            val_loss, val_top1 = evaluate_loss(model, val, answer_emb, s, device, candidates)
            sched.step()
            rows.append({"epoch": epoch, "train_loss": loss, "val_loss": val_loss,
                         "val_top1": val_top1, "lr": lr})  # fmt: skip
            if distributed.is_main():
                print(f"epoch {epoch}: train_loss {loss:.4f}  val_loss {val_loss:.4f}  "
                      f"val_top1 {val_top1:.4f}", file=sys.stderr)  # fmt: skip

        history = [{k: None if np.isnan(v) else v for k, v in r.items()} for r in rows]
        counts = {"n_train": len(train), "n_val": len(val)}
        report.written = len(train) + len(val)
        report.extra.update(counts, n_answers=len(vocab.answers),
                            final_train_loss=history[-1]["train_loss"],
                            final_val_loss=history[-1]["val_loss"], device=device.type)  # fmt: skip
        trained = {k: v for k, v in as_dict(s).items() if k != "device"}
        trained |= {**counts, "device": device.type, "history": history}
        manifest = store.manifest
        meta = {"answers": vocab.answers, "qtype_candidates": candidates,
                "clip": manifest.get("model"), "clip_revision": manifest.get("revision"),
                "loss": s.loss, "ce_scale": s.ce_scale, "train": trained}  # fmt: skip
        if distributed.is_main():
            write_plot(plots, rows)
            save_head(model.cpu(), out, answer_emb.cpu(), meta)
            report.save(Path(out) / "report.json")  # no timings inside the model folder

        summary = (f"{report.summary()}; train {len(train)} val {len(val)}, final train_loss "
                   f"{loss:.4f} val_loss {val_loss:.4f}")  # fmt: skip
        if distributed.is_distributed():
            summary += (f"; rank {distributed.rank()}/{distributed.world_size()}, "
                        f"weights {distributed.weights_digest(model)}")  # fmt: skip
        return summary
