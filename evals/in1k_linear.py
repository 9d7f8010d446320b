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
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from backbones.alexnet import PROBE_VALUES, probe_pool_sizes
from backbones.checkpoint import fingerprint
from evals import metrics
from evals.common import CommonConfig, Execution, center_crop, collate_views, random_crop_mirror, resize_shorter
from evals.datasets.imagenet import OFFICIAL_COUNTS, ImageNetDataset
from evals.datasets.preflight import preflight_datasets
from evals.run import run_task
from runtime.config import chosen, operational, protocol
from runtime.data import Augmented, loader_factory
from runtime.loop import Trainer, multistep_lr

TASK = "in1k_linear"
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
CAFFENET_WIDTHS = (96, 256, 384, 384, 256)  # the widths the protocol's pool sizes were set for
CHECKS = {"lengths": {"pool_sizes": len(LAYERS)}, "minimum": {"crop": 64}}


@dataclass
class Config(CommonConfig):
    pool_sizes: tuple[int, ...] = protocol((10, 6, 5, 5, 6), "P5: bilinear resize of each rectified conv map")
    batch_size: int = protocol(64, "P5 (reference)")
    iterations: int = protocol(140_000, "P5")
    crop: int = protocol(227, "P5: random 227 crop + mirror; centre 227 crop at test")
    resize: int = chosen(256, "shorter side before the 227 crop: the standard ImageNet pipeline (P5 does not say)")
    # P5: "Optimiser and lr schedule: not published"
    lr: float = chosen(0.01, "SGD at 0.01: the usual choice for Caffe-era linear probes")
    momentum: float = chosen(0.9, "the usual choice for Caffe-era linear probes")
    weight_decay: float = chosen(5e-4, "the usual choice for Caffe-era linear probes")
    lr_milestones: tuple[int, ...] = chosen((50_000, 100_000), "x0.1 at ~1/3 and ~2/3 of the published length")
    lr_gamma: float = chosen(0.1, "x0.1 at each milestone")
    train_split: str = protocol("train", "P5")
    test_split: str = protocol("val", "P5")
    checkpoint_every: int = operational(5_000)
    decode_device: str = operational("cpu", "where the JPEGs are decoded: cpu (the loader workers) or cuda (nvJPEG "
                                            "on the GPU, a batch of file bytes per step; the workers only draw "
                                            "the windows)")


PRESETS = {
    "paper": Config(),
    "demo": Config(preset="demo", data_root="demo_output/data", iterations=120, batch_size=32,
                   lr_milestones=(80,), checkpoint_every=40, resize=160, crop=128, workers=2),
}


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


class Data(NamedTuple):
    train: ImageNetDataset
    test: ImageNetDataset
    splits: dict  # split name -> image paths relative to the root: the run's data identity


def load_data(config: Config) -> Data:
    """The train and val sets; their file lists are relative to the root (the same files elsewhere
    are the same data)."""
    root = Path(config.data_root) / "imagenet"
    train_set, test_set = ImageNetDataset(root, config.train_split), ImageNetDataset(root, config.test_split)
    splits = {name: [os.path.relpath(p, root) for p, _ in data.samples]
              for name, data in ((config.train_split, train_set), (config.test_split, test_set))}
    return Data(train_set, test_set, splits)


def official_sizes(config: Config) -> dict[str, int]:
    """The image count of each split the ``paper`` preset must read: ILSVRC-12 train 1,281,167 and val 50,000 (P5). ``evals.run`` compares
    them with the loaded split lists before training (``--allow-subset`` to run on others)."""
    return {s: OFFICIAL_COUNTS[s] for s in (config.train_split, config.test_split) if s in ("train", "val")}


def backbone_options(config: Config) -> dict:
    """The checkpoint's own layers, frozen; no classifier."""
    return {"num_classes": None, "new_head": False}


def preflight(data: Data, config: Config, log) -> None:
    preflight_datasets({config.train_split: data.train, config.test_split: data.test}, log=log)


METRIC_DEFINITIONS = {"top1": "fraction of val images whose highest-scoring class is the label, percent, per layer"}


def train_and_evaluate(config: Config, data: Data, begun) -> dict:
    """Train the five probes on the frozen backbone (P5) and test them; the metrics (main rank)."""
    train_set, test_set = data.train, data.test
    info, device, loaded = begun.info, begun.device, begun.loaded
    num_classes = len(train_set.classes)
    execution = Execution.of(config, device)
    backbone = execution.model(loaded.model).eval()
    for param in backbone.parameters():
        param.requires_grad = False
    frozen_fp = fingerprint(backbone.state_dict())
    channels = {name: getattr(backbone, name).out_channels for name in LAYERS}
    pool_sizes = config.pool_sizes
    if channels != dict(zip(LAYERS, CAFFENET_WIDTHS)):  # another member: the same ~9k-value budget (P5)
        pool_sizes = probe_pool_sizes(backbone.arch, LAYERS)
        if begun.log:
            begun.log(f"[{TASK}] conv widths {list(channels.values())} are not CaffeNet's: probe sizes "
                      f"{list(pool_sizes)} (about {PROBE_VALUES} values per layer) instead of {list(config.pool_sizes)}")
    probes = LinearProbes(channels, dict(zip(LAYERS, pool_sizes)), num_classes).to(device)
    net = DistributedDataParallel(probes) if info.world_size > 1 else probes
    optimizer = torch.optim.SGD(probes.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = multistep_lr(optimizer, config.lr_milestones, config.lr_gamma)
    trainer = Trainer(model=net, optimizer=optimizer, scheduler=scheduler, total_steps=config.iterations,
                             work_dir=begun.work_dir, checkpoint_every=config.checkpoint_every, info=info,
                             description=TASK, identity=begun.identity, amp_dtype=execution.amp_dtype,
                             scaler=execution.scaler())
    if config.resume:
        trainer.resume()  # prints where it resumed

    def transform(sample, rng):
        image, target = sample
        # uint8 crops: normalised per batch in step_fn, on the device
        return random_crop_mirror(resize_shorter(image, config.resize), rng, config.crop, normalise=False,
                                  decode_device=config.decode_device), target

    train_data = Augmented(train_set, transform, config.seed)
    per_rank_batch = config.batch_size // info.world_size

    make_loader = loader_factory(train_data, per_rank_batch, config, info, collate_fn=collate_views)

    def step_fn(batch):
        images, targets = batch
        with torch.no_grad():  # one frozen forward pass feeds all five heads
            acts = backbone.activations(execution.images(images), LAYERS)
        logits = net(acts)
        losses = {k: F.cross_entropy(v.float(), targets.to(device)) for k, v in logits.items()}
        return sum(losses.values()), {f"loss_{k}": v.item() for k, v in losses.items()}

    t0 = time.monotonic()
    trainer.run(make_loader, step_fn, per_rank_batch, len(train_set))
    train_seconds = time.monotonic() - t0
    assert_frozen(backbone, frozen_fp)
    if not info.is_main:
        return {}

    probes.eval()
    test_data = Augmented(test_set, lambda s, rng: (center_crop(resize_shorter(s[0], config.resize), config.crop,
                                                                normalise=False, decode_device=config.decode_device),
                                                    s[1]), config.seed)
    all_logits = {k: [] for k in LAYERS}
    targets = []
    with torch.no_grad():
        for images, target in tqdm(DataLoader(test_data, batch_size=config.batch_size, num_workers=config.workers,
                                                    collate_fn=collate_views),
                                   desc=f"{TASK} val", unit="batch", mininterval=1.0):
            with execution.autocast():
                logits = probes(backbone.activations(execution.images(images), LAYERS))
            for k in LAYERS:
                all_logits[k].append(logits[k].float().cpu())
            targets.append(target)
    targets = torch.cat(targets)
    ks = (1, 5) if num_classes >= 5 else (1,)
    accuracy = {k: metrics.topk_accuracy(torch.cat(v), targets, ks=ks) for k, v in all_logits.items()}
    return {"top1": {k: 100.0 * accuracy[k][1] for k in LAYERS},
            **({"top5": {k: 100.0 * accuracy[k][5] for k in LAYERS}} if 5 in ks else {}),
            "chance_top1": 100.0 / num_classes, "num_classes": num_classes, "train_seconds": train_seconds,
            "backbone_frozen_check": "passed",
            "model_selection": "none: fixed schedule, last iterate evaluated once on the val split"}


def summary(result: dict) -> str:
    return "top-1 " + " ".join(f"{k} {v:.1f}" for k, v in result["top1"].items())


def run(config: Config) -> dict:
    """Evaluate ``config.ckpt`` by linear probing and write its record (evals.run.run_task)."""
    return run_task(TASK, config)
