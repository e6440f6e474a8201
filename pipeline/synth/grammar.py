"""The sample world's caption grammar as a recogniser: does a caption read as one of the
sentences `pipeline.synth.captions.sentences` writes (the Flickr30k-style references)?

It is built from the generator's own word lists (`PHRASES`, `VERBS` beside the generator;
`CATEGORIES`, `COLOURS`, `SIZES` of the scenes), so the two cannot drift, and
tests/test_grammar.py checks that every sentence the generator writes parses. It
reads a caption as every caption metric does (`pipeline.metrics.text.tokenize`: lower
case, punctuation gone, a list of words), so "," ":" "." are not part of it:

    sentence := "there are" N "shapes" np_a ... np_a "and" np_a   (N np_a's, N >= 2)
              | "there is" np_a "on a dark background"
              | np_a VERB PHRASE np_a
              | "there is" np_a PHRASE np_the
    np_a     := "a" [SIZE] COLOUR CATEGORY      ("an" for "a" right before a colour that
                                                 starts with a vowel: "an orange ring")
    np_the   := "the" [SIZE] COLOUR CATEGORY

VERB is one of `VERBS` ("is", "can be seen", ...), PHRASE one of the `PHRASES` of any
predicate ("to the left of", "beside", ...). The count N must be the number of objects
listed: "there are 3 shapes" before two of them does not parse.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from pipeline.synth.captions import PHRASES, VERBS
from pipeline.synth.scene import CATEGORIES, COLOURS, SIZES


def _any(words: Iterable[str]) -> str:
    """A regex group matching any of `words` (longest first, so "on top of" beats "on")."""
    return "(?:" + "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True)) + ")"


_SIZE, _COLOUR, _CATEGORY = _any(SIZES), _any(COLOURS), _any(CATEGORIES)
_VOWEL_COLOUR = _any(c for c in COLOURS if c[0] in "aeiou")
_CONSONANT_COLOUR = _any(c for c in COLOURS if c[0] not in "aeiou")
_VERB = _any(VERBS)
_PHRASE = _any(p for words in PHRASES.values() for p in words)
NP_A = rf"(?:a {_SIZE} {_COLOUR}|a {_CONSONANT_COLOUR}|an {_VOWEL_COLOUR}) {_CATEGORY}"
NP_THE = rf"the (?:{_SIZE} )?{_COLOUR} {_CATEGORY}"
_LIST = re.compile(rf"there are (\d+) shapes ((?:{NP_A} )+)and {NP_A}")
_ONE = re.compile(
    rf"there is {NP_A} on a dark background"
    rf"|{NP_A} {_VERB} {_PHRASE} {NP_A}"
    rf"|there is {NP_A} {_PHRASE} {NP_THE}"
)
_NP_A = re.compile(rf"\b{NP_A}\b")


def parses(words: Sequence[str]) -> bool:
    """True if the caption's words (as `tokenize` gives them) are a sentence of the grammar."""
    text = " ".join(words)
    if _ONE.fullmatch(text):
        return True
    listed = _LIST.fullmatch(text)
    return bool(listed) and int(listed[1]) == len(_NP_A.findall(listed[2])) + 1
