"""train_vqa: the VQA_CLIP head on cached image + question embeddings.

The head (`pipeline.nn.vqa_head`): the fused image + question embedding, LayerNorm'd
(`input_norm`; CLIP embeddings are unit vectors, components ~ 1/sqrt(d)), an MLP, and
two outputs: a softmax classifier over the answer vocabulary (the paper's section 1.1,
P(A|I,Q) = softmax(W v + b); loss `ce`) and a prediction in the answer-embedding space
(section 2.2's cosine loss; `cosine`). The default `both` trains the two; answers are
ranked by the classifier when there is one.

Every epoch is scored on the validation split (loss, and top-1 among the question type's
candidate answers); the weights of the best epoch by `early_stop` are kept, and training
stops after `patience` epochs without a better one. Train and validation loss, val top-1,
the learning rate and the best epoch so far go to the `plots` TSV; the kept epoch is
recorded in config.json (`train.best_epoch`) and report.json.

The source paper's recipe (section 2.2.1: cosine loss, batch 32, AdamW lr 5e-5, weight
decay 1e-4, 3 epochs, gradient accumulation 2, StepLR each epoch, mixed precision, no
early stopping) is
    dvc exp run -S train_vqa.loss=cosine -S train_vqa.lr=5e-5 -S train_vqa.epochs=3
        -S train_vqa.lr_step_size=1 -S train_vqa.input_norm=none -S train_vqa.early_stop=none

Under `torchrun` (pipeline.distributed) the head is wrapped in DistributedDataParallel
(see `pipeline.vqa.training`); validation numbers are all-reduced, so every rank keeps and
stops at the same epoch; only rank 0 writes the model folder, the plot and the report,
and each rank's summary names its rank and a digest of its weights.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline import distributed
from pipeline.compute import Compute
from pipeline.compute import session as compute_session
from pipeline.errors import UserError
from pipeline.nn.vqa_head import Fusion, InputNorm, Loss, VQAHead, head_config, save_head
from pipeline.report import Report
from pipeline.settings import as_dict, check, check_device, load
from pipeline.training import BestEpoch, cpu_threads, seed_everything, write_plot
from pipeline.vqa.data import (
    ImageSource,
    load_split,
    load_vocab,
    open_embeddings,
    qtype_candidates,
    read_train_answers,
)
from pipeline.vqa.training import evaluate_loss, train_epoch

EarlyStop = Literal["val_top1", "val_loss", "none"]


@dataclass(frozen=True)
class Settings:
    """The head (fusion, input norm, MLP, outputs) and its optimisation."""

    SECTION: ClassVar[str] = "train_vqa"
    batch_size: int = 32  # questions per batch (per rank under torchrun)
    lr: float = 1e-3  # AdamW learning rate (paper: 5e-5)
    weight_decay: float = 1e-4  # AdamW weight decay
    epochs: int = 60  # most passes over the train split (paper: 3)
    grad_accum: int = 2  # batches per optimizer step
    lr_step_size: int = 10  # epochs between learning-rate decays (StepLR; paper: 1)
    lr_gamma: float = 0.5  # StepLR decay factor
    loss: Loss = "both"  # ce (classifier) + cosine (answer embedding) | ce | cosine (paper)
    input_norm: InputNorm = "layernorm"  # LayerNorm of the fused input | none (paper)
    early_stop: EarlyStop = "val_top1"  # keep the best by val_top1 | val_loss | none: last (paper)
    patience: int = 15  # stop after this many epochs without a better one (0: run all epochs)
    fusion: Fusion = "concat"  # image i, question q -> concat [i, q] | product i*q | both
    hidden: tuple[int, ...] = (512,)  # hidden layer widths (Linear -> ReLU -> Dropout each)
    dropout: float = 0.1  # after each hidden layer
    image_source: ImageSource = "auto"  # auto: the box crop when embed wrote it | whole | crop
    eval_batch_size: int = 4096  # rows per validation forward
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 1  # CPU threads (0: torch default); a small MLP runs fastest on one
    seed: int = 0  # top-level `seed`: initialisation, dropout, batch order

    def __post_init__(self) -> None:
        for key in ("batch_size", "epochs", "grad_accum", "lr_step_size", "eval_batch_size"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        check(self.threads >= 0, "threads", "must be >= 0 (0: torch default)")
        for key in ("lr", "lr_gamma"):
            check(getattr(self, key) > 0, key, "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.patience >= 0, "patience", "must be >= 0 (0: run all epochs)")
        check(all(h >= 1 for h in self.hidden), "hidden", "widths must be >= 1")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        check_device(self.device)


SETTINGS = (Settings, Compute)


def main(qa: Path, emb: Path, out: Path, plots: Path, params: Path) -> str:
    """Train on `qa` train (validated on val), write `out/` and the `plots` TSV; the summary."""
    s, comp = load(Settings, params), load(Compute, params)
    with (
        distributed.session(s.device) as device,
        cpu_threads(s.threads if device.type == "cpu" else 0),  # CUDA runs: torch's default
        compute_session(comp, device),
    ):
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

        config = head_config(store.dim, vocab.emb.shape[1], s.fusion, s.hidden, s.dropout,
                             s.loss, len(vocab.answers), s.input_norm)  # fmt: skip
        model = VQAHead(config).to(device)
        answer_emb = torch.from_numpy(vocab.emb).to(device)
        net: torch.nn.Module = model
        if distributed.is_distributed():
            torch.manual_seed(s.seed + distributed.rank())  # own dropout masks per rank
            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=s.lr_step_size, gamma=s.lr_gamma)
        gen = torch.Generator().manual_seed(s.seed)
        early_stop = s.early_stop if len(val) else "none"  # nothing to watch: keep the last
        if early_stop != s.early_stop:
            report.note("no_validation_rows_early_stop_off", None)
        best = BestEpoch(s.patience if early_stop != "none" else 0)
        rows = []
        for epoch in range(1, s.epochs + 1):
            lr = opt.param_groups[0]["lr"]
            loss = train_epoch(net, train, answer_emb, opt, s, device, gen, f"epoch {epoch}")
            val_loss, val_top1 = evaluate_loss(model, val, answer_emb, s, device, candidates)
            sched.step()
            value = {"val_top1": val_top1, "val_loss": -val_loss, "none": float(epoch)}
            best.update(epoch, model, value[early_stop])
            rows.append({"epoch": epoch, "train_loss": loss, "val_loss": val_loss,
                         "val_top1": val_top1, "lr": lr, "best_epoch": best.epoch})  # fmt: skip
            if distributed.is_main():
                print(f"epoch {epoch}: train_loss {loss:.4f}  val_loss {val_loss:.4f}  "
                      f"val_top1 {val_top1:.4f}  best {best.epoch}", file=sys.stderr)  # fmt: skip
            if best.stop(epoch):
                break
        model.load_state_dict(best.state)

        history = [{k: None if np.isnan(v) else v for k, v in r.items()} for r in rows]
        kept = history[best.epoch - 1]
        counts = {"n_train": len(train), "n_val": len(val)}
        stopping = {"best_epoch": best.epoch, "epochs_run": len(rows), "early_stop": early_stop}
        report.written = len(train) + len(val)
        report.extra.update(counts, n_answers=len(vocab.answers), **stopping,
                            best_val_loss=kept["val_loss"], best_val_top1=kept["val_top1"],
                            final_train_loss=history[-1]["train_loss"],
                            final_val_loss=history[-1]["val_loss"], device=device.type)  # fmt: skip
        trained = {k: v for k, v in as_dict(s).items() if k != "device"}
        trained |= {**counts, **stopping, "device": device.type, "history": history}
        manifest = store.manifest
        meta = {"answers": vocab.answers, "qtype_candidates": candidates,
                "clip": manifest.get("model"), "clip_revision": manifest.get("revision"),
                "loss": s.loss, "train": trained}  # fmt: skip
        if distributed.is_main():
            write_plot(plots, rows)
            save_head(model.cpu(), out, answer_emb.cpu(), meta)
            report.save(Path(out) / "report.json")  # no timings inside the model folder

        summary = (f"{report.summary()}; train {len(train)} val {len(val)}; kept epoch "
                   f"{best.epoch} of {len(rows)} ({early_stop}): val_loss {shown(kept['val_loss'])} "
                   f"val_top1 {shown(kept['val_top1'])}")  # fmt: skip
        if distributed.is_distributed():
            summary += (f"; rank {distributed.rank()}/{distributed.world_size()}, "
                        f"weights {distributed.weights_digest(model)}")  # fmt: skip
        return summary


def shown(value: float | None) -> str:
    """A validation number for the summary line ('n/a' without validation rows)."""
    return "n/a" if value is None else f"{value:.4f}"
