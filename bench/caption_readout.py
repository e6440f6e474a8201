"""What the decoder's own training images let a linear read-out name, beside what it names.

Fits the scene probes of `pipeline.clip.scene_probes` (multi-label logistic regression,
L2 chosen by 2-fold cross-validation on the fit set) on the Flickr30k *train* image
embeddings the caption decoder trains on, labels from synth's `scenes.json`, and scores
recall@k (k = labels present) on the val and test images. Beside it, from an
evaluate_caption detail file, the decoders' grounding precision and recall. Where the
probe's recall@k is well above the decoder's precision, the embedding and the data carry
what the decoder fails to write.

    .venv/bin/python bench/caption_readout.py --emb data/emb/flickr30k \
        --scenes data/sample/flickr30k/scenes.json --detail metrics/caption_detail.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from pipeline.clip import scene_probes as SP
    from pipeline.embedding.files import read_dataset, vectors

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--emb", type=Path, required=True, help="Flickr30k embeddings folder")
    ap.add_argument("--scenes", type=Path, required=True, help="synth's flickr30k/scenes.json")
    ap.add_argument("--detail", type=Path, help="evaluate_caption's caption_detail.json")
    ap.add_argument("--canvas", type=int, nargs=2, default=(192, 144), help="synth.image_size")
    a = ap.parse_args()

    first: dict[str, tuple[np.ndarray, str]] = {}  # image id -> (embedding, split)
    t = read_dataset(a.emb)
    emb = vectors(t.column("image_emb")).astype(np.float32)
    for i, (im, sp) in enumerate(zip(t.column("image_id").to_pylist(),
                                     t.column("split").to_pylist(), strict=True)):  # fmt: skip
        first.setdefault(str(im), (emb[i], sp))
    scenes = {Path(s["filename"]).stem: s for s in json.loads(a.scenes.read_text())["images"]}
    vocab = SP.vocabulary()
    print(f"{len(first)} images; probe fit on the train split, scored on val and test")
    print(f"{'labels':<9} {'n_fit':>5} {'l2':>7} {'val r@k':>8} {'test r@k [95%]':>22}")
    for name in ("shape", "colour", "object", "relation"):
        pos = {lab: j for j, lab in enumerate(vocab[name])}
        xs: dict[str, list] = {"train": [], "val": [], "test": []}
        ys: dict[str, list] = {"train": [], "val": [], "test": []}
        for im, (vec, sp) in first.items():
            if sp not in xs or im not in scenes:
                continue
            y = np.zeros(len(pos), np.float32)
            for lab in SP.scene_labels(scenes[im]["objects"], tuple(a.canvas))[name]:
                y[pos[lab]] = 1.0
            xs[sp].append(vec)
            ys[sp].append(y)
        x, y = torch.from_numpy(np.stack(xs["train"])), np.stack(ys["train"])
        l2, _ = SP.choose_l2(x, y)
        w, b = SP.fit_multilabel(x, torch.from_numpy(y), l2)
        got = {sp: SP.score_multilabel((torch.from_numpy(np.stack(xs[sp])) @ w + b).numpy(),
                                       np.stack(ys[sp])) for sp in ("val", "test")}  # fmt: skip
        ci = got["test"]["recall_at_k_ci"]
        print(f"{name:<9} {len(y):>5} {l2:>7.0e} {got['val']['recall_at_k']:>8.3f} "
              f"{got['test']['recall_at_k']:>8.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")  # fmt: skip
    if a.detail:
        detail = json.loads(a.detail.read_text())
        split = detail.get("settings", {}).get("split", "?")
        print(f"\ndecoders' grounding on {split} ({a.detail}): precision / recall")
        for system in ("noada", "ada", "nn"):
            g = detail.get(system, {}).get("grounding")
            if g:
                cells = [f"{k} {g[k]['p']:.3f} / {g[k]['r']:.3f}"
                         for k in ("shapes", "colours", "objects", "relations")]  # fmt: skip
                print(f"{system:<6} " + ", ".join(cells))


if __name__ == "__main__":
    main()
