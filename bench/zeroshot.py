"""Benchmark: zero-shot ranking over many prompts, peak memory and time, cold and cached.

    .venv/bin/python bench/zeroshot.py                          # 10000 groups x 200 answers
    .venv/bin/python bench/zeroshot.py --groups 1000 --dim 64   # a quick one

A synthetic relation split: `--groups` (subject, object) pairs with `--rows` questions
each, all ranking the same `--answers` candidates, so groups x answers distinct prompts;
random `--dim`-d image embeddings. The text encoder is fake and cheap (a prompt's CRC32
picks one of 4096 random vectors), so the numbers are `zeroshot_rank`'s and the prompt
cache's own. Runs `zeroshot_rank` twice on one prompt cache in a temp folder: cold
(everything embedded, the cache written) and warm (everything read back from the cache).
Prints each run's time, counts and the process's peak RSS after it (Linux: ru_maxrss).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.vqa.zeroshot import PromptEncoder, zeroshot_rank


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Split:
    """The one method of `VQASplit` that `zeroshot_rank` uses."""

    def __init__(self, image: np.ndarray):
        self.image = image

    def image_emb(self, idx: np.ndarray) -> np.ndarray:
        return self.image[idx]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=10_000, help="(subject, object) pairs")
    ap.add_argument("--answers", type=int, default=200, help="candidate answers")
    ap.add_argument("--rows", type=int, default=3, help="questions per group")
    ap.add_argument("--dim", type=int, default=512, help="embedding size")
    ap.add_argument("--block", type=int, default=65536, help="prompts per block")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    pool = rng.standard_normal((4096, args.dim)).astype(np.float32)

    def encode(texts: list[str]) -> np.ndarray:
        return pool[[zlib.crc32(t.encode()) % len(pool) for t in texts]]

    n = args.groups * args.rows
    pairs = [(f"subject{g // 100}", f"object{g % 100}") for g in range(args.groups)]
    meta = {
        "subject": [pairs[r % args.groups][0] for r in range(n)],
        "object": [pairs[r % args.groups][1] for r in range(n)],
    }
    data = Split(rng.standard_normal((n, args.dim)).astype(np.float32))
    answers = [f"answer{a}" for a in range(args.answers)]
    cand, rows = np.arange(args.answers), np.arange(n)
    template = "a photo of {subject} {answer} {object}"
    print(f"{args.groups * args.answers} prompts, {n} questions, {args.dim}-d; "
          f"input ready, peak RSS {peak_mib():.0f} MiB")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "prompts.arrow"
        for run in ("cold", "warm"):
            start = time.perf_counter()
            with PromptEncoder(encode, 256, cache, "fake", "r0") as enc:
                zeroshot_rank(enc, template, answers, data, rows, cand, meta, args.block)
            print(f"{run}: {time.perf_counter() - start:.1f} s, {enc.embedded} embedded, "
                  f"{enc.cached} cached, cache {cache.stat().st_size / 2**20:.0f} MiB; "
                  f"peak RSS {peak_mib():.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
