"""Benchmark: caption-decoder training throughput at Flickr30k scale.

Random cached embeddings shaped like the embed stage's output for ViT-B/32 (145k
captions, d = 512, float16, L2-normalised; token table 49408 x 512; caption lengths
drawn around Flickr30k's ~14 CLIP tokens) feed the stage's own `Trainer.step`
(`pipeline.caption.training`), with the paper-scale decoder (6 layers, width 512) by
default. bf16 autocast on CUDA, fp32 on CPU (the same code path as the stage).

It times `--steps` optimiser steps (after `--warmup` untimed ones) of the `noada`
step (caption loss only) and the `ada` step (+ domain discriminator through the GRL on
a LAION/Flickr30k image batch pair), and prints samples/s, seconds per epoch of
`--captions` captions, and the ada/noada time ratio.

    .venv/bin/python bench/train_caption.py                       # CPU: 3 steps of batch 32
    .venv/bin/python bench/train_caption.py --steps 200 --batch 256   # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.caption.training import Trainer
from pipeline.nn.caption_decoder import CaptionDecoder, DecoderConfig
from pipeline.stages.train_caption import Settings
from pipeline.training import cpu_threads, pick_device


def random_data(n: int, dim: int, vocab: int, max_len: int, seed: int):
    """Cached-embedding-like tensors: fp16 unit image embeddings, padded ids, lengths."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1).half()
    lengths = (torch.randn(n, generator=g) * 4 + 14).round().clamp(4, max_len).long()
    ids = torch.randint(0, vocab - 2, (n, max_len), generator=g)
    ids[:, 0] = vocab - 2  # BOS
    ids[torch.arange(n), lengths - 1] = vocab - 1  # EOS
    ids[torch.arange(max_len)[None, :] >= lengths[:, None]] = vocab - 1  # pad = EOS (as CLIP)
    return emb, ids, lengths


def time_steps(trainer, data, domain_imgs, args, ada: bool) -> float:
    """Seconds per step (mean over `args.steps` after `args.warmup`)."""
    emb, ids, lengths = data
    g = torch.Generator().manual_seed(1)
    n = len(ids)

    def one():
        idx = torch.randint(n, (args.batch,), generator=g)
        dom = None
        if ada:
            s = torch.randint(n, (args.domain_batch,), generator=g)
            t = torch.randint(n, (args.domain_batch,), generator=g)
            dom = (domain_imgs[s], domain_imgs[t])
        trainer.step(emb[idx], ids[idx], lengths[idx], dom, 0.5 if ada else 0.0)

    for _ in range(args.warmup):
        one()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / args.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captions", type=int, default=145_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=49_408)
    ap.add_argument("--token-width", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--loss", default="mse", choices=["mse", "cosine", "ce"])
    ap.add_argument("--batch", type=int, default=None, help="default 256 on CUDA, 32 on CPU")
    ap.add_argument("--domain-batch", type=int, default=None, help="default: --batch")
    ap.add_argument("--steps", type=int, default=None, help="default 100 on CUDA, 3 on CPU")
    ap.add_argument("--warmup", type=int, default=None, help="default 10 on CUDA, 2 on CPU")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--disc-penalty", type=float, default=0.0,
                    help="train_caption.disc_penalty: the discriminator's gradient penalty")  # fmt: skip
    args = ap.parse_args()
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (256 if cuda else 32)
    args.domain_batch = args.domain_batch or args.batch
    args.steps = args.steps or (100 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    with cpu_threads(args.threads):
        run(args, device)


def run(args: argparse.Namespace, device: torch.device) -> None:
    """Build the decoder and the trainer, time both variants' steps, print the ratios."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    data = tuple(
        x.to(device) for x in random_data(args.captions, args.dim, args.vocab, args.max_len, 0)
    )
    table = torch.randn(args.vocab, args.token_width) * 0.02
    cfg = DecoderConfig(
        image_dim=args.dim, vocab_size=args.vocab, token_width=args.token_width,
        width=args.width, layers=args.layers, heads=args.heads,
        prefix_len=args.prefix, max_len=args.max_len, loss=args.loss,
        bos_token_id=args.vocab - 2, eos_token_id=args.vocab - 1,
        pad_token_id=args.vocab - 1,
    )  # fmt: skip
    model = CaptionDecoder(cfg, table)
    n_params = sum(p.numel() for p in model.parameters())
    trainer = Trainer(model, Settings(warmup_steps=0, disc_penalty=args.disc_penalty), device)
    where = torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} threads"
    print(
        f"device {device} ({where}), "
        f"autocast {'bf16' if cuda else 'off (fp32)'}; decoder {n_params / 1e6:.1f}M trainable "
        f"params ({args.layers}x{args.width}, prefix {args.prefix}, loss {args.loss}); "
        f"{args.captions} captions, d={args.dim}, table {args.vocab}x{args.token_width}; "
        f"batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up"
    )
    results = {}
    for name, ada in (("noada", False), ("ada", True)):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sec = time_steps(trainer, data, data[0], args, ada)
        sps = args.batch / sec
        results[name] = sec
        mem = f", peak GPU mem {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
        print(
            f"{name:>5}: {sec * 1000:8.1f} ms/step  {sps:10.1f} samples/s  "
            f"{args.captions / sps:9.1f} s/epoch ({args.captions} captions){mem}"
        )
    print(f"ada/noada time per step: {results['ada'] / results['noada']:.3f}")


if __name__ == "__main__":
    main()
