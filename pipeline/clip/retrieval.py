"""Image <-> text retrieval on held-out pairs: recall@k both ways and the contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.clip.backbone import Backbone, normalize_pixels
from pipeline.clip.pairs import PairSet

# How the numbers are computed (the detail metrics file records it).
HOW = (
    "held-out LAION pairs (seeded split, fraction {fraction}, seed {seed}), "
    "first caption per image, cosine similarity of L2-normalised embeddings; "
    "rank = number of candidates scoring strictly higher; chance r@k = k/n; "
    "loss = symmetric contrastive loss over all held-out pairs as one batch"
)


def recall_at_k(img: torch.Tensor, txt: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Recall@k of matched rows (pair i = image i, text i) in both directions.

    The rank of the true match is the number of candidates scoring strictly higher.
    """
    sim = img @ txt.T
    diag = sim.diagonal()
    rank_i2t = (sim > diag[:, None]).sum(dim=1)
    rank_t2i = (sim > diag[None, :]).sum(dim=0)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((rank_i2t < k).float().mean())
        out[f"t2i_r{k}"] = float((rank_t2i < k).float().mean())
    return out


def evaluate(bb: Backbone, held: PairSet, held_ids: list[list[int]]) -> dict[str, float]:
    """Recall@1/@5 both ways and the contrastive loss (one batch of all held-out pairs)."""
    model = bb.model
    was_training = model.training
    model.eval()
    pix = normalize_pixels(held.pixels, bb.mean, bb.std)
    img = torch.cat([bb.encode_images(pix[i : i + 256]) for i in range(0, len(held), 256)])
    txt = torch.cat([bb.encode_token_ids(held_ids[i : i + 256]) for i in range(0, len(held), 256)])
    scale = float(model.logit_scale.detach().exp())
    logits = scale * img @ txt.T
    target = torch.arange(len(held))
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    model.train(was_training)
    return {
        "loss": round(float(loss), 6),
        **{k: round(v, 6) for k, v in recall_at_k(img, txt).items()},
    }
