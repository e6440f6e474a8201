"""Embedding-space caption decoder: CLIP image embedding -> next-token *embeddings*.

Architecture (source paper section 2.3; prefix conditioning as in ClipCap, Mokady et al.
2021, arXiv:2111.09734):

- adapter: MLP mapping the CLIP image embedding to a prefix of `prefix_len` vectors of
  size `width` (these are the features the domain discriminator sees);
- the caption's tokens are embedded with the CLIP text model's token-embedding table,
  frozen and stored in the model (`token_table`), projected to `width`;
- with `domain_token`, a learned vector per domain (SOURCE: LAION, TARGET: Flickr30k)
  follows the prefix, after the gradient reversal (the discriminator never sees it); the
  captions of each domain are trained with their own, and captions are made with TARGET's;
- a causal Transformer decoder (pre-LayerNorm GPT blocks; `layers`, `heads`, `dropout`)
  reads `[prefix ; (domain) ; BOS t1 ... t_{n-1}]`;
- a projection maps each output to the token-embedding space: the prediction for the
  next token's embedding.

Losses (`loss`): `mse` between predicted and actual next-token embedding (the paper's),
`cosine` (1 - cosine similarity), `ce` (cross-entropy over logits = cosine similarity
with every row of the tied table / `ce_temperature`); padding is masked. `aux_ce > 0`
adds that weight times the `ce` loss to `mse`/`cosine`. `target_norm` makes the
regression targets the unit-normalised table rows times `target_scale` (raw rows
otherwise); the default scale sqrt(token_width) gives the targets unit-variance
components, so the elementwise `mse` equals the squared distance of unit vectors
(≈ 2·(1 - cos)) and its gradients are on the scale of the domain loss's, whatever the
width. (With raw CLIP rows, whose norms differ, the L2 nearest neighbour of an averaged
prediction is a small-norm "hub" row, and greedy captions collapse; see the stage's
report.) Decoding (`pipeline.caption.decode`) maps each prediction to its nearest table row in
the same space the loss measured it in (`search_space`).

Configuration: `DecoderSettings` is what a user chooses (params `train_caption.model`,
whose defaults it holds); `DecoderConfig` adds what the data fixes (embedding size, token
table shape, special ids) and is saved as `config.json["model"]` beside the weights.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from pipeline.errors import UserError
from pipeline.readers import read_json
from pipeline.settings import SettingError, check
from pipeline.training import CONFIG_FILE, WEIGHTS_FILE, save_model_folder

LOSSES = ("mse", "cosine", "ce")
KV = tuple[torch.Tensor, torch.Tensor]  # one block's cached keys and values


SOURCE, TARGET = 0, 1  # domain ids (LAION, Flickr30k) of the domain token


@dataclasses.dataclass(frozen=True)
class DecoderSettings:
    """What the user chooses: params `train_caption.model` (defaults: the sample-world run;
    real scale: width 512, layers 6, heads 8, prefix_len 10)."""

    width: int = 128  # Transformer width (adapter output and residual stream)
    layers: int = 2  # Transformer blocks
    heads: int = 4  # attention heads per block (must divide width)
    mlp_ratio: int = 4  # MLP hidden size / width
    prefix_len: int = 4  # image prefix vectors the adapter makes (the discriminator's input)
    max_len: int = 32  # caption tokens incl. BOS and EOS (longer captions are cut)
    dropout: float = 0.2  # dropout in the blocks and after the embeddings (chosen on
    # validation over 3 seeds against 0 and 0.1: docs/results.md, "Regularisation")
    loss: Literal["mse", "cosine", "ce"] = "ce"  # caption loss (mse: the paper's; docs/results.md)
    target_norm: bool = True  # regress unit-normalised token rows (raw rows if false)
    target_scale: float | None = None  # scale of the targets; null: sqrt(token width)
    ce_temperature: float = 0.05  # temperature of the ce logits (and of beam scores)
    aux_ce: float = 0.0  # weight of an auxiliary ce loss added to mse / cosine
    domain_token: bool = True  # a learned per-domain vector after the prefix (target at test)

    def __post_init__(self) -> None:
        for key in ("width", "layers", "heads", "mlp_ratio", "prefix_len"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        check(self.width % self.heads == 0, "heads",
              f"width {self.width} is not divisible by heads {self.heads}")  # fmt: skip
        check(self.max_len >= 3, "max_len", "must be >= 3 (BOS, a token, EOS)")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        check(self.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}")
        check(self.target_scale is None or self.target_scale > 0, "target_scale", "must be > 0")
        check(self.ce_temperature > 0, "ce_temperature", "must be > 0")
        check(self.aux_ce >= 0, "aux_ce", "must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig(DecoderSettings):
    """Everything needed to rebuild a `CaptionDecoder`: the user's `DecoderSettings` plus
    what the data fixes (the CLIP embedding size and token table, its special ids).

    Saved as `config.json["model"]` beside the weights and rebuilt from it. A
    `target_scale` of None is resolved here: sqrt(token_width) with `target_norm`, else 1.
    """

    image_dim: int  # CLIP image embedding size
    vocab_size: int  # token table rows
    token_width: int  # token table columns
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("image_dim", "vocab_size", "token_width"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            check(0 <= getattr(self, key) < self.vocab_size, key, "must be a row of the table")
        if self.target_scale is None:
            scale = math.sqrt(self.token_width) if self.target_norm else 1.0
            object.__setattr__(self, "target_scale", scale)

    @classmethod
    def for_data(
        cls,
        settings: DecoderSettings,
        *,
        image_dim: int,
        token_table: torch.Tensor,
        bos_token_id: int,
        eos_token_id: int,
        pad_token_id: int,
    ) -> DecoderConfig:
        """`settings` completed with what the embeddings and their token table fix."""
        return cls(
            **dataclasses.asdict(settings),
            image_dim=image_dim,
            vocab_size=token_table.shape[0],
            token_width=token_table.shape[1],
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )


class Block(nn.Module):
    """Pre-LN Transformer block with causal self-attention (nanoGPT style)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, mlp_ratio * width)
        self.fc_out = nn.Linear(mlp_ratio * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cached(x, None)[0]

    def cached(self, x: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        """The block on the new positions `x` (B, t, C), attending to the cached keys and
        values `past` of the earlier positions (None: none, causal over `x`); the output
        and the keys and values of all positions so far (B, heads, T, C / heads)."""
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        p = self.dropout if self.training else 0.0
        # one new position attends to every earlier one: no mask needed
        y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None, dropout_p=p)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(x))))), (k, v)


class CaptionDecoder(nn.Module):
    """Prefix-conditioned causal decoder predicting next-token embeddings (see module doc)."""

    def __init__(self, config: DecoderConfig, token_table: torch.Tensor | None = None):
        super().__init__()
        cfg = self.config = config
        v, tw, w, k = cfg.vocab_size, cfg.token_width, cfg.width, cfg.prefix_len
        if token_table is None:
            token_table = torch.zeros(v, tw)
        if tuple(token_table.shape) != (v, tw):
            raise UserError(f"token table is {tuple(token_table.shape)}, config says ({v}, {tw})")
        self.register_buffer("token_table", token_table.detach().float().clone())
        self.register_buffer("unit_table", torch.empty(0), persistent=False)
        self.register_buffer("target_table", torch.empty(0), persistent=False)
        self._refresh_tables()
        self.register_load_state_dict_post_hook(lambda mod, _keys: mod._refresh_tables())

        hidden = max(w, (k * w) // 2)
        self.adapter = nn.Sequential(
            nn.Linear(cfg.image_dim, hidden), nn.GELU(), nn.Linear(hidden, k * w)
        )
        self.tok_in = nn.Linear(tw, w)
        n_domain = 1 if cfg.domain_token else 0
        if cfg.domain_token:  # rows SOURCE and TARGET
            self.domain = nn.Parameter(torch.zeros(2, w))
        self.pos = nn.Parameter(torch.zeros(k + n_domain + cfg.max_len, w))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(w, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.layers)
        )
        self.ln_f = nn.LayerNorm(w)
        self.head = nn.Linear(w, tw)
        self._init_weights()

    # -- weights -------------------------------------------------------------------------
    def _init_weights(self) -> None:
        std_res = 0.02 / math.sqrt(2 * self.config.layers)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                std = std_res if name.endswith(("proj", "fc_out")) else 0.02
                nn.init.normal_(mod.weight, 0.0, std)
                nn.init.zeros_(mod.bias)
        nn.init.normal_(self.pos, 0.0, 0.02)
        if self.config.domain_token:
            nn.init.normal_(self.domain, 0.0, 0.02)

    @torch.no_grad()
    def _refresh_tables(self) -> None:
        """Derived, non-persistent copies of the frozen table (unit rows; loss targets)."""
        self.unit_table = F.normalize(self.token_table, dim=-1)
        base = self.unit_table if self.config.target_norm else self.token_table
        self.target_table = base * float(self.config.target_scale)

    @property
    def search_space(self) -> str:
        """'l2' (nearest target row by L2, for mse) or 'ip' (cosine, for cosine / ce)."""
        return "l2" if self.config.loss == "mse" else "ip"

    # -- forward -------------------------------------------------------------------------
    def prefix(self, image_emb: torch.Tensor) -> torch.Tensor:
        """Adapter: (B, image_dim) -> (B, prefix_len, width); input scaled to unit variance."""
        x = image_emb.to(self.pos.dtype) * math.sqrt(self.config.image_dim)
        return self.adapter(x).view(len(x), self.config.prefix_len, self.config.width)

    def context(self, image_emb: torch.Tensor, domain: torch.Tensor | int = TARGET) -> torch.Tensor:
        """What the decoder reads before the tokens: the prefix, then with `domain_token`
        the domain's vector (`domain`: one id, or one per row; SOURCE 0, TARGET 1). The
        discriminator sees `prefix` only: the token comes after the gradient reversal."""
        p = self.prefix(image_emb)
        if not self.config.domain_token:
            return p
        d = self.domain[torch.as_tensor(domain, device=p.device)].to(p.dtype)
        return torch.cat([p, d.expand(len(p), -1).unsqueeze(1)], dim=1)

    def decode(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Predicted next-token embeddings (B, T, token_width) for input tokens (B, T)."""
        k, t = prefix.shape[1], tokens.shape[1]
        if k + t > self.pos.shape[0]:
            raise ValueError(f"sequence of {t} tokens exceeds max_len {self.config.max_len}")
        emb = F.normalize(self.token_table[tokens], dim=-1) * math.sqrt(self.config.token_width)
        x = torch.cat([prefix, self.tok_in(emb)], dim=1) + self.pos[: k + t]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, k:]))

    def forward(
        self, image_emb: torch.Tensor, tokens: torch.Tensor, domain: torch.Tensor | int = TARGET
    ) -> torch.Tensor:
        return self.decode(self.context(image_emb, domain), tokens)

    def decode_step(
        self, prefix: torch.Tensor | None, tokens: torch.Tensor, cache: list[KV] | None
    ) -> tuple[torch.Tensor, list[KV]]:
        """Incremental decoding with a key/value cache: the prediction (B, token_width)
        after the last of `tokens` and the new cache. The first call gives the prefix and
        the tokens so far (cache None); each later call one new token (B, 1) and the
        cache it returned (rows reordered as the hypotheses were: `reorder_cache`)."""
        emb = F.normalize(self.token_table[tokens], dim=-1) * math.sqrt(self.config.token_width)
        x = self.tok_in(emb)
        if cache is None:
            assert prefix is not None
            x = torch.cat([prefix, x], dim=1)
        start = 0 if cache is None else cache[0][0].shape[2]
        if start + x.shape[1] > self.pos.shape[0]:
            raise ValueError(f"sequence exceeds max_len {self.config.max_len}")
        x = self.drop(x + self.pos[start : start + x.shape[1]])
        new = []
        for i, block in enumerate(self.blocks):
            x, kv = block.cached(x, None if cache is None else cache[i])
            new.append(kv)
        return self.head(self.ln_f(x[:, -1])), new

    # -- loss ----------------------------------------------------------------------------
    def ce_logits(self, pred: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to every table row / ce_temperature: (..., vocab), in fp32 even
        under autocast (bf16 would be off by up to ~0.08 at temperature 0.05)."""
        with torch.autocast(pred.device.type, enabled=False):
            pred = F.normalize(pred.float(), dim=-1)
            return pred @ self.unit_table.T / float(self.config.ce_temperature)

    def caption_loss(
        self, pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Masked mean loss of predictions (B, T, tw) against target ids (B, T)."""
        pred, ids = pred[mask].float(), targets[mask]
        kind = self.config.loss
        if kind == "ce":
            return F.cross_entropy(self.ce_logits(pred), ids)
        tgt = self.target_table[ids]
        if kind == "mse":
            loss = F.mse_loss(pred, tgt)
        else:
            loss = (1.0 - F.cosine_similarity(pred, tgt, dim=-1)).mean()
        if self.config.aux_ce > 0:
            loss = loss + float(self.config.aux_ce) * F.cross_entropy(self.ce_logits(pred), ids)
        return loss


def reorder_cache(cache: list[KV], rows: torch.Tensor) -> list[KV]:
    """The cache of the hypotheses `rows` (indices into the cached batch), in that order."""
    return [(k[rows], v[rows]) for k, v in cache]


def split_batch(ids: torch.Tensor, lengths: torch.Tensor):
    """Teacher forcing: inputs ids[:, :-1], targets ids[:, 1:], mask of real targets."""
    inputs, targets = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(targets.shape[1], device=ids.device)
    mask = pos[None, :] < (lengths[:, None] - 1)
    return inputs, targets, mask


def save_caption_model(
    model: CaptionDecoder, folder: str | Path, extra: dict[str, Any] | None = None
) -> None:
    """`model.safetensors` (weights + frozen token table) and `config.json`: the model's
    `DecoderConfig` under "model", plus `extra` (what it was trained on)."""
    config = {"model": dataclasses.asdict(model.config), **(extra or {})}
    save_model_folder(folder, model.state_dict(), config)


def load_caption_model(folder: str | Path, device: str | torch.device = "cpu") -> CaptionDecoder:
    """Rebuild a `CaptionDecoder` from a folder written by `save_caption_model` (eval mode)."""
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise UserError(f"{folder} is not a caption model folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
    config = read_json(cfg_path).get("model")
    if not isinstance(config, dict):
        raise UserError(f"{cfg_path}: not a caption model config (no 'model' object)")
    try:
        config = DecoderConfig(**config)
    except TypeError as exc:
        raise UserError(f"{cfg_path}: not a caption model config ({exc})") from None
    except SettingError as exc:
        raise UserError(f"{cfg_path}: model.{exc.key}: {exc.message}") from None
    model = CaptionDecoder(config)
    model.load_state_dict(load_file(str(w_path)))
    return model.to(device).eval()


def read_model_info(folder: str | Path) -> dict[str, Any]:
    """The whole `config.json` of a model folder (model config + training metadata)."""
    return read_json(Path(folder) / CONFIG_FILE)
