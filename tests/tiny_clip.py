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

    Deterministic: the same folder contents (and weights hash) on every call.
    """
    from transformers import CLIPModel

    from pipeline.clip.checkpoint import save_checkpoint, small_clip_config
    from pipeline.clip.tokenizer import BOS, EOS, PAD, save_tokenizer, train_tokenizer

    texts = [WORDS, "a red circle on a blue square.", "what is this?"]
    tok = train_tokenizer(texts, vocab_size=300)
    config = small_clip_config(
        vocab_size=tok.get_vocab_size(),
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        context_length=context_length,
        width=32,
        layers=2,
        heads=2,
        image_size=image_size,
        patch_size=8,
        projection_dim=16,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = CLIPModel(config).eval()
    finally:
        torch.random.set_rng_state(state)
    return save_checkpoint(
        model, lambda f: save_tokenizer(tok, f, context_length), folder, image_size
    )
