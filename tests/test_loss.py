"""CPFS loss (paper eqs. (2)-(5), protocols.md P1), Sigma, direct-regression baseline."""


import pytest
import torch
import torch.nn.functional as F

from pretrain.flow import normalize_flow
from pretrain.loss_reference import transcribed_cpfs_loss as transcribed_loss
from pretrain.loss import (
    Sigma,
    cpfs_loss,
    direct_regression_loss,
    embedding_kernel,
    flow_kernel,
    flow_to_bins,
)


def _inputs(seed, B=2, N=7, D=4, sigma2=0.3):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    raw = torch.randn(B, N, 2, generator=g, dtype=torch.float64) * 10.0
    flows = normalize_flow(raw)  # eq. (6), in [-1, 1]
    s2 = torch.tensor(sigma2, dtype=torch.float64)
    return emb, flows, s2


@pytest.mark.parametrize("seed,sigma2", [(0, 0.3), (1, 0.0067), (2, 2.0)])
def test_cpfs_loss_matches_transcription_value_and_grads(seed, sigma2):
    emb, flows, s2 = _inputs(seed, sigma2=sigma2)
    e1, s1 = emb.clone().requires_grad_(), s2.clone().requires_grad_()
    e2, s2b = emb.clone().requires_grad_(), s2.clone().requires_grad_()
    fast = cpfs_loss(e1, flows, s1)
    slow = transcribed_loss(e2, flows, s2b)
    assert fast.dtype == torch.float64 and fast.dim() == 0
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)
    g_fast = torch.autograd.grad(fast, (e1, s1))
    g_slow = torch.autograd.grad(slow, (e2, s2b))
    torch.testing.assert_close(g_fast[0], g_slow[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(g_fast[1], g_slow[1], rtol=0, atol=1e-10)
    assert g_fast[0].abs().max() > 0
    if sigma2 != 0.0067:  # sigma^2 this small saturates K_f to ~0 off the diagonal
        assert g_fast[1].abs() > 1e-6


def test_kernels_eq2():
    emb, flows, s2 = _inputs(3, N=5)
    K_phi = embedding_kernel(emb)
    K_f = flow_kernel(flows, s2)
    assert K_phi.shape == K_f.shape == (2, 5, 5)
    torch.testing.assert_close(torch.diagonal(K_phi, dim1=-2, dim2=-1), torch.full((2, 5), 0.25, dtype=torch.float64))
    torch.testing.assert_close(torch.diagonal(K_f, dim1=-2, dim2=-1), torch.ones(2, 5, dtype=torch.float64))
    assert K_phi.abs().max() <= 0.25 + 1e-15
    torch.testing.assert_close(K_phi, K_phi.transpose(-1, -2))
    torch.testing.assert_close(K_f, K_f.transpose(-1, -2))
    d2 = ((flows[0, 1] - flows[0, 3]) ** 2).sum()
    torch.testing.assert_close(K_f[0, 1, 3], torch.exp(-d2 / (2 * s2)))
    cos = F.cosine_similarity(emb[1, 2], emb[1, 4], dim=0)
    torch.testing.assert_close(K_phi[1, 2, 4], cos / 4)


def test_flow_kernel_float32_accuracy_at_learned_sigma():
    # The kernel expands |f_p - f_q|^2; check the rounding against explicit differences.
    g = torch.Generator().manual_seed(11)
    flows = normalize_flow(torch.randn(4, 64, 2, generator=g, dtype=torch.float64) * 30.0)
    flows[:, 1] = flows[:, 0] + 1e-3  # near-duplicates, where K_f ~ 1
    exact = torch.exp(-(flows[:, :, None] - flows[:, None, :]).square().sum(-1) / (2 * 0.0067))
    got = flow_kernel(flows.float(), torch.tensor(0.0067))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-4)


def test_loss_invariant_to_embedding_scale():
    emb, flows, s2 = _inputs(4, B=3, N=9, D=6)
    scale = torch.rand(3, 9, 1, dtype=torch.float64) * 100 + 0.01  # per-pixel positive scales
    torch.testing.assert_close(cpfs_loss(emb * scale, flows, s2), cpfs_loss(emb, flows, s2), rtol=0, atol=1e-12)


def test_permutation_equivariance_over_pixels():
    emb, flows, s2 = _inputs(5, B=2, N=11, D=5)
    perm = torch.randperm(11)
    K_phi, K_f = embedding_kernel(emb), flow_kernel(flows, s2)
    torch.testing.assert_close(embedding_kernel(emb[:, perm]), K_phi[:, perm][:, :, perm])
    torch.testing.assert_close(flow_kernel(flows[:, perm], s2), K_f[:, perm][:, :, perm])
    torch.testing.assert_close(cpfs_loss(emb[:, perm], flows[:, perm], s2), cpfs_loss(emb, flows, s2),
                               rtol=0, atol=1e-12)


def test_batch_is_mean_of_images_and_float32_works():
    emb, flows, s2 = _inputs(6, B=4, N=8)
    per_image = torch.stack([cpfs_loss(emb[i:i + 1], flows[i:i + 1], s2) for i in range(4)])
    torch.testing.assert_close(cpfs_loss(emb, flows, s2), per_image.mean(), rtol=0, atol=1e-12)
    out32 = cpfs_loss(emb.float(), flows.float(), s2.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), per_image.mean(), rtol=1e-5, atol=1e-6)


def test_loss_prefers_embeddings_that_group_like_flow():
    # Two rigid motions: embeddings aligned with the motion groups beat random ones.
    N = 16
    flows = torch.zeros(1, N, 2, dtype=torch.float64)
    flows[0, N // 2:] = torch.tensor([0.8, -0.5], dtype=torch.float64)
    good = torch.zeros(1, N, 2, dtype=torch.float64)
    good[0, :N // 2, 0], good[0, N // 2:, 0] = 1.0, -1.0
    bad = torch.randn(1, N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s2 = torch.tensor(0.01, dtype=torch.float64)
    assert cpfs_loss(good, flows, s2) < cpfs_loss(bad, flows, s2)


def test_cpfs_loss_shape_errors():
    emb, flows, s2 = _inputs(7)
    with pytest.raises(ValueError, match="flows"):
        cpfs_loss(emb, flows[..., :1], s2)
    with pytest.raises(ValueError, match="agree"):
        cpfs_loss(emb, flows[:, :5], s2)
    with pytest.raises(ValueError, match="embeddings"):
        cpfs_loss(emb[0], flows, s2)
    with pytest.raises(ValueError, match="scalar"):
        cpfs_loss(emb, flows, torch.ones(2))


# --------------------------------------------------------------------------- #
# Sigma
# --------------------------------------------------------------------------- #
def test_sigma_positive_and_learnable():
    sigma = Sigma(init=0.01)
    torch.testing.assert_close(sigma(), torch.tensor(0.01, dtype=sigma().dtype))
    opt = torch.optim.Adam(sigma.parameters(), lr=0.5)
    for _ in range(50):  # push sigma^2 down hard; an unconstrained value would cross 0
        opt.zero_grad()
        sigma().backward()
        opt.step()
        assert sigma().item() > 0
    # gets a gradient through the loss
    emb, flows, _ = _inputs(8)
    sigma = Sigma(init=0.3).double()
    cpfs_loss(emb, flows, sigma()).backward()
    assert sigma.log_sigma2.grad is not None and sigma.log_sigma2.grad.abs() > 0
    with pytest.raises(ValueError):
        Sigma(init=0.0)


def test_sigma_frozen_gets_no_grad():
    sigma = Sigma(init=0.05, frozen=True)
    assert sigma.frozen and not sigma.log_sigma2.requires_grad
    assert list(p for p in sigma.parameters() if p.requires_grad) == []
    emb, flows, _ = _inputs(9)
    emb.requires_grad_()
    cpfs_loss(emb, flows, sigma()).backward()
    assert sigma.log_sigma2.grad is None and emb.grad is not None
    torch.testing.assert_close(sigma(), torch.tensor(0.05))
    assert "frozen=True" in repr(sigma)


# --------------------------------------------------------------------------- #
# Direct-regression baseline (§4.5)
# --------------------------------------------------------------------------- #
def test_flow_to_bins_edges():
    f = torch.tensor([-1.0, -0.875 - 1e-9, -0.875, 0.0 - 1e-9, 0.0, 0.875, 1.0, 1.5, -3.0], dtype=torch.float64)
    assert flow_to_bins(f, 16).tolist() == [0, 0, 1, 7, 8, 15, 15, 15, 0]
    assert flow_to_bins(torch.tensor([-1.0, 0.0, 1.0]), 2).tolist() == [0, 1, 1]


def test_direct_regression_loss_against_cross_entropy_by_hand():
    g = torch.Generator().manual_seed(10)
    B, N, K = 3, 5, 16
    lx = torch.randn(B, N, K, generator=g, dtype=torch.float64, requires_grad=True)
    ly = torch.randn(B, N, K, generator=g, dtype=torch.float64, requires_grad=True)
    flows = torch.rand(B, N, 2, generator=g, dtype=torch.float64) * 2 - 1
    got = direct_regression_loss(lx, ly, flows, num_bins=K)

    by_hand = 0.0
    for b in range(B):
        for n in range(N):
            for axis, logits in ((0, lx), (1, ly)):
                k = int((flows[b, n, axis].item() + 1) / 2 * K)
                row = logits[b, n]
                by_hand = by_hand + (torch.logsumexp(row, 0) - row[k])
    by_hand = by_hand / (B * N)
    torch.testing.assert_close(got, by_hand, rtol=0, atol=1e-12)

    ce = F.cross_entropy(lx.reshape(-1, K), flow_to_bins(flows[..., 0]).reshape(-1)) + \
        F.cross_entropy(ly.reshape(-1, K), flow_to_bins(flows[..., 1]).reshape(-1))
    torch.testing.assert_close(got, ce)
    got.backward()
    assert lx.grad.abs().sum() > 0 and ly.grad.abs().sum() > 0

    with pytest.raises(ValueError, match="logits_x"):
        direct_regression_loss(lx[..., :8], ly, flows, num_bins=K)
