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
    "eval_every": 2, "warmup_steps": 1, "canvas": [96, 72],
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
    curve = (tmp_path / "standin" / "train_curve.tsv").read_text().splitlines()
    assert curve[0].startswith("step\ttrain_loss") and len(curve) == 3
    bb = load_backbone(tmp_path / "standin", "cpu")
    assert bb.image_size == 32 and bb.dim == 16


def test_bad_settings_name_the_key(tmp_path):
    from pipeline.errors import UserError
    from pipeline.settings import load
    from pipeline.stages.clip_standin import Settings

    for section, key in (({"single_share": 0.8, "crop_share": 0.5}, "crop_share"),
                         ({"val_probes": 10}, "val_probes")):  # fmt: skip
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
