"""pipeline.metrics.clipscore: CLIPScore and RefCLIPScore by hand on tiny vectors, the
references' own scores, and their bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.metrics.bootstrap import mean_metric, summarise
from pipeline.metrics.clipscore import PROMPT, ClipScorer, W, corpus, harmonic_mean

# text -> embedding (not unit length: the scorer normalises)
TEXTS = {
    "a cat": [1.0, 0.0],  # image 0 (0.6, 0.8): cos 0.6
    "r1": [0.0, 2.0],  # cos 0.8 with image 0, 0 with "a cat"
    "r2": [1.0, 1.0],  # cos 0.7 * sqrt(2) with image 0, 1 / sqrt(2) with "a cat" and r1
    "bad": [-1.0, 0.0],  # image 1 (1, 0): cos -1
    "r3": [2.0, 0.0],  # cos 1 with image 1, -1 with "bad"
}
IMAGES = np.array([[3.0, 4.0], [5.0, 0.0]])
REFS = [["r1", "r2"], ["r3"]]


class Encoder:
    """The TEXTS table behind the prompt, with the calls it got."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([TEXTS[t.removeprefix(PROMPT)] for t in texts])


def h(a: float, b: float) -> float:
    return 2 * a * b / (a + b)


def test_clipscore_and_refclipscore_by_hand():
    enc = Encoder()
    scorer = ClipScorer(enc, IMAGES, REFS)
    out = scorer.score(["a cat", "bad"])
    # image 0: 2.5 * 0.6; best reference r2 (cos 1/sqrt(2)); H-mean of the two
    # image 1: cos -1 -> 0; the one reference has cos -1 -> 0; H-mean(0, 0) = 0
    assert out["clipscore"].tolist() == pytest.approx([2.5 * 0.6, 0.0])
    assert out["refclipscore"].tolist() == pytest.approx([h(1.5, 1 / math.sqrt(2)), 0.0])
    # every text prompted; the references embedded once, when the scorer is made
    assert enc.calls == [
        [PROMPT + r for r in ("r1", "r2", "r3")],
        [PROMPT + "a cat", PROMPT + "bad"],
    ]
    assert corpus(out) == {"clipscore": 0.75, "refclipscore": round(h(1.5, 0.5**0.5) / 2, 6)}
    assert W == 2.5 and PROMPT == "A photo depicts "


def test_the_references_own_scores_leave_one_out():
    own = ClipScorer(Encoder(), IMAGES, REFS).references()
    r1, r2 = 2.5 * 0.8, 2.5 * 0.7 * math.sqrt(2)  # each reference against image 0
    assert own["clipscore"].tolist() == pytest.approx([(r1 + r2) / 2, 2.5])
    # image 0: each against the other (cos 1/sqrt(2)); image 1 has one reference: none
    loo = (h(r1, 0.5**0.5) + h(r2, 0.5**0.5)) / 2
    assert own["refclipscore"][0] == pytest.approx(loo) and np.isnan(own["refclipscore"][1])
    assert corpus(own)["refclipscore"] == round(loo, 6)  # the mean over the images scored


def test_harmonic_mean_and_mismatches():
    got = harmonic_mean(np.array([2.0, 0.0, 0.0]), np.array([0.5, 0.3, 0.0]))
    assert got.tolist() == pytest.approx([0.8, 0.0, 0.0])  # 2 * 2 * 0.5 / 2.5; 0; 0 / 0 -> 0
    scorer = ClipScorer(Encoder(), IMAGES, REFS)
    with pytest.raises(ValueError, match="1 captions for 2 images"):
        scorer.score(["a cat"])
    with pytest.raises(ValueError, match="2 reference lists for 1 images"):
        ClipScorer(Encoder(), IMAGES[:1], REFS)
    with pytest.raises(ValueError, match="3-d image embeddings"):
        ClipScorer(Encoder(), np.ones((2, 3)), REFS)


def test_bootstrap_interval_contains_the_corpus_score():
    rng = np.random.default_rng(0)
    n, d = 60, 8
    table = {f"t{i}": rng.normal(size=d) for i in range(4 * n)}
    refs = [[f"t{n + 3 * i + k}" for k in range(3)] for i in range(n)]

    def encode(texts: list[str]) -> np.ndarray:
        return np.stack([table[t.removeprefix(PROMPT)] for t in texts])

    images = np.stack([table[f"t{i}"] + 0.5 * rng.normal(size=d) for i in range(n)])
    scorer = ClipScorer(encode, images, refs)
    good = scorer.score([f"t{i}" for i in range(n)])  # each image's own text
    poor = scorer.score([f"t{(i + 1) % n}" for i in range(n)])  # the next image's
    metrics = {"good": mean_metric(good["clipscore"]), "poor": mean_metric(poor["clipscore"])}
    out = summarise(metrics, n, 1000, 0.95, 0, [("good", "poor")])
    assert out["good"]["value"] == corpus(good)["clipscore"]
    for v in out.values():
        assert v["lo"] <= v["value"] <= v["hi"] and v["lo"] < v["hi"]
    assert out["good-poor"]["lo"] > 0  # its own text fits an image better
