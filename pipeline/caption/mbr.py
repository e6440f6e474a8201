"""Minimum-Bayes-risk selection of one caption among candidates (Kumar & Byrne 2004).

    ĉ = argmax_i Σ_{j≠i} u(c_i, c_j)

Sampled captions estimate what the model believes the image says; the candidate that
agrees most with the others is the one with the least expected loss under that belief. Beam
search instead returns the single most probable sequence, which for a sample world whose
references say the same thing in many phrasings (and list the shapes in one fixed one) is
the fixed phrasing: the mode of the sequences, not of what they say.

u is CIDEr-D's similarity without idf (a per-image selection must not depend on which
other images share its batch): for n = 1..4 the cosine of the clipped n-gram count vectors
(min(h_g, r_g) r_g over the product of norms), averaged over n, times CIDEr-D's length
penalty exp(-(len_i - len_j)² / 2σ²), σ = 6. Identical candidates are kept: each counts as
one draw of the model's belief. Ties go to the earliest candidate.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

from pipeline.metrics.cider import ngram_counts

MAX_N = 4
SIGMA = 6.0


def _vectors(tokens: Sequence[Hashable]) -> tuple[list[dict], list[float]]:
    """Per-order n-gram counts of `tokens` and their L2 norms."""
    vec: list[dict] = [{} for _ in range(MAX_N)]
    for gram, tf in ngram_counts(list(tokens), MAX_N).items():
        vec[len(gram) - 1][gram] = tf
    return vec, [math.sqrt(sum(v * v for v in d.values())) for d in vec]


def similarity(a: tuple[list[dict], list[float], int], b: tuple[list[dict], list[float], int]):
    """u(a, b) of two (vectors, norms, length) triples (module docstring)."""
    (va, na, la), (vb, nb, lb) = a, b
    total = 0.0
    for n in range(MAX_N):
        if na[n] and nb[n]:
            dot = sum(min(w, vb[n].get(g, 0)) * vb[n].get(g, 0) for g, w in va[n].items())
            total += dot / (na[n] * nb[n])
    return total / MAX_N * math.exp(-((la - lb) ** 2) / (2 * SIGMA**2))


def consensus_index(candidates: Sequence[Sequence[Hashable]]) -> int:
    """The index of the candidate (a token sequence) with the highest summed similarity to
    the others."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    feats = [(*_vectors(c), len(c)) for c in candidates]
    best, best_score = 0, -1.0
    for i, a in enumerate(feats):
        score = sum(similarity(a, b) for j, b in enumerate(feats) if j != i)
        if score > best_score:
            best, best_score = i, score
    return best
