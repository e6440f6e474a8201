"""Domain discriminator and the domain-adversarial loss (DANN).

Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015
(arXiv:1409.7495): a discriminator classifies features as source (label 1) or target
(label 0); its features pass through a gradient-reversal layer (`pipeline.nn.grl`), so
minimising the one binary cross-entropy trains the discriminator and, reversed, makes
the features domain-invariant. The discriminator returns logits and the loss is
`binary_cross_entropy_with_logits` (numerically stable, unlike sigmoid + BCE).

In clipda: source = LAION, target = Flickr30k, features = the caption decoder's
adapter output (the image prefix, flattened).

Simultaneous gradient steps on this min-max game need not converge: with Adam on both
players the features can spiral away (on issue 20's offset control the prefix distance
between the domains grew ~100x within an epoch while the discriminator kept flipping;
Mescheder et al. 2018, "Which Training Methods for GANs do actually Converge?",
arXiv 1801.04406, show the same for unregularised GANs). `penalty` adds their zero-centred
gradient penalty (R1, here on the rows of both domains): γ/2 · E‖∇_f D(f)‖², which trains
the discriminator alone and makes the game converge locally.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.nn.grl import grad_reverse

SOURCE_LABEL, TARGET_LABEL = 1.0, 0.0


class DomainDiscriminator(nn.Module):
    """MLP `in_dim -> hidden -> hidden -> 1`; returns one logit per row (n,)."""

    def __init__(self, in_dim: int, hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats.flatten(1)).squeeze(-1)


class DomainLoss(NamedTuple):
    """What `domain_adversarial_loss` computes (all but `loss` detached)."""

    loss: torch.Tensor  # mean BCE of the discriminator: what `backward()` is called on
    accuracy: torch.Tensor  # share of rows whose logit sign names their domain
    confusion: torch.Tensor  # BCE against swapped labels (reported "adversarial loss")
    logits: torch.Tensor  # (n_source + n_target,) discriminator logits, float32
    labels: torch.Tensor  # SOURCE_LABEL for the source rows, then TARGET_LABEL
    penalty: torch.Tensor  # the gradient penalty's value (0 when off), detached


def gradient_penalty(disc: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """E‖∇_f D(f)‖² over the rows of `feats` (detached: its gradient reaches the
    discriminator only), in float32 outside autocast."""
    f = feats.detach().float().requires_grad_(True)
    with torch.autocast(f.device.type, enabled=False):
        (grad,) = torch.autograd.grad(disc(f).sum(), f, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def domain_adversarial_loss(
    disc: nn.Module,
    source: torch.Tensor,
    target: torch.Tensor,
    coeff: float,
    penalty: float = 0.0,
) -> DomainLoss:
    """L = BCE(D(GRL_λ([source; target])), [1...1; 0...0]) + penalty/2 · E‖∇D‖², λ = `coeff`.

    `loss.backward()` gives the discriminator the gradient of its BCE and the features
    `-coeff` times it (Ganin & Lempitsky 2015, eq. 9). `coeff = 0` trains the
    discriminator alone (the features receive an exact zero gradient), which is how the
    no-adaptation variant measures how separable the domains stay.

    Also returned: the accuracy of the sign of the logits, and the *confusion* loss, BCE
    against swapped domain labels: the GAN-style loss of the feature extractor, reported
    as the "adversarial loss" (it rises as the discriminator wins). It is not optimised:
    the features' gradient comes through the GRL on `loss`. The penalty (module
    docstring) gives the features no gradient.
    """
    both = torch.cat([source, target])
    feats = grad_reverse(both, coeff)
    logits = disc(feats).float()
    labels = torch.cat(
        [
            torch.full((len(source),), SOURCE_LABEL, device=logits.device),
            torch.full((len(target),), TARGET_LABEL, device=logits.device),
        ]
    )
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    accuracy = ((logits.detach() > 0).float() == labels).float().mean()
    confusion = F.binary_cross_entropy_with_logits(logits.detach(), 1.0 - labels)
    pen = gradient_penalty(disc, both) if penalty > 0 else torch.zeros((), device=loss.device)
    if penalty > 0:
        loss = loss + 0.5 * penalty * pen
    return DomainLoss(loss, accuracy, confusion, logits.detach(), labels, pen.detach())
