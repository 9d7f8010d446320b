"""Sparse hypercolumns: layer activations sampled bilinearly at chosen input pixels.

Used by the pretraining head (conv1, pool1, conv3, pool5, fc7; protocols.md P1) and by the
segmentation head (conv1..conv5, fc6, fc7; P4) alike: both are a :class:`HypercolumnHead`. Pixel ``(y, x)`` of the input falls on the
fractional unit ``((y - offset) / stride, (x - offset) / stride)`` of a layer whose geometry is
``(stride, offset)`` (see :func:`backbones.alexnet.layer_geometry`); the value there is the
bilinear interpolation of the four surrounding units, clamped at the map's border.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


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


def layer_channels(backbone: nn.Module, name: str) -> int:
    """Channels of AlexNet activation ``name`` (``convK``/``poolK``: conv K's filters; ``fcK``: its units)."""
    if name.startswith(("conv", "pool")):
        return getattr(backbone, f"conv{name[-1]}").out_channels
    if name in ("fc6", "fc7"):
        return getattr(backbone, name).out_features
    raise KeyError(f"no hypercolumn channels for layer {name!r}")


class HypercolumnHead(nn.Module):
    """``Linear(sum C_l, hidden) -> ReLU -> [Dropout] -> Linear(hidden, out_dim)`` on a sparse
    hypercolumn: P1's "MLP with one hidden layer" and P4's FC 1024 + ReLU + dropout + FC 21.

    The first layer is linear and bilinear sampling is linear with weights summing to one, so
    ``W [A_1(p); ...; A_n(p)] + b = b + sum_l (W_l A_l)(p)``. :meth:`forward_sampled` therefore
    projects a layer to the hidden width *before* sampling where its map has fewer units than
    there are points (and sums projected maps that share a grid), and samples first elsewhere:
    the same function as ``forward(sparse_hypercolumn(...))`` up to float rounding (tested in
    both users' tests), without materialising 4096-wide fc columns per pixel.
    """

    def __init__(self, channels: Mapping[str, int], hidden: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.layers = tuple(channels)
        self.channels = tuple(int(c) for c in channels.values())
        self.fc1 = nn.Linear(sum(self.channels), hidden)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, hypercolumn: torch.Tensor) -> torch.Tensor:
        """(B, N, sum C_l) -> (B, N, out_dim): the textbook form."""
        return self.fc2(self.drop(F.relu(self.fc1(hypercolumn))))

    def layer_weights(self) -> dict[str, torch.Tensor]:
        """The first layer's weight split per hypercolumn layer: ``{name: (hidden, C_l)}``."""
        return dict(zip(self.layers, self.fc1.weight.split(self.channels, dim=1)))

    def project(self, activations: Mapping[str, torch.Tensor], layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """``W_l A_l`` for each of ``layers``: the first layer applied at every unit of the map."""
        weights = self.layer_weights()
        return {l: F.conv2d(activations[l], weights[l][:, :, None, None]) for l in layers}

    def forward_sampled(self, activations: Mapping[str, torch.Tensor], positions: torch.Tensor,
                        geometry: Mapping[str, tuple[float, float]],
                        projected: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``forward(sparse_hypercolumn(activations, positions, geometry, self.layers))`` with
        positions (B, N, 2) as (y, x) input pixels. ``projected`` (from :meth:`project`, e.g. once
        per image for dense prediction in chunks) overrides the choice of projected layers."""
        if projected is None:
            points = positions.shape[1]
            small = [l for l in self.layers if activations[l].shape[-2] * activations[l].shape[-1] < points]
            projected = self.project(activations, small)
        sample_first = [l for l in self.layers if l not in projected]
        # Sampling runs in float32 (positions up to 224+ px with fractional offsets do not fit bf16).
        positions = positions.float()
        hidden = self.fc1.bias
        with torch.autocast(positions.device.type, enabled=False):
            if sample_first:
                weights = self.layer_weights()
                columns = sparse_hypercolumn({l: activations[l].float() for l in sample_first}, positions,
                                             geometry, sample_first)
                weight = torch.cat([weights[l] for l in sample_first], dim=1).float()
                hidden = hidden.float() + F.linear(columns, weight)
            if projected:
                groups: dict[tuple, list[str]] = {}  # maps on one grid are summed before sampling
                for name, value in projected.items():
                    groups.setdefault((tuple(geometry[name]), tuple(value.shape)), []).append(name)
                merged = {names[0]: sum(projected[n].float() for n in names) for names in groups.values()}
                columns = sparse_hypercolumn(merged, positions, geometry, list(merged))
                hidden = hidden.float() + columns.unflatten(-1, (len(merged), -1)).sum(dim=-2)
        return self.fc2(self.drop(F.relu(hidden)))
