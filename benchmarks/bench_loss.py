"""Time the batched CPFS loss (pretrain/loss.py) against naive loops.

Forward + backward at the paper's training shape (protocols.md P1: batch 96,
512 sampled pixels per image, D = 16), float32, CPU threads as torch sets them.

  batched     cpfs_loss on the whole (B, N, D) batch
  per-image   one cpfs_loss call per image, averaged (a Python loop over B)
  per-pixel   eqs. (2)-(5) transcribed with a Python loop over images and over
              pixels p, each row K(p, .) computed over q with tensor ops
  per-pair    eqs. (2)-(5) with Python loops over p and q on scalars, as in
              tests/test_loss.py (optional, --pair-pixels)

The naive loops are slow, so they run on a few images (and, for per-pair, at a
smaller N) and are extrapolated linearly in images (and quadratically in N);
the output says which figures are extrapolated.

Usage: .venv/bin/python benchmarks/bench_loss.py [--repeats 5] [--naive-images 4] [--pair-pixels 48]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pretrain.flow import normalize_flow  # noqa: E402
from pretrain.loss import cpfs_loss  # noqa: E402
from pretrain.loss_reference import transcribed_cpfs_loss as per_pair_loss  # noqa: E402


def per_image_loss(emb, flows, sigma2):
    return sum(cpfs_loss(emb[b:b + 1], flows[b:b + 1], sigma2) for b in range(emb.shape[0])) / emb.shape[0]


def per_pixel_loss(emb, flows, sigma2):
    """Eqs. (2)-(5), one pixel p (one row of each kernel) at a time."""
    B, N, _ = emb.shape
    total = 0.0
    for b in range(B):
        phi, f = emb[b], flows[b]
        norms = phi.norm(dim=1)
        L = 0.0
        for p in range(N):
            k_phi = 0.25 * (phi @ phi[p]) / (norms * norms[p])  # eq. (2), row p
            k_f = torch.exp(-((f - f[p]) ** 2).sum(1) / (2 * sigma2))  # eq. (2), row p
            off = torch.arange(N) != p
            z_f = torch.exp(k_f[off]).sum() + 1.0  # eq. (4) denominator
            z_phi = torch.exp(k_phi[off]).sum() + math.exp(-0.75)  # eq. (5) denominator
            s_f_off, s_f_diag = torch.exp(k_f[off]) / z_f, 1.0 / z_f
            log_s_phi_off = k_phi[off] - torch.log(z_phi)
            log_s_phi_diag = -0.75 - torch.log(z_phi)
            L = L - (s_f_off * log_s_phi_off).sum() - s_f_diag * log_s_phi_diag  # eq. (3)
        total = total + L / N
    return total / B


def time_fwd_bwd(fn, emb, flows, sigma2, repeats):
    times = []
    for _ in range(repeats):
        e = emb.detach().clone().requires_grad_()
        s = sigma2.detach().clone().requires_grad_()
        t0 = time.perf_counter()
        loss = fn(e, flows, s)
        loss.backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), loss.item()


def make_inputs(B, N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, N, D, generator=g)
    flows = normalize_flow(torch.randn(B, N, 2, generator=g) * 5.0)
    return emb, flows, torch.tensor(0.01)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=96, help="images per batch (P1: 96)")
    ap.add_argument("--pixels", type=int, default=512, help="sampled pixels per image (P1: 512)")
    ap.add_argument("--dim", type=int, default=16, help="embedding dimension D (§4.1: 16)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats of the batched/per-image runs (median)")
    ap.add_argument("--naive-images", type=int, default=4, help="images timed for the per-pixel loop")
    ap.add_argument("--pair-pixels", type=int, default=48, help="N for one image of the per-pair loop (0: skip)")
    args = ap.parse_args(argv)
    B, N, D = args.batch, args.pixels, args.dim

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, forward+backward, "
          f"B={B} N={N} D={D}")
    emb, flows, sigma2 = make_inputs(B, N, D)

    time_fwd_bwd(cpfs_loss, emb, flows, sigma2, 1)  # warm-up
    t_batched, min_batched, loss_batched = time_fwd_bwd(cpfs_loss, emb, flows, sigma2, args.repeats)
    print(f"batched    : {t_batched * 1e3:10.1f} ms  median of {args.repeats} (min {min_batched * 1e3:.1f} ms, "
          f"loss {loss_batched:.6f}); ratios below are against this median")

    t_image, min_image, loss_image = time_fwd_bwd(per_image_loss, emb, flows, sigma2, args.repeats)
    print(f"per-image  : {t_image * 1e3:10.1f} ms  median of {args.repeats} (min {min_image * 1e3:.1f} ms, "
          f"loss {loss_image:.6f})  ratio {t_image / t_batched:6.2f}x")

    k = min(args.naive_images, B)
    t_k, _, loss_k = time_fwd_bwd(per_pixel_loss, emb[:k], flows[:k], sigma2, 1)
    ref_k = cpfs_loss(emb[:k], flows[:k], sigma2).item()
    t_pixel = t_k * B / k
    print(f"per-pixel  : {t_pixel * 1e3:10.1f} ms  extrapolated from {k} image(s) in {t_k:.2f} s "
          f"(loss {loss_k:.6f} vs batched {ref_k:.6f})  ratio {t_pixel / t_batched:6.1f}x")

    if args.pair_pixels > 0:
        n = min(args.pair_pixels, N)
        t_n, _, loss_n = time_fwd_bwd(per_pair_loss, emb[:1, :n], flows[:1, :n], sigma2, 1)
        ref_n = cpfs_loss(emb[:1, :n], flows[:1, :n], sigma2).item()
        t_pair = t_n * B * (N / n) ** 2
        print(f"per-pair   : {t_pair * 1e3:10.1f} ms  extrapolated from 1 image at N={n} in {t_n:.2f} s, "
              f"x{B} images, x(N/{n})^2 (loss {loss_n:.6f} vs batched {ref_n:.6f})  "
              f"ratio {t_pair / t_batched:6.0f}x")


if __name__ == "__main__":
    main()
