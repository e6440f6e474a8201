"""pipeline.metrics.bootstrap: each metric on a weighted resample equals the exact scorer
run on that resample written out (repeated items repeated)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pipeline.metrics import cider_d, corpus_bleu_1to4
from pipeline.metrics.bootstrap import (
    CiderBootstrap,
    bleu_metric,
    bleu_stats,
    interval,
    mean_metric,
    ratio_metric,
    resample_weights,
    summarise,
)

WORDS = [
    "a",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "sits",
    "on",
    "the",
    "left",
    "of",
    "near",
    "small",
    "large",
]


def corpus(n: int, seed: int):
    rng = random.Random(seed)

    def sentence():
        return [rng.choice(WORDS) for _ in range(rng.randint(2, 12))]

    refs = [[sentence() for _ in range(rng.randint(1, 4))] for _ in range(n)]
    hyps = [sentence() if i % 3 else refs[i][0][:] for i in range(n)]  # some exact matches
    return refs, hyps


def explicit(weights: np.ndarray) -> list[int]:
    """The item indices of a resample given as counts."""
    return [i for i, c in enumerate(weights.astype(int).tolist()) for _ in range(c)]


def test_resample_weights_are_seeded_draws_of_n():
    w = resample_weights(30, 200, seed=5)
    assert w.shape == (200, 30) and (w.sum(axis=1) == 30).all()
    assert (w == resample_weights(30, 200, seed=5)).all()
    assert not (w == resample_weights(30, 200, seed=6)).all()
    assert 0.5 < w.mean(axis=0).min() and w.mean(axis=0).max() < 1.5  # every item ~once


def test_resamples_drawn_in_blocks_are_the_same_resamples(monkeypatch):
    """Memory stays flat (a block of resamples at a time) and nothing else changes."""
    from pipeline.metrics import bootstrap

    correct = np.random.default_rng(0).random(40) < 0.6
    metrics = {"a": mean_metric(correct), "b": mean_metric(~correct)}
    whole = resample_weights(40, 50, seed=3), summarise(metrics, 40, 50, 0.95, 3, [("a", "b")])
    monkeypatch.setattr(bootstrap, "BLOCK", 40 * 7)  # blocks of 7 resamples, the last of 1
    assert [len(w) for w in bootstrap.weight_blocks(40, 50, seed=3)] == [7] * 7 + [1]
    blocks = resample_weights(40, 50, seed=3), summarise(metrics, 40, 50, 0.95, 3, [("a", "b")])
    assert (whole[0] == blocks[0]).all() and whole[1] == blocks[1]


def test_bleu_and_cider_equal_the_exact_scorers_on_every_resample():
    refs, hyps = corpus(25, seed=0)
    stats, cider = bleu_stats(refs, hyps), CiderBootstrap(refs, hyps, chunk=3)
    weights = np.vstack([np.ones(25), resample_weights(25, 8, seed=1)])
    got_cider = cider(weights)
    for b, w in enumerate(weights):
        idx = explicit(w)
        r, h = [refs[i] for i in idx], [hyps[i] for i in idx]
        exact = corpus_bleu_1to4(r, h)
        for n in range(1, 5):
            assert bleu_metric(stats, n)(w[None])[0] == pytest.approx(exact[f"bleu{n}"], abs=1e-9)
        assert got_cider[b] == pytest.approx(cider_d(r, h)[0], abs=1e-9)


def test_bleu_is_zero_where_an_order_has_no_match():
    refs, hyps = [[["a", "b", "c"]]], [["a", "x", "b"]]  # unigrams match, no bigram
    stats = bleu_stats(refs, hyps)
    assert bleu_metric(stats, 1)(np.ones((1, 1)))[0] > 0
    assert bleu_metric(stats, 2)(np.ones((1, 1)))[0] == 0.0 == corpus_bleu_1to4(refs, hyps)["bleu2"]


def test_accuracy_and_ratio_metrics():
    hits = np.array([1, 0, 1, 1])
    w = np.array([[1, 1, 1, 1], [0, 2, 0, 2], [4, 0, 0, 0]], dtype=float)
    assert mean_metric(hits)(w).tolist() == [0.75, 0.5, 1.0]
    # masked: the mean over the items the mask keeps (item 1 left out); NaN if none drawn
    kept = mean_metric(np.array([0.5, np.nan, 1.0, 0.0]), np.array([1, 0, 1, 1], dtype=bool))
    got = kept(np.vstack([w, [[0, 3, 0, 0]]]))
    assert got[:3].tolist() == pytest.approx([0.5, 0.0, 0.5]) and np.isnan(got[3])
    assert interval(np.array([1.0, np.nan, 3.0]), 0.0) == (2.0, 2.0)  # NaN left out
    counts = np.array([[1, 2, 0, 0], [1, 1, 1, 4]], dtype=float)  # true, named, recalled, scene
    metric = ratio_metric(counts, [(0, 1), (2, 3)])
    # all: (2/3 + 1/4) / 2; the first image only: (1/2 + 0 (0 of 0)) / 2
    assert metric(np.array([[1.0, 1.0], [2.0, 0.0]])).tolist() == pytest.approx([11 / 24, 0.25])


def test_summarise_gives_values_intervals_and_paired_differences():
    rng = np.random.default_rng(0)
    a = (rng.random(400) < 0.7).astype(float)
    b = a.copy()
    b[:40] = 1 - b[:40]  # b differs from a on 40 items only
    out = summarise({"a": mean_metric(a), "b": mean_metric(b)}, 400, 1000, 0.95, 0, [("a", "b")])
    assert out["a"]["value"] == pytest.approx(a.mean(), abs=1e-6)
    for v in out.values():
        assert v["lo"] <= v["value"] <= v["hi"]
    # a binomial proportion: width about 2 x 1.96 x sqrt(p (1 - p) / n)
    width = out["a"]["hi"] - out["a"]["lo"]
    assert width == pytest.approx(2 * 1.96 * np.sqrt(a.mean() * (1 - a.mean()) / 400), rel=0.15)
    # paired: narrower than the two marginal intervals
    assert out["a-b"]["hi"] - out["a-b"]["lo"] < width
    assert out["a-b"]["value"] == pytest.approx(a.mean() - b.mean(), abs=1e-6)


def test_interval_is_the_percentile_interval():
    assert interval(np.arange(1001, dtype=float), 0.95) == (25.0, 975.0)
    assert interval(np.arange(1001, dtype=float), 0.5) == (250.0, 750.0)
