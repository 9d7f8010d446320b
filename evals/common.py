"""Config fields and image transforms shared by the harnesses (the protocol-specific ones live in
each harness file)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from backbones.alexnet import IMAGENET_MEAN, IMAGENET_STD
from runtime.config import operational, protocol
from runtime.images import DCT_SCALES, EncodedJpeg



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
    allow_subset: bool = operational(False, "let a paper-preset run read splits smaller or larger than the "
                                             "official ones; the run is then recorded under preset paper+subset")


def weight_and_bias_groups(model: torch.nn.Module, lr: float, weight_decay: float, bias_lr_mult: float,
                           bias_decay_mult: float) -> list[dict]:
    """The trainable parameters as two SGD parameter groups, weights and biases, with Caffe's
    per-blob ``lr_mult`` / ``decay_mult`` for the biases (the weights' multipliers are 1 in every
    reference this repo follows). Caffe scales a blob's regularised gradient by its lr and decays
    it by ``weight_decay * decay_mult``; SGD's per-group ``lr`` and ``weight_decay`` are exactly
    that. The step schedule scales both groups' lr alike, as Caffe's solver does."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    weights = [p for name, p in trainable if not name.endswith("bias")]
    biases = [p for name, p in trainable if name.endswith("bias")]
    return [{"params": weights, "lr": lr, "weight_decay": weight_decay},
            {"params": biases, "lr": lr * bias_lr_mult, "weight_decay": weight_decay * bias_decay_mult}]


# ----------------------------------------------------------------------------- image transforms
#
# The crop geometry of every transform below is drawn from the rng exactly as the protocol's
# reference code does (a window in original-image coordinates, then the mirror coin). Only the
# pixel source is chosen for speed: an image opened with ``runtime.images.open_rgb`` stays
# encoded, and a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain when the window,
# seen at that scale, still has at least as many pixels as the output (so the resampling still
# downsamples and nothing is upsampled beyond what the protocol's resize does).

_MEAN_255 = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1) * 255.0
_INV_STD_255 = 1.0 / (torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1) * 255.0)


def _normalise(pixels: torch.Tensor, mirror: bool = False) -> torch.Tensor:
    """(H, W, 3) uint8 (any strides) -> normalised float (3, H, W), contiguous, mirrored on
    request: one conversion pass and two in-place ones, as ``(x / 255 - mean) / std``."""
    chw = pixels.permute(2, 0, 1)
    if mirror:
        chw = chw.flip(-1)
    out = torch.empty(chw.shape, dtype=torch.float32)
    out.copy_(chw)
    return out.sub_(_MEAN_255).mul_(_INV_STD_255)


def _array(image: Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8 tensor of a PIL image (one copy; PIL's buffer is read-only)."""
    return torch.from_numpy(np.array(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> normalised float tensor (3, H, W)."""
    return _normalise(_array(image))


def dct_reduction(image: Image.Image, window: tuple[float, float], output: tuple[int, int]) -> int:
    """The largest DCT-domain reduction (8, 4, 2 or 1) at which a ``window`` (width, height in
    source pixels) of ``image`` still spans at least ``output`` pixels, so that resampling it to
    ``output`` downsamples or keeps the scale, as resampling the full decode would. 1 for images
    that are not lazily decoded JPEGs (``runtime.images.EncodedJpeg``)."""
    if not isinstance(image, EncodedJpeg):
        return 1
    for reduction in DCT_SCALES:
        if window[0] / reduction >= output[0] and window[1] / reduction >= output[1]:
            return reduction
    return 1


def _source(image: Image.Image, reduction: int) -> Image.Image:
    """The PIL image to resample from: the image itself, or its decode at ``1/reduction``
    (torchvision's libjpeg-turbo decoder at full size: the same pixels as PIL's, sooner)."""
    if not isinstance(image, EncodedJpeg):
        return image
    return Image.fromarray(image.pixels(reduction).contiguous().numpy(), "RGB")


def _resampled_view(image: Image.Image, box: tuple[float, float, float, float], size: tuple[int, int],
                    mirror: bool) -> torch.Tensor:
    """``box`` (source coordinates) of ``image`` bilinearly resampled to ``size``, normalised,
    mirrored on request; decoded at the reduction :func:`dct_reduction` allows."""
    reduction = dct_reduction(image, (box[2] - box[0], box[3] - box[1]), size)
    view = _source(image, reduction).resize(size, Image.BILINEAR, box=tuple(v / reduction for v in box))
    return _normalise(_array(view), mirror)


def random_scaled_view(image: Image.Image, rng: np.random.Generator, crop: int,
                       scale_range: tuple[float, float], mirror: bool = True) -> torch.Tensor:
    """P2's augmentation: a square source window whose side is ``crop * r`` with r uniform in
    ``scale_range`` (capped by the image's shorter side), at a uniformly random position,
    bilinearly resized to ``crop`` and mirrored with probability 1/2."""
    width, height = image.size
    side = min(crop * rng.uniform(*scale_range), width, height)
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    flip = bool(mirror and rng.random() < 0.5)
    return _resampled_view(image, (x0, y0, x0 + side, y0 + side), (crop, crop), flip)


class ResizedImage(Image.Image):
    """What :func:`resize_shorter` returns: a PIL image of the resized size whose pixels are
    computed only when PIL needs them. The crop functions below recognise it and resample just
    their window from the original (at a DCT reduction when that suffices), which gives the
    pixels of resize-then-crop without resizing the whole image."""

    def __init__(self, original: Image.Image, size: tuple[int, int]):
        super().__init__()
        self.original = original
        self._mode, self._size = "RGB", size

    def load(self):
        if self._im is None:
            self._im = self.original.convert("RGB").resize(self.size, Image.BILINEAR).im
        return super().load()

    def source_box(self, box: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
        """``box`` in this image's pixels -> the same window in the original's coordinates."""
        sx, sy = self.original.width / self.width, self.original.height / self.height
        return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy

    def view(self, box: tuple[int, int, int, int], mirror: bool) -> torch.Tensor:
        """The normalised crop ``box`` of the resized image, mirrored on request."""
        if self._im is not None:  # already resized in full (PIL used it): crop that
            return _normalise(_array(self.crop(box)), mirror)
        size = (box[2] - box[0], box[3] - box[1])
        source = self.source_box(box)
        if dct_reduction(self.original, (source[2] - source[0], source[3] - source[1]), size) > 1:
            return _resampled_view(self.original, source, size, mirror)
        return _normalise(self._full_size_resize()[box[1]:box[3], box[0]:box[2]], mirror)

    def _full_size_resize(self) -> torch.Tensor:
        """(H, W, 3) uint8 of the whole resize, by torch's antialiased bilinear kernel: PIL's
        filter and pixel mapping (within one grey level) at a fraction of its cost."""
        original = self.original
        pixels = original.pixels(1) if isinstance(original, EncodedJpeg) else _array(original)
        nchw = pixels.permute(2, 0, 1).unsqueeze(0)
        resized = torch.nn.functional.interpolate(nchw, size=(self.height, self.width), mode="bilinear",
                                                  antialias=True, align_corners=False)
        return resized[0].permute(1, 2, 0)

    def copy(self) -> Image.Image:
        self.load()
        return super().copy()


def resize_shorter(image: Image.Image, side: int) -> Image.Image:
    """``image`` bilinearly resized so that its shorter side is ``side`` (a :class:`ResizedImage`:
    the crop functions read only the window they need)."""
    width, height = image.size
    scale = side / min(width, height)
    return ResizedImage(image, (max(side, round(width * scale)), max(side, round(height * scale))))


def _crop(image: Image.Image, box: tuple[int, int, int, int], mirror: bool) -> torch.Tensor:
    if isinstance(image, ResizedImage):
        return image.view(box, mirror)
    return _normalise(_array(image.crop(box)), mirror)


def random_crop_mirror(image: Image.Image, rng: np.random.Generator, crop: int) -> torch.Tensor:
    width, height = image.size
    x0, y0 = int(rng.integers(0, width - crop + 1)), int(rng.integers(0, height - crop + 1))
    return _crop(image, (x0, y0, x0 + crop, y0 + crop), bool(rng.random() < 0.5))


def center_crop(image: Image.Image, crop: int) -> torch.Tensor:
    width, height = image.size
    x0, y0 = (width - crop) // 2, (height - crop) // 2
    return _crop(image, (x0, y0, x0 + crop, y0 + crop), False)
