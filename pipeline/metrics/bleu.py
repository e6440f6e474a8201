"""Corpus BLEU-1..4 with nltk, set up to match the COCO caption evaluation.

Choices (recorded in `BLEU_SETTINGS` and in metrics/caption_detail.json):

- corpus level (Papineni et al. 2002): clipped n-gram counts and lengths are summed over
  all images before dividing, as pycocoevalcap's `Bleu` does;
- brevity penalty against the *closest* reference length per image (ties: the shorter
  one), the same rule as pycocoevalcap's `option='closest'` and nltk's `closest_ref_length`;
- no smoothing: an n-gram order with zero matches in the whole corpus gives exactly 0 for
  that BLEU-n (and the higher ones). pycocoevalcap instead adds 1e-15 / 1e-9 to the
  numerator / denominator, so there it is tiny but positive (about 1e-5 for BLEU-4);
- nltk counts the order-n denominator of a hypothesis as max(1, #n-grams), so a
  hypothesis with fewer than n words adds 1 to it (pycocoevalcap adds 0). The stage
  records how many predictions have fewer than 4 words (`n_pred_under4`).

When every order has matches and no hypothesis is shorter than 4 words, the result equals
pycocoevalcap's `Bleu(4)` up to its epsilons (~1e-10; tested to 1e-6).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from nltk.translate.bleu_score import corpus_bleu

BLEU_WEIGHTS = [(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]
BLEU_SETTINGS = {"smoothing": "none", "bleu_ref_length": "closest"}  # for the detail file
BLEU_DETAIL = {
    "bleu": "nltk corpus_bleu, corpus-level (summed clipped counts), BLEU-n = uniform weights",
    "smoothing": "none: an n-gram order with zero matches in the corpus gives BLEU-n = 0",
    "bleu_ref_length": "closest reference length per image (ties: shorter), as COCO",
    "bleu_short_hyp": "nltk counts an order-n denominator of max(1, #n-grams); COCO 0",
}


def corpus_bleu_1to4(
    references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Corpus BLEU-1..4 of tokenised `hypotheses` (one per image) against their `references`.

    `references[i]` is the list of tokenised references of image i. Returns
    {"bleu1": .., "bleu2": .., "bleu3": .., "bleu4": ..}.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets for {len(hypotheses)} hypotheses")
    if not hypotheses:
        raise ValueError("BLEU of an empty corpus is undefined")
    refs = [[list(r) for r in rs] for rs in references]
    hyps = [list(h) for h in hypotheses]
    with warnings.catch_warnings():
        # nltk warns once per order with zero matches; we report 0 for it instead (below)
        warnings.simplefilter("ignore", UserWarning)
        scores = corpus_bleu(refs, hyps, weights=BLEU_WEIGHTS)
    # nltk's method0 replaces a zero precision by float_info.min (result ~1e-77): make it 0
    matched = _orders_with_matches(refs, hyps)
    return {
        f"bleu{n}": float(s) if all(matched[:n]) else 0.0 for n, s in enumerate(scores, start=1)
    }


def _orders_with_matches(refs: list[list[list[str]]], hyps: list[list[str]]) -> list[bool]:
    """For n = 1..4: does any hypothesis share an n-gram with one of its references?"""
    found = [False] * 4
    for rs, h in zip(refs, hyps):
        for n in range(1, 5):
            if found[n - 1]:
                continue
            grams = {tuple(h[i : i + n]) for i in range(len(h) - n + 1)}
            if grams and any(
                tuple(r[i : i + n]) in grams for r in rs for i in range(len(r) - n + 1)
            ):
                found[n - 1] = True
        if all(found):
            break
    return found
