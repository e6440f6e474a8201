"""VQA_CLIP head: fuse cached CLIP image + question embeddings, score every vocabulary answer.

The source paper (section 1.1) models P(A | I, Q) = softmax(W v_{I,Q} + b) over the answer
vocabulary; its VQA_CLIP (section 2.2) puts a fully connected network with ReLU and
dropout on CLIP's image and question embeddings and trains it with a cosine-similarity
loss between the (normalised) prediction and the (normalised) CLIP text embedding of the
answer. This head has both outputs on one trunk:

    x = LayerNorm([v_I, v_Q])                      (input_norm; CLIP embeddings are unit
    h = [Linear -> ReLU -> Dropout] x len(hidden)   vectors: components ~ 1/sqrt(d))
    logits = W h + b                    (n_answers > 0: the classifier, loss `ce`)
    e = P h                             (answer_embedding: the answer space, loss `cosine`)

Answers are ranked by the classifier's logits when there is one, else by the cosine of
`e` to each answer's text embedding (nearest neighbour). `both` trains both outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from pipeline.errors import UserError
from pipeline.readers import read_json
from pipeline.training import CONFIG_FILE, WEIGHTS_FILE, save_model_folder

Fusion = Literal["concat", "product", "both"]  # [i, q] | i*q | [i, q, i*q]
Loss = Literal["cosine", "ce", "both"]  # 1 - cos to the answer (paper) | softmax CE | sum
InputNorm = Literal["none", "layernorm"]  # the fused input as is | LayerNorm (affine)
FUSIONS: tuple[str, ...] = get_args(Fusion)
LOSSES: tuple[str, ...] = get_args(Loss)
INPUT_NORMS: tuple[str, ...] = get_args(InputNorm)
VOCAB_KEY = "vocab.answer_emb"  # answer embeddings stored beside the weights


@dataclass
class VQAHeadConfig:
    """Everything needed to rebuild a `VQAHead` (saved as config.json["head"])."""

    dim: int  # CLIP embedding size of image and question inputs
    out_dim: int  # answer-embedding size (the CLIP text embedding size)
    fusion: Fusion  # concat [i, q] | product i*q | both [i, q, i*q]
    hidden: list[int]  # widths of the hidden layers (Linear -> ReLU -> Dropout each)
    dropout: float  # after each hidden layer
    n_answers: int = 0  # classifier W h + b over this many answers (0: none)
    answer_embedding: bool = True  # output layer into the answer-embedding space
    input_norm: InputNorm = "none"  # LayerNorm of the fused input, or none

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise UserError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.input_norm not in INPUT_NORMS:
            raise UserError(
                f"input_norm must be one of {', '.join(INPUT_NORMS)}, got {self.input_norm!r}"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        self.hidden = [int(h) for h in self.hidden]
        if any(h <= 0 for h in self.hidden):
            raise UserError(f"hidden sizes must be positive, got {self.hidden}")
        if self.n_answers < 0 or (self.n_answers == 0 and not self.answer_embedding):
            raise UserError("a VQA head needs a classifier (n_answers > 0) or an answer embedding")

    @property
    def fused_dim(self) -> int:
        return {"concat": 2, "product": 1, "both": 3}[self.fusion] * self.dim


def head_config(
    dim: int, out_dim: int, fusion: str, hidden, dropout: float, loss: str, n_answers: int,
    input_norm: str = "none",
) -> VQAHeadConfig:  # fmt: skip
    """The head a loss trains: a classifier for `ce` / `both`, the answer-embedding output
    for `cosine` / `both` (no layer the loss leaves untrained, which DDP would reject)."""
    if loss not in LOSSES:
        raise UserError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    return VQAHeadConfig(
        dim, out_dim, fusion, list(hidden), dropout,  # type: ignore[arg-type]
        n_answers=n_answers if loss in ("ce", "both") else 0,
        answer_embedding=loss in ("cosine", "both"),
        input_norm=input_norm,  # type: ignore[arg-type]
    )  # fmt: skip


def fuse(image: torch.Tensor, question: torch.Tensor, fusion: str) -> torch.Tensor:
    """Combine (n, d) image and question embeddings into one (n, k*d) vector."""
    if fusion == "concat":
        return torch.cat([image, question], dim=-1)
    if fusion == "product":
        return image * question
    return torch.cat([image, question, image * question], dim=-1)


class HeadOutput(NamedTuple):
    embedding: torch.Tensor | None  # (n, out_dim) predicted answer embedding
    logits: torch.Tensor | None  # (n, n_answers) classifier logits


class VQAHead(nn.Module):
    """Fusion -> input norm -> [Linear -> ReLU -> Dropout] x len(hidden) -> classifier
    and/or a Linear into the answer-embedding space (see the module docstring)."""

    def __init__(self, config: VQAHeadConfig):
        super().__init__()
        self.config = config
        width = config.fused_dim
        self.norm = nn.LayerNorm(width) if config.input_norm == "layernorm" else nn.Identity()
        layers: list[nn.Module] = []
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(config.dropout)]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, config.n_answers) if config.n_answers else None
        self.to_answer = nn.Linear(width, config.out_dim) if config.answer_embedding else None

    def forward(self, image: torch.Tensor, question: torch.Tensor) -> HeadOutput:
        """(n, d) image and question embeddings -> predicted answer embedding and logits
        (each None when the head lacks that output)."""
        h = self.trunk(self.norm(fuse(image, question, self.config.fusion)))
        return HeadOutput(
            self.to_answer(h) if self.to_answer is not None else None,
            self.classifier(h) if self.classifier is not None else None,
        )

    def scores(
        self, image: torch.Tensor, question: torch.Tensor, answer_emb: torch.Tensor
    ) -> torch.Tensor:
        """(n, n_answers) ranking scores: classifier logits, or (cosine head) the cosine of
        the predicted embedding to each answer embedding."""
        return answer_scores(self(image, question), answer_emb)


def answer_scores(out: HeadOutput, answer_emb: torch.Tensor) -> torch.Tensor:
    """Scores that rank the answers: the logits if the head has a classifier, else cosines."""
    if out.logits is not None:
        return out.logits.float()
    assert out.embedding is not None
    pred = F.normalize(out.embedding.float(), dim=-1)
    return pred @ F.normalize(answer_emb.float(), dim=-1).T


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(pred, target), both L2-normalised (the paper's loss)."""
    pred = F.normalize(pred.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return (1.0 - (pred * target).sum(dim=-1)).mean()


def vqa_loss(
    kind: str, out: HeadOutput, answer_emb: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """`cosine` (of the predicted embedding to the label's answer embedding), `ce` (softmax
    cross-entropy of the classifier's logits), or `both` (their sum)."""
    if kind not in LOSSES:
        raise UserError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
    total = answer_emb.new_zeros((), dtype=torch.float32)
    if kind in ("cosine", "both"):
        if out.embedding is None:
            raise UserError(f"loss {kind} needs a head with an answer-embedding output")
        total = total + cosine_loss(out.embedding, answer_emb[labels])
    if kind in ("ce", "both"):
        if out.logits is None:
            raise UserError(f"loss {kind} needs a head with a classifier")
        total = total + F.cross_entropy(out.logits.float(), labels)
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
    answer_emb = tensors.pop(VOCAB_KEY, None)
    try:
        if answer_emb is None:
            raise RuntimeError(f"no {VOCAB_KEY}")
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(
            f"{weights} does not match its config.json ({first}): re-run train_vqa"
        ) from None
    model.eval()
    return model, answer_emb, config
