"""Scale rehearsal: every stage, through its real command, at fractions of real dataset sizes.

Generates, per fraction f, data in the real formats at f x the real counts:

- Visual Genome: `bench/vg_parse.py`'s replica (108,077 images, ~2.3M relationships,
  ~3.8M objects at f = 1, with the release's quirks), images as small JPEGs (sides and
  boxes 1/8 of the real ones, so that 2 cores can embed every crop);
- Flickr30k: 31,783 small JPEGs and `results.csv` with 5 captions each (158,915);
- LAION: 1M pairs in the precomputed-embedding layout (`img_emb/`, `text_emb/`,
  `metadata/`, 100,000 pairs per chunk, float16 unit vectors);

plus a tiny random CLIP (32 px, width 32, one layer per tower), then runs `python -m
pipeline <stage>` for prepare-vqa, embed (vg, flickr30k, laion), train-vqa, evaluate-vqa,
train-caption (ada) and evaluate-caption, each in its own process, and prints per stage:
rows (the stage's input size), wall seconds, peak RSS (the largest single process, from
wait4) and the peak summed PSS of its process tree (sampled every 0.2 s: DataLoader
workers included, shared pages split between the processes sharing them), and the cost
exponent k of time ~ rows^k: fitted over all fractions and, the figure the target k <= 1.1 is read on, between the two largest (the smaller
fractions carry the fixed start-up cost, which pulls the all-fractions fit down).

Training runs one epoch per phase (the cost of one epoch is what scales); the settings
used are in `PARAMS` below and in the JSON written to `bench/results/scale.json`.

    .venv/bin/python bench/scale.py                        # fractions 0.01 0.1 1.0
    .venv/bin/python bench/scale.py --fractions 0.01 0.1 --root /tmp/scale --keep
    .venv/bin/python bench/scale.py --fractions 0.01 --set compute.deterministic=on
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from measure import measure

FLICKR30K_IMAGES = 31_783
LAION_PAIRS = 1_000_000
LAION_CHUNK = 100_000
PIXEL_SCALE = 1 / 8  # image sides and boxes, against the real ones

CLIP = {  # the tiny CLIP (pipeline.clip.checkpoint.ClipModelConfig)
    "vocab_size": 2000, "context_length": 32, "width": 32, "layers": 1, "heads": 2,
    "image_size": 32, "patch_size": 16, "projection_dim": 32,
}  # fmt: skip
PARAMS = {
    "seed": 0,
    "embed": {"num_workers": 2, "threads": 1, "batch_size": 256, "text_batch_size": 1024},
    "train_vqa": {"epochs": 1, "batch_size": 256, "hidden": [128]},
    "train_caption": {
        "model": {"width": 32, "layers": 1, "heads": 2, "prefix_len": 4, "max_len": 24},
        "batch_size": 128, "domain_batch": 128, "pretrain_epochs": 1, "adapt_epochs": 1,
        "finetune_epochs": 1, "disc_hidden": 32,
    },
    "evaluate_caption": {"beam_size": 3, "max_len": 20},
}  # fmt: skip

WORDS = {
    "adj": [
        "small",
        "large",
        "red",
        "blue",
        "green",
        "young",
        "old",
        "white",
        "black",
        "wooden",
        "tall",
        "little",
        "brown",
        "striped",
        "empty",
        "busy",
        "happy",
        "yellow",
        "dark",
        "bright",
    ],
    "noun": [
        "man",
        "woman",
        "dog",
        "cat",
        "child",
        "girl",
        "boy",
        "tree",
        "car",
        "bike",
        "table",
        "chair",
        "street",
        "building",
        "window",
        "shirt",
        "sign",
        "ball",
        "horse",
        "bench",
        "water",
        "grass",
        "wall",
        "road",
        "field",
        "beach",
        "crowd",
    ],
    "verb": [
        "stands",
        "sits",
        "walks",
        "runs",
        "plays",
        "looks",
        "waits",
        "rides",
        "holds",
        "jumps",
        "lies",
    ],
    "prep": [
        "on",
        "in",
        "near",
        "behind",
        "under",
        "beside",
        "next",
        "to",
        "along",
        "across",
        "at",
        "by",
    ],
}


def captions(rng: np.random.Generator, n: int) -> list[str]:
    """n captions such as "A young dog runs near a wooden bench ." (a few thousand distinct
    word choices, 8-11 words)."""
    w = {k: np.array(v, dtype=object) for k, v in WORDS.items()}
    cols = [w[k][rng.integers(0, len(w[k]), n)]
            for k in ("adj", "noun", "verb", "prep", "adj", "noun")]  # fmt: skip
    return [f"A {a} {b} {c} {d} a {e} {f} ." for a, b, c, d, e, f in zip(*cols)]


def write_jpegs(paths_sizes, seed: int) -> None:
    """A small JPEG of blocky random colours at each (path, (w, h))."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for path, (w, h) in paths_sizes:
        cells = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
        Image.fromarray(cells).resize((w, h), Image.Resampling.NEAREST).save(path, quality=85)


def make_vg(root: Path, fraction: float) -> dict:
    """The VG replica, its empty image files replaced by small JPEGs of the declared size."""
    from vg_parse import generate_replica

    info = generate_replica(root, fraction, pixel_scale=PIXEL_SCALE)
    with open(root / "image_data.json") as f:
        sizes = {e.get("image_id", e.get("id")): (e["width"], e["height"]) for e in json.load(f)}
    files = [p for sub in ("VG_100K", "VG_100K_2") for p in (root / sub).iterdir()]
    write_jpegs(((p, sizes[int(p.stem)]) for p in files), seed=1)
    return {"images": info["images"], "relationships": info["relationships"]}


def make_flickr30k(root: Path, fraction: float) -> dict:
    n = max(10, round(FLICKR30K_IMAGES * fraction))
    rng = np.random.default_rng(2)
    folder = root / "flickr30k_images"
    folder.mkdir(parents=True)
    names = [f"{1_000_000 + i}.jpg" for i in range(n)]
    side = round(500 * PIXEL_SCALE), round(375 * PIXEL_SCALE)
    write_jpegs(((folder / name, side) for name in names), seed=3)
    caps = captions(rng, 5 * n)
    with open(root / "results.csv", "w") as f:
        f.write("image_name| comment_number| comment\n")
        f.writelines(f"{names[i // 5]}| {i % 5}| {c}\n" for i, c in enumerate(caps))
    return {"images": n, "captions": 5 * n}


def make_laion(root: Path, fraction: float, dim: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = max(100, round(LAION_PAIRS * fraction))
    rng = np.random.default_rng(4)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True)
    for k, start in enumerate(range(0, n, LAION_CHUNK)):
        m = min(LAION_CHUNK, n - start)
        for name in ("img_emb", "text_emb"):
            x = rng.standard_normal((m, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            np.save(root / name / f"{name}_{k}.npy", x.astype(np.float16))
        meta = {
            "key": [f"{start + i:09d}" for i in range(m)],
            "caption": captions(rng, m),
            "url": [f"https://example.com/{start + i}.jpg" for i in range(m)],
        }
        pq.write_table(pa.table(meta), root / "metadata" / f"metadata_{k}.parquet")
    return {"pairs": n}


def make_clip(folder: Path) -> Path:
    from pipeline.clip.checkpoint import ClipModelConfig, build_scratch_checkpoint

    texts = captions(np.random.default_rng(5), 2000)
    texts += ["What is the relationship between the man and the tree?", "What is this?"]
    texts += [" ".join(f"thing {k}" for k in range(j, 3000, 50)) for j in range(50)]
    return build_scratch_checkpoint(texts, ClipModelConfig(**CLIP), folder, seed=0)


def make_world(root: Path, fraction: float) -> None:
    """All inputs of one fraction under `root`, described in `root/world.json`."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    clip = make_clip(root / "clip")
    from pipeline.clip.backbone import load_backbone

    dim = load_backbone(str(clip)).dim
    info = {
        "vg": make_vg(root / "vg", fraction),
        "flickr30k": make_flickr30k(root / "flickr30k", fraction),
        "laion": make_laion(root / "laion", fraction, dim),
    }
    info["seconds"] = round(time.perf_counter() - t0, 1)
    (root / "world.json").write_text(json.dumps(info))


# --------------------------------------------------------------------------- running


def stages(w: Path) -> list[tuple[str, list]]:
    """(name, `python -m pipeline` arguments) of each stage, in pipeline order."""
    o, clip = w / "out", ["--clip", w / "clip"]
    embed = [
        (f"embed_{d}", ["embed", "--dataset", d, "--input", o / "qa" if d == "vg" else w / d,
                        "--images", w / d, *clip, "--out", o / "emb" / d])
        for d in ("vg", "flickr30k", "laion")
    ]  # fmt: skip
    # fmt: off
    return [
        ("prepare_vqa", ["prepare-vqa", "--vg", w / "vg", "--out", o / "qa"]),
        *embed,
        ("train_vqa", ["train-vqa", "--qa", o / "qa", "--emb", o / "emb/vg", "--out", o / "vqa",
                       "--plots", o / "vqa.tsv"]),
        ("evaluate_vqa", ["evaluate-vqa", "--qa", o / "qa", "--emb", o / "emb/vg",
                          "--model", o / "vqa", *clip, "--metrics", o / "metrics_vqa",
                          "--detail", o / "vqa_detail.json", "--predictions", o / "vqa.jsonl"]),
        ("train_caption", ["train-caption", "--variant", "ada", "--laion", o / "emb/laion",
                           "--flickr30k", o / "emb/flickr30k", *clip, "--out", o / "ada",
                           "--plots", o / "caption.tsv"]),
        ("evaluate_caption", ["evaluate-caption", "--emb", o / "emb/flickr30k", *clip,
                              "--model", o / "ada", "--metrics", o / "metrics_caption",
                              "--detail", o / "caption_detail.json", "--predictions", o / "eval"]),
    ]
    # fmt: on


def run_stage(args: list, params: Path, log: Path) -> dict:
    """Run one stage command: wall seconds, peak RSS (largest process), peak PSS (all), rc."""
    cmd = [sys.executable, "-m", "pipeline", *map(str, args), "--params", str(params)]
    return measure(cmd, REPO, log, every=0.2)


def worker(what: str, args: list) -> str:
    """Run `what` of this script in a child process (the parent stays small: on Linux a
    child's peak RSS from wait4 counts its parent's RSS at the fork)."""
    cmd = [sys.executable, __file__, "--worker", what, *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout


def stage_rows(name: str, w: Path) -> int:
    """The stage's input size: what its cost should be linear in."""
    import pyarrow.parquet as pq

    from pipeline.embedding.files import read_table

    o = w / "out"
    world = json.loads((w / "world.json").read_text())

    def parquet_rows(*splits: str) -> int:
        return sum(pq.read_metadata(o / "qa" / f"{s}.parquet").num_rows for s in splits)

    def arrow_rows(folder: Path) -> int:
        return sum(read_table(p).num_rows for p in sorted(folder.glob("*.arrow")))

    if name == "prepare_vqa":  # relationships + objects (the replica's mean 35 per image)
        from vg_parse import OBJECTS_PER_IMAGE

        return world["vg"]["relationships"] + round(world["vg"]["images"] * OBJECTS_PER_IMAGE)
    if name.startswith("embed_"):  # rows written: images, crops, captions, texts
        return arrow_rows(o / "emb" / name.removeprefix("embed_"))
    if name == "train_vqa":
        return parquet_rows("train", "val")
    if name == "evaluate_vqa":
        return parquet_rows("test")
    if name == "train_caption":
        return world["laion"]["pairs"] + world["flickr30k"]["captions"]
    return sum(1 for _ in open(o / "eval" / "caption_ada.jsonl"))  # test images captioned


def run_worker(what: str, args: list[str]) -> None:
    if what == "make-world":
        make_world(Path(args[0]), float(args[1]))
    else:
        print(stage_rows(args[0], Path(args[1])))


def exponent(rows: list[int], secs: list[float]) -> float | None:
    """Least-squares slope of log(seconds) on log(rows)."""
    if len(rows) < 2 or len(set(rows)) < 2:
        return None
    x, y = np.log(np.asarray(rows, float)), np.log(np.asarray(secs, float))
    return round(float(np.polyfit(x, y, 1)[0]), 2)


def with_overrides(params: dict, sets: list[str]) -> dict:
    """`params` with each `SECTION.KEY=VALUE` of `sets` set (VALUE read as JSON, else kept
    as a string: `compute.deterministic=on` is the string "on", not YAML's true)."""
    out = json.loads(json.dumps(params))
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SystemExit(f"--set {item!r}: {part} is not a section")
        node[last] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    ap.add_argument("--stages", nargs="+", help="only these (names as printed)")
    ap.add_argument("--root", type=Path, help="data folder (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the data and outputs")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/scale.json")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a stage param (VALUE as JSON, else a string), repeatable; "
                    "e.g. compute.deterministic=on")  # fmt: skip
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args.worker[0], args.worker[1:])
        return
    params = with_overrides(PARAMS, args.set)

    root = Path(tempfile.mkdtemp(prefix="scale_")) if args.root is None else args.root
    results: dict[str, dict] = {}
    try:
        for f in sorted(args.fractions):
            w = root / f"f{f:g}"
            if not (w / "world.json").exists():
                worker("make-world", [w, f])
            info = json.loads((w / "world.json").read_text())
            (w / "params.yaml").write_text(json.dumps(params, indent=1))  # JSON is YAML
            print(f"fraction {f:g}: data {info}", flush=True)
            if not args.stages:  # a subset reuses the outputs of the stages before it
                shutil.rmtree(w / "out", ignore_errors=True)
            (w / "out").mkdir(exist_ok=True)
            for name, cmd in stages(w):
                if args.stages and name not in args.stages:
                    continue
                r = run_stage(cmd, w / "params.yaml", w / "out" / f"{name}.log")
                if r["rc"]:
                    tail = (w / "out" / f"{name}.log").read_text()[-2000:]
                    raise SystemExit(f"{name} failed at fraction {f:g}:\n{tail}")
                r["rows"] = int(worker("rows", [name, w]))
                results.setdefault(name, {})[f"{f:g}"] = r
                print(f"  {name:18s}{r['rows']:>11,d} rows{r['seconds']:9.1f} s"
                      f"{r['peak_rss_mb']:7d} MB{r['peak_tree_pss_mb']:7d} MB tree PSS",
                      flush=True)  # fmt: skip
    finally:
        if not args.keep and args.root is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{'stage':18s}" + "".join(f"{'f=' + k:>26s}" for k in map("{:g}".format,
          sorted(args.fractions))) + f"{'k (all)':>9s}{'k (top 2)':>10s}")  # fmt: skip
    for name, by_f in results.items():
        fs = sorted(by_f, key=float)
        rows, secs = [by_f[k]["rows"] for k in fs], [by_f[k]["seconds"] for k in fs]
        k_all, k_top = exponent(rows, secs), exponent(rows[-2:], secs[-2:])
        by_f["k_all"], by_f["k_top2"] = k_all, k_top
        cells = "".join(f"{by_f[k]['rows']:>10,d} {by_f[k]['seconds']:7.1f}s "
                        f"{by_f[k]['peak_tree_pss_mb']:5d}MB" for k in fs)  # fmt: skip
        print(f"{name:18s}{cells}{k_all!s:>9s}{k_top!s:>10s}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }  # fmt: skip
    record = {
        "command": "python bench/scale.py " + " ".join(sys.argv[1:]),
        "machine": machine, "fractions": sorted(args.fractions), "clip": CLIP,
        "params": params, "pixel_scale": PIXEL_SCALE, "stages": results,
    }  # fmt: skip
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
