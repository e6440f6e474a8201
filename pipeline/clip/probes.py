"""What a CLIP sees, measured on a held-out probe set: zero-shot and linear-probe top-1.

The probe set (`pipeline.synth.webdata.write_probes`) holds single-object images and
Visual-Genome-style object crops in two drawing styles, each labelled with the object's
category and colour and split `train` / `test`. For each group (style x kind) and each
label (category, colour):

- **zero-shot**: the class whose prompt embedding (mean of the L2-normalised embeddings
  of `TEMPLATES[label]` filled with the class name, renormalised, as CLIP's prompt
  ensembling) is most similar to the image embedding; scored on the `test` half.
- **linear probe**: multinomial logistic regression on the L2-normalised image
  embeddings (L-BFGS, L2 penalty `LP_L2`, fit on the group's `train` half), top-1 on
  its `test` half.

Images are decoded as `embed` decodes them (`pipeline.imagedecode.decode_image`: whole
images resized and center-cropped, boxes letterboxed with the CLIP's mean colour).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.clip.backbone import Backbone, mean_pixel, normalize_pixels
from pipeline.errors import UserError

TEMPLATES = {
    "category": ("a photo of a {}.", "a {}."),
    "colour": ("a photo of a {} shape.", "a {} shape."),
}
LP_L2 = 1e-3  # L2 penalty of the linear probe (on the mean loss), fixed, not tuned
LP_ITERS = 200  # L-BFGS iterations
HOW = (
    "zero-shot: argmax cosine between the image embedding and each class's prompt "
    "embedding (templates averaged, renormalised), on the test half; linear probe: "
    f"multinomial logistic regression (L2 {LP_L2} on the mean loss, L-BFGS {LP_ITERS} "
    "iterations) on L2-normalised image embeddings, fit on the train half, top-1 on the "
    "test half; classes: the probe set's 22 categories / 11 colours; images decoded as "
    "embed decodes them (box crops letterboxed)"
)


def load_probe_set(folder: Path, bb: Backbone) -> tuple[list[dict], torch.Tensor]:
    """The probe rows of `folder/labels.json` and their (n, 3, S, S) uint8 pixels."""
    from pipeline.imagedecode import decode_image, read_bytes

    labels = Path(folder) / "labels.json"
    if not labels.is_file():
        raise UserError(f"--probes {folder}: no labels.json (written by clipda synth)")
    rows = json.loads(labels.read_text())["items"]
    fill, out = mean_pixel(bb.mean), []
    for r in rows:
        data = read_bytes(str(Path(folder) / r["file"]))
        box = tuple(r["box"]) if r["box"] else None
        dec = decode_image(data, bb.image_size, bb.resize_size, boxes=(box,) if box else (),
                           whole=box is None, fill=fill)  # fmt: skip
        if dec.skip or len(dec.pixels) != 1:
            raise UserError(f"--probes {folder}: {r['file']} unusable ({dec.skip or 'bad box'})")
        out.append(dec.pixels[0])
    return rows, torch.from_numpy(np.stack(out))


def embed_pixels(bb: Backbone, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """uint8 (n, 3, S, S) -> (n, d) L2-normalised image embeddings."""
    was = bb.model.training
    bb.model.eval()
    parts = [
        bb.encode_images(normalize_pixels(pixels[i : i + batch], bb.mean, bb.std))
        for i in range(0, len(pixels), batch)
    ]
    bb.model.train(was)
    return torch.cat(parts)


def class_embeddings(bb: Backbone, classes: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """(k, d): per class, the renormalised mean of its prompts' embeddings."""
    was = bb.model.training
    bb.model.eval()
    emb = torch.stack([bb.encode_texts([t.format(c) for c in classes]) for t in templates])
    bb.model.train(was)
    return torch.nn.functional.normalize(emb.mean(0), dim=-1)


def linear_probe(x_tr, y_tr, x_te, y_te, n_classes: int, seed: int = 0) -> float:
    """Top-1 on (x_te, y_te) of a multinomial logistic regression fit on (x_tr, y_tr)."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(x_tr.shape[1], n_classes, generator=gen) * 0.01).requires_grad_()
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=LP_ITERS, line_search_fn="strong_wolfe")
    scale = 10.0  # unit-norm features: a fixed gain keeps the logits in a workable range

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(scale * x_tr @ w + b, y_tr)
        loss = loss + LP_L2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((scale * x_te @ w + b).argmax(1) == y_te).float().mean())


def run_probes(bb: Backbone, rows: list[dict], pixels: torch.Tensor) -> dict:
    """`{group: {label: {"zeroshot": top1, "linear": top1, "n_test": n}}}` for every
    style_kind group (e.g. `photo_crop`), plus the classes and templates used."""
    from pipeline.synth.scene import CATEGORIES, COLOURS

    classes = {"category": list(CATEGORIES), "colour": list(COLOURS)}
    keep = [i for i, r in enumerate(rows) if r["kind"] != "scene"]  # scenes: scene_probes
    rows, pixels = [rows[i] for i in keep], pixels[keep]
    if not rows:
        return {}
    emb = embed_pixels(bb, pixels)
    prompts = {k: class_embeddings(bb, classes[k], TEMPLATES[k]) for k in classes}
    out: dict = {}
    groups = sorted({(r["style"], r["kind"]) for r in rows})
    with torch.enable_grad():
        for style, kind in groups:
            idx = [i for i, r in enumerate(rows) if (r["style"], r["kind"]) == (style, kind)]
            tr = [i for i in idx if rows[i]["split"] == "train"]
            te = [i for i in idx if rows[i]["split"] == "test"]
            if not tr or not te:
                continue  # too few images for a train and a test half
            res = {}
            for label, names in classes.items():
                y = torch.tensor([names.index(r[label]) for r in rows])
                zs = (emb[te] @ prompts[label].T).argmax(1)
                res[label] = {
                    "zeroshot": round(float((zs == y[te]).float().mean()), 4),
                    "linear": round(linear_probe(emb[tr], y[tr], emb[te], y[te], len(names)), 4),
                    "n_train": len(tr),
                    "n_test": len(te),
                    "chance": round(1 / len(names), 4),
                }
            out[f"{style}_{kind}"] = res
    return out


def headline(probes: dict, scenes: dict | None = None) -> dict:
    """The short keys of `metrics/clip.json`: zero-shot category and colour top-1 on photo
    crops and single images, linear-probe category on photo crops; with `scenes`
    (`scene_probes.run_scene_probes`), the scene probes' recall@k on photo-style scenes."""

    def get(group, label, how):
        return probes.get(group, {}).get(label, {}).get(how)

    out = {
        "zs_cat": {"crop": get("photo_crop", "category", "zeroshot"),
                   "single": get("photo_single", "category", "zeroshot")},
        "zs_col": {"crop": get("photo_crop", "colour", "zeroshot")},
        "lp_cat": {"crop": get("photo_crop", "category", "linear")},
    }  # fmt: skip
    if scenes and "photo_scene" in scenes:
        out["scene_rk"] = {k: v["recall_at_k"] for k, v in scenes["photo_scene"].items()}
    return out
