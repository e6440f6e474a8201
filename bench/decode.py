"""Incremental decoding with the key/value cache against re-running the whole sequence.

A caption decoder at real scale (6 layers, width 512, 8 heads, prefix 10, a 49,408 x 512
token table) decodes a batch of image embeddings for `--tokens` steps, feeding its own
predictions' nearest tokens back in (as greedy search does, EOS ignored so that every
run makes all the steps): once with `decode_step` and its cache, once re-running
`decode` over the prefix and all tokens so far at every step. Prints seconds per caption
for both, the speed-up, and the largest difference between the two predictions.

    python bench/decode.py [--tokens 30] [--batch 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.nn.caption_decoder import CaptionDecoder, DecoderConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = DecoderConfig(
        image_dim=512, vocab_size=49408, token_width=512, width=512, layers=6, heads=8,
        prefix_len=10, max_len=a.tokens + 2, dropout=0.0, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=0,
    )  # fmt: skip
    model = CaptionDecoder(cfg, torch.randn(49408, 512)).eval()
    emb = torch.randn(a.batch, 512)
    table = model.unit_table

    def nearest(pred: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.normalize(pred, dim=-1) @ table.T).argmax(-1)

    with torch.inference_mode():
        prefix = model.context(emb)
        start = torch.full((a.batch, 1), cfg.bos_token_id)
        t0 = time.perf_counter()
        pred, cache = model.decode_step(prefix, start, None)
        cached = [pred]
        for _ in range(a.tokens - 1):
            pred, cache = model.decode_step(None, nearest(pred)[:, None], cache)
            cached.append(pred)
        t_cache = time.perf_counter() - t0

        t0 = time.perf_counter()
        tokens, full = start, []
        for _ in range(a.tokens):
            pred = model.decode(prefix, tokens)[:, -1]
            full.append(pred)
            tokens = torch.cat([tokens, nearest(pred)[:, None]], dim=1)
        t_full = time.perf_counter() - t0
    diff = max(float((x - y).abs().max()) for x, y in zip(cached, full))
    print(f"{a.tokens} tokens, batch {a.batch}, {a.threads} threads: with cache "
          f"{t_cache / a.batch * 1000:.1f} ms/caption, re-running {t_full / a.batch * 1000:.1f} "
          f"ms/caption, speed-up {t_full / t_cache:.2f}x; largest prediction difference "
          f"{diff:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
