"""One training step of pretraining and of each harness, at the paper preset's shapes, on
generated tensors: what ``measure_step_rates.py`` times on a CPU and ``gpu_check.py`` on a GPU.

Each builder returns ``(step, batch)``: ``step(batch, autocast_dtype=None) -> loss`` runs forward,
backward and the optimiser step of the harness's own model class with its loss; ``batch`` is made
once (data loading is measured separately, by bench_loaders.py and gpu_check.py's loader test).
``scale`` < 1 shrinks the batch (never the image size) for a cheap CPU measurement; the step rate
is then reported per full batch by the caller, scaled linearly (labelled so).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from backbones.alexnet import AlexNet


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)


def _trainer(model, optimizer, loss_fn, device):
    def step(batch, autocast_dtype=None):
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, autocast_dtype):
            loss = loss_fn(model, batch)
        loss.float().backward()
        optimizer.step()
        return loss.detach().float()
    return step


def pretrain_step(device, batch: int = 96, generator=None):
    """P1: CPFS, batch 96 of 224 crops, 512 pixels each, Adam."""
    from pretrain.loss import Sigma, cpfs_loss
    from pretrain.model import build_model

    model = build_model("cpfs").to(device)
    sigma = Sigma().to(device)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(sigma.parameters()), lr=1e-4)
    data = (torch.randn(batch, 3, 224, 224, generator=generator),
            torch.randint(0, 224, (batch, 512, 2), generator=generator),
            torch.randn(batch, 512, 2, generator=generator) * 0.3)

    def loss_fn(m, b):
        images, positions, flows = (t.to(device) for t in b)
        emb = m(images, positions)
        return cpfs_loss(emb, flows, sigma())
    return _trainer(model, optimizer, loss_fn, device), data


def voc07_cls_step(device, batch: int = 16, generator=None):
    """P2: AlexNet with a 20-way fc8, batch 16 of 227 crops, sigmoid cross-entropy, SGD."""
    model = AlexNet("caffenet", num_classes=20).to(device)
    data = (torch.randn(batch, 3, 227, 227, generator=generator),
            torch.randint(0, 2, (batch, 20), generator=generator).float())

    def loss_fn(m, b):
        images, labels = (t.to(device) for t in b)
        return F.binary_cross_entropy_with_logits(m(images).float(), labels)
    return _trainer(model, _sgd(model), loss_fn, device), data


def voc07_det_step(device, batch: int = 2, generator=None):
    """P3: Fast R-CNN, 2 images at shorter side 600 (the middle of P3's scales) x 1000, 64 RoIs each."""
    from evals.detection.model import FastRCNN, detection_loss

    model = FastRCNN(AlexNet("caffenet", num_classes=None)).to(device)
    rois = []
    for i in range(batch):
        xy = torch.rand(64, 2, generator=generator) * torch.tensor([800.0, 400.0])
        wh = 32 + torch.rand(64, 2, generator=generator) * 160
        rois.append(torch.cat([torch.full((64, 1), float(i)), xy, xy + wh], 1))
    data = (torch.randn(batch, 3, 600, 1000, generator=generator), torch.cat(rois),
            torch.randint(0, 21, (64 * batch,), generator=generator), torch.randn(64 * batch, 4, generator=generator))

    def loss_fn(m, b):
        images, r, labels, targets = (t.to(device) for t in b)
        cls, box = m(images, r)
        loss_cls, loss_box = detection_loss(cls.float(), box.float(), labels, targets)
        return loss_cls + loss_box
    return _trainer(model, _sgd(model), loss_fn, device), data


def voc12_seg_step(device, batch: int = 10, generator=None):
    """P4: hypercolumn segmenter, batch 10 of 448 crops, 128 pixels each, whole network (stage 2)."""
    from evals.voc12_seg import HypercolumnSegmenter

    model = HypercolumnSegmenter(AlexNet("caffenet", num_classes=None)).to(device)
    data = (torch.randn(batch, 3, 448, 448, generator=generator),
            (32 + torch.rand(batch, 128, 2, generator=generator) * 384),
            torch.randint(0, 21, (batch, 128), generator=generator))

    def loss_fn(m, b):
        images, positions, labels = (t.to(device) for t in b)
        return F.cross_entropy(m(images, positions).float().reshape(-1, 21), labels.reshape(-1))
    return _trainer(model, _sgd(model), loss_fn, device), data


def in1k_linear_step(device, batch: int = 64, generator=None):
    """P5: frozen AlexNet, five linear probes on pooled conv1..conv5, batch 64 of 227 crops."""
    from evals.in1k_linear import LAYERS, LinearProbes

    backbone = AlexNet("caffenet", num_classes=None).to(device).eval()
    for p in backbone.parameters():
        p.requires_grad = False
    channels = {name: getattr(backbone, name).out_channels for name in LAYERS}
    probes = LinearProbes(channels, dict(zip(LAYERS, (10, 6, 5, 5, 6))), 1000).to(device)
    data = (torch.randn(batch, 3, 227, 227, generator=generator), torch.randint(0, 1000, (batch,), generator=generator))

    def loss_fn(m, b):
        images, labels = (t.to(device) for t in b)
        with torch.no_grad():
            acts = backbone.activations(images, LAYERS)
        return sum(F.cross_entropy(v.float(), labels) for v in m(acts).values())
    return _trainer(probes, _sgd(probes), loss_fn, device), data


STEPS: dict[str, tuple[Callable, int]] = {  # task -> (builder, the paper's batch per GPU)
    "pretrain": (pretrain_step, 24),  # 96 over the grid's 4 GPUs
    "voc07_cls": (voc07_cls_step, 16),
    "voc07_det": (voc07_det_step, 2),
    "voc12_seg": (voc12_seg_step, 10),
    "in1k_linear": (in1k_linear_step, 64),
}
