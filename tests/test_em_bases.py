"""EMBases (SEM's shared initial EM bases): initial statistics, the EMA update rule in training only, momentum,
no gradient through the update, and use with em_attention."""
import math

import pytest
import torch

from mtlfast.nn.em_bases import EMBases
from mtlfast.reference.em_attention import em_attention


def _l2(m):
    return m / (1e-6 + m.norm(dim=-1, keepdim=True))


def test_init_statistics():
    K, C = 64, 512
    gen = torch.Generator().manual_seed(0)
    bases = EMBases(K, C, generator=gen)
    assert bases.mu.shape == (K, C) and bases.mu.dtype == torch.float32
    assert "mu" in dict(bases.named_buffers()) and not list(bases.parameters())
    torch.testing.assert_close(bases.mu.norm(dim=1), torch.ones(K), rtol=1e-5, atol=1e-5)
    # Before normalisation the entries are N(0, 2/K): the same draw reproduces it exactly.
    raw = torch.randn(K, C, generator=torch.Generator().manual_seed(0)) * math.sqrt(2.0 / K)
    torch.testing.assert_close(bases.mu, _l2(raw))
    assert abs(raw.std().item() - math.sqrt(2.0 / K)) < 0.02 * math.sqrt(2.0 / K)
    # Unit rows of iid Gaussians: entries of mean 0 and variance 1/C, nearly orthogonal rows.
    assert abs(bases.mu.mean().item()) < 5 / (C * math.sqrt(K))  # 5 standard deviations of the mean
    assert abs((bases.mu.square().mean() - 1 / C).item()) < 1e-6
    off = bases.mu @ bases.mu.T - torch.eye(K)
    assert off.abs().max() < 6 / math.sqrt(C)


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_update_in_training_follows_the_rule(momentum):
    K, C = 5, 7
    bases = EMBases(K, C, momentum=momentum).train()
    before = bases.mu.clone()
    mu_new = torch.randn(3, 2, K, C)  # e.g. (batch, tasks, K, C): averaged over every leading dim
    bases.update(mu_new)
    expected = momentum * before + (1 - momentum) * mu_new.mean(dim=(0, 1))  # not re-normalised (EMANet)
    torch.testing.assert_close(bases.mu, expected)
    bases.update(mu_new[0, 0])  # (K, C) works too
    expected = momentum * expected + (1 - momentum) * mu_new[0, 0]
    torch.testing.assert_close(bases.mu, expected)


def test_no_update_in_eval():
    bases = EMBases(4, 6).eval()
    before = bases.mu.clone()
    bases.update(torch.randn(2, 4, 6))
    assert torch.equal(bases.mu, before)


def test_update_has_no_gradient_and_keeps_the_graph():
    """The update runs under no_grad; a tensor taken from the bases before it still backpropagates."""
    bases = EMBases(4, 9).train()
    x = torch.randn(2, 11, 9, requires_grad=True)
    mu0 = bases(2)
    assert mu0.shape == (2, 4, 9) and not mu0.requires_grad
    x_rec, mu_out, _ = em_attention(x, mu0, 3)
    bases.update(mu_out)
    assert not bases.mu.requires_grad
    x_rec.sum().backward()  # would fail if the update had modified a tensor saved for backward
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="momentum"):
        EMBases(4, 6, momentum=1.5)
    with pytest.raises(ValueError, match="num_bases"):
        EMBases(0, 6)
    bases = EMBases(4, 6).train()
    with pytest.raises(ValueError, match=r"mu_new: expected shape \(\.\.\., 4, 6\)"):
        bases.update(torch.randn(2, 4, 5))


def test_state_dict_round_trip():
    a, b = EMBases(3, 5), EMBases(3, 5)
    a.train().update(torch.randn(3, 5))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.mu, b.mu)
