"""Small CLIP checkpoints in the standard Hugging Face layout: config, build, save, copy.

`ClipModelConfig` is the architecture of the small CLIP that `clip_bootstrap` trains from
scratch (params `clip_bootstrap.model`); `hf_clip_config` turns it into a `CLIPConfig`.
A folder written by `save_checkpoint` holds `config.json`, `model.safetensors`,
`tokenizer.json`, `tokenizer_config.json` and `preprocessor_config.json`, and
`load_backbone` opens it like any hub checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.clip.backbone import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Backbone,
    quiet_transformers,
    weight_files,
)
from pipeline.settings import check

# What a checkpoint folder may hold; a pass-through copies these (plus weight shards).
CHECKPOINT_FILES = (
    "config.json", "model.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "preprocessor_config.json", "pytorch_model.bin.index.json",
    "open_clip.json",  # provenance of a converted open_clip checkpoint (convert-open-clip)
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ClipModelConfig:
    """A small CLIP: the same width / layers / heads in both towers (quick-GELU, MLP 4x)."""

    vocab_size: int = 2000  # BPE vocabulary trained on the captions (at most; specials incl.)
    context_length: int = 32  # text positions, BOS and EOS included
    width: int = 128  # hidden size of both towers
    layers: int = 2  # transformer layers of each tower
    heads: int = 4  # attention heads (must divide width)
    image_size: int = 64  # input pixels per side
    patch_size: int = 16  # ViT patch side (must divide image_size); 16 tokens at 64 px
    projection_dim: int = 128  # shared image/text embedding size

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check(getattr(self, field.name) >= 1, field.name, "must be >= 1")
        check(self.width % self.heads == 0, "heads", f"must divide width ({self.width})")
        check(self.image_size % self.patch_size == 0, "patch_size",
              f"must divide image_size ({self.image_size})")  # fmt: skip


def hf_clip_config(
    model: ClipModelConfig,
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
):
    """The `CLIPConfig` of `model` for a tokenizer of `vocab_size` ids (the trained one's).

    transformers 5 checks that `heads` divides `width`; token ids must lie in the vocab
    and EOS must not be id 2 (that selects the legacy argmax pooling).
    """
    from transformers import CLIPConfig

    if not all(0 <= t < vocab_size for t in (bos_token_id, eos_token_id, pad_token_id)):
        raise ValueError("bos/eos/pad token ids must lie inside the vocabulary")
    if eos_token_id == 2:
        raise ValueError("eos_token_id 2 selects transformers' legacy CLIP pooling; use another id")
    common = {
        "hidden_size": model.width,
        "intermediate_size": 4 * model.width,
        "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads,
        "hidden_act": "quick_gelu",
        "projection_dim": model.projection_dim,
    }
    text = {
        **common,
        "vocab_size": vocab_size,
        "max_position_embeddings": model.context_length,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    vision = {**common, "image_size": model.image_size, "patch_size": model.patch_size}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=model.projection_dim)


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


def build_scratch_checkpoint(
    texts: list[str], model: ClipModelConfig, folder: str | Path, seed: int
) -> Path:
    """Train the tokenizer on `texts`, build a random small CLIP (torch seeded with `seed`),
    save both to `folder`."""
    from transformers import CLIPModel

    from pipeline.clip.tokenizer import BOS, EOS, PAD, save_tokenizer, train_tokenizer

    tok = train_tokenizer(texts, vocab_size=model.vocab_size)
    config = hf_clip_config(
        model,
        vocab_size=tok.get_vocab_size(),
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
    )
    torch.manual_seed(seed)
    clip = CLIPModel(config)
    return save_checkpoint(
        clip, lambda f: save_tokenizer(tok, f, model.context_length), folder, model.image_size
    )


def save_backbone(bb: Backbone, folder: str | Path, image_settings_from: str) -> None:
    """Save a (trained) backbone's model and tokenizer to `folder`, with the image
    settings (`preprocessor_config.json`) of checkpoint `image_settings_from`."""
    from transformers.image_processing_base import ImageProcessingMixin

    from pipeline.atomic import write_json

    preprocessor, _ = ImageProcessingMixin.get_image_processor_dict(image_settings_from)
    with quiet_transformers():
        bb.model.save_pretrained(str(folder))
        bb.tokenizer.save_pretrained(str(folder))
    write_json(Path(folder) / "preprocessor_config.json", preprocessor)


def copy_checkpoint(src: str | Path, folder: str | Path) -> None:
    """Copy the checkpoint files of folder `src` (unchanged bytes) into `folder`: its
    `weight_files` and the CHECKPOINT_FILES beside them."""
    src, folder = Path(src), Path(folder)
    for name in CHECKPOINT_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
    for weights in weight_files(src):
        shutil.copy2(weights, folder / weights.name)


@contextlib.contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`; on success it replaces `out` (the old
    contents removed only once the new are in place), on an error it is removed."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
