"""Benchmark: streaming `prepare_vqa` vs a naive `json.load` parse on a full-size VG replica.

Generates a Visual Genome replica with the real release's schema and quirks (108,077
images, ~2.3M relationships, ~0.8 GB relationships.json, ~3.8M objects, image_data.json,
alias files, empty image files split over VG_100K/ and VG_100K_2/, some missing) into a
temp folder, then runs, each in its own subprocess:

- the stage (`pipeline.stages.prepare_vqa.main`: blocks of entries decoded by msgspec,
  objects.json by a second process, parquet row groups), `--runs` times, and
- a naive baseline: `json.load` of each whole file, every entry brought to the stage's
  form by `from_dict` (the path of entries msgspec rejects), all rows held in memory, one
  `pq.write_table` per split (same row-building code, so the same rows),

and prints wall time and peak RSS of both (`os.wait4` ru_maxrss: the largest process;
and the RSS of all its processes added up, sampled), their ratios, and whether the two
outputs are identical. At full scale it also checks the stage against 15 s and 200 MB
(the targets on a 2-core machine).

    .venv/bin/python bench/vg_parse.py               # full scale (~1.3 GB of JSON)
    .venv/bin/python bench/vg_parse.py --scale 0.01  # smoke run
    .venv/bin/python bench/vg_parse.py --dir /tmp/vgrep --keep --runs 3 --stream-only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from measure import measure

FULL_IMAGES = 108_077
RELS_PER_IMAGE = 21.3  # 2.3M / 108k, as in VG v1.4
OBJECTS_PER_IMAGE = 35.0  # 3.8M / 108k

PREDICATES = [
    "on", "has", "in", "of", "wearing", "with", "behind", "holding", "on top of", "next to",
    "near", "sitting on", "wears", "above", "in front of", "standing on", "under", "has a",
    "riding", "by", "ON", "On", " on ", "next  to", "Next To", "is wearing", "WEARING",
    "in  front of", "beside", "carrying", "parked on", "attached to", "hanging on", "belonging to",
    "covering", "looking at", "walking on", "laying on", "along", "against",
]  # fmt: skip
NOUNS = [
    "man", "person", "woman", "tree", "building", "window", "shirt", "wall", "sign", "sky",
    "table", "car", "water", "grass", "head", "hand", "plate", "street", "hair", "pole",
    "people", "leg", "light", "cloud", "ear", "fence", "train", "snow", "door", "shadow",
    "Man", "men", "guy", "  tree", "Window ", "sidewalk", "shade", "orange", "sofa", "mattress",
]  # fmt: skip
N_EXTRA_NAMES = 3000


def _name_pool() -> list[str]:
    return NOUNS + [f"thing {k}" for k in range(N_EXTRA_NAMES)]


def _zipf_choice(rng: np.random.Generator, n_pool: int, size: int) -> np.ndarray:
    """Indices in [0, n_pool) with a long-tailed (Zipf-like) distribution."""
    return (rng.zipf(1.3, size) - 1) % n_pool


def _entity(oid: int, x: int, y: int, w: int, h: int, name: str, style: int) -> str:
    """One subject/object dict in one of the release's variants."""
    nj = json.dumps(name)
    syn = f'"synsets": ["{name.strip().lower()}.n.01"], '
    if style == 0:  # v1.4 "name", synsets first
        return (
            f'{{"name": {nj}, "h": {h}, {syn}"object_id": {oid}, "merged_object_ids": [], '
            f'"w": {w}, "y": {y}, "x": {x}}}'
        )
    if style == 1:  # "names" list, merged ids
        return (
            f'{{"h": {h}, "object_id": {oid}, "merged_object_ids": [{oid + 7}], {syn}'
            f'"w": {w}, "y": {y}, "x": {x}, "names": [{nj}]}}'
        )
    if style == 2:  # no synsets
        return f'{{"h": {h}, "object_id": {oid}, "w": {w}, "y": {y}, "x": {x}, "name": {nj}}}'
    if style == 3:  # empty names list (skipped: no name)
        return f'{{"h": {h}, "object_id": {oid}, "w": {w}, "y": {y}, "x": {x}, "names": []}}'
    return f'{{"h": {h}, "object_id": {oid}, "w": {w}, "y": {y}, "x": {x}, "name": "  "}}'


def _image_block(rng, ids, names, rel_id0, obj_id0, pixel_scale=1.0):
    """JSON text for a block of images: (relationships, objects, image_data) parts; image
    sizes and boxes times `pixel_scale` (the same draws whatever the scale)."""

    def px(a: np.ndarray) -> np.ndarray:
        return a if pixel_scale == 1.0 else np.round(a * pixel_scale).astype(np.int64)

    n = len(ids)
    n_rel = rng.poisson(RELS_PER_IMAGE, n)
    n_obj = rng.poisson(OBJECTS_PER_IMAGE, n)
    tot_r, tot_o = int(n_rel.sum()), int(n_obj.sum())
    widths = px(rng.integers(300, 1025, n))
    heights = px(rng.integers(300, 1025, n))
    # relationship draws, vectorised
    pred = rng.integers(0, len(PREDICATES), tot_r).tolist()
    empty_pred = (rng.random(tot_r) < 0.003).tolist()
    sn = _zipf_choice(rng, len(names), tot_r).tolist()
    on = _zipf_choice(rng, len(names), tot_r).tolist()
    s_style = rng.choice(5, tot_r, p=[0.66, 0.25, 0.085, 0.003, 0.002]).tolist()
    o_style = rng.choice(5, tot_r, p=[0.66, 0.25, 0.085, 0.003, 0.002]).tolist()
    kind = rng.choice(3, tot_r, p=[0.975, 0.02, 0.005]).tolist()  # 1 dup triple, 2 self
    rel_syn = (rng.random(tot_r) < 0.9).tolist()
    box = px(rng.integers(0, 300, (tot_r, 8))).tolist()
    # object draws
    onames = _zipf_choice(rng, len(names), tot_o).tolist()
    ostyle = rng.choice(4, tot_o, p=[0.9, 0.07, 0.02, 0.01]).tolist()
    obox = px(rng.integers(0, 300, (tot_o, 4))).tolist()

    rel_parts, obj_parts, img_parts = [], [], []
    r = o = 0
    rid, oid = rel_id0, obj_id0
    for i, image_id in enumerate(ids):
        rels = []
        prev = None
        for _ in range(int(n_rel[i])):
            b = box[r]
            k = kind[r]
            if k == 1 and prev is not None:  # same triple again, new ids and boxes
                s_txt, o_txt, p_txt = prev
            else:
                s_txt = _entity(oid, b[0], b[1], b[2] + 1, b[3] + 1, names[sn[r]], s_style[r])
                if k == 2:
                    o_txt = s_txt
                else:
                    o_txt = _entity(
                        oid + 1, b[4], b[5], b[6] + 1, b[7] + 1, names[on[r]], o_style[r]
                    )
                p_txt = json.dumps("" if empty_pred[r] else PREDICATES[pred[r]])
                prev = (s_txt, o_txt, p_txt)
            syn = '"synsets": ["along.r.01"], ' if rel_syn[r] else ""
            rels.append(
                f'{{"predicate": {p_txt}, "object": {o_txt}, "relationship_id": {rid}, '
                f'{syn}"subject": {s_txt}}}'
            )
            r += 1
            rid += 1
            oid += 2
        rel_parts.append(f'{{"relationships": [{", ".join(rels)}], "image_id": {image_id}}}')
        objs = []
        for _ in range(int(n_obj[i])):
            b = obox[o]
            st = ostyle[o]
            nm = json.dumps(names[onames[o]])
            syn = "" if st == 2 else '"synsets": ["tree.n.01"], '
            nmf = '"names": []' if st == 3 else f'"names": [{nm}]'
            if st == 1:
                nmf = f'"name": {nm}'
            objs.append(
                f'{{{syn}"h": {b[3] + 1}, "object_id": {oid}, "merged_object_ids": [], '
                f'{nmf}, "w": {b[2] + 1}, "y": {b[1]}, "x": {b[0]}}}'
            )
            o += 1
            oid += 1
        folder = "VG_100K_2" if image_id > 2_000_000 else "VG_100K"
        url = f"https://cs.stanford.edu/people/rak248/{folder}/{image_id}.jpg"
        obj_parts.append(
            f'{{"image_id": {image_id}, "objects": [{", ".join(objs)}], "image_url": "{url}"}}'
        )
        key = "id" if image_id % 10 == 3 else "image_id"  # v1.0 spelling mixed in
        img_parts.append(
            f'{{"width": {int(widths[i])}, "url": "{url}", "height": {int(heights[i])}, '
            f'"{key}": {image_id}, "coco_id": null, "flickr_id": null}}'
        )
    return rel_parts, obj_parts, img_parts, rid, oid


def generate_replica(
    out: Path, scale: float = 1.0, seed: int = 0, pixel_scale: float = 1.0
) -> dict:
    """Write a VG replica into `out` (image sizes and boxes times `pixel_scale`); its sizes."""
    rng = np.random.default_rng(seed)
    n = max(10, round(FULL_IMAGES * scale))
    n1 = int(n * 0.6)
    ids = list(range(1, n1 + 1)) + list(range(2_300_001, 2_300_001 + n - n1))
    names = _name_pool()
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("VG_100K", "VG_100K_2"):
        (out / sub).mkdir(exist_ok=True)
    (out / "relationship_alias.txt").write_text("wearing,wears,is wearing\nnext to,beside\n")
    (out / "object_alias.txt").write_text("man,men,guy\nperson,people\n")
    rid, oid = 1, 1
    block = 2000
    missing = 0
    kinds = ("relationships", "objects", "image_data")
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(out / f"{k}.json", "w", buffering=1 << 22))
                 for k in kinds]  # fmt: skip
        for f in files:
            f.write("[")
        for start in range(0, n, block):
            chunk = ids[start : start + block]
            parts = _image_block(rng, chunk, names, rid, oid, pixel_scale)
            rid, oid = parts[3], parts[4]
            for f, p in zip(files, parts[:3]):
                f.write((", " if start else "") + ", ".join(p))
            for image_id in chunk:  # 2% of the images have no file on disk
                if image_id % 50 == 7:
                    missing += 1
                    continue
                folder = "VG_100K_2" if image_id > 2_000_000 else "VG_100K"
                (out / folder / f"{image_id}.jpg").touch()
        for f in files:
            f.write("]")
    return {
        "images": n,
        "relationships": rid - 1,
        "missing_image_files": missing,
        "mb": {k: round((out / f"{k}.json").stat().st_size / 1e6, 1) for k in kinds},
    }


# --------------------------------------------------------------------------- workers


def naive_parse(vg_dir: Path, out_dir: Path) -> None:
    """The baseline: `json.load` each whole file, keep every row in memory, write at the end.

    Row building is the stage's own `QABuilder` with the default settings (same
    normalisation, checks and row order), so the two outputs must be identical; only
    parsing (here `json.load` + `from_dict` for every entry) and buffering differ.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.formats import vg
    from pipeline.formats.vg_qa import SCHEMA, SPLITS, QABuilder, build_vocab
    from pipeline.settings import Answers, Split
    from pipeline.stages.prepare_vqa import Settings

    settings, split, answers = Settings(), Split(), Answers()
    with open(vg_dir / vg.IMAGE_DATA) as f:
        image_data = json.load(f)
    images = {}
    for e in image_data:
        w, h = e.get("width"), e.get("height")
        images[vg.image_id_of(e)] = (w, h)
    del image_data
    batches: dict[str, list] = {s: [] for s in SPLITS}
    builder = QABuilder(
        settings, split, images, vg.ImageFiles(vg_dir),
        vg.Normalizer(vg.load_aliases(vg_dir / vg.RELATIONSHIP_ALIAS)),
        vg.Normalizer(vg.load_aliases(vg_dir / vg.OBJECT_ALIAS)),
        lambda s, b: batches[s].append(b),
    )  # fmt: skip
    with open(vg_dir / vg.RELATIONSHIPS) as f:
        relationships = json.load(f)
    for entry in relationships:
        builder.add_relationships(vg.RelEntry.from_dict(entry))
    del relationships
    with open(vg_dir / vg.OBJECTS) as f:
        objects = json.load(f)
    for entry in objects:
        builder.add_objects(vg.ObjEntry.from_dict(entry))
    del objects
    builder.flush()
    vocab = build_vocab(builder.answer_counts["train"], answers.top_k, answers.min_count)
    vocab_arr = pa.array([a for a, _ in vocab], pa.string())
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        cols = {name: [] for name in SCHEMA.names}
        for b in batches[s]:
            for name in b.schema.names:
                cols[name].append(b[name])
            cols["in_vocab"].append(pc.is_in(b["answer"], value_set=vocab_arr))
            cols["split"].append(pa.array([s] * len(b), pa.string()))
        arrays = [pa.chunked_array(cols[f.name], f.type) for f in SCHEMA]
        table = pa.Table.from_arrays(arrays, schema=SCHEMA)
        pq.write_table(table, out_dir / f"{s}.parquet", use_compliant_nested_type=False)
    with open(out_dir / "answers.json", "w") as f:
        json.dump({"answers": [{"answer": a, "count": c} for a, c in vocab],
                   "top_k": answers.top_k, "min_count": answers.min_count,
                   "counted_on": "train"},
                  f, indent=2)  # fmt: skip


def _worker(kind: str, vg_dir: Path, out_dir: Path) -> None:
    if kind == "stream":
        from pipeline.stages.prepare_vqa import main

        params = out_dir.parent / f"{out_dir.name}.params.yaml"
        params.write_text("{}\n")  # the default settings, as the naive baseline uses
        print(main(vg_dir, out_dir, params))
    else:
        naive_parse(vg_dir, out_dir)


# --------------------------------------------------------------------------- driver


def run_worker(kind: str, vg_dir: Path, out_dir: Path) -> tuple[float, float, float]:
    """Run one worker in a subprocess: wall seconds, peak RSS in MB of its largest process
    and peak PSS in MB of all its processes (`bench/measure.py`)."""
    cmd = [sys.executable, __file__, "--worker", kind, "--dir", str(vg_dir), "--out", str(out_dir)]
    r = measure(cmd, REPO, every=0.02)
    if r["rc"]:
        raise SystemExit(f"{kind} worker failed with exit code {r['rc']}")
    return r["seconds"], r["peak_rss_mb"], r["peak_tree_pss_mb"]


def same_outputs(a: Path, b: Path) -> bool:
    import pyarrow.parquet as pq

    for s in ("train", "val", "test"):
        if not pq.read_table(a / f"{s}.parquet").equals(pq.read_table(b / f"{s}.parquet")):
            return False
    return json.loads((a / "answers.json").read_text()) == json.loads(
        (b / "answers.json").read_text()
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the real VG size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, help="replica folder (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the replica and outputs")
    ap.add_argument("--runs", type=int, default=1, help="runs of the stage (best wall)")
    ap.add_argument("--stream-only", action="store_true", help="skip the naive baseline")
    ap.add_argument("--worker", choices=["stream", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, args.dir, args.out)
        return

    root = Path(tempfile.mkdtemp(prefix="vg_bench_")) if args.dir is None else args.dir
    vg_dir = root / "vg"
    try:
        if (vg_dir / "relationships.json").exists():
            print(f"reusing replica in {vg_dir}")
        else:
            t0 = time.perf_counter()
            info = generate_replica(vg_dir, args.scale, args.seed)
            print(f"generated replica in {time.perf_counter() - t0:.1f}s: {info}")
        from pipeline.formats.vg import json_backend

        print(f"JSON readers: {json_backend()}")
        print(f"{'':28s}{'wall s':>10s}{'peak RSS MB':>14s}{'all processes PSS MB':>22s}")
        runs = [run_worker("stream", vg_dir, root / "out_stream") for _ in range(args.runs)]
        for sw, sr, ss in runs:
            print(f"{'streaming (prepare_vqa)':28s}{sw:10.1f}{sr:14.0f}{ss:22.0f}")
        sw, sr = min(r[0] for r in runs), max(r[1] for r in runs)
        if args.stream_only:
            return
        nw, nr, ns = run_worker("naive", vg_dir, root / "out_naive")
        print(f"{'naive json.load':28s}{nw:10.1f}{nr:14.0f}{ns:22.0f}")
        same = same_outputs(root / "out_stream", root / "out_naive")
        print(f"ratio streaming/naive: wall {sw / nw:.2f}x, peak RSS {sr / nr:.3f}x")
        print(f"identical outputs: {same}")
        ok = sr <= 1024 and sw <= nw and same
        print(
            f"targets (peak RSS <= 1024 MB, wall <= naive, same rows): {'MET' if ok else 'NOT MET'}"
        )
        if args.scale == 1.0:  # this machine: 2 cores
            ok = sw <= 15 and sr <= 200
            print(
                f"full scale (best wall <= 15 s, peak RSS <= 200 MB): {'MET' if ok else 'NOT MET'}"
            )
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
