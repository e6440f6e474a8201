"""Gradient reversal, its warm-start schedule, and the domain-adversarial loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.nn.discriminator import DomainDiscriminator, domain_adversarial_loss
from pipeline.nn.grl import GradientReversal, grad_reverse, warm_start_coeff


@pytest.mark.parametrize("coeff", [0.0, 0.3, 1.0, 2.5])
def test_grl_forward_identity_backward_minus_lambda(coeff):
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, 5, dtype=torch.float64)
    y = grad_reverse(x, coeff)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.equal(x.grad, -coeff * upstream)


def test_grl_inside_a_function_scales_its_jacobian():
    """d/dx f(GRL(x)) == -λ d/dx f(x) for a non-linear f (autograd on both sides)."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(3, 2).double()
    x = torch.randn(6, 3, dtype=torch.float64)

    def f(z):
        return torch.tanh(lin(z)).pow(2).sum()

    x1 = x.clone().requires_grad_()
    (g_plain,) = torch.autograd.grad(f(x1), [x1])
    x2 = x.clone().requires_grad_()
    (g_rev,) = torch.autograd.grad(f(GradientReversal()(x2, 0.25)), [x2])
    torch.testing.assert_close(g_rev, -0.25 * g_plain, rtol=0, atol=1e-15)
    # and the reversed gradient is the numerical Jacobian of f times -λ
    num = torch.zeros_like(x)
    eps = 1e-6
    for idx in range(x.numel()):
        d = torch.zeros_like(x).view(-1)
        d[idx] = eps
        d = d.view_as(x)
        num.view(-1)[idx] = (f(x + d) - f(x - d)) / (2 * eps)
    torch.testing.assert_close(g_rev, -0.25 * num, rtol=1e-6, atol=1e-8)


def test_warm_start_schedule_values():
    assert warm_start_coeff(0.0) == 0.0
    assert warm_start_coeff(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1, abs=1e-15)
    assert warm_start_coeff(0.5) == pytest.approx(0.9866142981514305, abs=1e-15)
    assert warm_start_coeff(0.1, gamma=10, hi=0.5) == pytest.approx(
        0.5 * (2 / (1 + math.exp(-1)) - 1), abs=1e-15
    )
    assert warm_start_coeff(-3.0) == 0.0 and warm_start_coeff(7.0) == warm_start_coeff(1.0)
    ps = [i / 20 for i in range(21)]
    vals = [warm_start_coeff(p) for p in ps]
    assert vals == sorted(vals) and vals[-1] < 1.0


def _fixed_discriminator() -> DomainDiscriminator:
    """A discriminator whose logit is 2 * (sum of the 2 features) (weights set by hand)."""
    disc = DomainDiscriminator(2, hidden=2)
    with torch.no_grad():
        for lin in (disc.net[0], disc.net[3]):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        disc.net[6].weight.copy_(torch.tensor([[2.0, 2.0]]))
        disc.net[6].bias.zero_()
    return disc


def test_adversarial_loss_value_accuracy_and_reversed_feature_gradient():
    disc = _fixed_discriminator()
    src = torch.tensor([[1.0, 0.5], [0.2, 0.1]], requires_grad=True)  # logits 3.0, 0.6
    tgt = torch.tensor([[0.1, 0.2], [3.0, 0.5]], requires_grad=True)  # logits 0.6, 7.0
    out = domain_adversarial_loss(disc, src, tgt, coeff=0.5)
    logits = torch.tensor([3.0, 0.6, 0.6, 7.0])
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0])
    expected = F.binary_cross_entropy_with_logits(logits, labels)
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert out.accuracy.item() == 0.5  # source logits > 0: right; target logits > 0: wrong
    out.loss.backward()
    # plain gradient of the BCE wrt each feature row: dL/dlogit * 2 (both features)
    dlogit = (torch.sigmoid(logits) - labels) / 4
    torch.testing.assert_close(src.grad, -0.5 * (2 * dlogit[:2, None]).expand(2, 2))
    torch.testing.assert_close(tgt.grad, -0.5 * (2 * dlogit[2:, None]).expand(2, 2))
    # the discriminator itself gets the un-reversed gradient
    assert disc.net[6].weight.grad is not None and disc.net[6].weight.grad.abs().sum() > 0


def test_zero_coeff_gives_features_exact_zero_gradient_but_trains_discriminator():
    torch.manual_seed(0)
    disc = DomainDiscriminator(8, hidden=16)
    src = torch.randn(5, 8, requires_grad=True)
    tgt = torch.randn(3, 8, requires_grad=True)
    domain_adversarial_loss(disc, src, tgt, coeff=0.0).loss.backward()
    assert torch.count_nonzero(src.grad) == 0 and torch.count_nonzero(tgt.grad) == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_confusion_loss_is_bce_with_swapped_labels():
    disc = _fixed_discriminator()
    src, tgt = torch.tensor([[1.0, 0.5]]), torch.tensor([[0.5, 0.0]])
    out = domain_adversarial_loss(disc, src, tgt, 1.0)
    assert out.labels.tolist() == [1.0, 0.0] and out.logits.tolist() == [3.0, 1.0]
    expected = (math.log1p(math.exp(3.0)) + math.log1p(math.exp(-1.0))) / 2
    assert out.confusion.item() == pytest.approx(expected, abs=1e-6)
    assert not out.confusion.requires_grad  # reported, not optimised
    assert out.accuracy.item() == 0.5
    assert out.loss.item() == pytest.approx(
        (math.log1p(math.exp(-3.0)) + math.log1p(math.exp(1.0))) / 2, abs=1e-6
    )


class _Linear(torch.nn.Module):
    def __init__(self, w: list[float]):
        super().__init__()
        self.lin = torch.nn.Linear(len(w), 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([w]))

    def forward(self, f):
        return self.lin(f).squeeze(-1)


def test_gradient_penalty_of_a_linear_discriminator_is_its_squared_weight_norm():
    disc = _Linear([3.0, -4.0])  # ∇_f D = w everywhere: E‖∇D‖² = 25
    src, tgt = torch.randn(4, 2), torch.randn(3, 2)
    out = domain_adversarial_loss(disc, src, tgt, coeff=1.0, penalty=10.0)
    plain = domain_adversarial_loss(disc, src, tgt, coeff=1.0)
    assert out.penalty.item() == pytest.approx(25.0)
    assert out.loss.item() == pytest.approx(plain.loss.item() + 0.5 * 10.0 * 25.0, rel=1e-6)
    assert plain.penalty.item() == 0.0
    out.loss.backward()  # d/dw (γ/2 ‖w‖²) = γ w is added to the BCE's gradient
    bce_grad = torch.autograd.grad(
        domain_adversarial_loss(disc, src, tgt, 1.0).loss, disc.lin.weight
    )[0]
    torch.testing.assert_close(disc.lin.weight.grad, bce_grad + 10.0 * torch.tensor([[3.0, -4.0]]))


def test_gradient_penalty_trains_the_discriminator_only():
    """The features' gradient (through the GRL) is the same with and without the penalty."""
    torch.manual_seed(0)
    disc = DomainDiscriminator(8, hidden=16)
    grads = []
    for penalty in (0.0, 10.0):
        src = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
        tgt = torch.randn(3, 8, generator=torch.Generator().manual_seed(2)).requires_grad_()
        disc.zero_grad()
        out = domain_adversarial_loss(disc, src, tgt, coeff=0.7, penalty=penalty)
        out.loss.backward()
        grads.append((src.grad, tgt.grad, disc.net[0].weight.grad.clone(), out.penalty))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)
    assert grads[1][3] > 0
    assert not torch.allclose(grads[0][2], grads[1][2])
