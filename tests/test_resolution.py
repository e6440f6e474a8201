"""A CLIP checkpoint moved to a higher input resolution (position embeddings interpolated)."""

from __future__ import annotations

import json

import torch

from pipeline.clip.resolution import POSITIONS, resize_checkpoint, resize_positions
from tests.tiny_clip import make_tiny_clip


def test_resize_positions_keeps_the_class_row_and_a_smooth_grid():
    table = torch.randn(1 + 16, 8)
    assert torch.allclose(resize_positions(table, 4, 4), table, atol=1e-5)  # same grid: same
    flat = torch.cat([torch.randn(1, 8), torch.ones(16, 8) * 3])
    out = resize_positions(flat, 4, 8)
    assert out.shape == (65, 8) and torch.equal(out[0], flat[0])
    assert torch.allclose(out[1:], torch.full((64, 8), 3.0), atol=1e-5)  # constant stays


def test_a_resized_checkpoint_loads_and_embeds_larger_images(tmp_path):
    from safetensors.torch import load_file

    from pipeline.clip.backbone import load_backbone
    from pipeline.clip.probes import embed_pixels

    folder = make_tiny_clip(tmp_path / "clip", image_size=32)
    before = load_file(folder / "model.safetensors")
    resize_checkpoint(folder, 64)
    after = load_file(folder / "model.safetensors")
    assert after[POSITIONS].shape == (1 + 64, 32)
    assert all(torch.equal(before[k], after[k]) for k in before if "position" not in k)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": 64, "width": 64}
    bb = load_backbone(folder, "cpu")
    assert bb.image_size == 64
    emb = embed_pixels(bb, torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8))
    assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-4)
