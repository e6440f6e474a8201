"""Building and saving small CLIP checkpoints in the standard Hugging Face layout.

A folder written by `save_checkpoint` holds `config.json`, `model.safetensors`,
`tokenizer.json`, `tokenizer_config.json` and `preprocessor_config.json`, and
`load_backbone` opens it like any hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.clip.backbone import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, quiet_transformers


def small_clip_config(
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    context_length: int = 32,
    width: int = 128,
    layers: int = 2,
    heads: int = 4,
    image_size: int = 64,
    patch_size: int = 8,
    projection_dim: int = 128,
):
    """A CLIPConfig with the same `width` / `layers` / `heads` in both towers.

    transformers 5 checks that `heads` divides `width`; token ids must lie in the vocab
    and EOS must not be id 2 (that selects the legacy argmax pooling).
    """
    from transformers import CLIPConfig

    if width % heads:
        raise ValueError(f"heads ({heads}) must divide width ({width})")
    if image_size % patch_size:
        raise ValueError(f"patch_size ({patch_size}) must divide image_size ({image_size})")
    if not all(0 <= t < vocab_size for t in (bos_token_id, eos_token_id, pad_token_id)):
        raise ValueError("bos/eos/pad token ids must lie inside the vocabulary")
    if eos_token_id == 2:
        raise ValueError("eos_token_id 2 selects transformers' legacy CLIP pooling; use another id")
    common = {
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": "quick_gelu",
        "projection_dim": projection_dim,
    }
    text = {
        **common,
        "vocab_size": vocab_size,
        "max_position_embeddings": context_length,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    vision = {**common, "image_size": image_size, "patch_size": patch_size}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_image_settings(
    folder: str | Path, image_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD
) -> None:
    """Write `preprocessor_config.json` for a CLIPImageProcessor at `image_size`."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean),
        image_std=list(std),
    )
    proc.save_pretrained(str(folder))


def save_checkpoint(model, tokenizer_folder_writer, folder: str | Path, image_size: int) -> Path:
    """Save `model` (safetensors), the tokenizer files and the image settings to `folder`.

    `tokenizer_folder_writer(folder)` writes the tokenizer files (e.g. a tokenizer's
    `save_pretrained`, or `pipeline.clip.tokenizer.save_tokenizer`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(str(folder))
    tokenizer_folder_writer(folder)
    save_image_settings(folder, image_size)
    return folder
