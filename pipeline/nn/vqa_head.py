"""VQA_CLIP head: fuse cached CLIP image + question embeddings, predict an answer embedding.

The source paper (section 2.2) puts a fully connected classifier with ReLU and dropout on
top of CLIP's image and question embeddings and trains it with a cosine-similarity loss
between the (normalised) prediction and the (normalised) CLIP text embedding of the
answer. Here the head's output lives in that answer-embedding space, so answering is a
nearest-neighbour search over the answer vocabulary's embeddings, and the same scores
(scaled cosines to every answer) are the logits of the optional cross-entropy loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from pipeline.errors import UserError
from pipeline.readers import read_json
from pipeline.training import CONFIG_FILE, WEIGHTS_FILE, save_model_folder

Fusion = Literal["concat", "product", "both"]  # [i, q] | i*q | [i, q, i*q]
Loss = Literal["cosine", "ce", "both"]  # 1 - cos to the answer (paper) | softmax CE | sum
FUSIONS: tuple[str, ...] = get_args(Fusion)
LOSSES: tuple[str, ...] = get_args(Loss)
VOCAB_KEY = "vocab.answer_emb"  # answer embeddings stored beside the weights


@dataclass
class VQAHeadConfig:
    """Everything needed to rebuild a `VQAHead` (saved as config.json["head"])."""

    dim: int  # CLIP embedding size of image and question inputs
    out_dim: int  # answer-embedding size (the CLIP text embedding size)
    fusion: Fusion  # concat [i, q] | product i*q | both [i, q, i*q]
    hidden: list[int]  # widths of the hidden layers (Linear -> ReLU -> Dropout each)
    dropout: float  # after each hidden layer

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise UserError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        self.hidden = [int(h) for h in self.hidden]
        if any(h <= 0 for h in self.hidden):
            raise UserError(f"hidden sizes must be positive, got {self.hidden}")

    @property
    def fused_dim(self) -> int:
        return {"concat": 2, "product": 1, "both": 3}[self.fusion] * self.dim


def fuse(image: torch.Tensor, question: torch.Tensor, fusion: str) -> torch.Tensor:
    """Combine (n, d) image and question embeddings into one (n, k*d) vector."""
    if fusion == "concat":
        return torch.cat([image, question], dim=-1)
    if fusion == "product":
        return image * question
    return torch.cat([image, question, image * question], dim=-1)


class VQAHead(nn.Module):
    """Fusion -> [Linear -> ReLU -> Dropout] x len(hidden) -> Linear to the answer space."""

    def __init__(self, config: VQAHeadConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.fused_dim
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(config.dropout)]
            width = h
        layers.append(nn.Linear(width, config.out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """(n, d) image and question embeddings -> (n, out_dim) predicted answer embedding."""
        return self.mlp(fuse(image, question, self.config.fusion))


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(pred, target), both L2-normalised (the paper's loss)."""
    pred = F.normalize(pred.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return (1.0 - (pred * target).sum(dim=-1)).mean()


def answer_logits(pred: torch.Tensor, answer_emb: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled cosine similarity of each prediction to every answer: (n, n_answers)."""
    pred = F.normalize(pred.float(), dim=-1)
    answers = F.normalize(answer_emb.float(), dim=-1)
    return scale * pred @ answers.T


def ce_loss(
    pred: torch.Tensor, answer_emb: torch.Tensor, labels: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax cross-entropy over the vocabulary with logits = scale * cosine."""
    return F.cross_entropy(answer_logits(pred, answer_emb, scale), labels)


def vqa_loss(
    kind: str,
    pred: torch.Tensor,
    answer_emb: torch.Tensor,
    labels: torch.Tensor,
    scale: float = 20.0,
) -> torch.Tensor:
    """`cosine` (to the label's answer embedding), `ce`, or `both` (their sum)."""
    if kind not in LOSSES:
        raise UserError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
    total = pred.new_zeros((), dtype=torch.float32)
    if kind in ("cosine", "both"):
        total = total + cosine_loss(pred, answer_emb[labels])
    if kind in ("ce", "both"):
        total = total + ce_loss(pred, answer_emb, labels, scale)
    return total


def save_head(
    model: VQAHead, folder: str | Path, answer_emb: torch.Tensor, meta: dict[str, Any]
) -> None:
    """Write model.safetensors (fp32 weights + the answer embeddings) and config.json.

    `meta` (answer list, qtype candidates, CLIP model id, training settings) is stored
    next to the head config so that `load_head` + the CLIP named there can answer alone.
    """
    tensors = {k: v.detach().float() for k, v in model.state_dict().items()}
    tensors[VOCAB_KEY] = answer_emb.detach().float()
    save_model_folder(folder, tensors, {"head": asdict(model.config), **meta})


def load_head(folder: str | Path) -> tuple[VQAHead, torch.Tensor, dict[str, Any]]:
    """Rebuild a saved head (eval mode, CPU) -> (head, answer_emb (n, d), config dict)."""
    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for p in (cfg_path, weights):
        if not p.exists():
            raise UserError(f"not a trained VQA model folder (missing {p.name}): {folder}")
    config = read_json(cfg_path)
    try:
        head_config = VQAHeadConfig(**config["head"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"{cfg_path}: not a VQA model config ({exc})") from None
    model = VQAHead(head_config)
    tensors = load_file(str(weights))
    answer_emb = tensors.pop(VOCAB_KEY)
    model.load_state_dict(tensors)
    model.eval()
    return model, answer_emb, config
