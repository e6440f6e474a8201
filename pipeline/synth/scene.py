"""Scenes of coloured shapes whose spatial relations hold by geometry.

A box is (x, y, w, h) in pixels with y pointing down. `predicate(a, b)` reads the relation
of `a` to `b` off the two boxes alone, so every relationship in the sample world is true of
the rendered image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CATEGORIES = [
    "circle",
    "square",
    "triangle",
    "star",
    "diamond",
    "hexagon",
    "pentagon",
    "octagon",
    "cross",
    "ring",
    "heart",
    "arrow",
    "crescent",
    "ellipse",
    "rectangle",
    "trapezoid",
    "parallelogram",
    "semicircle",
    "kite",
    "chevron",
    "house",
    "frame",
]
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "orange": (245, 130, 20),
    "purple": (140, 50, 180),
    "pink": (245, 120, 180),
    "brown": (130, 80, 40),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "cyan": (20, 200, 210),
}
# Fraction of the canvas height. At the default 192 x 144 canvas a small object is 37-46
# px, a large one 58-69 px: in a whole image (144 px centre square -> 64 px input) a small
# one is 16-20 px, a large one 26-31 px, 1-2 patches of 16 (the stand-in CLIP's), large as
# real photos' subjects are. (Until issue 19 they were 0.16-0.21 and 0.30-0.39: a small
# object was 10-13 px at the input, and 22 shapes were hard to tell apart at that size.)
SIZES = {"small": (0.26, 0.32), "large": (0.40, 0.48)}
PREDICATES = ["on", "above", "below", "left of", "right of", "next to", "in", "near"]
# containers must be hollow-looking or big enough for something to sit inside
CONTAINERS = ["square", "circle", "ring", "frame", "rectangle", "hexagon", "octagon"]


@dataclass
class Obj:
    object_id: int
    category: str
    colour: str
    size: str
    box: tuple[int, int, int, int]


def _h_overlap(a, b) -> int:
    return min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])


def _v_overlap(a, b) -> int:
    return min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])


def _inside(a, b) -> bool:
    return a[0] > b[0] and a[1] > b[1] and a[0] + a[2] < b[0] + b[2] and a[1] + a[3] < b[1] + b[3]


def predicate(a, b, near_frac: float = 0.9, touch: int = 3, next_gap: int = 8) -> str | None:
    """The spatial predicate that holds of box `a` relative to box `b`, or None.

    Precedence: in > on > next to > left of / right of > above / below > near.
    """
    if _inside(a, b) and a[2] * a[3] < 0.5 * b[2] * b[3]:
        return "in"
    if _h_overlap(a, b) > 0.5 * a[2] and abs(a[1] + a[3] - b[1]) <= touch:
        return "on"
    vo, ho = _v_overlap(a, b), _h_overlap(a, b)
    gap_x = max(b[0] - (a[0] + a[2]), a[0] - (b[0] + b[2]))
    gap_y = max(b[1] - (a[1] + a[3]), a[1] - (b[1] + b[3]))
    if vo > 0.5 * min(a[3], b[3]) and 0 <= gap_x <= next_gap:
        return "next to"
    if vo > 0 and gap_x > next_gap:
        return "left of" if a[0] + a[2] <= b[0] else "right of"
    if ho > 0 and gap_y > touch:
        return "above" if a[1] + a[3] <= b[1] else "below"
    if ho <= 0 and vo <= 0:
        ca = (a[0] + a[2] / 2, a[1] + a[3] / 2)
        cb = (b[0] + b[2] / 2, b[1] + b[3] / 2)
        dist = ((ca[0] - cb[0]) ** 2 + (ca[1] - cb[1]) ** 2) ** 0.5
        if dist < near_frac * max(a[2] + b[2], a[3] + b[3]):
            return "near"
    return None


def _place(rng: random.Random, pred: str, anchor, w: int, h: int, width: int, height: int):
    """A box of size (w, h) meant to stand in relation `pred` to `anchor`."""
    ax, ay, aw, ah = anchor
    gap = rng.randint(12, 30)
    if pred == "in":
        jx, jy = max(0, (aw - w) // 6), max(0, (ah - h) // 6)
        return (
            ax + (aw - w) // 2 + rng.randint(-jx, jx),
            ay + (ah - h) // 2 + rng.randint(-jy, jy),
            w,
            h,
        )
    if pred == "on":
        return (ax + rng.randint(0, max(0, aw - w)), ay - h, w, h)
    if pred == "next to":
        side = rng.choice([-1, 1])
        x = ax - w - rng.randint(1, 6) if side < 0 else ax + aw + rng.randint(1, 6)
        return (x, ay + ah - h, w, h)
    if pred in ("left of", "right of"):
        x = ax - w - gap if pred == "left of" else ax + aw + gap
        return (x, ay + rng.randint(-h // 3, max(0, ah - h // 2)), w, h)
    if pred in ("above", "below"):
        y = ay - h - gap if pred == "above" else ay + ah + gap
        return (ax + rng.randint(-w // 3, max(0, aw - w // 2)), y, w, h)
    # near: diagonal neighbour
    dx = rng.choice([-1, 1]) * (aw // 2 + w // 2 + rng.randint(3, 10))
    dy = rng.choice([-1, 1]) * (ah // 2 + h // 2 + rng.randint(3, 10))
    return (ax + aw // 2 + dx - w // 2, ay + ah // 2 + dy - h // 2, w, h)


def _fits(box, width: int, height: int) -> bool:
    return (
        box[0] >= 1 and box[1] >= 1 and box[0] + box[2] < width - 1 and box[1] + box[3] < height - 1
    )


def _clear(box, others, anchor) -> bool:
    """No overlap with any placed box but the anchor (whose relation geometry checks)."""
    for o in others:
        if o is anchor:
            continue
        if _h_overlap(box, o) > -2 and _v_overlap(box, o) > -2:
            return False
    return True


def single_object(
    rng: random.Random, width: int, height: int, category: str, colour: str, fill: tuple
) -> Obj:
    """One object of `category` and `colour` whose height is a `fill` = (lo, hi) share of
    the canvas height, at a random place inside the canvas (a web image of one thing)."""
    side = max(8, int(height * rng.uniform(*fill)))
    w = side if category not in ("rectangle", "ellipse", "parallelogram") else int(side * 1.4)
    w = min(w, width - 4)
    x, y = rng.randint(2, max(2, width - w - 2)), rng.randint(2, max(2, height - side - 2))
    size = "large" if side >= SIZES["large"][0] * height else "small"
    return Obj(0, category, colour, size, (x, y, w, side))


def make_scene(rng: random.Random, width: int, height: int, n_objects: int):
    """Place up to `n_objects` objects, each related to an earlier one; return objects and
    the relationships (subject index, predicate, object index) that hold by geometry."""
    objs: list[Obj] = []
    rels: list[tuple[int, str, int]] = []

    def new_obj(size: str, category: str | None = None) -> Obj:
        lo, hi = SIZES[size]
        side = int(height * rng.uniform(lo, hi))
        cat = category or rng.choice(CATEGORIES)
        w = side if cat not in ("rectangle", "ellipse", "parallelogram") else int(side * 1.4)
        colour = rng.choice(list(COLOURS))
        return Obj(len(objs), cat, colour, size, (0, 0, w, side))

    first_size = rng.choice(["small", "large", "large"])
    first = new_obj(first_size, rng.choice(CONTAINERS) if first_size == "large" else None)
    w, h = first.box[2], first.box[3]
    first.box = (rng.randint(w // 2, width - 3 * w // 2), rng.randint(h, height - h - 2), w, h)
    objs.append(first)
    for _ in range(120):
        if len(objs) >= n_objects:
            break
        anchor = rng.choice(objs)
        pred = rng.choice(PREDICATES)
        if pred == "in" and (anchor.size != "large" or anchor.category not in CONTAINERS):
            pred = "on"
        cand = new_obj("small" if pred == "in" else rng.choice(["small", "large"]))
        box = _place(rng, pred, anchor.box, cand.box[2], cand.box[3], width, height)
        if not _fits(box, width, height) or not _clear(box, [o.box for o in objs], anchor.box):
            continue
        if pred == "in" and any(r[2] == anchor.object_id and r[1] == "in" for r in rels):
            continue
        got = predicate(box, anchor.box)
        if got is None:
            continue
        cand.box = box
        objs.append(cand)
        rels.append((cand.object_id, got, anchor.object_id))
    return objs, rels
