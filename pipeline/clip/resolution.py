"""A CLIP checkpoint moved to another input resolution, as CLIP models are fine-tuned at a
higher one after training at a lower one (Radford et al. 2021 train ViT-L/14 one more epoch
at 336 px; Li et al. 2023, "An Inverse Scaling Law for CLIP Training", train at low
resolution and fine-tune at full resolution).

The patch size stays, so the patch grid grows; the vision tower's position embeddings
(one per patch, plus the class token's) are resized by bicubic interpolation over the
grid, and the image settings (`preprocessor_config.json`: resize and crop size) follow.
Every other weight is unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

POSITIONS = "vision_model.embeddings.position_embedding.weight"
POSITION_IDS = "vision_model.embeddings.position_ids"


def resize_positions(table: torch.Tensor, old_grid: int, new_grid: int) -> torch.Tensor:
    """(1 + old_grid², d) position table -> (1 + new_grid², d): the class token's row kept,
    the grid's rows interpolated bicubically."""
    cls, grid = table[:1], table[1:]
    if len(grid) != old_grid * old_grid:
        raise ValueError(f"{len(grid)} grid positions, expected {old_grid}x{old_grid}")
    grid = grid.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()
    grid = torch.nn.functional.interpolate(grid, size=(new_grid, new_grid), mode="bicubic",
                                           align_corners=False)  # fmt: skip
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(table.dtype)
    return torch.cat([cls, grid])


def resize_checkpoint(folder: str | Path, size: int) -> None:
    """Rewrite the Hugging Face CLIP checkpoint in `folder` (model.safetensors, config.json,
    preprocessor_config.json) for input images of `size` pixels."""
    from safetensors.torch import load_file, save_file

    from pipeline.atomic import write_json

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    vision = config["vision_config"]
    patch, old = int(vision["patch_size"]), int(vision["image_size"])
    if size % patch:
        raise ValueError(f"image size {size} is not a multiple of the patch size {patch}")
    weights = load_file(folder / "model.safetensors")
    weights[POSITIONS] = resize_positions(weights[POSITIONS], old // patch, size // patch)
    if POSITION_IDS in weights:
        weights[POSITION_IDS] = torch.arange(1 + (size // patch) ** 2).unsqueeze(0)
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    vision["image_size"] = size
    write_json(folder / "config.json", config)
    pre_path = folder / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text())
    for key in ("size", "crop_size"):
        value = pre.get(key)
        if isinstance(value, dict):
            pre[key] = dict.fromkeys(value, size)
        elif isinstance(value, int):
            pre[key] = size
    write_json(pre_path, pre)
