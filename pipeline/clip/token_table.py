"""The CLIP's token-embedding table: the caption decoder's input and output space.

It belongs to the CLIP, so there is one copy per CLIP folder: `clip_bootstrap` writes
`token_embedding.safetensors` (`weight`: (vocab, width) float32, tagged with the revision
of the weights beside it) into the folder it makes. `clip_token_table` gives the table of
any CLIP: the file when the folder holds one, else (a plain Hugging Face folder, a hub id)
the text model's embedding matrix read from the checkpoint. The embed manifests record the
table's `table_sha256`, so a reader can check that its table is the one the embeddings
were made with.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.atomic import atomic_path
from pipeline.clip.backbone import TOKEN_TABLE_FILE, Backbone, load_backbone, weights_sha256


def table_sha256(weight: torch.Tensor) -> str:
    """`sha256:<hex>` of the table's float32 values (row-major, little-endian bytes)."""
    data = weight.detach().to("cpu", torch.float32).contiguous().numpy()
    return "sha256:" + hashlib.sha256(data.astype("<f4", copy=False).tobytes()).hexdigest()


@dataclass(frozen=True)
class TokenTable:
    """A CLIP's token-embedding table and the revision of the weights it comes from."""

    weight: torch.Tensor  # (vocab, width) float32 on the CPU
    revision: str  # as `Backbone.revision`: "sha256:<hex>" of a folder's weights, hub commit

    @functools.cached_property
    def sha256(self) -> str:
        return table_sha256(self.weight)


def save_token_table(folder: str | Path, backbone: Backbone) -> None:
    """Write the table of `backbone` into the CLIP folder `folder` it was saved to (after
    the weights, whose revision tags it)."""
    from safetensors.torch import save_file

    weight = backbone.token_embedding().contiguous()
    meta = {"revision": weights_sha256(folder)}  # one key: safetensors orders keys arbitrarily
    with atomic_path(Path(folder) / TOKEN_TABLE_FILE) as tmp:
        save_file({"weight": weight}, str(tmp), metadata=meta)


def _read(path: Path) -> TokenTable | None:
    """The table file at `path` with its revision tag; None if absent, unreadable or untagged."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as fh:
            revision = (fh.metadata() or {}).get("revision")
            weight = fh.get_tensor("weight")
    except (OSError, SafetensorError):  # also: no "weight" tensor
        return None
    return None if revision is None else TokenTable(weight.float(), revision)


def clip_token_table(clip: str | Path) -> TokenTable:
    """The token table of the CLIP `clip` (a folder or a hub id): the folder's
    `token_embedding.safetensors` when it holds one, else read from the checkpoint."""
    table = _read(Path(clip).expanduser() / TOKEN_TABLE_FILE)
    if table is not None:
        return table
    bb = load_backbone(clip, device="cpu")
    return TokenTable(bb.token_embedding(), bb.revision)
