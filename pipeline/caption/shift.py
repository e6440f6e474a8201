"""The offset control: every Flickr30k (target-domain) image embedding moved by one fixed
vector, a setting of the caption stages (params `target_shift`).

The offset has length `norm` and lies in the span of `directions` random orthonormal
directions (a seeded Gaussian matrix's QR factor; their normalised sum). It is applied to
what the decoders and the nearest-neighbour baseline read, in training (train, val and
target images) and in evaluation (test and the baseline's train images) alike; CLIPScore
keeps the CLIP's own embeddings. A shared adapter becomes invariant to a constant offset by
mapping it to zero, so aligned features lose nothing here: the simplest setting in which
domain-adversarial training should beat no adaptation (issue 20's positive control).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from pipeline.errors import UserError
from pipeline.settings import check


@dataclasses.dataclass(frozen=True)
class TargetShift:
    """The offset control's shift of the target-domain image embeddings."""

    SECTION: ClassVar[str] = "target_shift"
    directions: int = 0  # random directions the offset spans (0: no shift)
    norm: float = 1.0  # its length (CLIP image embeddings have length 1)
    seed: int = 0  # top-level `seed`: the directions

    def __post_init__(self) -> None:
        check(self.directions >= 0, "directions", "must be >= 0 (0: no shift)")
        check(self.norm >= 0, "norm", "must be >= 0")

    def offset(self, dim: int) -> np.ndarray | None:
        """The (dim,) float32 offset, or None when off."""
        if not self.directions or not self.norm:
            return None
        if self.directions > dim:
            raise UserError(f"target_shift.directions: {self.directions} must be <= the "
                            f"embedding width {dim}")  # fmt: skip
        gauss = np.random.default_rng([self.seed, 2020]).normal(size=(dim, self.directions))
        q, _ = np.linalg.qr(gauss)
        v = q.sum(1)
        return (self.norm * v / np.linalg.norm(v)).astype(np.float32)

    def apply(self, x):
        """`x` (numpy or torch, (n, dim)) plus the offset; `x` itself when off."""
        o = self.offset(int(x.shape[1]))
        if o is None:
            return x
        if isinstance(x, np.ndarray):
            return (x.astype(np.float32) + o).astype(np.float32)
        import torch

        return x + torch.from_numpy(o).to(device=x.device, dtype=x.dtype)
