"""Images as the networks here expect them, for the tools of this package (rescale, features).

The harnesses in ``evals`` have their own pipelines; ``backbones`` must not import them, so this
module repeats only the small part these tools need: read an image, resize its shorter side and
take the centre crop (the harnesses' test-time view), scale to [0, 1] and normalise with
:data:`backbones.alexnet.IMAGENET_MEAN` / ``IMAGENET_STD``, the input convention of every
network here. It also lists the VOC2007 trainval JPEGs, the sample the rescaling reads.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from backbones.alexnet import IMAGENET_MEAN, IMAGENET_STD
from runtime.errors import DatasetError
from runtime.images import load_image

VOC07 = Path("VOCdevkit") / "VOC2007"
TRAINVAL_LIST = VOC07 / "ImageSets" / "Main" / "trainval.txt"
JPEG_DIR = VOC07 / "JPEGImages"


def voc07_trainval_jpegs(root: str | os.PathLike) -> list[Path]:
    """The JPEG of every VOC2007 trainval image under ``root``, in the split list's order.

    Only trainval: the rescaling must never see a test image. A missing list or image is a
    one-line DatasetError naming the path."""
    listing = Path(root) / TRAINVAL_LIST
    try:
        ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise DatasetError(f"{listing}: VOC2007 trainval list not found (is --data-root the folder holding "
                           f"VOCdevkit/?)") from None
    if not ids:
        raise DatasetError(f"{listing}: the VOC2007 trainval list is empty")
    paths = [Path(root) / JPEG_DIR / f"{image_id}.jpg" for image_id in ids]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"{missing[0]}: image listed in {listing} not found"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return paths


def sample_paths(paths: Sequence[Path], count: int, seed: int) -> list[Path]:
    """``count`` of ``paths`` (all of them if fewer), chosen by a permutation seeded by ``seed``
    alone, so the same list and seed give the same sample on every machine."""
    if count < 1:
        raise ValueError(f"the sample needs at least one image, got {count}")
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))
    return [paths[int(i)] for i in order[:count]]


def to_input(image: Image.Image, size: int | None = 227) -> torch.Tensor:
    """A ``3 x H x W`` float tensor of the RGB ``image``, normalised as every network here expects.

    ``size``: the shorter side is resized (bilinear) to ``size`` and the centre ``size x size``
    crop kept, as the harnesses do at test time; ``None`` keeps the image as it is."""
    if size is not None:
        width, height = image.size
        scale = size / min(width, height)
        image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                             Image.BILINEAR)
        x0, y0 = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((x0, y0, x0 + size, y0 + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(3, 1, 1)
    return (pixels - mean) / std


def load_input(path: str | os.PathLike, size: int | None = 227) -> torch.Tensor:
    """:func:`to_input` of the image file at ``path`` (a one-line DatasetError if unreadable)."""
    return to_input(load_image(path, "RGB"), size)


def load_batch(paths: Sequence[Path], size: int = 227) -> torch.Tensor:
    """``N x 3 x size x size``: the centre crops of ``paths``, stacked."""
    return torch.stack([load_input(p, size) for p in paths])
