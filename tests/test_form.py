"""Form metrics of captions (pipeline.metrics.form)."""

import pytest

from pipeline.metrics.form import form, repeats, stated_count
from pipeline.metrics.text import tokenize
from pipeline.synth.grammar import parses


def test_repeats_finds_a_4gram_that_occurs_twice():
    assert repeats(tokenize("a small purple heart and a small purple heart"))
    assert repeats(tokenize("beneath the beneath the beneath the"))  # period-2 loop
    assert not repeats(tokenize("a small red circle , a small red square"))  # 3 words only
    assert not repeats(tokenize("there are 2 shapes : a red circle and a blue square ."))
    assert not repeats([]) and not repeats(["a", "a", "a"])
    assert repeats(["a", "a", "a", "a", "a"])  # "a a a a" twice, overlapping


def test_stated_count_reads_n_shapes():
    assert stated_count(tokenize("There are 3 shapes : a red circle , ...")) == 3
    assert stated_count(tokenize("there are 12 shapes")) == 12
    assert stated_count(tokenize("there is 1 shape")) == 1
    assert stated_count(tokenize("a red circle is near 2 blue squares")) is None
    assert stated_count(tokenize("there are shapes 3")) is None
    assert stated_count([]) is None


def test_form_summary_of_one_system():
    captions = [
        "There are 2 shapes : a red circle and a blue square .",  # parses, count right
        "There are 3 shapes : a red circle and a blue square .",  # does not parse; wrong
        "a small purple heart and a small purple heart",  # loops
        "a small purple heart and a small purple heart",
        "There are 2 shapes : a gray kite and a red ring .",  # image without a scene
    ]
    out = form(captions, parses, [2, 2, 3, 3, None])
    assert out == {
        "n_captions": 5,
        "wellformed": pytest.approx(2 / 5),
        "alt_text": 0.0,
        "repeat4": pytest.approx(2 / 5),
        "n_distinct": 4,
        "distinct": pytest.approx(4 / 5),
        "mean_len": pytest.approx(sum(len(tokenize(c)) for c in captions) / 5, abs=1e-3),
        "count_stated": 2,  # the third count has no scene to check against
        "count_right": pytest.approx(1 / 2),
    }
    # real data: no grammar, no scene counts
    assert set(form(captions)) == {"n_captions", "repeat4", "n_distinct", "distinct", "mean_len"}
    empty = form([], parses, [])
    assert empty["n_captions"] == 0 and empty["wellformed"] == empty["count_right"] == 0.0


def test_alt_text_is_a_caption_ending_in_a_stock_suffix():
    from pipeline.metrics.form import alt_text

    assert alt_text(tokenize("red heart blue parallelogram stock illustration"))
    assert alt_text(tokenize("yellow hexagon green octagon clipart"))
    assert not alt_text(tokenize("there is a small red circle on the blue square ."))
    assert not alt_text(tokenize("clipart"))  # the suffix alone is no caption
    assert (
        form(["a red circle clipart", "there is a red circle ."], lambda w: True)["alt_text"] == 0.5
    )
