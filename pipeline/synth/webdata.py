"""The stand-in CLIP's own data: a web-like training set and a held-out probe set.

A real CLIP learns from web pairs that are not the datasets it is later used on; the
stand-in does the same. `training_pairs` draws images of three kinds in both drawing
styles (`clipart`, `photo`), each with several captions (keyword alt-text and descriptive
sentences):

- `single`: one object 50-95% as tall as a square canvas (a web image of one thing);
- `crop`: one object's box cut from a multi-object scene, as Visual Genome's object
  crops are (letterboxed, then resized);
- `scene`: a whole multi-object scene with the sample world's captions.

`write_probes` writes the probe set (`labels.json` + JPEGs): single-object images and
VG-style object crops, in both styles, with their category and colour, half `train` (for
the linear probes) and half `test`. Readers decode them exactly as `embed` does (whole
images resized and center-cropped, box crops letterboxed; `pipeline.clip.standin.decode`).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.synth.captions import ALT_SUFFIXES, alt_text, sentences
from pipeline.synth.render import render
from pipeline.synth.scene import CATEGORIES, COLOURS, Obj, make_scene, single_object

KINDS = ("single", "crop", "scene")
STYLES = ("clipart", "photo")
PROBE_KINDS = ("single", "crop")
SINGLE_CANVAS = 144  # side of a single-object image, pixels
SINGLE_FILL = (0.5, 0.95)  # its object's height, as a share of the canvas
LABELS = "labels.json"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_captions(rng: random.Random, o: Obj) -> list[str]:
    """Two keyword alt-texts and two sentences about one object, varied as web captions are;
    some name only its category or only its colour (as the zero-shot prompts do)."""
    c, k, z = o.colour, o.category, o.size
    alts = [
        f"{c} {k} {rng.choice(ALT_SUFFIXES)}",
        f"{z} {c} {k} {rng.choice(ALT_SUFFIXES)}",
        f"{c} {k}",
        f"{k} {rng.choice(ALT_SUFFIXES)}",
    ]
    sents = [
        f"a photo of a {c} {k} .",
        f"{_article(c)} {c} {k} .",
        f"there is a {z} {c} {k} .",
        f"the {k} is {c} .",
        f"a photo of a {k} .",
        f"a photo of a {c} shape .",
        f"{_article(c)} {c} shape .",
    ]
    weights = [4, 3, 3, 2, 1, 1, 1]
    return (
        rng.sample(alts[:3], 1) + rng.choices(alts, [3, 2, 2, 1]) + rng.choices(sents, weights, k=2)
    )


@dataclass
class Drawn:
    """One drawn image: JPEG bytes, the box to crop (None: the whole image), its labels."""

    jpeg: bytes
    box: tuple[int, int, int, int] | None
    captions: list[str]
    category: str
    colour: str
    style: str
    kind: str
    objects: list[dict] | None = None  # scenes: every object's category, colour, size, box
    relations: list[tuple[int, str, int]] | None = None  # scenes: (subject, predicate, object)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def draw(
    rng: random.Random, nrng: np.random.Generator, kind: str, style: str,
    canvas: tuple[int, int], objects: tuple[int, int], category: str | None = None,
    margin: float = 0.0,
) -> Drawn:  # fmt: skip
    """One image of `kind` in `style`. `category` forces the labelled object's category
    (single, crop); `margin` widens a crop box by up to this share of its size per side."""
    width, height = canvas
    if kind == "single":
        cat = category or rng.choice(CATEGORIES)
        o = single_object(rng, SINGLE_CANVAS, SINGLE_CANVAS, cat, rng.choice(list(COLOURS)),
                          SINGLE_FILL)  # fmt: skip
        img = render([o], SINGLE_CANVAS, SINGLE_CANVAS, style, nrng)
        return Drawn(_jpeg(img), None, object_captions(rng, o), o.category, o.colour, style, kind)
    for _ in range(200):
        objs, rels = make_scene(rng, width, height, rng.randint(*objects))
        if kind == "scene" or category is None or any(o.category == category for o in objs):
            break
    img = render(objs, width, height, style, nrng)
    if kind == "scene":
        caps = [
            alt_text(rng, objs, rels),
            alt_text(rng, objs, rels),
            *sentences(rng, objs, rels, 2),
        ]
        every = [{"category": o.category, "colour": o.colour, "size": o.size, "box": list(o.box)}
                 for o in objs]  # fmt: skip
        return Drawn(_jpeg(img), None, caps, objs[0].category, objs[0].colour, style, kind, every,
                     rels)  # fmt: skip
    pick = [o for o in objs if category is None or o.category == category] or objs
    o = rng.choice(pick)
    x, y, w, h = o.box
    mx, my = int(w * rng.uniform(0, margin)), int(h * rng.uniform(0, margin))
    box = (max(0, x - mx), max(0, y - my), w + 2 * mx, h + 2 * my)
    return Drawn(_jpeg(img), box, object_captions(rng, o), o.category, o.colour, style, kind)


def shape_twin(
    rng: random.Random, nrng: np.random.Generator, d: Drawn, canvas: tuple[int, int]
) -> Drawn:  # fmt: skip
    """The scene `d` again with every object's category redrawn (another one), same boxes,
    colours and sizes, so same layout and relations: a hard negative that only its shapes
    tell apart (as in Yuksekgonul et al. 2023, "When and why vision-language models behave
    like bags-of-words", whose negatives swap what a caption binds)."""
    from pipeline.synth.scene import CATEGORIES, Obj

    objs = [Obj(i, rng.choice([c for c in CATEGORIES if c != o["category"]]), o["colour"],
                o["size"], tuple(o["box"])) for i, o in enumerate(d.objects or [])]  # fmt: skip
    rels = d.relations or []
    img = render(objs, *canvas, d.style, nrng)
    caps = [alt_text(rng, objs, rels), alt_text(rng, objs, rels), *sentences(rng, objs, rels, 2)]
    every = [{"category": o.category, "colour": o.colour, "size": o.size, "box": list(o.box)}
             for o in objs]  # fmt: skip
    return Drawn(_jpeg(img), None, caps, objs[0].category, objs[0].colour, d.style, "twin",
                 every, rels)  # fmt: skip


def probe_items(
    n_per_group: int, seed: int, canvas: tuple[int, int], objects: tuple[int, int],
    tag: str = "probes", n_scenes: int = 0,
):  # fmt: skip
    """The probe set: for each style and kind (single, crop), `n_per_group` images with
    categories in turn (balanced) and colours at random; every other round of the 22
    categories is `train`, the rest `test`. Then, per style, `n_scenes` whole scenes laid
    out as the sample world's (`make_scene`), alternately `train` and `test`. `tag` seeds
    it (another tag: another set)."""
    rng = random.Random(f"{seed}-{tag}")
    nrng = np.random.default_rng([seed, 8, sum(map(ord, tag))])
    for style in STYLES:
        for kind in PROBE_KINDS:
            for i in range(n_per_group):
                cat = CATEGORIES[i % len(CATEGORIES)]
                split = "train" if (i // len(CATEGORIES)) % 2 == 0 else "test"
                yield draw(rng, nrng, kind, style, canvas, objects, category=cat), split
    for style in STYLES:
        for i in range(n_scenes):
            split = "train" if i % 2 == 0 else "test"
            yield draw(rng, nrng, "scene", style, canvas, objects), split


def write_probes(
    out: Path, n_per_group: int, seed: int, canvas: tuple[int, int], objects: tuple[int, int],
    n_scenes: int = 0,
) -> dict:  # fmt: skip
    """Write `out/images/*.jpg` and `out/labels.json`; return counts. A scene row's
    `objects` lists every object (category, colour, box); its `category` and `colour` are
    its first object's."""
    from pipeline.atomic import atomic_path, write_text

    rows = []
    items = probe_items(n_per_group, seed, canvas, objects, n_scenes=n_scenes)
    for i, (d, split) in enumerate(items):
        name = f"images/{i:05d}.jpg"
        (out / "images").mkdir(parents=True, exist_ok=True)
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(d.jpeg)
        rows.append({
            "file": name, "box": list(d.box) if d.box else None, "category": d.category,
            "colour": d.colour, "style": d.style, "kind": d.kind, "split": split,
            **({"objects": d.objects, "canvas": list(canvas)} if d.objects else {}),
        })  # fmt: skip
    write_text(out / LABELS, json.dumps({"items": rows}))
    return {"images": len(rows), "per_group": n_per_group, "scenes_per_style": n_scenes}
