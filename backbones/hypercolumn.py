"""Sparse hypercolumns: layer activations sampled bilinearly at chosen input pixels.

Used by the pretraining head (conv1, pool1, conv3, pool5, fc7; protocols.md P1) and by the
segmentation head (conv1..conv5, fc6, fc7; P4) alike. Pixel ``(y, x)`` of the input falls on the
fractional unit ``((y - offset) / stride, (x - offset) / stride)`` of a layer whose geometry is
``(stride, offset)`` (see :func:`backbones.alexnet.layer_geometry`); the value there is the
bilinear interpolation of the four surrounding units, clamped at the map's border.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F


def _normalised_grid_coord(index: torch.Tensor, size: int) -> torch.Tensor:
    # grid_sample(align_corners=True) puts -1 and +1 on the centres of the first and last unit.
    if size == 1:
        return torch.zeros_like(index)
    return index * (2.0 / (size - 1)) - 1.0


def sample_layer(feature_map: torch.Tensor, positions: torch.Tensor, stride: float, offset: float) -> torch.Tensor:
    """Bilinearly sample ``feature_map (B, C, H, W)`` at input pixels ``positions (B, N, 2)``
    given as (y, x); returns ``(B, N, C)``."""
    if feature_map.dim() != 4 or positions.dim() != 3 or positions.shape[-1] != 2:
        raise ValueError(f"expected feature map (B, C, H, W) and positions (B, N, 2), got "
                         f"{tuple(feature_map.shape)} and {tuple(positions.shape)}")
    h, w = feature_map.shape[-2:]
    pos = positions.to(feature_map.dtype)
    gy = _normalised_grid_coord((pos[..., 0] - offset) / stride, h)
    gx = _normalised_grid_coord((pos[..., 1] - offset) / stride, w)
    grid = torch.stack((gx, gy), dim=-1).unsqueeze(1)  # (B, 1, N, 2) in grid_sample's (x, y) order
    sampled = F.grid_sample(feature_map, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return sampled[:, :, 0, :].transpose(1, 2)


def sparse_hypercolumn(activations: Mapping[str, torch.Tensor], positions: torch.Tensor,
                       geometry: Mapping[str, tuple[float, float]], layers: Sequence[str]) -> torch.Tensor:
    """Concatenate ``layers`` of ``activations`` sampled at ``positions (B, N, 2)`` (y, x):
    returns ``(B, N, sum of channels)`` in the order of ``layers``."""
    return torch.cat([sample_layer(activations[name], positions, *geometry[name]) for name in layers], dim=-1)
