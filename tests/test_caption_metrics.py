"""Caption metrics against pycocoevalcap's scorers (the COCO caption evaluation code)."""

from __future__ import annotations

import random

import pytest

from pipeline.metrics import cider_d, corpus_bleu_1to4, tokenize

coco_bleu = pytest.importorskip("pycocoevalcap.bleu.bleu")
coco_cider = pytest.importorskip("pycocoevalcap.cider.cider")


def _coco_inputs(references, hypotheses):
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(references)}
    res = {i: [" ".join(h)] for i, h in enumerate(hypotheses)}
    return gts, res


def coco_bleu_scores(references, hypotheses) -> list[float]:
    gts, res = _coco_inputs(references, hypotheses)
    score, _ = coco_bleu.Bleu(4).compute_score(gts, res, verbose=0)
    return score


def coco_cider_scores(references, hypotheses):
    gts, res = _coco_inputs(references, hypotheses)
    return coco_cider.Cider().compute_score(gts, res)


REFS = [
    [
        "a man rides a red bike down the street",
        "a person on a bicycle in a city street",
        "man riding a bike",
    ],
    ["two dogs play in the snow", "a brown dog and a black dog run through snow"],
    [
        "a woman in a blue dress sings on stage",
        "a singer performs on a stage",
        "a woman sings into a microphone",
        "a lady in blue is singing",
    ],
    ["children play soccer on a green field"],
]
HYPS_SHORT = [  # shorter than the closest references (7/9, 5/6, 5/6, 5/7 words): bp < 1
    "a man rides a bike in the",
    "dogs play in the snow",
    "a woman in blue sings",
    "children play soccer on a",
]
HYPS_LONG = [  # longer: no brevity penalty
    "a man rides a red bike down the street in a city",
    "a brown dog and a black dog play in the white snow",
    "a woman in a blue dress sings into a microphone on stage",
    "children play soccer on a green field in the sun",
]


def _tok(refs, hyps):
    return [[r.split() for r in rs] for rs in refs], [h.split() for h in hyps]


def test_tokenize_coco_style():
    assert tokenize("A Dog's red T-shirt, on the grass.") == [
        "a",
        "dog",
        "s",
        "red",
        "t",
        "shirt",
        "on",
        "the",
        "grass",
    ]
    # a CLIP BPE decode of the same caption separates clitics and hyphens: same tokens
    assert tokenize("a dog 's red t - shirt , on the grass .") == tokenize(
        "A Dog's red T-shirt, on the grass."
    )
    assert tokenize("  Two\tmen...  (outside)!\n") == ["two", "men", "outside"]
    assert tokenize("Café au lait") == ["café", "au", "lait"]
    assert tokenize("under_score 3.5") == ["under", "score", "3", "5"]
    assert tokenize("?!. ,") == []


@pytest.mark.parametrize("hyps", [HYPS_SHORT, HYPS_LONG], ids=["brevity", "no-brevity"])
def test_bleu_equals_pycocoevalcap(hyps):
    refs, hyp_tokens = _tok(REFS, hyps)
    ours = corpus_bleu_1to4(refs, hyp_tokens)
    coco = coco_bleu_scores(refs, hyp_tokens)
    assert all(0.0 < v < 1.0 for v in ours.values())
    for n in range(1, 5):
        assert ours[f"bleu{n}"] == pytest.approx(coco[n - 1], abs=1e-6)


def test_bleu_brevity_penalty_uses_closest_reference():
    # one image, refs of length 3 and 9, hypothesis of length 4: closest is 3 -> no penalty
    refs = [[["a", "b", "c"], list("abcdefghi")]]
    ours = corpus_bleu_1to4(refs, [["a", "b", "c", "d"]])
    assert ours["bleu1"] == pytest.approx(1.0)
    assert ours["bleu2"] == pytest.approx(1.0)
    # hypothesis of length 2: closest reference is 3 -> bp = exp(1 - 3/2)
    ours = corpus_bleu_1to4(refs, [["a", "b"]])
    assert ours["bleu1"] == pytest.approx(pytest.approx(2.718281828459045 ** (1 - 1.5)))


def test_bleu_perfect_and_zero_orders():
    refs, hyps = _tok(REFS, [rs[0] for rs in REFS])
    assert corpus_bleu_1to4(refs, hyps) == pytest.approx(
        {"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0}
    )
    # unigram matches but no bigram match: BLEU-1 > 0, BLEU-2..4 exactly 0 (no smoothing);
    # pycocoevalcap gives tiny positive numbers here instead (its 1e-15 epsilon)
    refs = [[["a", "cat", "sat"]], [["the", "dog", "ran"]]]
    hyps = [["sat", "x", "cat"], ["ran", "y", "dog"]]
    ours = corpus_bleu_1to4(refs, hyps)
    assert ours["bleu1"] == pytest.approx(4 / 6)
    assert ours["bleu2"] == ours["bleu3"] == ours["bleu4"] == 0.0
    coco = coco_bleu_scores(refs, hyps)
    assert coco[0] == pytest.approx(4 / 6, abs=1e-6)
    assert 0.0 < coco[3] < 1e-3
    # no match at all
    assert corpus_bleu_1to4([[["a"]]], [["b"]]) == {f"bleu{n}": 0.0 for n in range(1, 5)}


def test_bleu_short_hypotheses_differ_from_coco():
    # nltk's modified_precision counts a denominator of max(1, #n-grams): a hypothesis with
    # fewer than n words adds 1 to the order-n denominator; pycocoevalcap adds 0
    refs = [[["a", "b", "c", "d"]], [["x", "y"]]]
    hyps = [["a", "b", "c", "d"], ["x", "y"]]
    ours = corpus_bleu_1to4(refs, hyps)
    assert ours["bleu2"] == pytest.approx(1.0)
    assert ours["bleu3"] == pytest.approx((2 / 3) ** (1 / 3))
    assert ours["bleu4"] == pytest.approx((2 / 3 * 1 / 2) ** (1 / 4))
    assert coco_bleu_scores(refs, hyps) == pytest.approx([1.0, 1.0, 1.0, 1.0], abs=1e-6)


def test_bleu_equals_pycocoevalcap_random_corpus():
    rng = random.Random(0)
    vocab = ["a", "the", "man", "dog", "red", "runs", "on", "grass"]
    refs = [
        [[rng.choice(vocab) for _ in range(rng.randint(3, 12))] for _ in range(rng.randint(1, 5))]
        for _ in range(60)
    ]
    # every hypothesis has >= 4 words (see test_bleu_short_hypotheses_differ_from_coco)
    hyps = [[rng.choice(vocab) for _ in range(rng.randint(4, 12))] for _ in range(60)]
    ours = corpus_bleu_1to4(refs, hyps)
    coco = coco_bleu_scores(refs, hyps)
    assert ours["bleu4"] > 0.0
    for n in range(1, 5):
        assert ours[f"bleu{n}"] == pytest.approx(coco[n - 1], abs=1e-6)


@pytest.mark.parametrize("hyps", [HYPS_SHORT, HYPS_LONG], ids=["short", "long"])
def test_cider_equals_pycocoevalcap(hyps):
    refs, hyp_tokens = _tok(REFS, hyps)
    score, per_image = cider_d(refs, hyp_tokens)
    coco_score, coco_per_image = coco_cider_scores(refs, hyp_tokens)
    assert score > 0.0
    assert score == pytest.approx(coco_score, abs=1e-6)
    assert per_image == pytest.approx(list(coco_per_image), abs=1e-6)


def test_cider_equals_pycocoevalcap_edge_cases():
    # empty hypothesis, one-word hypothesis, repeated n-grams, an empty reference,
    # n-grams present in every image (idf 0), hypothesis words unseen in any reference
    refs = [
        [["a", "dog"], ["a", "dog", "runs", "fast"]],
        [["a", "cat"], []],
        [["a", "bird", "a", "bird", "sings"], ["a", "bird"]],
        [["a", "fish", "swims"]],
    ]
    hyps = [[], ["cat"], ["a", "bird", "a", "bird", "a", "bird"], ["zebra", "a", "fish"]]
    score, per_image = cider_d(refs, hyps)
    coco_score, coco_per_image = coco_cider_scores(refs, hyps)
    assert per_image[0] == 0.0
    assert score == pytest.approx(coco_score, abs=1e-6)
    assert per_image == pytest.approx(list(coco_per_image), abs=1e-6)


def test_cider_equals_pycocoevalcap_random_corpus():
    rng = random.Random(1)
    vocab = [
        "a",
        "the",
        "man",
        "woman",
        "dog",
        "red",
        "blue",
        "runs",
        "sits",
        "on",
        "in",
        "grass",
        "street",
    ]
    refs = [
        [[rng.choice(vocab) for _ in range(rng.randint(3, 14))] for _ in range(rng.randint(1, 5))]
        for _ in range(80)
    ]
    hyps = [[rng.choice(vocab) for _ in range(rng.randint(0, 14))] for _ in range(80)]
    score, per_image = cider_d(refs, hyps)
    coco_score, coco_per_image = coco_cider_scores(refs, hyps)
    assert score == pytest.approx(coco_score, abs=1e-6)
    assert per_image == pytest.approx(list(coco_per_image), abs=1e-6)


def test_cider_exact_values():
    # hypothesis = its single reference, no n-gram shared between images: every cosine is
    # 1 and the length penalty 1, so each image scores exactly 10
    # for the orders the caption has (a 3-word caption has no 4-gram: that order adds 0)
    refs = [[["red", "circle", "left"]], [["blue", "square", "top"]], [["green", "dot"]]]
    hyps = [r[0] for r in refs]
    score, per_image = cider_d(refs, hyps)
    assert per_image == pytest.approx([7.5, 7.5, 5.0])
    assert score == pytest.approx(20.0 / 3)
    # a single image: idf = log(1) - log(1) = 0 for every n-gram, so CIDEr is 0
    assert cider_d([[["a", "b"]]], [["a", "b"]]) == (0.0, [0.0])


def test_metric_input_errors():
    with pytest.raises(ValueError):
        corpus_bleu_1to4([[["a"]]], [])
    with pytest.raises(ValueError):
        cider_d([[]], [["a"]])
    with pytest.raises(ValueError):
        cider_d([], [])
