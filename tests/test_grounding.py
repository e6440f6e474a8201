"""Grounding scores: how captions are read, what counts as true, the corpus averages, and
that the sample world's own captions are read as fully grounded."""

from __future__ import annotations

import json
import random

import pytest

from pipeline.errors import UserError
from pipeline.metrics.grounding import (
    Mention,
    Scene,
    Vocabulary,
    count,
    grounding,
    load_scenes,
    parse,
    vocabulary,
)
from pipeline.synth.captions import PHRASES, alt_text, sentences
from pipeline.synth.scene import PREDICATES, make_scene, predicate
from pipeline.synth.world import OBJ_ALIASES, REL_ALIASES, scene_truth

VOCAB = Vocabulary()


def two_objects() -> Scene:
    """A red circle left of a blue square (listed), a small green star above the square."""
    objects = {
        0: {"category": "circle", "colour": "red", "box": (10, 10, 20, 20)},
        1: {"category": "square", "colour": "blue", "box": (60, 10, 20, 20)},
        2: {"category": "star", "colour": "green", "box": (62, 60, 10, 10)},
    }
    return Scene(objects, [(0, "left of", 1), (2, "below", 1)])


def test_the_scene_geometry_is_what_the_world_says():
    s = two_objects()
    assert predicate(s.objects[0]["box"], s.objects[1]["box"]) == "left of"
    assert predicate(s.objects[1]["box"], s.objects[0]["box"]) == "right of"
    assert predicate(s.objects[2]["box"], s.objects[1]["box"]) == "below"
    assert s.holds(1, "right of", 0) and s.holds(1, "above", 2) and not s.holds(0, "above", 1)


def test_parse_reads_mentions_colours_and_relations():
    p = parse("A small red circle is placed to the left of the large blue square .", VOCAB)
    red, blue = Mention("circle", "red"), Mention("square", "blue")
    assert p.colours == {"red", "blue"} and p.shapes == {"circle", "square"}
    assert p.objects == {("red", "circle"), ("blue", "square")}
    assert p.relations == {(red, "left of", blue)}
    # keyword alt-text style, aliases and plurals
    p = parse("red circle next to grey box clipart", VOCAB)
    assert p.relations == {(red, "next to", Mention("square", "gray"))}
    assert parse("two green circles", VOCAB).objects == {("green", "circle")}
    # a shape without a colour; the colour nearest the shape wins; size words are skipped
    p = parse("There is a circle inside a red large blue ring", VOCAB)
    assert p.relations == {(Mention("circle"), "in", Mention("ring", "blue"))}
    # no relation: nothing after the phrase, a non-article word before the object, a
    # colour without a shape before the phrase
    for text in ("There is a red circle on a dark background .", "a red circle is above",
                 "red circle isolated on white", "a red is left of a blue square"):  # fmt: skip
        assert parse(text, VOCAB).relations == set(), text
    assert parse("", VOCAB).colours == set()


def test_every_wording_of_the_world_is_read():
    """The synth's phrases and Visual Genome aliases all parse to their predicate/shape."""
    for pred in PREDICATES:
        for phrase in [*PHRASES[pred], *REL_ALIASES.get(pred, [])]:
            p = parse(f"a red circle {phrase} a blue square", VOCAB)
            assert p.relations == {(Mention("circle", "red"), pred, Mention("square", "blue"))}, (
                phrase
            )
    for shape, aliases in OBJ_ALIASES.items():
        for alias in aliases:
            assert parse(f"a pink {alias}", VOCAB).objects == {("pink", shape)}


def test_counts_against_a_scene():
    scene = two_objects()

    def c(text: str) -> dict[str, int]:
        return count(parse(text, VOCAB), scene)

    right = c("A red circle is to the left of a blue square .")
    rel = ("relations_named", "relations_true", "relations_scene", "relations_recalled")
    assert [right[k] for k in rel] == [1, 1, 2, 1]
    assert (right["colours_true"], right["colours_scene"], right["objects_true"]) == (2, 3, 2)
    # the converse, read off the boxes, is true and recalls the listed relation
    conv = c("The blue square is right of the red circle")
    assert (conv["relations_true"], conv["relations_recalled"]) == (1, 1)
    # "above" is the converse of the listed "star below square": true, and recalls it
    above = c("a blue square above a green star")
    assert (above["relations_true"], above["relations_recalled"]) == (1, 1)
    # colours swapped: colours and shapes are right, the objects and the relation wrong
    swap = c("A blue circle to the left of a red square")
    assert (swap["colours_true"], swap["shapes_true"]) == (2, 2)
    assert (swap["objects_named"], swap["objects_true"]) == (2, 0)
    assert [swap[k] for k in rel] == [1, 0, 2, 0]
    # no colours named: the relation holds of the categories
    bare = c("a circle left of a square")
    assert (bare["colours_named"], bare["relations_true"], bare["relations_recalled"]) == (0, 1, 1)
    wrong = c("A red circle above a blue square, a purple heart")
    assert (wrong["relations_true"], wrong["colours_named"], wrong["colours_true"]) == (0, 3, 2)
    assert (wrong["shapes_named"], wrong["shapes_true"]) == (3, 2)


def test_corpus_scores_are_micro_averages_and_the_headline_their_mean():
    scene = two_objects()
    caps = ["A red circle is to the left of a blue square .", "a purple heart", ""]
    g = grounding(caps, [scene] * 3, VOCAB)
    # colours: named 2 + 1 + 0, true 2 + 0; scene colours 3 per caption
    assert g["colours"] == {"p": round(2 / 3, 6), "r": round(2 / 9, 6), "named": 3,
                                 "true": 2, "scene": 9, "recalled": 2}  # fmt: skip
    assert (g["shapes"]["p"], g["shapes"]["r"]) == (round(2 / 3, 6), round(2 / 9, 6))
    assert (g["relations"]["p"], g["relations"]["r"]) == (1.0, round(1 / 6, 6))
    assert g["ground_p"] == round((2 / 3 + 2 / 3 + 1) / 3, 6)
    assert g["ground_r"] == round((2 / 9 + 2 / 9 + 1 / 6) / 3, 6)
    assert g["n_captions"] == 3
    nothing = grounding(["a photo", "a thing"], [scene] * 2, VOCAB)
    assert nothing["ground_p"] == nothing["ground_r"] == 0.0  # naming nothing earns nothing
    with pytest.raises(ValueError):
        grounding(caps, [scene], VOCAB)


def test_the_worlds_own_captions_are_fully_grounded():
    """Every reference sentence and alt text the synth writes is read with precision 1,
    and each sentence about a relation recalls it."""
    rng = random.Random(7)
    caps, scenes = [], []
    for _ in range(150):
        objs, rels = make_scene(rng, 192, 144, rng.randint(1, 4))
        truth = scene_truth("x.jpg", objs, rels)
        scene = load_scenes_from([truth])["x"]
        for text in [*sentences(rng, objs, rels, 5), alt_text(rng, objs, rels)]:
            caps.append(text)
            scenes.append(scene)
    g = grounding(caps, scenes, VOCAB)
    for kind in ("colours", "shapes", "objects", "relations"):
        assert g[kind]["p"] == 1.0, (kind, g[kind])
        assert g[kind]["named"] > 100
    assert g["relations"]["r"] > 0.3 and g["colours"]["r"] > 0.6


def load_scenes_from(images: list[dict]) -> dict[str, Scene]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scenes.json"
        path.write_text(json.dumps({"images": images}))
        return load_scenes(path)


def test_load_scenes_by_file_stem_and_rejects_malformed_files(tmp_path):
    scenes = load_scenes_from([{
        "filename": "1000092795.jpg",
        "objects": [{"id": 0, "category": "kite", "colour": "teal", "size": "small",
                     "box": [1, 2, 3, 4]}],
        "relations": [],
    }])  # fmt: skip
    assert list(scenes) == ["1000092795"]
    assert scenes["1000092795"].objects[0] == {"category": "kite", "colour": "teal",
                                               "box": (1, 2, 3, 4)}  # fmt: skip
    vocab = vocabulary(scenes)  # the scenes' own words join the world's
    assert parse("a teal kite", vocab).objects == {("teal", "kite")}
    assert parse("a teal kite", VOCAB).colours == set()
    path = tmp_path / "scenes.json"
    bad = [
        ("[1, 2]", "expected an object"),
        ('{"images": {}}', "expected {'images'"),
        ('{"images": [{"filename": "a.jpg"}]}', "images[0] is malformed"),
        (json.dumps({"images": [{"filename": "a.jpg", "objects": [], "relations": [
            {"subject": 0, "predicate": "on", "object": 1}]}]}), "object id"),
        (json.dumps({"images": [{"filename": "a.jpg", "relations": [], "objects": [
            {"id": 0, "category": "x", "colour": "y", "box": [1, 2]}]}]}), "box"),
        ("{not json", "not valid JSON"),
    ]  # fmt: skip
    for text, fragment in bad:
        path.write_text(text)
        with pytest.raises(UserError) as exc:
            load_scenes(path)
        assert fragment in str(exc.value) and str(path) in str(exc.value)
