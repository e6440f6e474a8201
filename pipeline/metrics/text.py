"""COCO-style caption tokenisation without Java.

pycocoevalcap runs Stanford's PTBTokenizer (`-lowerCase`) and then drops punctuation
tokens. For plain captions the effect is: lower-case, punctuation gone, whitespace split.
We do that directly, with one deliberate choice: every character that is not a letter or
a digit becomes a *space* (not deleted). The CLIP BPE tokenizer decodes "dog's" as
"dog 's" and "t-shirt" as "t - shirt"; replacing punctuation by a space makes a
reference and a decoded prediction of the same words tokenise identically
("dog s", "t shirt"). (PTB would keep "t-shirt" whole and give "dog 's".)
"""

from __future__ import annotations

import re

TOKENIZATION = "lower,punct->space,split"  # short, for metrics/caption_detail.json
TOKENIZATION_DETAIL = "lower-case; every char that is not a letter/digit -> space; whitespace split"

_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lower-case `text`, turn punctuation (anything but letters/digits) into spaces, split."""
    return _NOT_WORD.sub(" ", text.lower()).split()
