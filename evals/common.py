"""Config fields and image transforms shared by the harnesses (the protocol-specific ones live in
each harness file)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from backbones.alexnet import IMAGENET_MEAN, IMAGENET_STD
from runtime.config import operational, protocol



@dataclass
class CommonConfig:
    """Fields every harness has; task configs extend it with their protocol values. Every field
    declares its source (runtime.config: protocol / chosen / operational)."""

    ckpt: str = operational("random", "checkpoint path, or 'random'; its fingerprint keys the run separately")
    data_root: str = operational("data", "folder holding VOCdevkit/, benchmark_RELEASE/, imagenet/; the "
                                         "split lists it holds key the run")
    preset: str = operational("paper", "the name of the value set; a changed protocol value marks it +custom")
    seed: int = operational(0, "keys the run separately (records hold one seed each)")
    label: str | None = operational(None, "row label in the tables (default: from the checkpoint)")
    supervision: str | None = operational(None, "Supervision column (default: from the checkpoint)")
    row: str | None = operational(None, "pool this checkpoint's runs with other checkpoints' under one table row "
                                        "(e.g. several pretraining seeds)")
    layout: str = protocol("caffenet", "P1: the paper's CaffeNet layout, for ckpt=random")
    device: str = operational("auto")
    workers: int = operational(2)
    work_dir: str = operational("work_dirs", "training checkpoints and TensorBoard logs")
    results_dir: str | None = operational(None, "default: results.store.default_results_dir()")
    resume: bool = operational(True, "continue from work_dir's checkpoint if one exists")
    overwrite: bool = operational(False, "replace an existing finished record")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> normalised float tensor (3, H, W)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())


def random_scaled_view(image: Image.Image, rng: np.random.Generator, crop: int,
                       scale_range: tuple[float, float], mirror: bool = True) -> torch.Tensor:
    """P2's augmentation: a square source window whose side is ``crop * r`` with r uniform in
    ``scale_range`` (capped by the image's shorter side), at a uniformly random position,
    bilinearly resized to ``crop`` and mirrored with probability 1/2."""
    width, height = image.size
    side = min(crop * rng.uniform(*scale_range), width, height)
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    view = image.resize((crop, crop), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    if mirror and rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(view)


def resize_shorter(image: Image.Image, side: int) -> Image.Image:
    width, height = image.size
    scale = side / min(width, height)
    return image.resize((max(side, round(width * scale)), max(side, round(height * scale))), Image.BILINEAR)


def random_crop_mirror(image: Image.Image, rng: np.random.Generator, crop: int) -> torch.Tensor:
    width, height = image.size
    x0, y0 = int(rng.integers(0, width - crop + 1)), int(rng.integers(0, height - crop + 1))
    view = image.crop((x0, y0, x0 + crop, y0 + crop))
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(view)


def center_crop(image: Image.Image, crop: int) -> torch.Tensor:
    width, height = image.size
    x0, y0 = (width - crop) // 2, (height - crop) // 2
    return to_tensor(image.crop((x0, y0, x0 + crop, y0 + crop)))
