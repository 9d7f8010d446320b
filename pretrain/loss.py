"""Cross Pixel Optical-Flow Similarity loss, paper §3 eqs. (2)-(5) (protocols.md P1),
and the direct flow-classification baseline of §4.5.

Shapes: B images, N sampled pixels per image, D embedding dimensions.
All functions are pure and batched; nothing loops over pixels. On CPU, cpfs_loss
processes the batch a few images at a time (see images_per_chunk).
"""

from __future__ import annotations

import contextlib
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
    "images_per_chunk",
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


def _squared_distances(flows: Tensor) -> Tensor:
    """``|f_p - f_q|^2`` for all pairs, (B, N, 2) -> (B, N, N), from explicit differences.

    Not from the expansion ``|f_p|^2 + |f_q|^2 - 2 f_p . f_q``: that cancels
    catastrophically for nearby flows, with an absolute error of a few ulp of
    ``|f|^2`` that ``1 / (2 sigma^2)`` then magnifies (issue 13: K_f off by 2e-2
    and above 1 at sigma^2 = 1e-5). Differences of the two components keep the
    relative error of each distance at a few ulp, so K_f stays within ~1e-7 of
    exact at any sigma^2, is exactly 1 at distance 0 and never above 1.
    """
    fx, fy = (component.contiguous() for component in flows.unbind(-1))  # strided views broadcast ~2x slower
    dx = fx[..., :, None] - fx[..., None, :]
    dy = fy[..., :, None] - fy[..., None, :]
    return torch.addcmul(dx * dx, dy, dy)


def flow_kernel(flows: Tensor, sigma2: Tensor | float) -> Tensor:
    """Eq. (2) right: ``K_f(p, q) = exp(-|f_p - f_q|^2 / (2 sigma^2))``.

    (B, N, 2) -> (B, N, N), values in [0, 1]. ``sigma2`` is sigma^2 (> 0).
    Accurate to ~1e-7 in float32 for every sigma^2 (see :func:`_squared_distances`);
    differentiable in ``flows`` and ``sigma2``.
    """
    _check_points(flows, "flows", last=2)
    return torch.exp(_squared_distances(flows) * (-0.5 / sigma2))


def _diagonal_replaced(kernel: Tensor, diagonal_logit: float) -> Tensor:
    n = kernel.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=kernel.device)
    return kernel.masked_fill(eye, diagonal_logit)


def _per_image_loss(embeddings: Tensor, flows: Tensor, sigma2: Tensor | float) -> Tensor:
    """Eqs. (2)-(5): the loss of each image, (B,) -- the sum over p of its row cross-entropies."""
    flow_logits = _diagonal_replaced(flow_kernel(flows, sigma2), FLOW_DIAGONAL_LOGIT)  # eq. (4)
    emb_logits = _diagonal_replaced(embedding_kernel(embeddings), EMBEDDING_DIAGONAL_LOGIT)  # eq. (5)
    s_f = torch.softmax(flow_logits, dim=-1)  # eq. (4): S_f(p, .) over q
    log_s_phi = torch.log_softmax(emb_logits, dim=-1)  # eq. (5): log S_phi(p, .) over q
    return -(s_f * log_s_phi).sum(dim=(-2, -1))  # eq. (3)


# On CPU the batch is processed a few images at a time, so that each image's
# N x N matrices stay in cache (L2 is 0.5-2 MiB per core on current CPUs) from one
# operation to the next. Fully batched, every one of the ~20 elementwise passes of
# forward + backward streams B N^2 elements through main memory (100 MB at the
# paper's B=96, N=512), which made the batched call 2.5x slower than a Python
# loop over images (issue 16). GPUs have the bandwidth and want the parallelism:
# there the whole batch is one chunk.
CPU_CHUNK_BYTES = 2 << 20


def images_per_chunk(batch: int, pixels: int, dtype: torch.dtype, device: torch.device) -> int:
    """How many images :func:`cpfs_loss` processes at once: all of them on GPU, on CPU
    as many as keep one (chunk, N, N) matrix within :data:`CPU_CHUNK_BYTES` (at least 1)."""
    if device.type != "cpu":
        return max(batch, 1)
    per_image = pixels * pixels * torch.finfo(dtype).bits // 8
    return max(1, min(batch, CPU_CHUNK_BYTES // per_image))


def _loss_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 if an input is float64: the softmaxes over N terms of
    eqs. (4)/(5) lose too much in bf16/fp16, so half-precision inputs are promoted."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _autocast_disabled(device: torch.device):
    """A context without autocast on ``device``, so the loss keeps the dtype it is given."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


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

    Computed in float32 (float64 if an input is float64) with autocast disabled,
    whatever precision the embeddings arrive in. On CPU the images are processed
    in chunks (:func:`images_per_chunk`); each image's loss is the same
    computation either way, so chunking changes nothing beyond float32 rounding.
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

    dtype = _loss_dtype(embeddings, flows)
    batch, n = embeddings.shape[:2]
    with _autocast_disabled(embeddings.device):
        embeddings, flows = embeddings.to(dtype), flows.to(dtype)
        if isinstance(sigma2, Tensor):
            sigma2 = sigma2.reshape(()).to(dtype)
        chunk = images_per_chunk(batch, n, dtype, embeddings.device)
        per_image = torch.cat([
            _per_image_loss(embeddings[i:i + chunk], flows[i:i + chunk], sigma2)
            for i in range(0, batch, chunk)
        ])
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
