"""CPFS loss (paper eqs. (2)-(5), protocols.md P1), Sigma, direct-regression baseline."""


import pytest
import torch
import torch.nn.functional as F

import pretrain.loss as loss_module
from pretrain.flow import normalize_flow
from pretrain.loss_reference import transcribed_cpfs_loss as transcribed_loss
from pretrain.loss import (
    Sigma,
    cpfs_loss,
    direct_regression_loss,
    images_per_chunk,
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


def _realistic_flows(seed, B=1, N=512, dtype=torch.float32):
    """Eq. (6)-normalised, piecewise-smooth flow: 8 rigid motions of up to ~30 px, each
    pixel jittered by 1e-3 to 1 px, so pixel pairs are close at every sigma^2 tested."""
    g = torch.Generator().manual_seed(seed)
    motions = torch.randn(B, 8, 2, generator=g, dtype=torch.float64) * 10.0
    jitter_px = 10.0 ** -(torch.arange(N, dtype=torch.float64) % 4)
    raw = motions[:, torch.arange(N) % 8] + torch.randn(B, N, 2, generator=g, dtype=torch.float64) * jitter_px[:, None]
    return normalize_flow(raw).to(dtype)


def _exact_flow_kernel(flows, sigma2):
    f = flows.double()
    return torch.exp(-(f[:, :, None] - f[:, None, :]).square().sum(-1) / (2 * torch.as_tensor(sigma2).double()))


@pytest.mark.parametrize("sigma2", [0.0067, 1e-4, 1e-5, 1e-6])
def test_flow_kernel_float32_exact_at_any_sigma(sigma2):
    # Issue 13: the |a|^2 + |b|^2 - 2ab expansion was off by 2e-2 (and > 1) at sigma^2 = 1e-5.
    flows = _realistic_flows(11, B=2)
    s2 = torch.tensor(sigma2)  # float32, as Sigma gives it; the reference uses the same value
    exact = _exact_flow_kernel(flows, s2)
    assert ((exact > 0.01) & (exact < 0.99)).sum() > 1000  # many pairs in the kernel's sensitive range
    got = flow_kernel(flows, s2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-6)
    assert got.max() <= 1.0
    assert (torch.diagonal(got, dim1=-2, dim2=-1) == 1.0).all()


@pytest.mark.parametrize("sigma2", [1e-5, 1e-6])
def test_cpfs_loss_matches_transcription_at_small_sigma(sigma2):
    # Near-duplicate flows (offsets ~ sigma) so that K_f and d loss / d sigma^2 are not all ~0.
    emb, flows, s2 = _inputs(12, N=7, sigma2=sigma2)
    g = torch.Generator().manual_seed(13)
    flows[:, 1::2] = flows[:, 0::2][:, :3] + torch.randn(2, 3, 2, generator=g, dtype=torch.float64) * sigma2 ** 0.5
    e1, s1 = emb.clone().requires_grad_(), s2.clone().requires_grad_()
    e2, s2b = emb.clone().requires_grad_(), s2.clone().requires_grad_()
    fast, slow = cpfs_loss(e1, flows, s1), transcribed_loss(e2, flows, s2b)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)
    g_fast, g_slow = torch.autograd.grad(fast, (e1, s1)), torch.autograd.grad(slow, (e2, s2b))
    torch.testing.assert_close(g_fast[0], g_slow[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(g_fast[1], g_slow[1], rtol=1e-8, atol=0)
    assert g_fast[1].abs() > 1.0  # sigma^2 is small: a real gradient, not a saturated 0


@pytest.mark.parametrize("sigma2", [1e-5, 1e-6])
def test_float32_loss_and_grads_match_float64_at_small_sigma(sigma2):
    flows = _realistic_flows(14, B=2)
    emb = torch.randn(2, 512, 16, generator=torch.Generator().manual_seed(15))
    results = {}
    for dtype in (torch.float32, torch.float64):
        e = emb.to(dtype).requires_grad_()
        s = torch.tensor(sigma2, dtype=torch.float32).to(dtype).requires_grad_()  # the same sigma^2 value
        loss = cpfs_loss(e, flows.to(dtype), s)
        results[dtype] = (loss, *torch.autograd.grad(loss, (e, s)))
    for got, want in zip(results[torch.float32], results[torch.float64]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


def test_gradcheck_small_sigma():
    # float64 finite differences for embeddings, flows and sigma^2 at sigma^2 = 1e-4.
    emb, flows, _ = _inputs(16, B=2, N=6, D=3)
    flows[:, 3:] = flows[:, :3] + 0.01 * torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(17),
                                                     dtype=torch.float64)
    s2 = torch.tensor(1e-4, dtype=torch.float64)
    assert torch.autograd.gradcheck(cpfs_loss, (emb.requires_grad_(), flows.requires_grad_(), s2.requires_grad_()),
                                    eps=1e-7, atol=1e-6, rtol=1e-4)


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


def test_cpu_chunks_change_nothing(monkeypatch):
    # B = 5 images in chunks of 2 (2, 2, 1): the same loss and gradients as one chunk of 5.
    emb, flows, s2 = _inputs(18, B=5, N=8)

    def loss_and_grads():
        e, s = emb.clone().requires_grad_(), s2.clone().requires_grad_()
        loss = cpfs_loss(e, flows, s)
        return (loss, *torch.autograd.grad(loss, (e, s)))

    monkeypatch.setattr(loss_module, "CPU_CHUNK_BYTES", 5 * 8 * 8 * 8)
    whole = loss_and_grads()
    monkeypatch.setattr(loss_module, "CPU_CHUNK_BYTES", 2 * 8 * 8 * 8)
    assert images_per_chunk(5, 8, torch.float64, torch.device("cpu")) == 2
    chunked = loss_and_grads()
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_images_per_chunk():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert images_per_chunk(96, 512, torch.float32, cuda) == 96  # GPU: fully batched
    assert images_per_chunk(96, 512, torch.float32, cpu) == 2  # 1 MiB per image, 2 MiB per chunk
    assert images_per_chunk(96, 512, torch.float64, cpu) == 1
    assert images_per_chunk(96, 4096, torch.float32, cpu) == 1  # never 0
    assert images_per_chunk(3, 16, torch.float32, cpu) == 3  # never more than B


def test_half_precision_and_autocast_compute_in_float32():
    emb, flows, s2 = _inputs(19, B=2, N=9, D=8)
    want = cpfs_loss(emb.float(), flows.float(), s2.float())
    for half in (torch.bfloat16, torch.float16):
        e = emb.to(half).requires_grad_()
        got = cpfs_loss(e, flows.to(half), s2.float())
        assert got.dtype == torch.float32
        want_half_in = cpfs_loss(emb.to(half).float(), flows.to(half).float(), s2.float())
        torch.testing.assert_close(got, want_half_in, rtol=0, atol=0)
        got.backward()
        assert e.grad.dtype == half and torch.isfinite(e.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # would run the N x N products in bf16
        got = cpfs_loss(emb.float(), flows.float(), s2.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


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
