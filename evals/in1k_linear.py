"""ImageNet linear probing of a frozen AlexNet (protocols.md P5; Zhang et al.'s protocol).

The rectified conv1..conv5 activations are bilinearly resized to roughly 9-10k values each
(conv1 10x10, conv2 6x6, conv3 5x5, conv4 5x5, conv5 6x6), normalised by a BatchNorm without
affine parameters and fed to one linear classifier per layer; the five heads are trained jointly
from one frozen forward pass. The backbone stays in eval mode with gradients off, and a check
at the end asserts that its weights did not change. Top-1 per layer on the validation split.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from backbones.checkpoint import fingerprint
from evals import engine, metrics
from evals.common import CommonConfig, center_crop, random_crop_mirror, resize_shorter
from evals.datasets.imagenet import ImageNetDataset
from evals.datasets.preflight import preflight_datasets

TASK = "in1k_linear"
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
CHECKS = {"lengths": {"pool_sizes": len(LAYERS)}, "minimum": {"crop": 64}}


@dataclass
class Config(CommonConfig):
    # P5: bilinear resize of each rectified conv activation
    pool_sizes: tuple[int, ...] = (10, 6, 5, 5, 6)
    batch_size: int = 64                 # P5 (reference)
    iterations: int = 140_000            # P5
    crop: int = 227                      # P5: random 227 crop + mirror; centre 227 crop at test
    resize: int = 256                    # chosen: shorter side before cropping (P5 does not say)
    # P5: "Optimiser and lr schedule: not published" -- chosen values, see README:
    lr: float = 0.01                     # chosen
    momentum: float = 0.9                # chosen
    weight_decay: float = 5e-4           # chosen
    lr_milestones: tuple[int, ...] = (50_000, 100_000)  # chosen: x0.1 at 50k and 100k
    lr_gamma: float = 0.1                # chosen
    train_split: str = "train"
    test_split: str = "val"
    checkpoint_every: int = 5_000


PRESETS = {
    "paper": Config(),
    "demo": Config(preset="demo", data_root="demo_output/data", iterations=120, batch_size=32,
                   lr_milestones=(80,), checkpoint_every=40, resize=160, crop=128, workers=2),
}
CHOSEN = ("resize", "lr", "momentum", "weight_decay", "lr_milestones", "lr_gamma")


class FrozenWeightsChanged(RuntimeError):
    """The backbone of a linear probe changed during training: the probe is invalid."""


class LinearProbes(nn.Module):
    """One (BatchNorm without affine -> Linear) head per layer, on resized activations."""

    def __init__(self, channels: dict[str, int], pool_sizes: dict[str, int], num_classes: int):
        super().__init__()
        self.pool_sizes = dict(pool_sizes)
        self.norms = nn.ModuleDict({k: nn.BatchNorm1d(channels[k] * s * s, affine=False) for k, s in pool_sizes.items()})
        self.heads = nn.ModuleDict({k: nn.Linear(channels[k] * s * s, num_classes) for k, s in pool_sizes.items()})

    def forward(self, activations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = {}
        for name, size in self.pool_sizes.items():
            feature = F.interpolate(activations[name], size=(size, size), mode="bilinear", align_corners=False)
            logits[name] = self.heads[name](self.norms[name](feature.flatten(1)))
        return logits


def assert_frozen(backbone: nn.Module, expected: str) -> None:
    actual = fingerprint(backbone.state_dict())
    if actual != expected:
        raise FrozenWeightsChanged(f"the frozen backbone's weights changed during linear probing "
                                   f"(fingerprint {expected[:16]} -> {actual[:16]}); the probe is invalid")


def load_data(config: Config) -> tuple[ImageNetDataset, ImageNetDataset, dict]:
    """The train and val sets and their file lists relative to the root (the run's data identity:
    the same files elsewhere are the same data)."""
    root = Path(config.data_root) / "imagenet"
    train_set, test_set = ImageNetDataset(root, config.train_split), ImageNetDataset(root, config.test_split)
    splits = {name: [os.path.relpath(p, root) for p, _ in data.samples]
              for name, data in ((config.train_split, train_set), (config.test_split, test_set))}
    return train_set, test_set, splits


def run(config: Config) -> dict:
    engine.validate_config(config, **CHECKS)
    train_set, test_set, splits = load_data(config)
    begun = engine.begin_run(TASK, config, splits=splits, num_classes=None, new_head=False)
    if begun.finished is not None:
        return begun.finished
    preflight_datasets({config.train_split: train_set, config.test_split: test_set}, log=begun.log)
    info, device, loaded = begun.info, begun.device, begun.loaded
    num_classes = len(train_set.classes)

    backbone = loaded.model.to(device).eval()
    for param in backbone.parameters():
        param.requires_grad = False
    frozen_fp = fingerprint(backbone.state_dict())
    channels = {name: getattr(backbone, name).out_channels for name in LAYERS}
    probes = LinearProbes(channels, dict(zip(LAYERS, config.pool_sizes)), num_classes).to(device)
    net = DistributedDataParallel(probes) if info.world_size > 1 else probes
    optimizer = torch.optim.SGD(probes.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = engine.multistep_lr(optimizer, config.lr_milestones, config.lr_gamma)
    trainer = engine.Trainer(model=net, optimizer=optimizer, scheduler=scheduler, total_steps=config.iterations,
                             work_dir=begun.work_dir, checkpoint_every=config.checkpoint_every, info=info,
                             description=TASK, identity=begun.identity)
    if config.resume and trainer.resume():
        print(f"[{TASK}] resumed from {trainer.checkpoint_path} at step {trainer.state.step}")

    def transform(sample, rng):
        image, target = sample
        return random_crop_mirror(resize_shorter(image, config.resize), rng, config.crop), target

    train_data = engine.Augmented(train_set, transform, config.seed)
    per_rank_batch = config.batch_size // info.world_size

    make_loader = engine.loader_factory(train_data, per_rank_batch, config, info)

    def step_fn(batch):
        images, targets = batch
        with torch.no_grad():  # one frozen forward pass feeds all five heads
            acts = backbone.activations(images.to(device), LAYERS)
        logits = net(acts)
        losses = {k: F.cross_entropy(v, targets.to(device)) for k, v in logits.items()}
        return sum(losses.values()), {f"loss_{k}": v.item() for k, v in losses.items()}

    t0 = time.monotonic()
    trainer.run(make_loader, step_fn, per_rank_batch, len(train_set))
    train_seconds = time.monotonic() - t0
    assert_frozen(backbone, frozen_fp)
    if not info.is_main:
        return {}

    probes.eval()
    test_data = engine.Augmented(test_set, lambda s, rng: (center_crop(resize_shorter(s[0], config.resize),
                                                                       config.crop), s[1]), config.seed)
    all_logits = {k: [] for k in LAYERS}
    targets = []
    with torch.no_grad():
        for images, target in tqdm(DataLoader(test_data, batch_size=config.batch_size, num_workers=config.workers),
                                   desc=f"{TASK} val", unit="batch", mininterval=1.0):
            logits = probes(backbone.activations(images.to(device), LAYERS))
            for k in LAYERS:
                all_logits[k].append(logits[k].cpu())
            targets.append(target)
    targets = torch.cat(targets)
    ks = (1, 5) if num_classes >= 5 else (1,)
    accuracy = {k: metrics.topk_accuracy(torch.cat(v), targets, ks=ks) for k, v in all_logits.items()}
    result = {"top1": {k: 100.0 * accuracy[k][1] for k in LAYERS},
              **({"top5": {k: 100.0 * accuracy[k][5] for k in LAYERS}} if 5 in ks else {}),
              "chance_top1": 100.0 / num_classes, "num_classes": num_classes, "train_seconds": train_seconds,
              "backbone_frozen_check": "passed",
              "model_selection": "none: fixed schedule, last iterate evaluated once on the val split"}
    path = engine.save_record(task=TASK, metrics=result, metric_definitions={
        "top1": "fraction of val images whose highest-scoring class is the label, percent, per layer"},
        begun=begun, config=config, splits=splits)
    print(f"[{TASK}] top-1 " + " ".join(f"{k} {v:.1f}" for k, v in result["top1"].items()) + f"; record: {path}")
    return result
