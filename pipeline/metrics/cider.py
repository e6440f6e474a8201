"""CIDEr-D (Vedantam, Zitnick & Parikh, CVPR 2015), as the COCO caption evaluation computes it.

Our own ~60 lines rather than a runtime dependency on pycocoevalcap (which pulls in
pycocotools and ships a Java jar); `tests/test_caption_metrics.py` checks it equals
`pycocoevalcap.cider.Cider` to 1e-6. Like that scorer (which is CIDEr-D although named
"CIDEr"):

- n-grams n = 1..4, each sentence a TF-IDF vector per order with raw term counts and
  idf = log(N) - log(max(1, df)), where N is the number of *evaluated images* and df the
  number of those images whose references contain the n-gram (df comes from the
  references of the evaluated set only, so a score depends on the set);
- CIDEr-D clipping: the hypothesis weight is clipped at the reference weight,
  sum_g min(h_g, r_g) * r_g / (|h| |r|);
- a Gaussian length penalty exp(-(l_h - l_r)^2 / (2 sigma^2)) with sigma = 6 (lengths in
  words; pycocoevalcap counts bigrams, i.e. words - 1, which gives the same difference
  whenever it matters);
- per image: mean over the orders of the similarity averaged over its references, x 10;
  the corpus score is the mean over images.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

CIDER_SETTINGS = {"cider": "CIDEr-D,sigma=6,x10"}  # short, for the detail file
CIDER_DETAIL = {
    "cider": "CIDEr-D as pycocoevalcap's Cider: n=1..4, clipped tf-idf cosine, Gaussian length "
    "penalty sigma=6, x10; idf from the references of the evaluated images only",
}

NGram = tuple[str, ...]


def ngram_counts(tokens: Sequence[str], max_n: int = 4) -> Counter[NGram]:
    """All n-grams of `tokens` for n = 1..max_n with their counts."""
    counts: Counter[NGram] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


def _tfidf(counts: Counter[NGram], df: Counter[NGram], log_n: float, max_n: int):
    """Per-order TF-IDF dicts and their L2 norms."""
    vec: list[dict[NGram, float]] = [{} for _ in range(max_n)]
    for gram, tf in counts.items():
        vec[len(gram) - 1][gram] = tf * (log_n - math.log(max(1.0, df[gram])))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
    return vec, norms


def cider_d(
    references: Sequence[Sequence[Sequence[str]]],
    hypotheses: Sequence[Sequence[str]],
    max_n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, list[float]]:
    """CIDEr-D of tokenised `hypotheses` (one per image) against their `references`.

    Returns (corpus score, per-image scores).
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets for {len(hypotheses)} hypotheses")
    if not hypotheses:
        raise ValueError("CIDEr of an empty corpus is undefined")
    if any(len(rs) == 0 for rs in references):
        raise ValueError("every image needs at least one reference")
    ref_counts = [[ngram_counts(r, max_n) for r in rs] for rs in references]
    df: Counter[NGram] = Counter()
    for rcs in ref_counts:
        df.update({g for rc in rcs for g in rc})
    log_n = math.log(len(hypotheses))

    scores = []
    for hyp, rs, rcs in zip(hypotheses, references, ref_counts):
        h_vec, h_norm = _tfidf(ngram_counts(hyp, max_n), df, log_n, max_n)
        total = [0.0] * max_n
        for ref, rc in zip(rs, rcs):
            r_vec, r_norm = _tfidf(rc, df, log_n, max_n)
            penalty = math.exp(-((len(hyp) - len(ref)) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                dot = sum(
                    min(w, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, w in h_vec[n].items()
                )
                if h_norm[n] != 0 and r_norm[n] != 0:
                    dot /= h_norm[n] * r_norm[n]
                total[n] += dot * penalty
        scores.append(10.0 * sum(total) / max_n / len(rs))
    return sum(scores) / len(scores), scores
