"""Eqs. (2)-(5) of the paper transcribed with explicit Python loops over images, p, q and q'.

The reference that tests/test_loss.py checks :func:`pretrain.loss.cpfs_loss` against (values and
gradients) and that benchmarks/bench_loss.py times as the per-pair baseline. Far too slow for
training: O(B N^2) Python-level scalar operations.
"""
from __future__ import annotations

import math

import torch


def transcribed_cpfs_loss(emb, flows, sigma2):
    """Eqs. (2)-(5) written out with explicit loops over images, p, q and q'."""
    B, N, _ = emb.shape
    total = 0.0
    for b in range(B):
        phi, f = emb[b], flows[b]
        # eq. (2)
        K_phi = [[0.25 * (phi[p] @ phi[q]) / (phi[p].norm() * phi[q].norm()) for q in range(N)] for p in range(N)]
        K_f = [[torch.exp(-((f[p] - f[q]) ** 2).sum() / (2 * sigma2)) for q in range(N)] for p in range(N)]
        L = 0.0
        for p in range(N):
            Z_f = sum(torch.exp(K_f[p][qq]) for qq in range(N) if qq != p) + 1.0  # eq. (4)
            Z_phi = sum(torch.exp(K_phi[p][qq]) for qq in range(N) if qq != p) + math.exp(-0.75)  # eq. (5)
            for q in range(N):
                if p == q:
                    S_f = 1.0 / Z_f
                    S_phi = math.exp(-0.75) / Z_phi
                else:
                    S_f = torch.exp(K_f[p][q]) / Z_f
                    S_phi = torch.exp(K_phi[p][q]) / Z_phi
                L = L - S_f * torch.log(S_phi)  # eq. (3)
        total = total + L / N
    return total / B
