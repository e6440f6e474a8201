"""Stage `train_caption@{noada,ada}`: the embedding-space caption decoder, three phases.

Schedule (source paper 3.1; every length a param):

1. `pretrain`: caption loss on LAION captions.
2. `adapt`: caption loss on LAION continues; a domain discriminator on the adapter's
   features (the image prefix) behind a gradient-reversal layer separates LAION images
   (source) from Flickr30k images (target).
3. `finetune`: caption loss on Flickr30k train captions; the domain loss keeps using
   LAION + Flickr30k images.

The λ of the GRL follows Ganin & Lempitsky's warm start over phases 2-3 (`grl_gamma`,
peak `adv_weight`). Variant `noada` runs the very same steps, batches and discriminator
with λ = 0: the discriminator still trains (so its accuracy shows how separable the
domains stay) but the features get no gradient from it. Each step's domain batches come
from their own seeded generator, caption batches from another, so both variants see the
same data in the same order.

Outputs: `out_dir/` (model.safetensors + config.json with the model config, the CLIP
model the embeddings came from and a training summary) and
`plots_dir/caption_<variant>.tsv` with one row per epoch.

Under `torchrun` (pipeline.distributed): every rank draws the same caption order and the
same domain draws and takes its strided slice of both (`batch_size` and `domain_batch` are
per rank); the decoder's and the discriminator's gradients are averaged over ranks after
each backward (one flat all-reduce: the decoder is called through `prefix` as well as
`forward`, so it is not wrapped in DistributedDataParallel). Epoch statistics are
all-reduced means; the validation loss is computed on every rank over the whole val set
(weights are identical, so are the results). Only rank 0 writes the model and the TSV.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline import distributed
from pipeline.atomic import write_text
from pipeline.caption_data import (
    CaptionSet,
    load_captions,
    load_images,
    load_token_table,
    read_manifest,
)
from pipeline.errors import UserError
from pipeline.nn.caption_decoder import CaptionDecoder, save_caption_model, split_batch
from pipeline.nn.discriminator import (
    DomainDiscriminator,
    bce_and_accuracy,
    confusion_loss,
    domain_logits,
)
from pipeline.nn.grl import warm_start_coeff
from pipeline.params import torch_device, typed

VARIANTS = {"noada": 0.0, "ada": 1.0}  # multiplier of the GRL coefficient
TSV_COLUMNS = [
    "epoch",
    "phase",
    "caption_loss",
    "disc_loss",
    "adv_loss",
    "disc_acc",
    "val_loss",
    "lambda",
]

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": {  # pipeline.nn.caption_decoder settings (dims of the data are filled in)
        "width": 128,
        "layers": 2,
        "heads": 4,
        "mlp_ratio": 4,
        "prefix_len": 4,
        "max_len": 32,
        "dropout": 0.0,
        "loss": "mse",
        "target_norm": True,
        "target_scale": None,
        "ce_temperature": 0.05,
        "aux_ce": 0.0,
    },
    "batch_size": 32,
    "lr": 1.0e-3,
    "finetune_lr": 5.0e-4,
    "weight_decay": 0.01,
    "warmup_steps": 50,
    "grad_clip": 1.0,
    "pretrain_epochs": 5,
    "adapt_epochs": 3,
    "finetune_epochs": 20,
    "adv_weight": 1.0,
    "grl_gamma": 10.0,
    "disc_hidden": 128,
    "disc_dropout": 0.0,
    "disc_lr": 1.0e-3,
    "domain_batch": 32,
    "target_splits": ["train"],  # Flickr30k splits whose images serve as target domain
    "device": "auto",
    "threads": 1,  # CPU intra-op threads: fixed so CPU runs are bit-reproducible (0: torch's)
}


def merged_params(params: dict[str, Any]) -> dict[str, Any]:
    """`DEFAULTS` updated with `params` (the `model` sub-dict merged key by key)."""
    unknown = set(params) - set(DEFAULTS) - {"laion", "flickr", "out", "plots"}
    if unknown:
        raise UserError(f"unknown train_caption params: {sorted(unknown)}")
    model = params.get("model") or {}
    if not isinstance(model, dict):
        raise UserError(f"params train_caption.model: expected a mapping, got {model!r}")
    p = typed(
        {**DEFAULTS, **{k: v for k, v in params.items() if v is not None}},
        DEFAULTS,
        "train_caption",
        positive=("batch_size", "domain_batch"),
    )
    p["model"] = typed(
        {**DEFAULTS["model"], **{k: v for k, v in model.items() if v is not None}},
        DEFAULTS["model"],
        "train_caption.model",
        positive=("width", "layers", "heads", "mlp_ratio", "prefix_len", "max_len"),
    )
    return p


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    return torch_device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, plain fp32 elsewhere (same code path)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; under torchrun this rank's slice of the shared order."""
    perm = torch.randperm(n, generator=gen)
    if distributed.is_distributed():
        perm = torch.from_numpy(distributed.shard(perm.numpy()))
        n = len(perm)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


class Trainer:
    """Model, discriminator, optimisers and one training step (shared with bench/)."""

    def __init__(self, model: CaptionDecoder, p: dict[str, Any], device: torch.device):
        self.model, self.p, self.device = model.to(device), p, device
        feat_dim = model.config["prefix_len"] * model.config["width"]
        self.disc = DomainDiscriminator(feat_dim, p["disc_hidden"], p["disc_dropout"]).to(device)
        self.opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
        self.dopt = torch.optim.AdamW(self.disc.parameters(), lr=p["disc_lr"])
        self.step_no = 0

    def set_lr(self, base: float) -> float:
        warm = self.p["warmup_steps"]
        lr = base * min(1.0, (self.step_no + 1) / warm) if warm > 0 else base
        for group in self.opt.param_groups:
            group["lr"] = lr
        return lr

    def step(
        self,
        image_emb: torch.Tensor,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        domain: tuple[torch.Tensor, torch.Tensor] | None,
        coeff: float,
    ) -> dict[str, torch.Tensor]:
        """One optimiser step on a caption batch (+ a domain batch pair if given).

        Returns detached scalar tensors (no device sync per step)."""
        dev = self.device
        self.model.train()
        self.disc.train()
        ids = ids[:, : int(lengths.max())]  # drop all-padding columns
        inputs, targets, mask = split_batch(ids.to(dev), lengths.to(dev))
        out: dict[str, torch.Tensor] = {}
        with autocast(dev):
            pred = self.model(image_emb.to(dev).float(), inputs)
            loss = self.model.caption_loss(pred, targets, mask)
            out["caption_loss"] = loss.detach()
            if domain is not None:
                src, tgt = (x.to(dev).float() for x in domain)
                feats = self.model.prefix(torch.cat([src, tgt]))
                logits, labels = domain_logits(
                    self.disc, feats[: len(src)], feats[len(src) :], coeff
                )
                d_loss, acc = bce_and_accuracy(logits, labels)
                loss = loss + d_loss
                out |= {
                    "disc_loss": d_loss.detach(),
                    "adv_loss": confusion_loss(logits, labels),
                    "disc_acc": acc,
                }
        self.opt.zero_grad(set_to_none=True)
        self.dopt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.all_reduce_grads(self.model, self.disc)  # no-op without torchrun
        if self.p["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.p["grad_clip"])
        self.opt.step()
        if domain is not None:
            self.dopt.step()
        self.step_no += 1
        return out

    @torch.no_grad()
    def eval_loss(self, data: CaptionSet, batch_size: int = 256) -> float:
        """Token-weighted mean caption loss over a whole set (eval mode)."""
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
                    data.image_emb[i : i + batch_size].to(self.device).float(), inputs
                )
                n = int(mask.sum())
                total += self.model.caption_loss(pred, targets, mask).item() * n
            count += n
        return total / max(count, 1)


def _fmt(x: float | str) -> str:
    return x if isinstance(x, str) else ("nan" if math.isnan(x) else f"{x:.6g}")


def _check_same_clip(laion: dict, flickr: dict) -> dict[str, Any]:
    keys = ("model", "revision", "dim")
    a, b = ({k: m.get(k) for k in keys} for m in (laion, flickr))
    if a != b:
        raise UserError(
            f"LAION and Flickr30k embeddings come from different CLIP models: {a} vs {b}"
        )
    return {**a, "token_embedding": laion.get("token_embedding", {})}


def run(
    variant: str,
    laion_dir: str | Path,
    flickr_dir: str | Path,
    out_dir: str | Path,
    plots_dir: str | Path,
    params: dict[str, Any],
) -> dict[str, Any]:
    """Train variant `noada` or `ada`; write the model folder and the per-epoch TSV."""
    if variant not in VARIANTS:
        raise UserError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    p = merged_params(params)
    with distributed.session(p["device"]) as device:
        threads = torch.get_num_threads()
        if device.type == "cpu" and int(p["threads"]) > 0:
            torch.set_num_threads(int(p["threads"]))
        try:
            return _train(variant, Path(laion_dir), Path(flickr_dir), out_dir, plots_dir, p, device)
        finally:
            torch.set_num_threads(threads)


def _train(
    variant: str,
    laion_dir: Path,
    flickr_dir: Path,
    out_dir: str | Path,
    plots_dir: str | Path,
    p: dict[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    seed = int(p["seed"])
    seed_everything(seed)
    t0 = time.perf_counter()

    clip = _check_same_clip(read_manifest(laion_dir), read_manifest(flickr_dir))
    tok = clip["token_embedding"]
    table = load_token_table(laion_dir)
    if not torch.equal(table, load_token_table(flickr_dir)):
        raise UserError("LAION and Flickr30k folders hold different token-embedding tables")
    special = {k: int(tok[k]) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    max_len = int(p["model"]["max_len"])
    load = {
        "max_len": max_len,
        "pad_id": special["pad_token_id"],
        "eos_id": special["eos_token_id"],
    }
    laion = load_captions(laion_dir, ("train",), **load)
    f_train = load_captions(flickr_dir, ("train",), **load)
    f_val = load_captions(flickr_dir, ("val",), **load)
    if len(laion) == 0 or len(f_train) == 0:
        raise UserError(
            f"no training captions (LAION {len(laion)}, Flickr30k train {len(f_train)})"
        )
    src_images = laion.images().to(device)
    _, tgt_images = load_images(flickr_dir, tuple(p["target_splits"]))
    if len(tgt_images) == 0:
        raise UserError(f"no Flickr30k images in target_splits {list(p['target_splits'])}")
    tgt_images = tgt_images.to(device)
    for cs in (laion, f_train, f_val):  # small enough to live on the device (145k x 512 fp16)
        cs.image_emb, cs.ids, cs.lengths = (
            x.to(device) for x in (cs.image_emb, cs.ids, cs.lengths)
        )

    cfg = {
        **p["model"],
        **special,
        "image_dim": int(laion.image_emb.shape[1]),
        "vocab_size": table.shape[0],
        "token_width": table.shape[1],
    }
    trainer = Trainer(CaptionDecoder(cfg, table), p, device)
    distributed.broadcast_params(trainer.model, trainer.disc)  # same start on every rank
    world = distributed.world_size()
    g_data = torch.Generator().manual_seed(seed)
    g_dom = torch.Generator().manual_seed(seed + 1)
    bs, dbs = int(p["batch_size"]), int(p["domain_batch"])
    plan = [
        ("pretrain", laion, int(p["pretrain_epochs"]), p["lr"]),
        ("adapt", laion, int(p["adapt_epochs"]), p["lr"]),
        ("finetune", f_train, int(p["finetune_epochs"]), p["finetune_lr"]),
    ]

    def n_steps(n: int) -> int:  # optimiser steps per epoch on this rank
        return math.ceil(math.ceil(n / world) / bs)

    adv_total = sum(e * n_steps(len(d)) for name, d, e, _ in plan if name != "pretrain")
    adv_done, epoch, rows = 0, 0, []
    bar = tqdm(
        total=sum(e * n_steps(len(d)) for _, d, e, _ in plan),
        desc=f"train_caption[{variant}]",
        disable=None if distributed.is_main() else True,
    )
    for phase, data, n_epochs, lr in plan:
        for _ in range(n_epochs):
            epoch += 1
            sums: dict[str, list[torch.Tensor]] = {}
            coeff = 0.0
            for idx in batches(len(data), bs, g_data):
                trainer.set_lr(lr)
                domain = None
                if phase != "pretrain":
                    s = torch.randint(len(src_images), (dbs * world,), generator=g_dom)
                    t = torch.randint(len(tgt_images), (dbs * world,), generator=g_dom)
                    if world > 1:  # this rank's part of the shared global domain batch
                        s, t = s[distributed.rank() :: world], t[distributed.rank() :: world]
                    domain = (src_images[s], tgt_images[t])
                    coeff = VARIANTS[variant] * warm_start_coeff(
                        adv_done / max(adv_total, 1), p["grl_gamma"], p["adv_weight"]
                    )
                    adv_done += 1
                stats = trainer.step(
                    data.image_emb[idx], data.ids[idx], data.lengths[idx], domain, coeff
                )
                for key, val in stats.items():
                    sums.setdefault(key, []).append(val)
                bar.update(1)
            mean = {k: torch.stack(v).float().mean().item() for k, v in sums.items()}
            if world > 1:
                keys = sorted(mean)
                reduced = distributed.all_reduce_sum([mean[k] for k in keys])
                mean = {k: v / world for k, v in zip(keys, reduced, strict=True)}
            rows.append(
                {
                    "epoch": epoch,
                    "phase": phase,
                    **{c: mean.get(c, float("nan")) for c in TSV_COLUMNS[2:6]},
                    "val_loss": trainer.eval_loss(f_val),
                    "lambda": coeff,
                }
            )
            bar.set_postfix(
                phase=phase, loss=f"{mean['caption_loss']:.4f}", val=f"{rows[-1]['val_loss']:.4f}"
            )
    bar.close()

    seconds, nan = time.perf_counter() - t0, float("nan")
    last = rows[-1] if rows else {}
    summary = {
        "variant": variant,
        "device": str(device),
        "epochs": epoch,
        "steps": trainer.step_no,
        "seconds": round(seconds, 2),
        "final_caption_loss": last.get("caption_loss", nan),
        "final_val_loss": last.get("val_loss", nan),
        "final_disc_acc": last.get("disc_acc", nan),
        "best_val_loss": min((r["val_loss"] for r in rows), default=nan),
        "n_laion_captions": len(laion),
        "n_flickr_train_captions": len(f_train),
        "n_flickr_val_captions": len(f_val),
        "n_source_images": len(src_images),
        "n_target_images": len(tgt_images),
        "truncated_captions": laion.truncated + f_train.truncated + f_val.truncated,
        "skipped_rows": {
            k: laion.skipped.get(k, 0) + f_train.skipped.get(k, 0) + f_val.skipped.get(k, 0)
            for k in set(laion.skipped) | set(f_train.skipped) | set(f_val.skipped)
        },
    }
    trainer.model.cpu()
    saved = {k: v for k, v in summary.items() if k != "seconds"}  # keep the folder reproducible
    if distributed.is_main():
        save_caption_model(
            trainer.model, out_dir, extra={"clip": clip, "training": {**saved, "params": p}}
        )
        lines = ["\t".join(TSV_COLUMNS)]
        lines += ["\t".join(_fmt(r[c]) for c in TSV_COLUMNS) for r in rows]
        write_text(Path(plots_dir) / f"caption_{variant}.tsv", "\n".join(lines) + "\n")
    if world > 1:
        digest = distributed.weights_digest
        summary |= {"rank": distributed.rank(), "world_size": world}
        summary["weights_sha256"] = digest(trainer.model) + digest(trainer.disc)
    return summary
