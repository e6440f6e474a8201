"""Benchmark: the whole embed stage vs. a bare model forward, images and texts, one run.

    .venv/bin/python bench/embed.py                      # CPU: 500 JPEGs 500x375, ViT-B/32
    python bench/embed.py --device cuda --batch-size 256 --workers 16 --images 5000

The model is the ViT-B/32 architecture (transformers' `CLIPConfig()` defaults: 224 px,
patch 32, 12+12 layers, 512-d embeddings, 49408-token vocabulary) with random weights, so
nothing is downloaded. The tokenizer is a small BPE trained on the generated texts.

- images: `pipeline.embedding.dataset.embed_dataset("vg", ...)` over N generated JPEGs
  (decode + resize in DataLoader workers, forward, Arrow writing, report, manifest with
  the token table's fingerprint: everything but loading the checkpoint) vs.
  `Backbone.encode_images` on ready, normalised tensors with the same batch size, as many
  images.
- texts: the same stage over M distinct questions (their one image file is absent, so no
  image is decoded) vs.
  `Backbone.encode_token_ids` on ready token ids with the same batch size.
The bare forward is timed before and after the stage and averaged (other processes share
the CPU). Prints throughput of both and the ratio stage / bare.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.clip.backbone import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Backbone
from pipeline.embedding.dataset import embed_dataset
from pipeline.settings import Split
from pipeline.stages.embed import Settings

SUBJECTS = [
    "sofa",
    "mattress",
    "table",
    "chair",
    "lamp",
    "dog",
    "cat",
    "man",
    "woman",
    "tree",
    "car",
    "bike",
    "cup",
    "plate",
]
NO_IMAGE = 10**9  # an image id without a file
PREDICATES = ["on", "under", "next to", "behind", "in front of", "near", "holding", "above"]


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def make_images(folder: Path, n: int, width: int, height: int, seed: int = 0) -> None:
    """Photo-like JPEGs: smooth random colour fields with shapes and sensor noise (q=90)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.int16)
        for _ in range(4):
            x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
            h, w = rng.integers(20, 120), rng.integers(20, 160)
            arr[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, 3)
        arr = arr + rng.normal(0, 6, arr.shape)
        out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        out.save(folder / f"{i}.jpg", format="JPEG", quality=90)


def questions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = set()
    while len(out) < n:
        a, b = rng.choice(SUBJECTS, 2, replace=False)
        adj = rng.choice(["", "red ", "small ", "large ", "wooden ", "old "])
        out.add(f"What is the relationship between the {adj}{a} and the {b} #{len(out)}?")
    return sorted(out)


def write_qa(root: Path, image_ids: list[int], texts: list[str]) -> Path:
    """A data/qa folder: the given images (VG_100K/<id>.jpg), questions, one answer."""
    qa = root / "qa"
    qa.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "qid": f"q{i}",
            "image_id": image_ids[i % len(image_ids)],
            "question": q,
            "image_path": f"VG_100K/{image_ids[i % len(image_ids)]}.jpg",
            "answer": "on",
            "qtype": "relation",
        }
        for i, q in enumerate(texts)
    ]
    rows += [
        {
            "qid": f"i{i}",
            "image_id": i,
            "image_path": f"VG_100K/{i}.jpg",
            "question": texts[0],
            "answer": "on",
            "qtype": "relation",
        }
        for i in image_ids
    ]
    pq.write_table(pa.Table.from_pylist(rows), qa / "train.parquet")
    (qa / "answers.json").write_text(json.dumps({"answers": [{"answer": "on", "count": 1}]}))
    return qa


def vit_b32(device: str, texts: list[str]) -> Backbone:
    """ViT-B/32 with random weights and a small BPE tokenizer (no download)."""
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    from pipeline.clip.tokenizer import BOS, EOS, PAD, UNK, train_tokenizer

    tok = train_tokenizer(texts + [" ".join(SUBJECTS + PREDICATES)], vocab_size=2000)
    bos, eos, pad = tok.token_to_id(BOS), tok.token_to_id(EOS), tok.token_to_id(PAD)
    config = CLIPConfig(
        text_config={"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    )  # defaults: ViT-B/32, 224 px, 49408-token text model, 512-d projection
    torch.manual_seed(0)
    model = CLIPModel(config).eval().to(device)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=77,
    )
    return Backbone(
        model=model,
        tokenizer=fast,
        image_size=224,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        device=torch.device(device),
        model_id="random ViT-B/32",
        revision="random-init-seed-0",
        context_length=77,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its finished children (decode workers)."""
    import resource

    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


def sync(bb: Backbone) -> None:
    if bb.device.type == "cuda":
        torch.cuda.synchronize()


def bare_images(bb: Backbone, n: int, bs: int) -> tuple[float, float]:
    """(wall, CPU) seconds for `encode_images` over n ready, normalised images in batches of bs."""
    g = torch.Generator().manual_seed(0)
    batch = torch.randn((bs, 3, 224, 224), generator=g)
    if bb.device.type == "cuda":
        batch = batch.pin_memory()
    sync(bb)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for s in range(0, n, bs):
        bb.encode_images(batch[: min(bs, n - s)])
    sync(bb)
    return time.perf_counter() - t0, cpu_seconds() - c0


def bare_texts(bb: Backbone, ids: list[list[int]], bs: int) -> tuple[float, float]:
    """(wall, CPU) seconds for `encode_token_ids` over ready token ids in batches of bs."""
    sync(bb)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for s in range(0, len(ids), bs):
        bb.encode_token_ids(ids[s : s + bs])
    sync(bb)
    return time.perf_counter() - t0, cpu_seconds() - c0


def report(what: str, unit: str, n: int, stage, bare1, bare2) -> None:
    """Print wall-clock throughput of stage and bare forward and their ratio (the target),
    plus CPU seconds per item (robust to other processes on the machine)."""
    wall = (bare1[0] + bare2[0]) / 2
    cpu = (bare1[1] + bare2[1]) / 2
    print(
        f"{what}: stage {n / stage[0]:.2f} {unit}/s ({stage[0]:.2f} s), bare forward "
        f"{n / wall:.2f} {unit}/s ({bare1[0]:.2f} s / {bare2[0]:.2f} s), "
        f"ratio {wall / stage[0]:.3f}"
    )
    print(
        f"{what} CPU: stage {1000 * stage[1] / n:.1f} ms/{unit} (incl. decode workers), bare "
        f"{1000 * cpu / n:.1f} ms/{unit}, ratio {cpu / stage[1]:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--size", default="500x375", help="JPEG width x height")
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--text-batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader decode workers")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (main)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None, help="keep data here (default: temp)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    width, height = (int(x) for x in args.size.split("x"))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-embed-"))
    print(f"# load average at start: {loadavg()} ({os.cpu_count()} cores)")
    print(
        f"# device {args.device}, bf16 autocast {args.device == 'cuda'}, torch threads {args.threads}, "
        f"decode workers {args.workers}, batch {args.batch_size}, text batch "
        f"{args.text_batch_size}"
    )
    try:
        texts = questions(args.texts)
        vg = work / "vg" / "VG_100K"
        vg.mkdir(parents=True, exist_ok=True)
        if len(list(vg.glob("*.jpg"))) != args.images:
            make_images(vg, args.images, width, height)
        jpeg_kb = sum(f.stat().st_size for f in vg.glob("*.jpg")) / args.images / 1024
        print(f"# {args.images} JPEGs {width}x{height}, {jpeg_kb:.0f} KiB each on average")
        bb = vit_b32(args.device, texts)
        settings = Settings(
            batch_size=args.batch_size,
            text_batch_size=args.text_batch_size,
            num_workers=args.workers,
            shard_size=10**9,
            dtype="float16",
            vg_crops=False,
        )
        bs = args.batch_size
        bb.encode_images(torch.randn(min(bs, 8), 3, 224, 224))  # warm-up
        bb.encode_token_ids(bb.tokenize(texts[:8]))

        # ---- images
        qa = write_qa(work / "img", list(range(args.images)), texts[:1])
        bare1 = bare_images(bb, args.images, bs)
        out = work / "out-img"
        shutil.rmtree(out, ignore_errors=True)
        t0, c0 = time.perf_counter(), cpu_seconds()
        rep = embed_dataset("vg", qa, out, bb, settings, Split(), images=work / "vg")
        sync(bb)
        stage = (time.perf_counter() - t0, cpu_seconds() - c0)
        bare2 = bare_images(bb, args.images, bs)
        assert rep.written == args.images, rep.summary()
        report("images", "img", args.images, stage, bare1, bare2)

        # ---- texts
        if not args.skip_text:
            qa = write_qa(work / "txt", [NO_IMAGE], texts)  # its image file is absent
            n_texts = len(texts) + 1  # questions + the one answer
            ids = bb.tokenize([*texts, "on"])
            bare1 = bare_texts(bb, ids, args.text_batch_size)
            out = work / "out-txt"
            shutil.rmtree(out, ignore_errors=True)
            t0, c0 = time.perf_counter(), cpu_seconds()
            rep = embed_dataset("vg", qa, out, bb, settings, Split(), images=work / "vg")
            sync(bb)
            stage = (time.perf_counter() - t0, cpu_seconds() - c0)
            assert rep.skipped == {"missing_file": 1}, rep.summary()
            bare2 = bare_texts(bb, ids, args.text_batch_size)
            report("texts", "texts", n_texts, stage, bare1, bare2)
        print(f"# load average at end: {loadavg()}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
