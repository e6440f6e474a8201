"""The sample world's caption grammar (pipeline.synth.grammar) against its generator."""

import random

import pytest

from pipeline.metrics.text import tokenize
from pipeline.synth.captions import alt_text, sentences
from pipeline.synth.grammar import parses
from pipeline.synth.scene import make_scene


def test_every_sentence_the_generator_writes_parses():
    rng = random.Random(0)
    n = 0
    for _ in range(1500):  # 1 to 5 objects: the one-object sentence and lists of 2 to 5
        objs, rels = make_scene(rng, 192, 144, rng.randint(1, 5))
        for caption in sentences(rng, objs, rels, 5):
            assert parses(tokenize(caption)), caption
            n += 1
        assert not parses(tokenize(alt_text(rng, objs, rels)))  # the LAION style is not
    assert n == 7500


@pytest.mark.parametrize(
    "caption",
    [
        "there is a beneath the left of the large yellow circle .",
        "there is a beneath the beneath the beneath the brown diamond .",
        "a small purple heart and a small purple heart",
        "",
        "There are 3 shapes : a red circle and a blue square .",  # 2 listed, not 3
        "There are 2 shapes : a red circle .",
        "a orange circle is near a red square .",  # "an orange"
        "an red circle is near a red square .",
        "A red circle is near a red square . A red circle is near a red square .",
        "A red blob is near a red square .",  # not a shape of the world
        "A red circle sits near .",
        "red circle blue square clipart",
    ],
)
def test_broken_captions_do_not_parse(caption):
    assert not parses(tokenize(caption))


@pytest.mark.parametrize(
    "caption",
    [
        "There are 2 shapes : a red circle and an orange square .",
        "There are 3 shapes : a small red circle, a large blue ring and a gray kite .",
        "There is a large green ring on a dark background .",
        "A small orange star can be seen to the left of a blue hexagon .",
        "there is an orange heart on top of the large cyan frame .",
    ],
)
def test_well_formed_captions_parse_in_the_form_metrics_read(caption):
    assert parses(tokenize(caption))
    assert parses(tokenize(caption.upper().replace(" ,", ",")))  # case, spacing of commas
