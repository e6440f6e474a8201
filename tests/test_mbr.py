"""Minimum-Bayes-risk selection among candidate captions."""

import math

import pytest

from pipeline.caption.mbr import _vectors, consensus_index, similarity


def _feat(tokens):
    return (*_vectors(tokens), len(tokens))


def test_the_caption_most_like_the_others_is_chosen():
    a, b, c = "a red ring left of a blue star", "a red ring near a blue star", "two shapes"
    cands = [c.split(), b.split(), a.split(), b.split()]
    assert consensus_index(cands) == 1  # b agrees with itself and mostly with a
    assert consensus_index([c.split(), a.split()]) == 0  # a tie: the earliest
    assert consensus_index([["x"]]) == 0
    with pytest.raises(ValueError):
        consensus_index([])


def test_similarity_is_cider_d_without_idf():
    same = _feat(["a", "b", "c", "d", "e"])
    assert similarity(same, same) == pytest.approx(1.0)
    # no shared n-gram: 0; an empty caption shares nothing
    assert similarity(_feat(["a", "b"]), _feat(["c", "d"])) == 0.0
    assert similarity(_feat([]), same) == 0.0
    # "a b" against "a b c": unigrams 2/sqrt(2*3), bigrams 1/sqrt(1*2), no 3-/4-grams,
    # length penalty exp(-1/72)
    want = (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert similarity(_feat(["a", "b"]), _feat(["a", "b", "c"])) == pytest.approx(want)
