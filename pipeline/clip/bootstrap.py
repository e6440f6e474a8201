"""The `clip_bootstrap` stage: the CLIP checkpoint every later stage embeds with.

Three modes, chosen by params:

- **scratch** (`pretrained: null`, the offline default): train a lower-case BPE tokenizer
  on the training captions (LAION + Flickr30k train split), build a small `CLIPConfig`
  and train it with CLIP's symmetric contrastive loss and learnable temperature
  (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
  Supervision", Fig. 3) on the LAION image-text pairs.
- **finetune** (`pretrained: <hub id or folder>`, `finetune: true`): the same loss and
  loop, starting from the named checkpoint and its tokenizer / image settings.
- **passthrough** (`pretrained: ...`, `finetune: false`): the checkpoint is copied (local
  folder) or saved (hub id) unchanged.

In every mode the output folder is a standard Hugging Face checkpoint (config.json,
model.safetensors, tokenizer files, preprocessor_config.json) that `load_backbone` opens
like any other, plus `clip_source.json` (where it came from) and `report.json`.
`metrics/clip.json` holds the loss per epoch and image->text / text->image recall@1/@5 on
held-out LAION pairs (a seeded split never trained on), before and after training.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.atomic import write_json, write_text
from pipeline.clip.backbone import Backbone, load_backbone, normalize_pixels, quiet_transformers
from pipeline.errors import UserError
from pipeline.params import typed
from pipeline.readers import read_json
from pipeline.report import Report

DEFAULTS: dict[str, Any] = {
    "pretrained": None,  # hub id or folder; None = train a small CLIP from scratch
    "finetune": False,  # with `pretrained`: contrastive fine-tuning (True) or pass-through
    "flickr_pairs": False,  # also train on Flickr30k train-split image-caption pairs
    "max_pairs": 0,  # cap on LAION pairs read (0: all)
    "heldout_fraction": 0.2,  # LAION pairs held out for recall (never trained on)
    "heldout_max": 1000,
    # tokenizer + architecture (scratch mode)
    "vocab_size": 2000,
    "context_length": 32,
    "width": 128,
    "layers": 2,
    "heads": 4,
    "image_size": 64,
    "patch_size": 8,
    "projection_dim": 128,
    # training
    "epochs": 20,
    "batch_size": 32,
    "lr": 5.0e-4,
    "weight_decay": 0.1,
    "warmup_steps": 30,
    "grad_clip": 1.0,
    "augment_shift": 4,  # random translation of training images by up to this many pixels
    "device": None,  # None: cuda when available, else cpu
    # CPU threads for torch (0: torch's default). One thread keeps CPU runs bit-identical
    # on any machine and avoids OpenMP spinning when the cores are shared.
    "cpu_threads": 1,
}
SIZE_KEYS = (  # params that must be > 0
    "vocab_size", "context_length", "width", "layers", "heads", "image_size", "patch_size",
    "projection_dim", "batch_size",
)  # fmt: skip
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the temperature at 100
PASSTHROUGH_FILES = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "preprocessor_config.json",
)  # fmt: skip


@dataclass
class PairSet:
    """Images (uint8 crops) with one or more captions each."""

    ids: list[str]
    captions: list[list[str]]
    pixels: torch.Tensor  # (n, 3, S, S) uint8
    source: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: list[int] | np.ndarray) -> PairSet:
        idx = [int(i) for i in idx]
        return PairSet(
            [self.ids[i] for i in idx], [self.captions[i] for i in idx],
            self.pixels[idx], [self.source[i] for i in idx],
        )  # fmt: skip

    def __add__(self, other: PairSet) -> PairSet:
        return PairSet(
            self.ids + other.ids, self.captions + other.captions,
            torch.cat([self.pixels, other.pixels]), self.source + other.source,
        )  # fmt: skip


# --------------------------------------------------------------------------- data


def _decode_items(items, size: int, resize: int | None, source: str, report: Report) -> PairSet:
    from pipeline.formats.laion import TarReader
    from pipeline.imagedecode import decode_image, read_bytes

    reader = TarReader()
    ids, caps, crops = [], [], []
    try:
        for item in items:
            data = reader.read(item.path, item.member) if item.member else read_bytes(item.path)
            dec = decode_image(data, size, resize)
            label = item.id if source == "laion" else f"{source}:{item.id}"
            if dec.skip:
                report.skip(dec.skip, label)
                continue
            for note in dec.notes:
                report.note(note, label)
            ids.append(item.id)
            caps.append([text for _, text in item.captions])
            crops.append(dec.pixels[0])
    finally:
        reader.close()
    pixels = (
        torch.from_numpy(np.stack(crops))
        if crops
        else torch.zeros((0, 3, size, size), dtype=torch.uint8)
    )
    return PairSet(ids, caps, pixels, [source] * len(ids))


def load_laion(
    folder: Path, size: int, resize: int | None, report: Report, max_pairs: int = 0
) -> PairSet:
    """The downloaded image-caption pairs of img2dataset shards, decoded to uint8 crops."""
    from pipeline.formats.laion import list_webdataset

    listing = list_webdataset(Path(folder))
    report.merge(listing.report)
    items = listing.items
    if max_pairs and len(items) > max_pairs:
        for item in items[max_pairs:]:
            report.skip("over_max_pairs", item.id)
        items = items[:max_pairs]
    return _decode_items(items, size, resize, "laion", report)


def flickr_train_items(folder: Path, report: Report) -> list:
    """Flickr30k train-split images with their captions (Karpathy split when present).

    What the Flickr30k reader read and skipped goes to `report.extra["flickr30k"]`.
    """
    from pipeline.formats.flickr30k import list_flickr30k

    listing = list_flickr30k(Path(folder))
    sub = listing.report.to_dict()
    sub.pop("stage", None)
    report.extra["flickr30k"] = sub
    return [item for item in listing.items if item.split == "train"]


def split_heldout(n: int, fraction: float, cap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of `n` pairs into (train, held-out) index arrays, both sorted."""
    n_held = min(round(n * fraction), cap)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


# --------------------------------------------------------------------------- model


def build_scratch_checkpoint(texts: list[str], p: dict, folder: Path, seed: int) -> None:
    """Train the tokenizer on `texts`, build a random small CLIP, save both to `folder`."""
    from transformers import CLIPModel

    from pipeline.clip.checkpoint import save_checkpoint, small_clip_config
    from pipeline.clip.tokenizer import BOS, EOS, PAD, save_tokenizer, train_tokenizer

    tok = train_tokenizer(texts, vocab_size=int(p["vocab_size"]))
    try:
        config = small_clip_config(
            vocab_size=tok.get_vocab_size(),
            bos_token_id=tok.token_to_id(BOS),
            eos_token_id=tok.token_to_id(EOS),
            pad_token_id=tok.token_to_id(PAD),
            context_length=int(p["context_length"]),
            width=int(p["width"]),
            layers=int(p["layers"]),
            heads=int(p["heads"]),
            image_size=int(p["image_size"]),
            patch_size=int(p["patch_size"]),
            projection_dim=int(p["projection_dim"]),
        )
    except ValueError as exc:
        raise UserError(f"clip_bootstrap params: {exc}") from None
    torch.manual_seed(seed)
    model = CLIPModel(config)
    save_checkpoint(
        model, lambda f: save_tokenizer(tok, f, int(p["context_length"])), folder,
        int(p["image_size"]),
    )  # fmt: skip


def _pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids, mask


def clip_loss(model, input_ids, mask, pixels) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: mean of the image->text and text->image cross-entropies
    over the batch's cosine similarities times the learned `logit_scale.exp()`."""
    out = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
    target = torch.arange(len(input_ids), device=out.logits_per_image.device)
    logits_i, logits_t = out.logits_per_image.float(), out.logits_per_text.float()
    return (F.cross_entropy(logits_i, target) + F.cross_entropy(logits_t, target)) / 2


def recall_at_k(img: torch.Tensor, txt: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Recall@k of matched rows (pair i = image i, text i) in both directions.

    The rank of the true match is the number of candidates scoring strictly higher.
    """
    sim = img @ txt.T
    diag = sim.diagonal()
    rank_i2t = (sim > diag[:, None]).sum(dim=1)
    rank_t2i = (sim > diag[None, :]).sum(dim=0)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((rank_i2t < k).float().mean())
        out[f"t2i_r{k}"] = float((rank_t2i < k).float().mean())
    return out


def evaluate(bb: Backbone, held: PairSet, held_ids: list[list[int]]) -> dict[str, float]:
    """Recall@1/@5 both ways and the contrastive loss (one batch of all held-out pairs)."""
    model = bb.model
    was_training = model.training
    model.eval()
    pix = normalize_pixels(held.pixels, bb.mean, bb.std)
    img = torch.cat([bb.encode_images(pix[i : i + 256]) for i in range(0, len(held), 256)])
    txt = torch.cat([bb.encode_token_ids(held_ids[i : i + 256]) for i in range(0, len(held), 256)])
    scale = float(model.logit_scale.detach().exp())
    logits = scale * img @ txt.T
    target = torch.arange(len(held))
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    model.train(was_training)
    return {
        "loss": round(float(loss), 6),
        **{k: round(v, 6) for k, v in recall_at_k(img, txt).items()},
    }


def random_shift(pixels: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `shift` pixels (edge pixels repeated): (n, 3, S, S)."""
    n, _, h, w = pixels.shape
    padded = F.pad(pixels.float(), (shift, shift, shift, shift), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets)])


def _optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def _lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(bb: Backbone, data: PairSet, held: PairSet, p: dict, seed: int) -> list[dict[str, float]]:
    """Contrastive training on `data`; one row per epoch (train loss, held-out metrics)."""
    from tqdm import tqdm

    model = bb.model
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tokens = [bb.tokenize(caps) for caps in data.captions]  # per image, all its captions
    held_ids = bb.tokenize([caps[0] for caps in held.captions])
    batch = min(int(p["batch_size"]), len(data))
    steps_per_epoch = len(data) // batch  # drop the ragged last batch (reshuffled each epoch)
    epochs = int(p["epochs"])
    total = steps_per_epoch * epochs
    opt = _optimizer(model, float(p["lr"]), float(p["weight_decay"]))
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
            input_ids, mask = _pad(ids, bb.pad_token_id)
            pixels = data.pixels[idx]
            if int(p["augment_shift"]):
                pixels = random_shift(pixels, int(p["augment_shift"]), gen)
            pixels = normalize_pixels(pixels.to(bb.device), bb.mean, bb.std)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, int(p["warmup_steps"]), float(p["lr"]))
            with bb.autocast():
                loss = clip_loss(model, input_ids.to(bb.device), mask.to(bb.device), pixels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if p.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(p["grad_clip"]))
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
        rows.append(epoch_row(bb, epoch, float(np.mean(losses)), held, held_ids))
        bar.set_postfix(loss=rows[-1]["train_loss"], r1=rows[-1]["heldout_i2t_r1"])
    bar.close()
    model.eval()
    return rows


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
            ids, mask = _pad(bb.tokenize([c[0] for c in data.captions[sel]]), bb.pad_token_id)
            pixels = normalize_pixels(data.pixels[sel].to(bb.device), bb.mean, bb.std)
            with bb.autocast():
                loss = clip_loss(model, ids.to(bb.device), mask.to(bb.device), pixels)
            losses.append(float(loss))
    return float(np.mean(losses))


# --------------------------------------------------------------------------- output


def _save(bb: Backbone, folder: Path, preprocessor: dict) -> None:
    with quiet_transformers():
        bb.model.save_pretrained(str(folder))
        bb.tokenizer.save_pretrained(str(folder))
    write_json(folder / "preprocessor_config.json", preprocessor)


def _copy_checkpoint(src: Path, folder: Path) -> None:
    for name in PASSTHROUGH_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
    for shard in sorted(src.glob("model-*.safetensors")):
        shutil.copy2(shard, folder / shard.name)


def _preprocessor_dict(source: str) -> dict:
    from transformers.image_processing_base import ImageProcessingMixin

    cfg, _ = ImageProcessingMixin.get_image_processor_dict(source)
    return cfg


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace folder `out` by `tmp` (old contents removed only once the new are in place)."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _plots_tsv(rows: list[dict]) -> str:
    cols = list(rows[0].keys())
    lines = ["\t".join(cols)] + ["\t".join(str(r[c]) for c in cols) for r in rows]
    return "\n".join(lines) + "\n"


def run(
    laion: Path,
    flickr30k: Path | None,
    out: Path,
    metrics_path: Path,
    plots_path: Path | None,
    params: dict,
) -> Report:
    """Build `out` (a CLIP checkpoint folder) and write `metrics_path` (+ the epoch curve)."""
    p = {**DEFAULTS, **{k: v for k, v in params.items() if v is not None or k == "pretrained"}}
    p = typed(p, DEFAULTS, "clip_bootstrap", positive=SIZE_KEYS)
    seed = int(p.get("seed", 0))
    pretrained = p["pretrained"] or None
    mode = "scratch" if pretrained is None else ("finetune" if p["finetune"] else "passthrough")
    report = Report("clip_bootstrap")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if int(p["cpu_threads"]):
        torch.set_num_threads(int(p["cpu_threads"]))
    try:
        torch.manual_seed(seed)
        if mode == "scratch":
            size, resize = int(p["image_size"]), None
        else:
            bb = load_backbone(pretrained, p["device"])
            size, resize = bb.image_size, bb.resize_size
        pairs = load_laion(Path(laion), size, resize, report, int(p["max_pairs"]))
        train_idx, held_idx = split_heldout(
            len(pairs), float(p["heldout_fraction"]), int(p["heldout_max"]), seed
        )
        if len(held_idx) < 5 or len(train_idx) < 2:
            raise UserError(
                f"{laion}: only {len(pairs)} usable LAION pairs; clip_bootstrap needs enough "
                "for training and at least 5 held-out pairs"
            )
        data, held = pairs.subset(train_idx), pairs.subset(held_idx)
        use_flickr = mode == "scratch" or (mode == "finetune" and p["flickr_pairs"])
        flickr_items = flickr_train_items(flickr30k, report) if flickr30k and use_flickr else []
        if mode == "scratch":
            texts = [c for caps in data.captions for c in caps]
            texts += [c for item in flickr_items for _, c in item.captions]
            build_scratch_checkpoint(texts, p, tmp, seed)
            bb = load_backbone(tmp, p["device"])
        if p["flickr_pairs"] and mode != "passthrough":
            data = data + _decode_items(flickr_items, size, resize, "flickr30k", report)
        report.written = len(data) + len(held)
        held_ids = bb.tokenize([caps[0] for caps in held.captions])
        start = epoch_row(bb, 0, mean_train_loss(bb, data, int(p["batch_size"])), held, held_ids)
        t1, c1 = time.perf_counter(), time.process_time()
        rows = [] if mode == "passthrough" else train(bb, data, held, p, seed)
        train_seconds, train_cpu = time.perf_counter() - t1, time.process_time() - c1
        before = {k[len("heldout_") :]: v for k, v in start.items() if k.startswith("heldout_")}
        after = evaluate(bb, held, held_ids) if rows else dict(before)
        if mode == "passthrough" and Path(pretrained).is_dir():
            _copy_checkpoint(Path(pretrained), tmp)
        else:
            _save(bb, tmp, _preprocessor_dict(bb.model_id if mode != "scratch" else str(tmp)))
        source = {
            "mode": mode,
            "pretrained": pretrained,
            "pretrained_revision": bb.revision if mode != "scratch" else None,
            "seed": seed,
            "trained_on": {"laion_pairs": len(data) - _count(data, "flickr30k"),
                           "flickr30k_images": _count(data, "flickr30k")} if rows else None,
        }  # fmt: skip
        write_json(tmp / "clip_source.json", source)
        report.extra.update({"mode": mode, "cpu_threads": torch.get_num_threads()})
        report.save(tmp / "report.json")  # no timings inside the model: its hash stays stable
        report.extra.update(
            {
                "train_seconds": round(train_seconds, 2),
                "train_cpu_seconds": round(train_cpu, 2),
                "total_seconds": round(time.perf_counter() - t0, 2),
            }
        )
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads)

    n = len(held)
    metrics = {
        "mode": mode,
        "model": str(pretrained) if pretrained else "scratch",
        "train_images": len(data),
        "train_laion_pairs": len(data) - _count(data, "flickr30k"),
        "train_flickr30k_images": _count(data, "flickr30k"),
        "heldout_pairs": n,
        "chance_r1": round(1 / n, 6),
        "chance_r5": round(min(5, n) / n, 6),
        "before": before,
        "after": after,
        "loss_per_epoch": [r["train_loss"] for r in rows],
        "train_loss_start": start["train_loss"],
        "train_loss_final": rows[-1]["train_loss"] if rows else start["train_loss"],
        "final_logit_scale": round(float(bb.model.logit_scale.detach().exp()), 4),
        "how": (
            f"held-out LAION pairs (seeded split, fraction {p['heldout_fraction']}, seed {seed}), "
            "first caption per image, cosine similarity of L2-normalised embeddings; "
            "rank = number of candidates scoring strictly higher; chance r@k = k/n; "
            "loss = symmetric contrastive loss over all held-out pairs as one batch"
        ),
        "tokenizer": (
            "BPE trained on LAION train-split + Flickr30k train-split captions (lower-case, "
            "accents stripped, CLIP pre-token split)"
            if mode == "scratch"
            else f"from {pretrained}"
        ),
        "vocab_size": int(bb.model.config.text_config.vocab_size),
        "epochs": len(rows),
        "batch_size": int(p["batch_size"]),
    }
    write_json(metrics_path, metrics)
    if plots_path is not None:
        write_text(plots_path, _plots_tsv([start, *rows]))
    report.extra["summary"] = (
        f"i2t r@1 {before['i2t_r1']:.3f} -> {after['i2t_r1']:.3f}, "
        f"t2i r@1 {before['t2i_r1']:.3f} -> {after['t2i_r1']:.3f} (chance {1 / n:.3f}, n={n})"
    )
    return report


def _count(data: PairSet, source: str) -> int:
    return sum(1 for s in data.source if s == source)


def summary(report: Report) -> str:
    """One line for the CLI."""
    extra = report.extra
    return (
        f"{report.summary()}; {extra.get('mode')}: {extra.get('summary', '')}, "
        f"training {extra.get('train_seconds', 0):.1f}s ({extra.get('train_cpu_seconds', 0):.1f}s CPU)"
    )


def describe(folder: Path) -> dict:
    """`clip_source.json` of a checkpoint folder written by this stage ({} if none)."""
    path = Path(folder) / "clip_source.json"
    return read_json(path) if path.exists() else {}
