"""Scene probes: labels of a whole scene and the multi-label linear read-out."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.clip import scene_probes as SP


def test_labels_of_a_hand_made_scene():
    objs = [
        {"category": "star", "colour": "red", "box": [40, 20, 30, 30]},  # left of the circle
        {"category": "circle", "colour": "blue", "box": [100, 10, 30, 30]},
        {"category": "heart", "colour": "red", "box": [100, 90, 20, 20]},  # below the circle
        {"category": "kite", "colour": "green", "box": [0, 60, 20, 20]},  # outside the square
    ]
    got = SP.scene_labels(objs, (192, 144))  # centre square: x in [24, 168]
    assert got["shape"] == {"star", "circle", "heart"}
    assert got["colour"] == {"red", "blue"}
    assert got["object"] == {"red star", "blue circle", "red heart"}
    assert {"star left of", "circle right of", "heart below", "circle above"} <= got["relation"]
    assert not any(r.startswith("kite") for r in got["relation"])


def test_visible_needs_half_the_box_inside_the_centre_square():
    assert SP.visible([10, 10, 30, 30], (192, 144))  # 16 of 30 px inside
    assert not SP.visible([0, 10, 30, 30], (192, 144))  # 6 of 30 px inside
    assert SP.visible([0, 0, 10, 10], (100, 100))  # square canvas: everything is kept


def _rows(n: int, seed: int):
    """Scenes of 2-3 random objects, alternately train / test."""
    from pipeline.synth.scene import CATEGORIES, COLOURS

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        objs = [{"category": CATEGORIES[rng.integers(22)], "colour": list(COLOURS)[rng.integers(11)],
                 "box": [30 + 40 * j, 50, 20, 20]} for j in range(rng.integers(2, 4))]  # fmt: skip
        rows.append({"kind": "scene", "style": "photo", "split": ("train", "test")[i % 2],
                     "objects": objs, "canvas": [192, 144]})  # fmt: skip
    return rows


def _shapes(rows: list[dict]) -> np.ndarray:
    """(rows, 22) 0/1: the shapes of each row's objects."""
    vocab = SP.vocabulary()["shape"]
    y = np.zeros((len(rows), len(vocab)), dtype=np.float32)
    for i, r in enumerate(rows):
        for o in r["objects"]:
            y[i, vocab.index(o["category"])] = 1
    return y


def test_linearly_coded_labels_are_read_out_and_random_features_are_at_chance():
    rows = _rows(600, 0)
    y = _shapes(rows)
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(y.shape[1], 64, generator=gen)
    coded = torch.nn.functional.normalize(torch.from_numpy(y) @ proj, dim=1)
    good = SP.run_scene_probes(coded, rows)["photo_scene"]["shape"]
    assert good["recall_at_k"] > 0.95 and good["n_test"] == 300 and good["labels"] == 22
    noise = torch.nn.functional.normalize(torch.randn(len(rows), 64, generator=gen), dim=1)
    bad = SP.run_scene_probes(noise, rows)["photo_scene"]["shape"]
    assert bad["recall_at_k"] < bad["chance_recall_at_k"] + 0.08
    assert abs(bad["chance_recall_at_k"] - good["chance_recall_at_k"]) < 1e-9


def test_the_penalty_is_chosen_on_the_train_half_only():
    rows = _rows(400, 1)
    y = _shapes(rows)
    gen = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.from_numpy(y) @ torch.randn(22, 32, generator=gen)
                                        + 0.3 * torch.randn(len(rows), 32, generator=gen), dim=1)  # fmt: skip
    a = SP.run_scene_probes(emb, rows)["photo_scene"]["shape"]
    # other objects behind the test half's embeddings: its score falls, the choice stays
    moved = [dict(r, objects=rows[(i + 2) % len(rows)]["objects"]) if r["split"] == "test" else r
             for i, r in enumerate(rows)]  # fmt: skip
    b = SP.run_scene_probes(emb, moved)["photo_scene"]["shape"]
    assert a["l2"] in SP.LP_L2_GRID
    assert (a["l2"], a["cv_recall_at_k"]) == (b["l2"], b["cv_recall_at_k"])
    assert b["recall_at_k"] < a["recall_at_k"] - 0.3 and a["cv_recall_at_k"] > 0.5


def test_score_multilabel_by_hand():
    y = np.array([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=np.float32)
    s = np.array([[2.0, 1.0, -1.0, -3.0], [-1.0, 0.5, 0.2, -2.0]])
    got = SP.score_multilabel(s, y)
    assert got["recall_at_k"] == 0.75  # image 0: top-2 {0, 1} holds 1 of 2; image 1: 1 of 1
    assert got["recall_at_k_ci"] == [0.5, 1.0]  # resamples of two scenes: 0.5, 0.75 or 1
    assert got["precision"] == round(2 / 4, 4) and got["recall"] == round(2 / 3, 4)
    assert got["chance_recall_at_k"] == round((2 / 4 + 1 / 4) / 2, 4)


def test_probe_set_holds_scenes_with_their_objects(tmp_path):
    import json

    from pipeline.synth.webdata import write_probes

    info = write_probes(tmp_path, 44, 0, (96, 72), (2, 3), n_scenes=6)
    rows = json.loads((tmp_path / "labels.json").read_text())["items"]
    scenes = [r for r in rows if r["kind"] == "scene"]
    assert info["scenes_per_style"] == 6 and len(scenes) == 12
    assert {r["style"] for r in scenes} == {"clipart", "photo"}
    assert [r["split"] for r in scenes[:4]] == ["train", "test", "train", "test"]
    assert all(2 <= len(r["objects"]) <= 3 and r["box"] is None for r in scenes)
    assert scenes[0]["objects"][0]["category"] == scenes[0]["category"]
