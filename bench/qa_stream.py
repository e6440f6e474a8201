"""Benchmark: streaming `read_gqa` (`pipeline.formats.vqa_json`) on GQA-sized question files.

Writes one GQA-shaped questions file per size (`{qid: {...}}` with the release's fields:
imageId, question, answer, fullAnswer, types {structural, semantic, detailed}, a semantic
program of a few small dicts, semanticStr, entailed / equivalent qids, annotations,
groups, isBalanced; ~700 bytes a question) into a temp folder, without holding it in
memory, then reads each with `read_gqa` in a child process and prints, per size: wall
time, the child's peak RSS (`os.wait4` ru_maxrss) split into its RSS after imports (the
fixed part), the Arrow table returned and the rest, and the rows read. Then the peak RSS
growth per row measured between the two largest sizes against the Arrow bytes per row,
and an extrapolation to GQA's 14M `train_all_questions`: time linear in the questions,
memory = the fixed part + the rest at the largest size + Arrow bytes per row x 14M.

    .venv/bin/python bench/qa_stream.py                   # 1M and 5M questions (~4 GB)
    .venv/bin/python bench/qa_stream.py --sizes 20000     # smoke run
    .venv/bin/python bench/qa_stream.py --dir /tmp/gqa --keep --sizes 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from measure import measure

TARGET = 14_000_000  # GQA's train_all_questions
BLOCK = 10_000  # questions written at a time

OBJECTS = ["sky", "man", "table", "shirt", "car", "tree", "dog", "cat", "window", "plate"]
ATTRS = ["white", "black", "blue", "red", "green", "wooden", "metal", "large", "small"]
YES_NO = ("yes", "no")
RELS = ["to the left of", "to the right of", "on", "wearing", "holding", "behind", "near"]
TEMPLATES = [
    ("Is the {o} to the left or to the right of the {o2}?", "choose", "rel", "chooseRel"),
    ("What is the {a} {o} that is {r} the {o2} made of?", "query", "attr", "materialVerify"),
    ("Is the {a} {o} {r} the {o2} on the {o3}?", "verify", "rel", "relVerify"),
    ("Are there both {o}s and {o2}s in the picture?", "logical", "obj", "existAnd"),
    ("Which color is the {o} that is {r} the {o2}?", "query", "attr", "directOf"),
    ("Do the {o} and the {o2} have the same color?", "compare", "attr", "sameColor"),
]


def _question(rng: random.Random, k: int) -> tuple[str, str]:
    """(qid, the JSON object) of one GQA question."""
    o, o2, o3 = rng.sample(OBJECTS, 3)
    a, r = rng.choice(ATTRS), rng.choice(RELS)
    text, structural, semantic, detailed = rng.choice(TEMPLATES)
    question = text.format(o=o, o2=o2, o3=o3, a=a, r=r)
    yes_no = structural in ("verify", "logical", "compare")
    answer = rng.choice(YES_NO if yes_no else ATTRS + OBJECTS)
    iid = f"n{rng.randrange(10**6):06d}" if rng.random() < 0.05 else str(rng.randrange(1, 2420000))
    oid, oid2 = rng.randrange(10**6, 4 * 10**6), rng.randrange(10**6, 4 * 10**6)
    program = [
        {"operation": "select", "dependencies": [], "argument": f"{o} ({oid})"},
        {"operation": "relate", "dependencies": [0], "argument": f"{o2},{r},s ({oid2})"},
        {"operation": "filter " + rng.choice(("color", "material")), "dependencies": [1],
         "argument": a},
        {"operation": structural, "dependencies": [2], "argument": a},
    ][: rng.randint(2, 4)]  # fmt: skip
    qid = f"{k:08d}"
    q = {
        "semantic": program,
        "entailed": [f"{rng.randrange(10**8):08d}" for _ in range(rng.randint(0, 6))],
        "equivalent": [qid],
        "question": question,
        "imageId": iid,
        "isBalanced": rng.random() < 0.1,
        "groups": {
            "global": rng.choice((None, "color", "material")),
            "local": f"{rng.randrange(20):02d}-{o}_{a}",
        },
        "answer": answer,
        "semanticStr": " ->".join(f"{p['operation']}: {p['argument']}" for p in program),
        "annotations": {
            "answer": {"0": str(oid)} if answer in OBJECTS else {},
            "question": {"2": str(oid), "9": str(oid2)},
            "fullAnswer": {"1": str(oid)},
        },
        "types": {"detailed": detailed, "semantic": semantic, "structural": structural},
        "fullAnswer": f"{answer.capitalize()}, the {o} is {a}."
        if yes_no
        else f"The {o} is {answer}.",
    }
    return qid, json.dumps(q)


def write_gqa(path: Path, n: int, seed: int = 0) -> None:
    """A GQA questions file of `n` questions, written BLOCK questions at a time."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write("{")
        for start in range(0, n, BLOCK):
            parts = [_question(rng, k) for k in range(start, min(n, start + BLOCK))]
            f.write(("," if start else "") + ",".join(f'"{qid}": {q}' for qid, q in parts))
        f.write("}")


def child(path: Path, out: Path) -> None:
    """Read `path` with read_gqa; write {rows, arrow_bytes, fixed_kb, read_s} to `out`."""
    import pyarrow  # noqa: F401  (imports count as the fixed part)

    from pipeline.formats import vqa_json

    fixed = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    table, skipped = vqa_json.read_gqa(path)
    secs = time.perf_counter() - t0
    result = {"rows": table.num_rows, "arrow_bytes": table.nbytes, "fixed_kb": fixed,
              "chunk": vqa_json.CHUNK}  # fmt: skip
    out.write_text(json.dumps({**result, "read_s": secs, "skipped": dict(skipped)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--dir", type=Path, help="folder for the files (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    root = a.dir or Path(tempfile.mkdtemp(prefix="qa_stream_"))
    root.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for n in sorted(a.sizes):
            path = root / f"gqa_{n}.json"
            if not path.is_file():
                t0 = time.perf_counter()
                write_gqa(path, n)
                mb, secs = path.stat().st_size / 2**20, time.perf_counter() - t0
                print(f"wrote {path} ({mb:,.0f} MB) in {secs:.0f} s", flush=True)
            res = root / f"gqa_{n}.result.json"
            m = measure([sys.executable, __file__, "--child", str(path), str(res)], cwd=REPO)
            if m["rc"] != 0:
                raise SystemExit(f"read_gqa failed on {path} (rc {m['rc']})")
            result = json.loads(res.read_text())
            runs.append({"n": n, "mb": path.stat().st_size / 2**20, **m, **result})
    finally:
        if not a.keep and a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
        elif not a.keep:
            with contextlib.suppress(OSError):
                for p in root.glob("gqa_*.json"):
                    p.unlink()

    head = ("questions", "file MB", "B/quest", "read s", "wall s", "peak MB", "fixed MB",
            "Arrow MB", "rest MB", "rows")  # fmt: skip
    print("\n" + " ".join(f"{h:>9}" for h in head))
    for r in runs:
        arrow, fixed = r["arrow_bytes"] / 2**20, r["fixed_kb"] / 1024
        r["rest"] = r["peak_rss_mb"] - fixed - arrow  # ijson, the rows not yet in Arrow, ...
        cells = (f"{r['n']:,}", f"{r['mb']:,.0f}", f"{r['mb'] * 2**20 / r['n']:.0f}",
                 f"{r['read_s']:.1f}", f"{r['seconds']:.1f}", f"{r['peak_rss_mb']:,}",
                 f"{fixed:.0f}", f"{arrow:,.0f}", f"{r['rest']:,.0f}",
                 f"{r['rows']:,}")  # fmt: skip
        print(" ".join(f"{c:>9}" for c in cells))
    big = runs[-1]
    per_row = big["arrow_bytes"] / big["rows"]
    if len(runs) > 1:
        small = runs[-2]
        growth = (big["peak_rss_mb"] - small["peak_rss_mb"]) * 2**20 / (big["n"] - small["n"])
        print(
            f"\npeak RSS growth {growth:.0f} B/question from {small['n']:,} to {big['n']:,}; "
            f"Arrow {per_row:.0f} B/row (ratio {growth / per_row:.2f})"
        )
    if big["n"] < 2 * big["chunk"]:
        print(f"(under 2 x {big['chunk']:,} rows the rows not yet in Arrow grow with the size)")
    seconds = big["read_s"] * TARGET / big["n"]
    fixed, arrow = big["fixed_kb"] / 1024, per_row * TARGET / 2**20
    print(
        f"\nextrapolated to {TARGET:,} questions (from {big['n']:,}): "
        f"read {seconds / 60:.1f} min ({big['n'] / big['read_s']:,.0f} questions/s), "
        f"file {big['mb'] * TARGET / big['n'] / 1024:.1f} GB, peak RSS "
        f"{fixed + big['rest'] + arrow:,.0f} MB (fixed {fixed:.0f} + rest {big['rest']:.0f} "
        f"+ Arrow {arrow:,.0f})"
    )


if __name__ == "__main__":
    main()
