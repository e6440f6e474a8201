"""Gradient reversal layer and its warm-start coefficient schedule.

Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015
(arXiv:1409.7495), and Ganin et al., "Domain-Adversarial Training of Neural Networks",
JMLR 2016 (arXiv:1505.07818). (The source paper's reference [2] names Ganin & Lempitsky
but gives arXiv:1702.05464, which is Tzeng et al.'s ADDA; the method used here is the
GRL one.)

The GRL is the identity on the forward pass and multiplies the gradient by -λ on the
backward pass, so one backward pass trains the domain discriminator to *separate* the
domains while pushing the features before it to *confuse* it (Ganin & Lempitsky 2015,
section 3.2, eq. 8-9).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _GradientReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = float(coeff)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """Identity forward; backward multiplies the incoming gradient by `-coeff` (λ)."""
    return _GradientReverse.apply(x, coeff)


class GradientReversal(nn.Module):
    """Module form of `grad_reverse`; λ is passed in on each call (no hidden step counter)."""

    def forward(self, x: torch.Tensor, coeff: float) -> torch.Tensor:
        return grad_reverse(x, coeff)


def warm_start_coeff(progress: float, gamma: float = 10.0, hi: float = 1.0) -> float:
    """λ(p) = hi · (2 / (1 + exp(-γ p)) - 1), p = training progress in [0, 1].

    Ganin & Lempitsky 2015, section 5.2.2 (γ = 10): λ grows from 0 to `hi` so that the
    discriminator's early, noisy gradients do not disturb the features. `progress` is
    passed in explicitly by the training loop (fraction of adversarial steps done);
    values outside [0, 1] are clamped.
    """
    p = min(max(float(progress), 0.0), 1.0)
    return float(hi) * (2.0 / (1.0 + math.exp(-float(gamma) * p)) - 1.0)
