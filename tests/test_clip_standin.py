"""The clip_standin stage (tiny, seconds), its batches, and the committed stand-in CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.clip.standin import colour_batch
from pipeline.stages.clip_standin import main

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "models" / "clip_standin"
TINY = {
    "model": {"vocab_size": 400, "context_length": 24, "width": 32, "layers": 1, "heads": 2,
              "image_size": 32, "patch_size": 8, "projection_dim": 16},
    "images": 48, "steps": 4, "batch_size": 16, "colour_groups": 2, "val_probes": 44,
    "eval_every": 2, "warmup_steps": 1, "canvas": [96, 72], "base_image_size": 32,
    "val_scenes": 6, "hires_steps": 0,
}  # fmt: skip


def test_colour_batches_hold_few_colours():
    rng = np.random.default_rng(0)
    colours = [i % 11 for i in range(440)]
    by_colour = [np.array([i for i, c in enumerate(colours) if c == k]) for k in range(11)]
    for _ in range(20):
        idx = colour_batch(by_colour, 64, 4, rng)
        assert len(idx) == 64 == len(set(idx.tolist()))
        assert len({colours[i] for i in idx}) == 4  # colour never identifies a caption alone
    assert len({colours[i] for i in colour_batch(by_colour, 64, 0, rng)}) > 4


def test_tiny_standin_writes_a_checkpoint_with_its_probes(tmp_path):
    from pipeline.clip.backbone import load_backbone

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 0, "clip_standin": TINY}))
    summary = main(tmp_path / "standin", params)
    assert summary.startswith("clip_standin: 4 steps on 48 images")
    info = json.loads((tmp_path / "standin" / "standin.json").read_text())
    assert set(info["validation_probes"]) == {"clipart_single", "clipart_crop", "photo_single",
                                              "photo_crop"}  # fmt: skip
    assert sum(info["train_images"].values()) == 48
    assert set(info["validation_scene_probes"]) == {"clipart_scene", "photo_scene"}
    curve = (tmp_path / "standin" / "train_curve.tsv").read_text().splitlines()
    assert curve[0].startswith("phase\tstep\ttrain_loss") and len(curve) == 3
    bb = load_backbone(tmp_path / "standin", "cpu")
    assert bb.image_size == 32 and bb.dim == 16


def test_a_hires_phase_moves_the_standin_to_its_final_size(tmp_path):
    from pipeline.clip.backbone import load_backbone

    params = tmp_path / "params.yaml"
    hires = {"hires_steps": 2, "hires_images": 20, "twins": 1, "hires_single_share": 0.0,
             "hires_crop_share": 0.0, "model": {**TINY["model"], "image_size": 48}}  # fmt: skip
    params.write_text(yaml.safe_dump({"seed": 0, "clip_standin": {**TINY, **hires}}))
    main(tmp_path / "standin", params)
    info = json.loads((tmp_path / "standin" / "standin.json").read_text())
    assert info["hires_train_images"]["twin"] == info["hires_train_images"]["scene"] == 10
    curve = (tmp_path / "standin" / "train_curve.tsv").read_text().splitlines()
    assert [line.split("\t")[:2] for line in curve[1:]] == [
        ["base", "2"], ["base", "4"], ["hires", "6"]]  # fmt: skip
    assert load_backbone(tmp_path / "standin", "cpu").image_size == 48


def test_bad_settings_name_the_key(tmp_path):
    from pipeline.errors import UserError
    from pipeline.settings import load
    from pipeline.stages.clip_standin import Settings

    for section, key in (({"single_share": 0.8, "crop_share": 0.5}, "crop_share"),
                         ({"val_probes": 10}, "val_probes"),
                         ({"base_image_size": 32, "hires_steps": 0}, "base_image_size"),
                         ({"hires_single_share": 0.9}, "hires_crop_share")):  # fmt: skip
        with pytest.raises(UserError, match=f"clip_standin.{key}"):
            load(Settings, {"clip_standin": section})


@pytest.mark.skipif(not (STANDIN / "config.json").exists(), reason="no committed stand-in")
def test_committed_standin_covers_the_world_vocabulary():
    """Every word of the sample world's captions, names and questions is one token of the
    committed stand-in's tokenizer (none falls back to characters or <|unk|>)."""
    from transformers import AutoTokenizer

    from pipeline.synth.captions import vocabulary_text

    tok = AutoTokenizer.from_pretrained(str(STANDIN))
    words = sorted(set(" ".join(vocabulary_text()).lower().split()))
    split = [w for w in words if len(tok(w, add_special_tokens=False)["input_ids"]) != 1]
    assert not split, split
    info = json.loads((STANDIN / "standin.json").read_text())
    assert info["settings"]["steps"] >= 1000 and "photo_crop" in info["validation_probes"]


def test_shape_twins_keep_the_layout_and_change_every_shape():
    import random

    from pipeline.synth.webdata import draw, shape_twin

    rng, nrng = random.Random(0), np.random.default_rng(0)
    for _ in range(10):
        d = draw(rng, nrng, "scene", "photo", (192, 144), (2, 4))
        t = shape_twin(rng, nrng, d, (192, 144))
        assert t.kind == "twin" and t.relations == d.relations and t.style == d.style
        assert [o["box"] for o in t.objects] == [o["box"] for o in d.objects]
        assert [o["colour"] for o in t.objects] == [o["colour"] for o in d.objects]
        assert all(a["category"] != b["category"] for a, b in zip(t.objects, d.objects))
        assert all(o["category"] in " ".join(t.captions) for o in t.objects[:1])


def test_a_twin_shares_its_scenes_batch():
    from pipeline.clip.standin import with_twins

    twins = [0, 1, 0, 0, 2, 0, 0]  # 2 is 1's twin, 5 and 6 are 4's
    assert with_twins(np.array([0, 1, 4]), twins, 8).tolist() == [0, 1, 2, 4, 5, 6]
    assert with_twins(np.array([4, 1, 0]), twins, 4).tolist() == [4, 5, 6, 1]


def test_an_interrupted_standin_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Stopped after its first evaluation, the stage started again goes on from there and
    ends with the weights of an uninterrupted run (truth head on)."""
    from pipeline.clip import standin
    from pipeline.stages.clip_standin import resume_file

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 0, "clip_standin": {**TINY, "truth_weight": 1.0}}))
    main(tmp_path / "whole", params)
    real = standin.train_step
    calls = []

    def stop_after_two(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(standin, "train_step", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        main(tmp_path / "cut", params)
    assert resume_file(tmp_path / "cut", "base").exists()
    monkeypatch.setattr(standin, "train_step", real)
    main(tmp_path / "cut", params)
    assert resume_file(tmp_path / "cut", "base").exists()  # kept: a later round starts from it
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == whole
    rows = [line.split("\t")[:3] for line in
            (tmp_path / "cut" / "train_curve.tsv").read_text().splitlines()]  # fmt: skip
    assert rows == [line.split("\t")[:3] for line in
                    (tmp_path / "whole" / "train_curve.tsv").read_text().splitlines()]  # fmt: skip


def test_truth_labels_name_what_each_training_image_holds():
    from pipeline.clip.scene_probes import TRUTH_LABELS
    from pipeline.clip.standin import training_pairs

    kinds = {"single": 0.3, "crop": 0.3, "scene": 0.4}
    _, _, colours, kind, labels = training_pairs(30, 0, 32, kinds, 0.5, (96, 72), (2, 4), 0.1)
    assert labels.shape == (30, len(TRUTH_LABELS))
    for i in range(30):
        held = {TRUTH_LABELS[j] for j in np.flatnonzero(labels[i])}
        assert ("colour", colours[i]) in held or kind[i] == "scene"
        shapes = {lab for name, lab in held if name == "shape"}
        if kind[i] != "scene":  # one object: its shape, colour and the pair
            assert len(held) == 3 and len(shapes) == 1
        else:  # the visible objects (`scene_labels`, tested in test_scene_probes)
            assert len(shapes) >= 1


def test_more_rounds_train_only_the_new_ones(tmp_path, monkeypatch):
    """A finished run keeps each phase's state; raised `hires_rounds`, it trains the new
    round only (its own draw, seed + 2) and ends with the weights of a two-round run."""
    from pipeline.clip import standin

    hires = {"hires_steps": 2, "hires_images": 20, "hires_single_share": 0.0,
             "hires_crop_share": 0.0, "eval_every": 2}  # fmt: skip

    def params(name, rounds):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"seed": 0, "clip_standin": {
            **TINY, **hires, "hires_rounds": rounds}}))  # fmt: skip
        return path

    summary = main(tmp_path / "two", params("two", 2))
    assert summary.startswith("clip_standin: 4 + 2 x 2 steps on 48 + 2 x 20 images")
    main(tmp_path / "grown", params("one", 1))
    real, calls = standin.train_step, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(standin, "train_step", counted)
    main(tmp_path / "grown", params("grown", 2))
    assert len(calls) == 2  # the new round's steps only
    two, grown = ((tmp_path / n / "model.safetensors").read_bytes() for n in ("two", "grown"))
    assert grown == two
    curve = (tmp_path / "grown" / "train_curve.tsv").read_text().splitlines()
    assert [line.split("\t")[:2] for line in curve[1:]] == [
        ["base", "2"], ["base", "4"], ["hires", "6"], ["hires2", "8"]]  # fmt: skip
