"""The pretraining networks: AlexNet + sparse hypercolumn + MLP (paper §3 "CNN embedding
function", §4.1; protocols.md P1).

* backbone: AlexNet in the CaffeNet layout with parameter-free BatchNorm after every conv/fc
  (P1), run densely (fc6/fc7 as convolutions) so that every layer is a spatial map;
* sparse hypercolumn: conv1, pool1, conv3, pool5 and fc7 bilinearly sampled at the chosen
  pixels and concatenated (96 + 96 + 384 + 256 + 4096 = 4928 channels; P1), with the shared
  sampler :func:`backbones.hypercolumn.sparse_hypercolumn`;
* MLP with one hidden layer (P1) -> ``CPFSNet``: D = 16 L2-normalised embeddings (P1, eq. 2);
  ``DirectRegressionNet``: two 16-way heads, flow bins along x and along y (§4.5 baseline, P1).

The hidden width of the MLP is **not published** (the paper defers "the exact model
specifications" to a supplement that is not available): ``HIDDEN_WIDTH = 256`` is the project's
choice, small enough that the head costs a few percent of the AlexNet step
(``benchmarks/bench_train_step.py``).

The MLP is :class:`backbones.hypercolumn.HypercolumnHead`, the same module as the segmentation
head's: layers whose map has fewer units than there are sampled pixels (conv3, pool5, fc7 at 512
pixels) are projected to the hidden width *before* sampling (exact, as the first layer and
bilinear sampling are both linear), so the 4096-wide fc7 column is never materialised per pixel.

Checkpoint layout (written by ``pretrain.train``): AlexNet weights under ``state_dict`` (what
``backbones.checkpoint`` reads and ``pretrain.export`` folds), the MLP under ``head``, the
flow-kernel bandwidth under ``sigma`` and the constructor arguments under ``model_config``.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones.alexnet import AlexNet, layer_geometry
from backbones.checkpoint import CheckpointError
from backbones.hypercolumn import HypercolumnHead, layer_channels, sparse_hypercolumn
from runtime.safe_load import safe_torch_load

__all__ = [
    "PRETRAIN_FORMAT",
    "HYPERCOLUMN_LAYERS",
    "EMBEDDING_DIM",
    "HIDDEN_WIDTH",
    "NUM_BINS",
    "CPFSNet",
    "DirectRegressionNet",
    "build_model",
    "set_bn_momentum",
    "hypercolumn_layer_names",
    "load_pretrain_checkpoint",
]

PRETRAIN_FORMAT = "cpfs-bench/pretrain"
HYPERCOLUMN_LAYERS = ("conv1", "pool1", "conv3", "pool5", "fc7")  # P1, §4.1
EMBEDDING_DIM = 16  # P1, §4.1: D = 16
HIDDEN_WIDTH = 256  # not published (supplement unavailable): project choice, see module docstring
NUM_BINS = 16  # P1, §4.5: 16 uniform bins per flow component
LAYOUT = "caffenet"  # P1
BN_MOMENTUM = 0.1  # not published: torch's default (the running statistics export folds in)


class _HypercolumnNet(nn.Module):
    """AlexNet (parameter-free BN, P1) + sparse hypercolumn + one-hidden-layer MLP."""

    def __init__(self, out_dim: int, hidden: int = HIDDEN_WIDTH, layers: Sequence[str] = HYPERCOLUMN_LAYERS,
                 dropout: float = 0.0, backbone_dropout: float = 0.0, bn_momentum: float = BN_MOMENTUM):
        super().__init__()
        # fc8 is not used: the hypercolumn stops at fc7. backbone_dropout acts after fc6 (CaffeNet).
        self.backbone = AlexNet(LAYOUT, batchnorm=True, num_classes=None, dropout=backbone_dropout)
        set_bn_momentum(self.backbone, bn_momentum)
        self.layers = tuple(layers)
        self.geometry = layer_geometry(self.backbone.arch)
        channels = {name: layer_channels(self.backbone, name) for name in self.layers}
        self.head = HypercolumnHead(channels, hidden, out_dim, dropout)
        self._config = {"hidden": hidden, "layers": list(self.layers), "dropout": dropout,
                        "backbone_dropout": backbone_dropout, "bn_momentum": bn_momentum}

    @property
    def hypercolumn_channels(self) -> int:
        return sum(self.head.channels)

    def activations(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.backbone.activations(images, self.layers, dense=True)

    def hypercolumn(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The sparse hypercolumn itself, (B, N, 4928) for the paper's layers."""
        return sparse_hypercolumn(self.activations(images), positions.float(), self.geometry, self.layers)

    def pixel_outputs(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """MLP outputs before any normalisation, (B, N, out_dim); positions (B, N, 2) as (y, x)."""
        return self.head.forward_sampled(self.activations(images), positions, self.geometry)

    def config(self) -> dict:
        """Constructor arguments, for rebuilding the network from a checkpoint."""
        return dict(self._config)


class CPFSNet(_HypercolumnNet):
    """Pixel embeddings phi(I, p) for the CPFS loss (eqs. 2-5): ``forward(images (B,3,H,W),
    positions (B,N,2) (y,x)) -> (B, N, D)``, unit L2 norm (§4.1)."""

    method = "cpfs"

    def __init__(self, embedding_dim: int = EMBEDDING_DIM, hidden: int = HIDDEN_WIDTH,
                 layers: Sequence[str] = HYPERCOLUMN_LAYERS, dropout: float = 0.0, backbone_dropout: float = 0.0,
                 bn_momentum: float = BN_MOMENTUM):
        super().__init__(embedding_dim, hidden, layers, dropout, backbone_dropout, bn_momentum)
        self.embedding_dim = embedding_dim
        self._config.update(method=self.method, embedding_dim=embedding_dim)

    def forward(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.pixel_outputs(images, positions), p=2.0, dim=-1)


class DirectRegressionNet(_HypercolumnNet):
    """The "direct reg." baseline (§4.5, P1): the same network with two ``num_bins``-way heads.
    ``forward(images, positions) -> (logits_x, logits_y)``, each (B, N, num_bins)."""

    method = "direct"

    def __init__(self, num_bins: int = NUM_BINS, hidden: int = HIDDEN_WIDTH,
                 layers: Sequence[str] = HYPERCOLUMN_LAYERS, dropout: float = 0.0, backbone_dropout: float = 0.0,
                 bn_momentum: float = BN_MOMENTUM):
        super().__init__(2 * num_bins, hidden, layers, dropout, backbone_dropout, bn_momentum)
        self.num_bins = num_bins
        self._config.update(method=self.method, num_bins=num_bins)

    def forward(self, images: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.pixel_outputs(images, positions)
        return logits[..., :self.num_bins], logits[..., self.num_bins:]


def build_model(method: str = "cpfs", *, embedding_dim: int = EMBEDDING_DIM, num_bins: int = NUM_BINS,
                hidden: int = HIDDEN_WIDTH, layers: Sequence[str] = HYPERCOLUMN_LAYERS, dropout: float = 0.0,
                backbone_dropout: float = 0.0, bn_momentum: float = BN_MOMENTUM) -> _HypercolumnNet:
    """``CPFSNet`` for ``method="cpfs"``, ``DirectRegressionNet`` for ``"direct"``."""
    common = dict(hidden=hidden, layers=tuple(layers), dropout=dropout, backbone_dropout=backbone_dropout,
                  bn_momentum=bn_momentum)
    if method == "cpfs":
        return CPFSNet(embedding_dim, **common)
    if method == "direct":
        return DirectRegressionNet(num_bins, **common)
    raise ValueError(f"unknown method {method!r}; expected 'cpfs' or 'direct'")


def set_bn_momentum(module: nn.Module, momentum: float) -> None:
    """Give every BatchNorm of ``module`` the running-average ``momentum``. It only shapes the
    running statistics (what export folds into the weights), never a training step's output; the
    default equals torch's, so a default network is bit for bit the one built without this call."""
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.momentum = momentum


def hypercolumn_layer_names() -> tuple[str, ...]:
    """The AlexNet activations a hypercolumn can sample (for checking ``layers`` in a config
    before a run builds its network): every conv/pool map and fc6/fc7 (fc8 has no map)."""
    return tuple(name for name in layer_geometry(LAYOUT)
                 if name.startswith(("conv", "pool")) or name in ("fc6", "fc7"))


def load_pretrain_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                             ) -> tuple[_HypercolumnNet, float | None, dict]:
    """Rebuild the network of a ``pretrain.train`` checkpoint (``last.pt`` / ``best.pt``).

    Returns ``(net in eval mode, learned sigma^2 or None, the checkpoint dict)``.
    """
    path = os.fspath(path)
    ckpt = safe_torch_load(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != PRETRAIN_FORMAT or "model_config" not in ckpt:
        raise CheckpointError(path, f"not a {PRETRAIN_FORMAT} checkpoint written by pretrain.train")
    try:
        cfg = dict(ckpt["model_config"])
        method = cfg.pop("method")
        net = build_model(method, **cfg)
        net.backbone.load_state_dict(ckpt["state_dict"], strict=True)
        net.head.load_state_dict(ckpt["head"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # edited or mismatched file
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(path, f"weights do not match the recorded model_config "
                                    f"({type(err).__name__}: {first})") from None
    sigma2 = ckpt.get("sigma2")
    return net.eval(), (float(sigma2) if sigma2 is not None else None), ckpt
