"""Logits that must stay fp32 under bf16 autocast (CUDA trains under it; CPU autocast
exercises the same kernels' dtype rules here)."""

from __future__ import annotations

import torch
from test_caption_model import VOCAB, WIDTH, tiny_config
from tiny_clip import make_tiny_clip

from pipeline.nn.caption_decoder import CaptionDecoder


def test_ce_logits_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = CaptionDecoder(tiny_config(loss="ce"), torch.randn(VOCAB, WIDTH))
    pred = torch.randn(64, WIDTH)
    want = model.ce_logits(pred)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.ce_logits(pred)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-5  # bf16 matmul: off by ~0.05 at temperature 0.05


def test_contrastive_logits_are_fp32_under_bf16_autocast(tmp_path):
    from pipeline.clip.backbone import load_backbone
    from pipeline.clip.contrastive import clip_loss, pad_ids

    bb = load_backbone(make_tiny_clip(tmp_path / "clip"), "cpu")
    with torch.no_grad():
        bb.model.logit_scale.fill_(4.6052)  # exp: 100, CLIP's cap
    ids, mask = pad_ids([bb.tokenize([t])[0] for t in ("a red circle", "a blue star",
                         "two green squares", "a cat")], bb.pad_token_id)  # fmt: skip
    pixels = torch.randn(
        4, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(1)
    )
    seen = {}

    def extra(out):  # the embeddings the logits come from, as the forward gave them
        seen["out"] = out
        return torch.zeros(())

    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = clip_loss(bb.model, ids, mask, pixels, extra)
        out = seen["out"]
        t, i = out.text_embeds.float(), out.image_embeds.float()
        logits = t @ i.T * bb.model.logit_scale.exp().float()
        target = torch.arange(4)
        ce = torch.nn.functional.cross_entropy
        want = (ce(logits.T, target) + ce(logits, target)) / 2
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want.item()) < 1e-4
