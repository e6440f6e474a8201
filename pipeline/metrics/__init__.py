"""Caption metrics: COCO-style tokenisation, corpus BLEU-1..4 (nltk), CIDEr-D and
grounding in the sample world's scenes.

`tokenize` turns a caption into the word list every metric sees; `corpus_bleu_1to4`
and `cider_d` score one hypothesis per image against all of its references. Both are
checked against pycocoevalcap's scorers in `tests/test_caption_metrics.py`.
`grounding` scores the colours, shapes and relations a caption names against the truth
of its image (`pipeline.metrics.grounding`; `tests/test_grounding.py`).
"""

from pipeline.metrics.bleu import BLEU_DETAIL, BLEU_SETTINGS, corpus_bleu_1to4
from pipeline.metrics.cider import CIDER_DETAIL, CIDER_SETTINGS, cider_d
from pipeline.metrics.grounding import GROUNDING_DETAIL, grounding, load_scenes, vocabulary
from pipeline.metrics.text import TOKENIZATION, TOKENIZATION_DETAIL, tokenize

__all__ = [
    "BLEU_DETAIL",
    "BLEU_SETTINGS",
    "CIDER_DETAIL",
    "CIDER_SETTINGS",
    "GROUNDING_DETAIL",
    "TOKENIZATION",
    "TOKENIZATION_DETAIL",
    "cider_d",
    "corpus_bleu_1to4",
    "grounding",
    "load_scenes",
    "tokenize",
    "vocabulary",
]
