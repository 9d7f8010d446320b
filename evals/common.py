"""Config fields and image transforms shared by the harnesses (the protocol-specific ones live in
each harness file)."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from backbones.alexnet import IMAGENET_MEAN, IMAGENET_STD
from runtime.config import operational, protocol
from runtime.images import DCT_SCALES, EncodedJpeg
from runtime.precision import AMP_CHOICES, amp_dtype, grad_scaler, memory_format



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
    amp: str = operational("off", "autocast dtype of the network's forward passes: off, bf16 (CPU or CUDA) or fp16 "
                                  "(CUDA, with a GradScaler); losses and metrics stay float32")
    channels_last: bool = operational(False, "run the network in the channels-last memory format (faster "
                                             "convolutions on recent GPUs)")


# values every harness config may take (evals.run checks them with the harness's own CHECKS)
COMMON_CHOICES = {"amp": AMP_CHOICES}


@dataclass
class Execution:
    """How a harness's network computes (``amp``, ``channels_last``), on ``device``: the pieces
    the training loop and the evaluation loops share."""
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    @classmethod
    def of(cls, config, device: torch.device) -> "Execution":
        return cls(device, amp_dtype(config.amp, device), config.channels_last)

    def scaler(self) -> torch.amp.GradScaler | None:
        """For :class:`runtime.loop.Trainer` (fp16 only)."""
        return grad_scaler(self.amp_dtype, self.device)

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on the device, in the memory format."""
        return model.to(self.device, memory_format=memory_format(self.channels_last))

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """A batch from the loader on the device, normalised if it is uint8 (:func:`normalise_images`),
        in the memory format."""
        if isinstance(images, ViewBatch):
            images = decode_views(images, self.device if self.device.type == "cuda" else torch.device("cuda"))
        images = images.to(self.device, non_blocking=True)
        layout = memory_format(self.channels_last) if images.dim() == 4 else torch.contiguous_format
        if images.dtype == torch.uint8:
            return normalise_images(images, layout)
        return images.contiguous(memory_format=layout)

    def autocast(self):
        """The forward passes of evaluation, as the Trainer runs training's (nothing when off)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


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
# downsamples and nothing is upsampled beyond what the protocol's resize does). A JPEG's window
# is resampled by :func:`resample_window` (torch's antialiased bilinear kernel on uint8: PIL's
# filter, 3x faster); any other image by PIL itself.

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


def normalise_images(images: torch.Tensor, memory: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 RGB images (3, H, W) or a batch (B, 3, H, W), on any device -> normalised float32,
    ``(x / 255 - mean) / std``: the same operations as the per-sample path, so the same values.
    Pipelines that hand uint8 views to the training step call it once per batch there (on the
    step's device), which keeps float conversion out of the loader workers and the copies to
    the device a quarter of the size."""
    mean, inv_std = _MEAN_255.to(images.device), _INV_STD_255.to(images.device)
    return torch.sub(images.to(torch.float32, memory_format=memory), mean).mul_(inv_std)


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
    (OpenCV's libjpeg-turbo decoder at full size: the same pixels as PIL's, sooner)."""
    if not isinstance(image, EncodedJpeg):
        return image
    return Image.fromarray(image.pixels(reduction).contiguous().numpy(), "RGB")


def _pil_resample(image: Image.Image, box: tuple[float, float, float, float], size: tuple[int, int]) -> torch.Tensor:
    """``box`` (source coordinates) of ``image`` resampled to ``size`` by PIL's bilinear filter,
    (H, W, 3) uint8; decoded at the reduction :func:`dct_reduction` allows."""
    reduction = dct_reduction(image, (box[2] - box[0], box[3] - box[1]), size)
    return _array(_source(image, reduction).resize(size, Image.BILINEAR, box=tuple(v / reduction for v in box)))


# How many extra output rows/columns resample_window may compute before the window to find a
# crop origin on the pixel grid (see there), and the largest shift of the window it accepts: where
# no origin comes that close (scales near 1 or another simple ratio), PIL resamples the window.
_ORIGIN_SEARCH = 24
MAX_WINDOW_SHIFT = 0.25  # source pixels


def _window_axis(start: float, end: float, out: int, limit: int) -> tuple[int, int, int, float]:
    """One axis of :func:`resample_window`: ``(first, last, lead, shift)``: the source pixels
    ``[first, last)`` to crop, the number of leading outputs to drop, and how far the window
    then read lies from ``start`` (source pixels)."""
    scale = (end - start) / out
    support = max(scale, 1.0)  # the bilinear filter's half-width in source pixels (PIL's and torch's)
    needed = math.ceil(support / scale)  # leading outputs whose support covers the window's
    best = None
    for lead in range(needed + _ORIGIN_SEARCH + 1):
        origin = start - lead * scale
        first = round(origin)
        if first < 0:
            break
        if lead < needed and first != 0:  # the filter would be cut off at the crop, not at the image edge
            continue
        if best is None or abs(origin - first) < best[0]:
            best = (abs(origin - first), lead, first)
            if best[0] <= 0.05:  # close enough: the fewest extra outputs
                break
    if best is None:  # the window starts within a filter support of the image edge, but not on it
        best = (math.inf, 0, min(round(start), limit - 1))
    shift, lead, first = best
    return first, min(limit, math.ceil(end + support) + 1), lead, shift


def resample_window(pixels: torch.Tensor, box: tuple[float, float, float, float],
                    size: tuple[int, int]) -> torch.Tensor:
    """``box`` (x0, y0, x1, y1 in pixel units of ``pixels``, an (H, W, 3) uint8 tensor) resampled
    to ``size`` (width, height) with the antialiased bilinear filter: the (H, W, 3) uint8 result
    of ``Image.resize(size, BILINEAR, box=box)``, from torch's uint8 kernel (within one grey level
    of PIL's fixed-point arithmetic on 99.9 % of values, three times faster).

    torch's kernel places output ``j``'s filter at ``(j + 0.5) * scale`` from the first pixel of
    its input, so a window whose origin is not on the pixel grid is cropped ``lead`` outputs
    early (``lead * scale`` source pixels, which also keeps the filter's support beyond the window
    as PIL reads it) and the lead is dropped; ``lead`` is chosen to bring the crop's origin nearest
    to the pixel grid. The window read is the drawn one shifted by at most MAX_WINDOW_SHIFT (0.03 px
    on average over P2's scales), its scale exact; where no lead comes that close (one view in
    twenty: scales near 1 or another simple ratio), PIL resamples the drawn window itself. On the
    GPU (decode_device=cuda) the nearest origin is used, whatever its shift (at most 0.5 px)."""
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = box
    left, right, lead_x, shift_x = _window_axis(x0, x1, size[0], width)
    top, bottom, lead_y, shift_y = _window_axis(y0, y1, size[1], height)
    on_cpu = pixels.device.type == "cpu"  # the GPU kernel takes floating point only
    if on_cpu and max(shift_x, shift_y) > MAX_WINDOW_SHIFT:
        return _array(Image.fromarray(pixels.contiguous().numpy(), "RGB").resize(size, Image.BILINEAR, box=box))
    crop = pixels[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0)  # channels-last strides: the fast path
    out = torch.ops.aten._upsample_bilinear2d_aa(crop if on_cpu else crop.float(), [lead_y + size[1], lead_x + size[0]],
                                                 False, size[1] / (y1 - y0), size[0] / (x1 - x0))
    if not on_cpu:
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out[0, :, lead_y:, lead_x:].permute(1, 2, 0)


def _resampled_view(image: Image.Image, box: tuple[float, float, float, float], size: tuple[int, int],
                    mirror: bool) -> torch.Tensor:
    """``box`` (source coordinates) of ``image`` bilinearly resampled to ``size``, mirrored on
    request, as a (3, H, W) uint8 tensor (any strides: the batch's stack or normalisation makes
    the one copy): a lazily decoded JPEG at the reduction :func:`dct_reduction` allows, through
    :func:`resample_window`; any other image through PIL."""
    if isinstance(image, EncodedJpeg):
        reduction = dct_reduction(image, (box[2] - box[0], box[3] - box[1]), size)
        pixels = resample_window(image.pixels(reduction), tuple(v / reduction for v in box), size)
    else:
        pixels = _pil_resample(image, box, size)
    return _chw_view(pixels, mirror)


def _chw_view(pixels: torch.Tensor, mirror: bool) -> torch.Tensor:
    """(H, W, 3) uint8 (any strides) -> the (3, H, W) view of it, mirrored on request by one copy
    in the pixels' own memory order (channels innermost or not), which :func:`stack_views` then
    keeps: no pixel is transposed on the way to the batch."""
    if not mirror:
        return pixels.permute(2, 0, 1)
    return pixels.flip(1).permute(2, 0, 1) if pixels.stride(2) == 1 else pixels.permute(2, 0, 1).flip(-1)


def scaled_window(size: tuple[int, int], rng: np.random.Generator, crop: int, scale_range: tuple[float, float],
                  mirror: bool = True) -> tuple[tuple[float, float, float, float], bool]:
    """P2's geometry for an image of ``size`` (width, height): a square source window whose side
    is ``crop * r`` with r uniform in ``scale_range`` (capped by the image's shorter side), at a
    uniformly random position, and the mirror coin (probability 1/2): ``(box, mirrored)``."""
    width, height = size
    side = min(crop * rng.uniform(*scale_range), width, height)
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    return (x0, y0, x0 + side, y0 + side), bool(mirror and rng.random() < 0.5)


def random_scaled_view(image: Image.Image, rng: np.random.Generator, crop: int, scale_range: tuple[float, float],
                       mirror: bool = True, normalise: bool = True, decode_device: str = "cpu"):
    """P2's augmentation (:func:`scaled_window`), bilinearly resized to ``crop``: normalised float
    (3, crop, crop), or with ``normalise=False`` uint8 for :func:`normalise_images` on the batch;
    with ``decode_device="cuda"`` a JPEG's :class:`EncodedView` instead (:func:`decode_views`)."""
    box, flip = scaled_window(image.size, rng, crop, scale_range, mirror)
    if decode_device != "cpu":
        return deferred_view(image, box, (crop, crop), flip)
    view = _resampled_view(image, box, (crop, crop), flip)
    return normalise_images(view) if normalise else view


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

    def window(self, box: tuple[int, int, int, int]) -> torch.Tensor:
        """The crop ``box`` of the resized image, (H, W, 3) uint8."""
        if self._im is not None:  # already resized in full (PIL used it): crop that
            return _array(self.crop(box))
        size = (box[2] - box[0], box[3] - box[1])
        source = self.source_box(box)
        if dct_reduction(self.original, (source[2] - source[0], source[3] - source[1]), size) > 1:
            return _pil_resample(self.original, source, size)
        return self._full_size_resize()[box[1]:box[3], box[0]:box[2]]

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


def _crop(image: Image.Image, box: tuple[int, int, int, int], mirror: bool, normalise: bool,
          decode_device: str = "cpu"):
    """The crop ``box``, mirrored on request: normalised float (3, H, W), or uint8 for
    :func:`normalise_images` on the batch (or, ``decode_device="cuda"``, an :class:`EncodedView`
    of the window in the original JPEG)."""
    if decode_device != "cpu" and isinstance(image, ResizedImage):
        return deferred_view(image.original, image.source_box(box), (box[2] - box[0], box[3] - box[1]), mirror)
    pixels = image.window(box) if isinstance(image, ResizedImage) else _array(image.crop(box))
    return _normalise(pixels, mirror) if normalise else _chw_view(pixels, mirror)


def random_crop_mirror(image: Image.Image, rng: np.random.Generator, crop: int, normalise: bool = True,
                       decode_device: str = "cpu"):
    width, height = image.size
    x0, y0 = int(rng.integers(0, width - crop + 1)), int(rng.integers(0, height - crop + 1))
    return _crop(image, (x0, y0, x0 + crop, y0 + crop), bool(rng.random() < 0.5), normalise, decode_device)


def center_crop(image: Image.Image, crop: int, normalise: bool = True, decode_device: str = "cpu"):
    width, height = image.size
    x0, y0 = (width - crop) // 2, (height - crop) // 2
    return _crop(image, (x0, y0, x0 + crop, y0 + crop), False, normalise, decode_device)


# ----------------------------------------------------------------------------- decode_device=cuda
#
# The loader workers only read the files and draw the windows; the training step decodes the
# batch's JPEGs with nvJPEG (torchvision.io.decode_jpeg on the GPU) and resamples the windows
# there with the same antialiased bilinear filter (resample_window, in float on the GPU). The
# pixels differ from the CPU path's by the decoders' rounding (about a grey level): decode_device
# is operational, like amp.


class EncodedView(NamedTuple):
    """A view still to be made: the JPEG's bytes (1-D uint8), the source window (x0, y0, x1, y1),
    the output size (width, height) and the mirror coin."""
    data: torch.Tensor
    box: tuple[float, float, float, float]
    size: tuple[int, int]
    mirror: bool


def deferred_view(image: Image.Image, box, size: tuple[int, int], mirror: bool):
    """An :class:`EncodedView` of a lazily decoded JPEG (one bytes tensor per image, shared by its
    views); any other image is resampled now, on the CPU, to the (3, H, W) uint8 view."""
    if isinstance(image, EncodedJpeg) and hasattr(image, "encoded"):
        cache = image.__dict__.setdefault("_pixel_cache", {})
        if "bytes" not in cache:
            cache["bytes"] = torch.from_numpy(np.frombuffer(image.encoded, np.uint8).copy())  # owns its storage
        return EncodedView(cache["bytes"], tuple(float(v) for v in box), size, mirror)
    return _resampled_view(image, box, size, mirror)


class ViewBatch(list):
    """A batch of :class:`EncodedView` (and CPU uint8 views) for :func:`decode_views`."""


def collate_views(samples: list, shared: bool | None = None):
    """The DataLoader collate of ``(view, *rest)`` samples: the views as :func:`stack_views` batches
    them, the rest as torch's default collate does. ``shared``: allocate the batch in shared
    memory, as a DataLoader worker sends it (default: inside a worker, as default_collate does)."""
    views, *rest = zip(*samples)
    return (stack_views(list(views), shared), *(default_collate(list(items)) for items in rest))


def stack_views(views: list, shared: bool | None = None):
    """uint8 (3, H, W) views as one (B, 3, H, W) uint8 batch in the views' own memory order
    (channels-last when the channels are innermost, as from PIL or a decoder; else contiguous):
    each view is one plain copy, where torch.stack would transpose channels-last views pixel by
    pixel (:func:`normalise_images` gives the float batch the format the network wants); a
    :class:`ViewBatch` when some are still encoded (decode_device=cuda)."""
    if any(isinstance(v, EncodedView) for v in views):
        return ViewBatch(views)
    channels, height, width = views[0].shape
    channels_last = views[0].stride(0) == 1
    if shared is None:
        shared = torch.utils.data.get_worker_info() is not None
    shape = (len(views), height, width, channels) if channels_last else (len(views), channels, height, width)
    if shared:  # what a DataLoader worker sends, as default_collate allocates it
        out = views[0].new(views[0]._typed_storage()._new_shared(math.prod(shape))).resize_(shape)
    else:
        out = views[0].new_empty(shape)
    for row, view in zip(out, views):
        row.copy_(view.permute(1, 2, 0) if channels_last else view)
    return out.permute(0, 3, 1, 2) if channels_last else out


def decode_views(views: list, device: torch.device) -> torch.Tensor:
    """(B, 3, H, W) uint8 on ``device``: each distinct JPEG of the batch decoded once with nvJPEG
    (one batched ``decode_jpeg`` call on the GPU), its windows resampled there; CPU views copied."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = {id(v.data): v.data for v in views if isinstance(v, EncodedView)}
    decoded = {}
    if encoded:
        with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated (for torchcodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            images = decode_jpeg(list(encoded.values()), mode=ImageReadMode.RGB, device=device)
        decoded = dict(zip(encoded, (image.permute(1, 2, 0) for image in images)))
    out = []
    for view in views:
        if isinstance(view, EncodedView):
            chw = resample_window(decoded[id(view.data)], view.box, view.size).permute(2, 0, 1)
            out.append(chw.flip(-1) if view.mirror else chw)
        else:
            out.append(view.to(device, non_blocking=True))
    return torch.stack(out)
