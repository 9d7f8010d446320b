"""Cross Pixel Optical-Flow Similarity loss, paper §3 eqs. (2)-(5) (protocols.md P1),
and the direct flow-classification baseline of §4.5.

Shapes: B images, N sampled pixels per image, D embedding dimensions.
All functions are pure and batched; nothing loops over images or pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EMBEDDING_DIAGONAL_LOGIT",
    "FLOW_DIAGONAL_LOGIT",
    "embedding_kernel",
    "flow_kernel",
    "cpfs_loss",
    "Sigma",
    "flow_to_bins",
    "direct_regression_loss",
]

# Eqs. (4)/(5): the diagonal of each kernel is replaced before the softmax,
# because every pixel is trivially similar to itself. exp(0) = 1 for the flow
# kernel; e^{-3/4} for the embedding kernel (its maximum, 1/4, minus 1: the same
# offset below the kernel's maximum as 0 is below K_f's maximum of 1).
FLOW_DIAGONAL_LOGIT = 0.0
EMBEDDING_DIAGONAL_LOGIT = -0.75


def _check_points(x: Tensor, name: str, last: int | None = None) -> None:
    if x.dim() != 3 or (last is not None and x.shape[-1] != last):
        want = f"(B, N, {last})" if last is not None else "(B, N, D)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")


def embedding_kernel(emb: Tensor) -> Tensor:
    """Eq. (2) left: ``K_phi(p, q) = 1/4 * phi_p . phi_q / (|phi_p| |phi_q|)``.

    (B, N, D) -> (B, N, N), values in [-1/4, 1/4].
    """
    _check_points(emb, "emb")
    unit = F.normalize(emb, p=2.0, dim=-1)
    return (0.25 * unit) @ unit.transpose(-1, -2)  # 1/4 applied to the (B, N, D) side: one N x N pass less


def flow_kernel(flows: Tensor, sigma2: Tensor | float) -> Tensor:
    """Eq. (2) right: ``K_f(p, q) = exp(-|f_p - f_q|^2 / (2 sigma^2))``.

    (B, N, 2) -> (B, N, N), values in (0, 1]. ``sigma2`` is sigma^2 (> 0).

    The exponent is one batched matrix product,
    ``-|f_p - f_q|^2 / (2 sigma^2) = a_p . b_q`` with
    ``a_p = [f_p, -|f_p|^2 / 2, -1/2] / sigma^2`` and ``b_q = [f_q, 1, |f_q|^2]``,
    so that no (B, N, N, 2) difference tensor is built and 1/sigma^2 scales a
    (B, N, 4) tensor rather than an N x N one (cpfs_loss forward+backward at
    B=96, N=512 on 2 CPU threads: ~2.4 s with explicit differences, ~0.6 s so;
    see benchmarks/bench_loss.py). The expansion costs a rounding error of a few
    ulp of ``|f_p|^2 + |f_q|^2`` in ``|f_p - f_q|^2``: for eq. (6)-normalised
    flow (|f| <= sqrt 2) in float32 and sigma^2 = 0.0067 that is < 1e-4 on K_f.
    """
    _check_points(flows, "flows", last=2)
    sq_norm = flows.square().sum(-1, keepdim=True)
    ones = torch.ones_like(sq_norm)
    a = torch.cat([flows, -0.5 * sq_norm, -0.5 * ones], dim=-1) / sigma2
    b = torch.cat([flows, ones, sq_norm], dim=-1)
    return torch.exp(a @ b.transpose(-1, -2))


def _diagonal_replaced(kernel: Tensor, diagonal_logit: float) -> Tensor:
    n = kernel.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=kernel.device)
    return kernel.masked_fill(eye, diagonal_logit)


def cpfs_loss(embeddings: Tensor, flows: Tensor, sigma2: Tensor | float) -> Tensor:
    """CPFS loss, eqs. (2)-(5), divided by N and averaged over the B images.

    embeddings: (B, N, D) pixel embeddings phi_p (any scale; eq. (2) normalises).
    flows:      (B, N, 2) flow at the same pixels, normalised by eq. (6).
    sigma2:     scalar tensor sigma^2 > 0 (see :class:`Sigma`); gets a gradient.

    S_f, S_phi (eqs. (4), (5)) are softmaxes over q for each fixed p (the
    denominators sum over q'), with logits K(p, q) off the diagonal and 0 resp.
    -3/4 on it. Eq. (3) is ``-sum_q sum_p S_f(p, q) log S_phi(p, q)``: the sum of
    the N row-wise cross-entropies, hence /N gives the mean per pixel.
    (The prose before eq. (3) speaks of normalising columns; both kernels and
    their replaced diagonals are symmetric, so rows give the same loss.)
    """
    _check_points(embeddings, "embeddings")
    _check_points(flows, "flows", last=2)
    if embeddings.shape[:2] != flows.shape[:2]:
        raise ValueError(
            f"embeddings {tuple(embeddings.shape)} and flows {tuple(flows.shape)} must agree on (B, N)"
        )
    if embeddings.shape[1] < 2:
        raise ValueError(f"need at least 2 pixels per image, got N = {embeddings.shape[1]}")
    if isinstance(sigma2, Tensor) and sigma2.numel() != 1:
        raise ValueError(f"sigma2 must be a scalar, got shape {tuple(sigma2.shape)}")
    if isinstance(sigma2, Tensor):
        sigma2 = sigma2.reshape(())

    n = embeddings.shape[1]
    flow_logits = _diagonal_replaced(flow_kernel(flows, sigma2), FLOW_DIAGONAL_LOGIT)  # eq. (4)
    emb_logits = _diagonal_replaced(embedding_kernel(embeddings), EMBEDDING_DIAGONAL_LOGIT)  # eq. (5)
    s_f = torch.softmax(flow_logits, dim=-1)  # eq. (4): S_f(p, .) over q
    log_s_phi = torch.log_softmax(emb_logits, dim=-1)  # eq. (5): log S_phi(p, .) over q
    per_image = -(s_f * log_s_phi).sum(dim=(-2, -1))  # eq. (3)
    return (per_image / n).mean()


class Sigma(nn.Module):
    """Learned RBF bandwidth sigma^2 of the flow kernel, eq. (2).

    Parametrised as ``log sigma^2`` so that sigma^2 stays positive under any
    gradient step. The paper learns sigma jointly with the network and reports
    the learned value sigma^2 = 0.0067 (§3, P1) but not the initial value
    ("not published"). Default ``init = 0.01``: same order as the learned value,
    so the kernel starts localised on eq. (6)-normalised flow (sigma = 0.1, i.e.
    ~0.5 px near zero flow) instead of relying on the optimiser to shrink it
    from a wide, uninformative kernel; slightly above 0.0067 so that it is not
    the answer planted in advance.
    """

    def __init__(self, init: float = 0.01, frozen: bool = False):
        super().__init__()
        if not init > 0:
            raise ValueError(f"sigma^2 init must be positive, got {init}")
        self.log_sigma2 = nn.Parameter(torch.tensor(math.log(init)), requires_grad=not frozen)

    @property
    def frozen(self) -> bool:
        return not self.log_sigma2.requires_grad

    def forward(self) -> Tensor:
        return self.log_sigma2.exp()

    def extra_repr(self) -> str:
        return f"sigma2={self.log_sigma2.detach().exp().item():.4g}, frozen={self.frozen}"


def flow_to_bins(flows: Tensor, num_bins: int = 16) -> Tensor:
    """Discretise normalised flow in [-1, 1] (eq. (6)) into ``num_bins`` uniform bins.

    Bin k covers [-1 + 2k/num_bins, -1 + 2(k+1)/num_bins); +1 falls in the last
    bin and values outside [-1, 1] are clamped into the end bins. Returns int64
    of the same shape.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be positive, got {num_bins}")
    idx = torch.floor((flows + 1.0) * (num_bins / 2.0)).long()
    return idx.clamp_(0, num_bins - 1)


def direct_regression_loss(logits_x: Tensor, logits_y: Tensor, flows: Tensor, num_bins: int = 16) -> Tensor:
    """Baseline "direct reg." (§4.5, P1): per-pixel softmax cross-entropy over
    ``num_bins`` uniform bins of the normalised flow, once for x, once for y.

    logits_x, logits_y: (B, N, num_bins); flows: (B, N, 2) normalised (eq. (6)).
    Returns CE_x + CE_y (the two classification losses summed, as two heads
    trained together), each averaged over all B*N sampled pixels.
    """
    _check_points(flows, "flows", last=2)
    for name, logits in (("logits_x", logits_x), ("logits_y", logits_y)):
        if logits.shape != flows.shape[:2] + (num_bins,):
            raise ValueError(
                f"{name} must have shape (B, N, num_bins) = {tuple(flows.shape[:2]) + (num_bins,)}, "
                f"got {tuple(logits.shape)}"
            )
    bins = flow_to_bins(flows, num_bins)
    ce_x = F.cross_entropy(logits_x.reshape(-1, num_bins), bins[..., 0].reshape(-1))
    ce_y = F.cross_entropy(logits_y.reshape(-1, num_bins), bins[..., 1].reshape(-1))
    return ce_x + ce_y
