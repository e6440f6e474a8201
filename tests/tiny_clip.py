"""A tiny random CLIP checkpoint in the standard Hugging Face layout, for tests (seconds)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "a an the red green blue yellow white black circle square triangle star dog cat man "
    "woman on in under near next to of with and is are two three small large photo "
    "picture sofa mattress table chair orange what relationship between this"
)


def make_tiny_clip(folder: str | Path, image_size: int = 32, context_length: int = 16) -> Path:
    """Save a tiny random CLIP (width 32, 2 layers, 2 heads, patch 8) to `folder`.

    Deterministic: the same folder contents (and weights hash) on every call; torch's
    global generator is left as it was.
    """
    from pipeline.clip.checkpoint import ClipModelConfig, build_scratch_checkpoint

    model = ClipModelConfig(
        vocab_size=300,
        context_length=context_length,
        width=32,
        layers=2,
        heads=2,
        image_size=image_size,
        patch_size=8,
        projection_dim=16,
    )
    texts = [WORDS, "a red circle on a blue square.", "what is this?"]
    with torch.random.fork_rng(devices=[]):
        return build_scratch_checkpoint(texts, model, folder, seed=0)
