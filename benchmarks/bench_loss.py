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

batched and per-image are timed side by side: each repeat runs one of each, so
that load from other processes hits both alike; the medians are reported.
--json prints one JSON object instead: those two timings, their ratio, and how
far the float32 batched loss and gradients are from a float64 evaluation
(cpfs_loss in float64, itself checked against pretrain/loss_reference.py's
transcription in tests/test_loss.py) and from the per-image loop.

Usage: .venv/bin/python benchmarks/bench_loss.py [--repeats 5] [--naive-images 4] [--pair-pixels 48]
                                                [--threads T] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pretrain.flow import normalize_flow  # noqa: E402
from pretrain.loss import cpfs_loss, images_per_chunk  # noqa: E402
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


def fwd_bwd(fn, emb, flows, sigma2):
    """One forward + backward from fresh leaves: (seconds, loss, d loss/d emb, d loss/d sigma2)."""
    e = emb.detach().clone().requires_grad_()
    s = sigma2.detach().clone().requires_grad_()
    t0 = time.perf_counter()
    loss = fn(e, flows, s)
    loss.backward()
    return time.perf_counter() - t0, loss.detach(), e.grad, s.grad


def time_fwd_bwd(fn, emb, flows, sigma2, repeats):
    runs = [fwd_bwd(fn, emb, flows, sigma2) for _ in range(repeats)]
    times = [run[0] for run in runs]
    return statistics.median(times), min(times), runs[-1][1].item()


def time_side_by_side(fns, emb, flows, sigma2, repeats):
    """Median and min seconds of each of ``fns`` (name -> loss function), interleaved per repeat."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fwd_bwd(fn, emb, flows, sigma2)[0])
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def accuracy(emb, flows, sigma2):
    """Max abs differences of the float32 batched loss and gradients from float64 and from the per-image loop."""
    _, loss, g_emb, g_s2 = fwd_bwd(cpfs_loss, emb, flows, sigma2)
    _, loss64, g_emb64, g_s2_64 = fwd_bwd(cpfs_loss, emb.double(), flows.double(), sigma2.double())
    _, loss_img, g_emb_img, g_s2_img = fwd_bwd(per_image_loss, emb, flows, sigma2)
    return {
        "max_abs_loss_diff_vs_reference": abs(loss.double() - loss64).item(),
        "max_abs_grad_emb_diff_vs_reference": (g_emb.double() - g_emb64).abs().max().item(),
        "max_abs_grad_sigma2_diff_vs_reference": abs(g_s2.double() - g_s2_64).item(),
        "grad_sigma2_reference": g_s2_64.item(),
        "max_abs_loss_diff_vs_per_image": abs(loss - loss_img).item(),
        "max_abs_grad_emb_diff_vs_per_image": (g_emb - g_emb_img).abs().max().item(),
        "reference": "cpfs_loss in float64 (tests/test_loss.py checks it against loss_reference.py)",
    }


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
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (batched vs per-image only)")
    args = ap.parse_args(argv)
    B, N, D = args.batch, args.pixels, args.dim
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.json:
        print(json.dumps(json_report(args)))
        return

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, forward+backward, "
          f"B={B} N={N} D={D}")
    emb, flows, sigma2 = make_inputs(B, N, D)

    fns = {"batched": cpfs_loss, "per_image": per_image_loss}
    time_side_by_side(fns, emb, flows, sigma2, 1)  # warm-up
    timed = time_side_by_side(fns, emb, flows, sigma2, args.repeats)
    (t_batched, min_batched), (t_image, min_image) = timed["batched"], timed["per_image"]
    loss_batched, loss_image = cpfs_loss(emb, flows, sigma2).item(), per_image_loss(emb, flows, sigma2).item()
    print(f"batched    : {t_batched * 1e3:10.1f} ms  median of {args.repeats} (min {min_batched * 1e3:.1f} ms, "
          f"loss {loss_batched:.6f}); ratios below are against this median")
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


def json_report(args):
    B, N, D = args.batch, args.pixels, args.dim
    emb, flows, sigma2 = make_inputs(B, N, D)
    fns = {"batched": cpfs_loss, "per_image": per_image_loss}
    time_side_by_side(fns, emb, flows, sigma2, 1)  # warm-up
    timed = time_side_by_side(fns, emb, flows, sigma2, args.repeats)
    (t_batched, min_batched), (t_image, min_image) = timed["batched"], timed["per_image"]
    return {
        "batched_ms": t_batched * 1e3,
        "per_image_ms": t_image * 1e3,
        "ratio_batched_vs_per_image": t_image / t_batched,
        "batched_min_ms": min_batched * 1e3,
        "per_image_min_ms": min_image * 1e3,
        "repeats": args.repeats,
        **accuracy(emb, flows, sigma2),
        "B": B, "N": N, "D": D,
        "threads": torch.get_num_threads(),
        "images_per_chunk": images_per_chunk(B, N, emb.dtype, emb.device),
        "torch": torch.__version__,
        "dtype": "float32",
        "sigma2": sigma2.item(),
    }


if __name__ == "__main__":
    main()
