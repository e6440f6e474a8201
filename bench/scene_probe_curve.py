"""Scene-probe learning curve: does the probe measure the embedding, or its own training set?

Embeds one style's whole scenes of a probe set (`synth`'s `probes/`; raise
`synth.probe_scenes` for a long curve) with a CLIP checkpoint and prints, for a growing
number of train scenes, the test recall@k of the shape, object and relation probes
(`pipeline.clip.scene_probes`) at each L2 penalty of its grid. While recall still climbs
with more train scenes, the probe under-reads what the embedding carries. The test half is
scored here for every penalty, so the best number of a row is an optimistic read-out; the
stage itself chooses the penalty by cross-validation on the train half.

    .venv/bin/python bench/scene_probe_curve.py --probes data/sample/probes --clip models/clip
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from pipeline.clip import scene_probes as SP
    from pipeline.clip.backbone import load_backbone
    from pipeline.clip.probes import embed_pixels, load_probe_set

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probes", type=Path, required=True, help="a probe set folder")
    ap.add_argument("--clip", default="models/clip", help="CLIP checkpoint folder or hub id")
    ap.add_argument("--style", default="photo", choices=("photo", "clipart"))
    ap.add_argument("--sizes", default="600,1200,2400,4800", help="train scenes per row")
    ap.add_argument("--test", type=int, default=2400, help="test scenes scored (at most)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    bb = load_backbone(a.clip, "cpu")
    rows, px = load_probe_set(a.probes, bb)
    keep = [i for i, r in enumerate(rows) if r["kind"] == "scene" and r["style"] == a.style]
    rows = [rows[i] for i in keep]
    emb = embed_pixels(bb, px[keep]).float()
    del px
    train = np.array([i for i, r in enumerate(rows) if r["split"] == "train"])
    test = np.array([i for i, r in enumerate(rows) if r["split"] == "test"])[: a.test]
    vocab, sets = SP.vocabulary(), ("shape", "object", "relation")
    y = {name: np.zeros((len(rows), len(vocab[name])), dtype=np.float32) for name in sets}
    for i, r in enumerate(rows):
        present = SP.scene_labels(r["objects"], tuple(r["canvas"]))
        for name in sets:
            for lab in present[name]:
                y[name][i, vocab[name].index(lab)] = 1.0
    order = np.random.default_rng(0).permutation(train)
    print(f"{a.style} scenes: {len(train)} train, {len(test)} scored; clip {a.clip}")
    print("train scenes | " + " | ".join(f"{n} recall@k at L2 {list(SP.LP_L2_GRID)}" for n in sets))
    for n in [int(v) for v in a.sizes.split(",") if int(v) <= len(train)]:
        sub, cells = order[:n], []
        for name in sets:
            got = []
            for l2 in SP.LP_L2_GRID:
                w, b = SP.fit_multilabel(emb[sub], torch.from_numpy(y[name][sub]), l2)
                s = (emb[test] @ w + b).numpy()
                got.append(SP.score_multilabel(s, y[name][test], 0)["recall_at_k"])
            cells.append(" ".join(f"{v:.3f}" for v in got) + f" (best {max(got):.3f})")
        print(f"{n} | " + " | ".join(cells), flush=True)
    print(f"in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
