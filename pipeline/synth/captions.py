"""Caption text in the two domains' styles.

LAION-like alt-text is a bag of keywords ("red circle blue square clipart"); Flickr30k-like
captions are descriptive sentences ("A red circle sits to the left of a small blue square .").
"""

from __future__ import annotations

import random

from pipeline.synth.scene import Obj

ALT_SUFFIXES = [
    "clipart",
    "vector",
    "icon",
    "png",
    "stock illustration",
    "flat design",
    "isolated on white",
    "clip art",
    "vector graphic",
    "cartoon",
]
PHRASES = {
    "on": ["on", "on top of", "resting on"],
    "above": ["above", "over"],
    "below": ["below", "under", "beneath"],
    "left of": ["to the left of", "left of"],
    "right of": ["to the right of", "right of"],
    "next to": ["next to", "beside"],
    "in": ["inside", "in"],
    "near": ["near", "close to"],
}
VERBS = ["is", "sits", "is placed", "can be seen", "appears"]


def alt_text(rng: random.Random, objs: list[Obj], rels: list[tuple[int, str, int]]) -> str:
    """Keyword-style alt text: shuffled "colour category" pairs plus a stock suffix."""
    words = [f"{o.colour} {o.category}" for o in objs]
    rng.shuffle(words)
    if rels and rng.random() < 0.3:
        s, p, o = rels[0]
        words = [f"{objs[s].colour} {objs[s].category} {p} {objs[o].colour} {objs[o].category}"]
        words += [f"{x.colour} {x.category}" for x in objs if x.object_id not in (s, o)]
    if rng.random() < 0.5:
        words.append(f"{objs[0].size} {objs[0].category}")
    return " ".join(words + [rng.choice(ALT_SUFFIXES)])


def _np(rng: random.Random, o: Obj, article: str) -> str:
    size = f"{o.size} " if rng.random() < 0.5 else ""
    art = article if article != "a" or size or o.colour[0] not in "aeiou" else "an"
    return f"{art} {size}{o.colour} {o.category}"


def sentences(
    rng: random.Random, objs: list[Obj], rels: list[tuple[int, str, int]], n: int = 5
) -> list[str]:
    """`n` different descriptive sentences, each about one true relation (or the objects)."""
    out: list[str] = []
    for k in range(n * 4):
        if len(out) == n:
            break
        if not rels or k % 5 == 4:
            names = [_np(rng, o, "a") for o in objs]
            body = (
                f"{names[0]} and {names[1]}"
                if len(names) == 2
                else (", ".join(names[:-1]) + f" and {names[-1]}")
            )
            s = f"There are {len(objs)} shapes : {body} ."
            if len(objs) == 1:
                s = f"There is {names[0]} on a dark background ."
        else:
            si, pred, oi = rels[rng.randrange(len(rels))]
            subj, obj = _np(rng, objs[si], "a"), _np(rng, objs[oi], "a")
            phrase = rng.choice(PHRASES[pred])
            if rng.random() < 0.5:
                s = f"{subj} {rng.choice(VERBS)} {phrase} {obj} ."
            else:
                s = f"there is {subj} {phrase} {_np(rng, objs[oi], 'the')} ."
        s = s[0].upper() + s[1:]
        if s not in out:
            out.append(s)
    while len(out) < n:  # tiny scenes can run out of distinct sentences
        out.append(out[len(out) % max(1, len(out))])
    return out


def vocabulary_text() -> list[str]:
    """Every word the sample world's captions, names and questions use, one line per
    group: a tokenizer trained with these lines covers the whole world's vocabulary."""
    from pipeline.synth.scene import CATEGORIES, COLOURS, PREDICATES, SIZES
    from pipeline.synth.world import OBJ_ALIASES, REL_ALIASES

    lines = [" ".join(CATEGORIES), " ".join(COLOURS), " ".join(SIZES), " ".join(PREDICATES)]
    lines += [" ".join(v) for v in PHRASES.values()] + [" ".join(VERBS), " ".join(ALT_SUFFIXES)]
    lines += [" ".join(v) for v in REL_ALIASES.values()] + [
        " ".join(v) for v in OBJ_ALIASES.values()
    ]
    lines += [
        "There are 2 3 4 5 shapes : a an the and , . There is on a dark background .",
        "a photo of a shape . What is the relationship between this and ?",
    ]
    return lines
