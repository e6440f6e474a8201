"""Grounding of captions in the sample world: do they name the colours, shapes and
relations that are in the image?

BLEU and CIDEr-D reward n-grams shared with the references; a caption in the right
template with the wrong colours and shapes still scores well. The sample world knows
the truth of every image: `clipda synth` writes `flickr30k/scenes.json`, per image file
its objects (id, category, colour, size, box) and the relations that hold between them
(subject id, predicate, object id). Only evaluation reads it.

Reading a caption (its words as every caption metric sees them, `tokenize`):

- a *colour* is a colour word of the world (`COLOURS`; "grey" reads as gray);
- a *shape* is a category word (`CATEGORIES`, plus the world's aliases "box" = square,
  "round" = circle; a plural "circles" reads as circle);
- a *mention* is a shape with its modifiers: the run of colour and size words right
  before it ("a small red circle"); its colour is the last colour word of that run, or
  none ("a circle");
- a *relation* is mention, predicate phrase, mention: the phrase (`PHRASES`, longest
  match first: "to the left of", "on top of", "beside", ...) follows the first mention
  with no colour, shape or phrase word in between ("is", "sits", "can be seen" are
  skipped), and the second mention follows the phrase with only "a"/"an"/"the" in
  between. "A red circle on a dark background" names no relation.

Scoring a caption against its image's scene (sets: a thing named twice counts once):

- colours: precision = named colours that some object has / colours named; recall =
  scene colours named / distinct colours in the scene;
- shapes: the same with categories;
- objects (breakdown only): (colour, shape) pairs of mentions with a colour against the
  scene's (colour, category) pairs; binds colour to shape;
- relations: a named relation (S, p, O) is true when two different objects a, b exist
  with S matching a and O matching b (same category; same colour if S / O names one) and
  p holding of (a, b): p is the relation listed for (a, b) in the scene, or the one the
  world's geometry (`pipeline.synth.scene.predicate`) reads off their two boxes in that
  order (so "B right of A" is true when the scene lists "A left of B"). Precision = true
  relations / relations named. Recall = listed relations (a, q, b) named, in either
  order (S~a, O~b, p = q; or S~b, O~a, p = the geometry of (b, a)) / relations listed.

Corpus scores are micro averages: sums of the counts over all captions, then the
ratios (precision of a kind nothing was named of: 0). The headline numbers are the
means over colours, shapes and relations of those precisions (`ground_p`) and recalls
(`ground_r`). A one-sentence caption names at most one relation of the one to three a
scene lists, so recall is capped well below 1: the references' own scores are the scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.metrics.text import tokenize
from pipeline.readers import read_json
from pipeline.synth.scene import CATEGORIES, COLOURS, SIZES, predicate

# The words captions use for each predicate (pipeline.synth.captions.PHRASES) and the
# Visual Genome aliases of the world (pipeline.synth.world.REL_ALIASES); tests check
# that both stay covered.
PHRASES = {
    "on": ["on", "on top of", "resting on", "atop"],
    "above": ["above", "over"],
    "below": ["below", "under", "beneath"],
    "left of": ["to the left of", "left of"],
    "right of": ["to the right of", "right of"],
    "next to": ["next to", "beside", "by"],
    "in": ["inside", "in", "within"],
    "near": ["near", "close to"],
}
SHAPE_ALIASES = {"box": "square", "round": "circle"}  # pipeline.synth.world.OBJ_ALIASES
COLOUR_ALIASES = {"grey": "gray"}
ARTICLES = {"a", "an", "the"}
KINDS = ("colours", "shapes", "relations")  # the headline's kinds
ALL_KINDS = ("colours", "shapes", "objects", "relations")

GROUNDING_DETAIL = {
    "grounding": "colours, shapes, (colour, shape) objects and relations named in a caption "
    "against the image's scene (scenes.json); a relation (S, p, O) is true if two objects "
    "match S and O (category, and colour where named) and p is listed for them or is what "
    "the world's geometry reads off their boxes; recall counts listed relations named in "
    "either order; sets per caption, micro-averaged over captions; ground_p / ground_r = "
    "mean over colours, shapes, relations (precision with nothing named: 0)",
    "grounding_references": "every reference of every scored image, scored the same way "
    "(an upper bound: precision should be ~1)",
    "grounding_shuffled": "each image scored with the references of the next image in file "
    "order (what an image-blind caption in the right style gets: chance)",
}


@dataclass(frozen=True)
class Mention:
    """A shape named in a caption with the colour named right before it (or None)."""

    category: str
    colour: str | None = None

    def matches(self, obj: dict[str, Any]) -> bool:
        return obj["category"] == self.category and self.colour in (None, obj["colour"])


@dataclass
class Parsed:
    """What a caption names."""

    colours: set[str] = field(default_factory=set)
    shapes: set[str] = field(default_factory=set)
    objects: set[tuple[str, str]] = field(default_factory=set)  # (colour, category)
    relations: set[tuple[Mention, str, Mention]] = field(default_factory=set)


@dataclass
class Scene:
    """One image's truth: objects by id and the listed relations (subject, predicate, object)."""

    objects: dict[int, dict[str, Any]]
    relations: list[tuple[int, str, int]]

    def holds(self, a: int, p: str, b: int) -> bool:
        """Relation p holds of objects a, b (listed, or by the geometry of their boxes)."""
        if (a, p, b) in self.relations:
            return True
        return predicate(tuple(self.objects[a]["box"]), tuple(self.objects[b]["box"])) == p


class Vocabulary:
    """Word -> meaning tables, from the world's lists plus the categories and colours the
    scenes themselves use."""

    def __init__(self, categories: Sequence[str] = (), colours: Sequence[str] = ()):
        self.colours = {c: c for c in [*COLOURS, *colours]} | COLOUR_ALIASES
        self.shapes = {c: c for c in [*CATEGORIES, *categories]} | SHAPE_ALIASES
        self.sizes = set(SIZES)
        phrases = [(tuple(w.split()), p) for p, words in PHRASES.items() for w in words]
        self.phrases = sorted(phrases, key=lambda x: -len(x[0]))  # longest match first

    def shape(self, word: str) -> str | None:
        for cand in (word, word[:-1] if word.endswith("s") else "",
                     word[:-2] if word.endswith("es") else ""):  # fmt: skip
            if cand in self.shapes:
                return self.shapes[cand]
        return None


def parse(caption: str, vocab: Vocabulary) -> Parsed:
    """The colours, shapes, (colour, shape) objects and relations `caption` names."""
    words = tokenize(caption)
    items: list[tuple[str, Any]] = []  # (kind, value): colour, size, shape, pred, article, other
    i = 0
    while i < len(words):
        for phrase, pred in vocab.phrases:
            if tuple(words[i : i + len(phrase)]) == phrase:
                items.append(("pred", pred))
                i += len(phrase)
                break
        else:
            w = words[i]
            if w in vocab.colours:
                items.append(("colour", vocab.colours[w]))
            elif w in vocab.sizes:
                items.append(("size", w))
            elif (shape := vocab.shape(w)) is not None:
                items.append(("shape", shape))
            else:
                items.append(("article" if w in ARTICLES else "other", w))
            i += 1

    out = Parsed()
    mentions: dict[int, Mention] = {}  # index of the shape item -> mention
    starts: dict[int, int] = {}  # index of the mention's first modifier -> its shape item
    for k, (kind, value) in enumerate(items):
        if kind == "colour":
            out.colours.add(value)
        elif kind == "shape":
            out.shapes.add(value)
            j, colour = k, None
            while j > 0 and items[j - 1][0] in ("colour", "size"):
                j -= 1
                if colour is None and items[j][0] == "colour":
                    colour = items[j][1]
            mentions[k] = Mention(value, colour)
            starts[j] = k
            if colour is not None:
                out.objects.add((colour, value))
    for k, (kind, pred) in enumerate(items):
        if kind != "pred":
            continue
        j = k - 1  # the subject: the last mention before, with only other words between
        while j >= 0 and items[j][0] in ("other", "article"):
            j -= 1
        j2 = k + 1  # the object: right after, past articles
        while j2 < len(items) and items[j2][0] == "article":
            j2 += 1
        if j in mentions and j2 in starts:
            out.relations.add((mentions[j], pred, mentions[starts[j2]]))
    return out


def count(parsed: Parsed, scene: Scene) -> dict[str, int]:
    """The counts behind precision and recall of one caption against one scene."""
    objs = list(scene.objects.values())
    colours = {o["colour"] for o in objs}
    shapes = {o["category"] for o in objs}
    pairs = {(o["colour"], o["category"]) for o in objs}
    ids = list(scene.objects)

    def true(rel: tuple[Mention, str, Mention]) -> bool:
        s, p, o = rel
        return any(
            a != b and s.matches(scene.objects[a]) and o.matches(scene.objects[b])
            and scene.holds(a, p, b)
            for a in ids for b in ids
        )  # fmt: skip

    def recalled(a: int, q: str, b: int) -> bool:
        oa, ob = scene.objects[a], scene.objects[b]
        return any(
            (p == q and s.matches(oa) and o.matches(ob))
            or (s.matches(ob) and o.matches(oa) and scene.holds(b, p, a))
            for s, p, o in parsed.relations
        )

    return {
        "colours_named": len(parsed.colours),
        "colours_true": len(parsed.colours & colours),
        "colours_scene": len(colours),
        "colours_recalled": len(parsed.colours & colours),
        "shapes_named": len(parsed.shapes),
        "shapes_true": len(parsed.shapes & shapes),
        "shapes_scene": len(shapes),
        "shapes_recalled": len(parsed.shapes & shapes),
        "objects_named": len(parsed.objects),
        "objects_true": len(parsed.objects & pairs),
        "objects_scene": len(pairs),
        "objects_recalled": len(parsed.objects & pairs),
        "relations_named": len(parsed.relations),
        "relations_true": sum(true(r) for r in parsed.relations),
        "relations_scene": len(scene.relations),
        "relations_recalled": sum(recalled(*r) for r in scene.relations),
    }


def counts(
    captions: Sequence[str], scenes: Sequence[Scene], vocab: Vocabulary
) -> list[dict[str, int]]:
    """`count` of each caption against its scene (the per-image rows `grounding` sums)."""
    return [count(parse(caption, vocab), scene) for caption, scene in zip(captions, scenes)]


def headline_parts(keys: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
    """Column pairs (numerator, denominator) of `keys` (count names) behind `ground_p`
    and `ground_r`: their value is the mean of the pairs' summed ratios."""
    col = {k: i for i, k in enumerate(keys)}
    return {
        "ground_p": [(col[f"{k}_true"], col[f"{k}_named"]) for k in KINDS],
        "ground_r": [(col[f"{k}_recalled"], col[f"{k}_scene"]) for k in KINDS],
    }


def kind_parts(keys: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
    """Column pairs of `keys` behind each kind's own precision and recall (`colours_p`,
    `colours_r`, ..., `relations_r`: the breakdown's `p` and `r`)."""
    col = {k: i for i, k in enumerate(keys)}
    out = {}
    for kind in ALL_KINDS:
        out[f"{kind}_p"] = [(col[f"{kind}_true"], col[f"{kind}_named"])]
        out[f"{kind}_r"] = [(col[f"{kind}_recalled"], col[f"{kind}_scene"])]
    return out


def _ratio(num: int, den: int) -> float:
    return round(num / den, 6) if den else 0.0


def grounding(
    captions: Sequence[str], scenes: Sequence[Scene], vocab: Vocabulary
) -> dict[str, Any]:
    """Corpus grounding of `captions[i]` against `scenes[i]`: the headline `ground_p` /
    `ground_r` and, per kind, precision, recall and the summed counts."""
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes")
    totals: dict[str, int] = {}
    for row in counts(captions, scenes, vocab):
        for key, n in row.items():
            totals[key] = totals.get(key, 0) + n
    kinds = {}
    for kind in ALL_KINDS:
        t = {k.split("_", 1)[1]: totals.get(k, 0) for k in totals if k.startswith(kind + "_")}
        kinds[kind] = {"p": _ratio(t.get("true", 0), t.get("named", 0)),
                       "r": _ratio(t.get("recalled", 0), t.get("scene", 0)), **t}  # fmt: skip
    return {
        "ground_p": round(sum(kinds[k]["p"] for k in KINDS) / len(KINDS), 6),
        "ground_r": round(sum(kinds[k]["r"] for k in KINDS) / len(KINDS), 6),
        "n_captions": len(captions),
        **kinds,
    }


def load_scenes(path: str | Path) -> dict[str, Scene]:
    """scenes.json (`{"images": [{filename, objects, relations}]}`) by image id (file stem).

    A wrongly shaped file is a `UserError` naming it."""
    path = Path(path)
    data = read_json(path)
    images = data.get("images")
    if not isinstance(images, list):
        raise UserError(f"{path}: expected {{'images': [...]}}")
    out: dict[str, Scene] = {}
    for k, entry in enumerate(images):
        try:
            objects = {
                int(o["id"]): {
                    "category": str(o["category"]),
                    "colour": str(o["colour"]),
                    "box": tuple(int(v) for v in o["box"]),
                }
                for o in entry["objects"]
            }
            rels = [(int(r["subject"]), str(r["predicate"]), int(r["object"]))
                    for r in entry["relations"]]  # fmt: skip
            if any(len(o["box"]) != 4 for o in objects.values()):
                raise ValueError("a box is not (x, y, w, h)")
            if any(a not in objects or b not in objects for a, _, b in rels):
                raise ValueError("a relation names an object id the image lacks")
            out[Path(str(entry["filename"])).stem] = Scene(objects, rels)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: images[{k}] is malformed ({exc!r})") from None
    return out


def vocabulary(scenes: dict[str, Scene]) -> Vocabulary:
    """The world's words plus every category and colour the scenes use."""
    objs = [o for s in scenes.values() for o in s.objects.values()]
    return Vocabulary(sorted({o["category"] for o in objs}), sorted({o["colour"] for o in objs}))
