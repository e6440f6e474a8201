"""The form of captions: do they read as sentences, do they loop, how varied and how long
are they, and is a count of shapes they state right?

BLEU and CIDEr-D reward shared n-grams: "there is a beneath the left of the large yellow
circle ." and "a small purple heart and a small purple heart" score well enough. These
read each caption as every caption metric does (`tokenize`'s words):

- `repeats(words)`: some 4-gram occurs twice in the caption (the references of the sample
  world: ~0.1%);
- `stated_count(words)`: the N of "N shapes" ("there are 3 shapes : ..."), or None;
- `alt_text(words)`: the caption ends in one of the sample world's LAION alt-text stock
  suffixes ("... clipart", "... vector graphic"): the source domain's style;
- `form(captions, grammar, n_objects)`: one system's summary: the share that parse under
  `grammar` (`wellformed`; the sample world's, `pipeline.synth.grammar.parses`) and, with
  it, the share in the source's alt-text style (`alt_text`), the share
  that repeat a 4-gram (`repeat4`), distinct captions (`n_distinct`, share `distinct`),
  mean length in words (`mean_len`) and, against the number of objects of each image,
  how many state a count (`count_stated`) and the share of those that are right
  (`count_right`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

from pipeline.metrics.text import tokenize
from pipeline.synth.captions import ALT_SUFFIXES

REPEAT_N = 4  # `repeat4`: a caption repeats some n-gram of this many words

FORM_DETAIL = {
    "form": "on tokenize's words: wellformed = share of captions that parse under the sample "
    "world's caption grammar (pipeline.synth.grammar; only where scenes.json exists); "
    "repeat4 = share of captions in which some 4-gram occurs twice; n_distinct / distinct "
    "= distinct captions (count, share); mean_len = mean words per caption; count_stated "
    "= captions stating 'N shapes', count_right = share of those whose N is the number of "
    "objects in the image's scene (only where scenes.json exists); alt_text = share ending "
    "in one of the sample world's LAION alt-text suffixes (its style; only where scenes.json "
    "exists); source_token (models with a domain token): the same captions decoded with the "
    "source (LAION) token instead of the target's",
}


def repeats(words: Sequence[str], n: int = REPEAT_N) -> bool:
    """True if some n-gram occurs twice in `words`."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)


def stated_count(words: Sequence[str]) -> int | None:
    """The number N of the first "N shapes" (or "N shape") in `words`; None if there is none."""
    for w, nxt in pairwise(words):
        if w.isdigit() and nxt in ("shapes", "shape"):
            return int(w)
    return None


SUFFIXES = [tokenize(s) for s in ALT_SUFFIXES]


def alt_text(words: Sequence[str]) -> bool:
    """`words` end in one of the sample world's alt-text suffixes."""
    return any(len(words) > len(s) and list(words[-len(s) :]) == s for s in SUFFIXES)


def _share(num: int, den: int) -> float:
    return round(num / den, 6) if den else 0.0


def form(
    captions: Sequence[str],
    grammar: Callable[[Sequence[str]], bool] | None = None,
    n_objects: Sequence[int | None] | None = None,
) -> dict[str, Any]:
    """One system's form summary (module doc). `grammar` None: no `wellformed`;
    `n_objects` (objects in each caption's image, None where unknown) None: no counts."""
    words = [tokenize(c) for c in captions]
    n = len(words)
    out: dict[str, Any] = {"n_captions": n}
    if grammar is not None:
        out["wellformed"] = _share(sum(map(grammar, words)), n)
        out["alt_text"] = _share(sum(map(alt_text, words)), n)
    out["repeat4"] = _share(sum(map(repeats, words)), n)
    out["n_distinct"] = len({" ".join(w) for w in words})
    out["distinct"] = _share(out["n_distinct"], n)
    out["mean_len"] = round(sum(map(len, words)) / n, 3) if n else 0.0
    if n_objects is not None:
        stated = [(stated_count(w), k) for w, k in zip(words, n_objects) if k is not None]
        stated = [(c, k) for c, k in stated if c is not None]
        out["count_stated"] = len(stated)
        out["count_right"] = _share(sum(c == k for c, k in stated), len(stated))
    return out
