"""The AlexNet family, with every activation reachable by name.

One description, :class:`AlexNetArch`, expresses every AlexNet the benchmarks meet: per conv layer
the width, kernel, stride, padding and groups; Caffe's cross-channel LRN (size, alpha, beta, k;
after conv1 and conv2, before or after their pooling); BatchNorm (ours: parameter-free, kept
during pretraining and folded afterwards); ceil- or floor-mode 3x3/2 max pooling after conv1,
conv2 and conv5; the fc6/fc7 widths; where dropout sits; the input front-end (a fixed Sobel stage
for DeepCluster's 2-channel conv1) and the :class:`InputSpec` (channel order, value scale, mean,
std, colour space) of the pixels the network was trained on. Every geometry the harnesses use
(hypercolumn strides and offsets, the RoI-pooling scale, the linear probe's channels) is derived
from it by :func:`layer_geometry` and the model's own layers. Named members (:data:`LAYOUTS`):

* ``caffenet``: the layout of the paper (protocols.md P1; §4.1): 96-256-384-384-256 channels,
  groups=2 on conv2/conv4/conv5, fc6/fc7 with 4096 units. conv1 is padded by 5 pixels (the
  "padding adapted so a hypercolumn head can attach" of P1): a 224 crop (pretraining) and a 227
  crop (VOC classification) both give a 6x6 pool5, so fc6 is the usual 6x6x256 -> 4096 layer and
  the same weights serve every benchmark. There is no LRN: the paper replaces it by BatchNorm
  during pretraining and folds BN away afterwards, so the evaluated network is plain.
* ``torchvision``: ``torchvision.models.alexnet`` (64-192-384-256-256, adaptive 6x6 average pool
  before fc6), so torchvision's ImageNet weights can be evaluated as the supervised row.
* ``bvlc_caffenet`` / ``bvlc_alexnet``: Caffe's reference models (conv1 unpadded, LRN 5/1e-4/0.75
  after / before pooling, ceil-mode pooling, BGR 0-255 minus the mean): the layout most published
  self-supervised AlexNets were released in. ``custom``: any other member, every field explicit
  (what ``backbones.convert`` writes when a file matches no named member).

Input convention. Every data pipeline here produces the *canonical* input: RGB in [0, 1]
normalised by torchvision's ImageNet statistics (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`).
The network's first step, :meth:`AlexNet.prepare_input`, turns it into what this checkpoint was
trained on (its :class:`InputSpec`), so every harness, ``backbones.features`` and
``backbones.rescale`` feed each checkpoint its own convention without knowing it. For the
checkpoints trained here the spec *is* the canonical input and the step is skipped.

Parameter-free BatchNorm (``affine=False``) after every conv/fc is optional (``batchnorm=True``
during pretraining, P1). Activations are named as in Caffe, whose ReLUs run in place: ``convK``
and ``fc6``/``fc7`` are the rectified outputs; ``pool1``/``pool2``/``pool5`` the pooled maps.
With ``dense=True`` fc6/fc7 run as 6x6 / 1x1 convolutions over the pool5 map, which is what a
hypercolumn needs (P4).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The canonical input of every pipeline here (see the module docstring): RGB in [0, 1]
# normalised by torchvision's ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_LAYERS = ("fc6", "fc7")
ACTIVATIONS = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7", "fc8")
POOLED = ("conv1", "conv2", "conv5")  # a 3x3/2 max pool follows these
NORMALISED = ("conv1", "conv2")       # Caffe's LRN follows these (when the member has LRN)
POOL_KERNEL, POOL_STRIDE = 3, 2
FC6_GRID = 6  # pool5 is 6x6 for a 224/227 input; fc6 sees 6*6*C inputs
FC_WIDTH = 4096
CAFFE_LRN = (5, 1e-4, 0.75, 1.0)  # size, alpha (Caffe's: divided by size), beta, k of the reference nets
# Caffe's ILSVRC-2012 mean per channel (B, G, R), in 0-255 units: the usual substitute for the
# 256x256 mean image when a crop is not 227 px at the image centre.
CAFFE_MEAN_BGR = (104.0, 117.0, 123.0)

COLORSPACES = ("rgb", "gray", "lab")
FRONTENDS = ("none", "sobel")


@dataclass(frozen=True)
class InputSpec:
    """The pixels a network was trained on, starting from an 8-bit RGB image ``p`` (0-255).

    ``colorspace`` ``rgb``: channels in ``channel_order``, values ``p * scale``; ``gray``: one
    channel, ITU-R BT.601 luma of ``p`` times ``scale``; ``lab``: CIE L*a*b* (D65; L in 0-100,
    ``scale`` ignored). Then, in this order: each image's own per-channel mean is subtracted
    (``per_image_mean``, Doersch et al.), then the per-pixel ``mean_image`` (C x H x W, Caffe's
    ``.binaryproto``; centre-cropped to the input, or resized when the input is larger), then
    ``mean`` (per channel), then division by ``std``; finally only ``channels`` are kept (e.g.
    ``(0,)``: the L channel of Lab for colorization networks). Means and stds are in the units
    after scaling, in the order the channels are fed.
    """

    colorspace: str = "rgb"
    channel_order: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD
    per_image_mean: bool = False
    mean_image: torch.Tensor | None = field(default=None, compare=False, repr=False)
    channels: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.colorspace not in COLORSPACES:
            raise ValueError(f"unknown colour space {self.colorspace!r}; expected one of {COLORSPACES}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel order must be RGB or BGR, got {self.channel_order!r}")
        width = 1 if self.colorspace == "gray" else 3
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
                if len(value) not in (1, width):
                    raise ValueError(f"input {name} has {len(value)} values for {width} channel(s)")
        if self.std is not None and any(v == 0 for v in self.std):
            raise ValueError("input std must not contain zeros")
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
            if not self.channels or any(not 0 <= c < width for c in self.channels):
                raise ValueError(f"input channels {self.channels} out of range for {width} channel(s)")
        if self.mean_image is not None:
            image = torch.as_tensor(self.mean_image, dtype=torch.float32)
            if image.dim() != 3 or image.shape[0] != width:
                raise ValueError(f"mean image must be {width} x H x W, got {tuple(image.shape)}")
            object.__setattr__(self, "mean_image", image)

    @property
    def channels_out(self) -> int:
        return len(self.channels) if self.channels is not None else (1 if self.colorspace == "gray" else 3)

    @property
    def is_canonical(self) -> bool:
        """True when the spec is the pipelines' own output (no conversion needed)."""
        return self == CANONICAL_INPUT and self.mean_image is None

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["mean"] = list(self.mean) if self.mean is not None else None
        out["std"] = list(self.std) if self.std is not None else None
        out["channels"] = list(self.channels) if self.channels is not None else None
        if self.mean_image is None:
            del out["mean_image"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "InputSpec":
        data = dict(data)
        for key in ("mean", "std", "channels"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    def describe(self) -> str:
        """One line, e.g. ``BGR x1 (0-255) - per-pixel mean image 3x256x256``."""
        if self.colorspace == "lab":
            parts = ["Lab (L 0-100)"]
        else:
            space = "gray (BT.601 luma)" if self.colorspace == "gray" else self.channel_order
            top = 255.0 * self.scale
            parts = [f"{space} in 0-{top:g}" + (f" (x{self.scale:g})" if self.scale not in (1.0, 1 / 255) else "")]
        if self.per_image_mean:
            parts.append("minus each image's mean")
        if self.mean_image is not None:
            parts.append(f"minus a per-pixel mean image {'x'.join(map(str, self.mean_image.shape))}")
        if self.mean is not None:
            parts.append(f"minus mean {_fmt(self.mean)}")
        if self.std is not None:
            parts.append(f"over std {_fmt(self.std)}")
        if self.channels is not None:
            parts.append(f"channels {list(self.channels)} kept")
        return ", ".join(parts)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


CANONICAL_INPUT = InputSpec()
CAFFE_INPUT = InputSpec(channel_order="BGR", scale=1.0, mean=CAFFE_MEAN_BGR, std=None)

# (out, kernel, stride, padding, groups) per conv
_UNPADDED_CAFFE = ((96, 11, 4, 0, 1), (256, 5, 1, 2, 2), (384, 3, 1, 1, 1), (384, 3, 1, 1, 2), (256, 3, 1, 1, 2))
_MEMBERS: dict[str, dict] = {
    "caffenet": dict(convs=((96, 11, 4, 5, 1),) + _UNPADDED_CAFFE[1:]),
    "torchvision": dict(convs=((64, 11, 4, 2, 1), (192, 5, 1, 2, 1), (384, 3, 1, 1, 1), (256, 3, 1, 1, 1),
                               (256, 3, 1, 1, 1)), dropout_before_fc=True),
    "bvlc_caffenet": dict(convs=_UNPADDED_CAFFE, lrn=CAFFE_LRN, lrn_before_pool=False, ceil_pool=True,
                          input=CAFFE_INPUT),
    "bvlc_alexnet": dict(convs=_UNPADDED_CAFFE, lrn=CAFFE_LRN, lrn_before_pool=True, ceil_pool=True,
                         input=CAFFE_INPUT),
}
LAYOUTS = tuple(_MEMBERS) + ("custom",)
_GEOMETRY_FIELDS = ("convs", "lrn", "lrn_before_pool", "ceil_pool", "fc_widths", "dropout_before_fc", "frontend",
                    "input", "relu_slope")


@dataclass(frozen=True)
class AlexNetArch:
    """Everything needed to rebuild the network; stored inside every checkpoint.

    ``layout`` names a family member; the geometry fields left at ``None`` take that member's
    values (so checkpoints written before the family existed, which store only the first four
    fields, keep meaning what they meant). ``custom`` requires ``convs``.
    """

    layout: str = "caffenet"
    batchnorm: bool = False
    num_classes: int | None = None  # fc8; None for a headless backbone
    dropout: float = 0.5
    convs: tuple[tuple[int, int, int, int, int], ...] | None = None  # (out, kernel, stride, pad, groups) x5
    lrn: tuple[float, float, float, float] | None = None  # (size, alpha, beta, k) after conv1/conv2; None: none
    lrn_before_pool: bool | None = None
    ceil_pool: bool | None = None
    fc_widths: tuple[int, int] | None = None
    dropout_before_fc: bool | None = None  # torchvision: dropout before fc6/fc7; Caffe: after relu6/7
    frontend: str | None = None  # "none" | "sobel" (fixed grey + Sobel convolutions before conv1)
    input: InputSpec | None = None
    relu_slope: float | None = None  # 0: ReLU; > 0: leaky ReLU with this negative slope (BiGAN: 0.2)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown AlexNet layout {self.layout!r}; expected one of {LAYOUTS}")
        defaults = dict(convs=None, lrn=None, lrn_before_pool=False, ceil_pool=False, fc_widths=(FC_WIDTH, FC_WIDTH),
                        dropout_before_fc=False, frontend="none", input=CANONICAL_INPUT, relu_slope=0.0)
        defaults.update(_MEMBERS.get(self.layout, {}))
        for name in _GEOMETRY_FIELDS:
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults[name])
        if isinstance(self.input, Mapping):
            object.__setattr__(self, "input", InputSpec.from_dict(self.input))
        if self.convs is None:
            raise ValueError("a custom AlexNet needs its conv layers (convs)")
        convs = tuple(tuple(int(v) for v in c) for c in self.convs)
        if len(convs) != 5 or any(len(c) != 5 for c in convs):
            raise ValueError(f"convs must be five (out, kernel, stride, pad, groups) tuples, got {self.convs}")
        object.__setattr__(self, "convs", convs)
        object.__setattr__(self, "fc_widths", tuple(int(v) for v in self.fc_widths))
        if self.lrn is not None:
            object.__setattr__(self, "lrn", tuple(float(v) for v in self.lrn))
        if self.frontend not in FRONTENDS:
            raise ValueError(f"unknown front-end {self.frontend!r}; expected one of {FRONTENDS}")
        object.__setattr__(self, "relu_slope", float(self.relu_slope))
        if not 0.0 <= self.relu_slope < 1.0:
            raise ValueError(f"relu_slope must be in [0, 1), got {self.relu_slope}")

    @property
    def in_channels(self) -> int:
        """What conv1 reads: 2 after the Sobel front-end, else the input spec's channels."""
        return 2 if self.frontend == "sobel" else self.input.channels_out

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["convs"] = [list(c) for c in self.convs]
        out["fc_widths"] = list(self.fc_widths)
        out["lrn"] = list(self.lrn) if self.lrn is not None else None
        out["input"] = self.input.to_dict()
        return out

    def describe(self) -> list[str]:
        """The member's layers, a line each (for ``backbones.info``)."""
        pool = f"max 3x3/2 {'ceil' if self.ceil_pool else 'floor'}"
        lines = [f"input: {self.input.describe()}"]
        if self.relu_slope:
            lines.append(f"activation: leaky ReLU, negative slope {self.relu_slope:g} (every conv and fc)")
        if self.frontend == "sobel":
            lines.append("front-end: fixed grey (1x1 conv) + Sobel x/y (3x3 conv) -> 2 channels")
        cin = self.in_channels
        for i, (out, k, s, p, g) in enumerate(self.convs, start=1):
            name = f"conv{i}"
            text = f"{name}: {cin}->{out}, {k}x{k}/{s} pad {p}" + (f", groups {g}" if g > 1 else "")
            text += ", BN" if self.batchnorm else ""
            after = []
            lrn = f"LRN {int(self.lrn[0])}/{self.lrn[1]:g}/{self.lrn[2]:g}/k={self.lrn[3]:g}" if self.lrn else None
            if lrn and name in NORMALISED and self.lrn_before_pool:
                after.append(lrn)
            if name in POOLED:
                after.append(pool)
            if lrn and name in NORMALISED and not self.lrn_before_pool:
                after.append(lrn)
            lines.append(text + "".join(f" -> {a}" for a in after))
            cin = out
        fc6, fc7 = self.fc_widths
        lines.append(f"fc6: {cin}x{FC6_GRID}x{FC6_GRID}->{fc6}, fc7: {fc6}->{fc7}, dropout {self.dropout:g} "
                     f"{'before each fc' if self.dropout_before_fc else 'after relu6/relu7'}"
                     + (", BN" if self.batchnorm else "")
                     + (f", fc8: {fc7}->{self.num_classes}" if self.num_classes else ""))
        return lines


def arch_from_dict(data: Mapping) -> AlexNetArch:
    """An :class:`AlexNetArch` from its stored form (``to_dict``; older files hold fewer fields)."""
    data = dict(data)
    for key in ("convs",):
        if data.get(key) is not None:
            data[key] = tuple(tuple(c) for c in data[key])
    for key in ("fc_widths", "lrn"):
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    if isinstance(data.get("input"), Mapping):
        data["input"] = InputSpec.from_dict(data["input"])
    return AlexNetArch(**data)


# --- input conversion --------------------------------------------------------------------------------

_LUMA = (0.299, 0.587, 0.114)


def _srgb_to_lab(rgb01: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65 white) of sRGB values in [0, 1], ``(B, 3, H, W)``; L in 0-100."""
    linear = torch.where(rgb01 > 0.04045, ((rgb01 + 0.055) / 1.055) ** 2.4, rgb01 / 12.92)
    matrix = rgb01.new_tensor([[0.412453, 0.357580, 0.180423],
                               [0.212671, 0.715160, 0.072169],
                               [0.019334, 0.119193, 0.950227]])
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear)
    xyz = xyz / xyz.new_tensor([0.95047, 1.0, 1.08883]).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    lightness = torch.where(xyz[:, 1:2] > 0.008856, 116.0 * f[:, 1:2] - 16.0, 903.3 * xyz[:, 1:2])
    return torch.cat([lightness, 500.0 * (f[:, 0:1] - f[:, 1:2]), 200.0 * (f[:, 1:2] - f[:, 2:3])], dim=1)


def _fit_mean_image(mean_image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The per-pixel mean for an ``height x width`` input: its centre crop (Caffe's test-time
    crop of the mean), or the mean resized bilinearly when the input is larger."""
    _, mh, mw = mean_image.shape
    if height <= mh and width <= mw:
        y0, x0 = (mh - height) // 2, (mw - width) // 2
        return mean_image[:, y0:y0 + height, x0:x0 + width]
    return F.interpolate(mean_image[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def convert_input(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Canonical input ``(B, 3, H, W)`` -> the pixels ``spec`` describes."""
    if spec.is_canonical:
        return x
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb01 = x * std + mean
    if spec.colorspace == "lab":
        v = _srgb_to_lab(rgb01.clamp(0.0, 1.0))
    elif spec.colorspace == "gray":
        v = torch.einsum("c,bchw->bhw", x.new_tensor(_LUMA), rgb01 * 255.0)[:, None] * spec.scale
    else:
        v = rgb01 * 255.0
        if spec.channel_order == "BGR":
            v = v.flip(1)
        v = v * spec.scale
    if spec.per_image_mean:
        v = v - v.mean(dim=(2, 3), keepdim=True)
    if spec.mean_image is not None:
        v = v - _fit_mean_image(spec.mean_image.to(v), v.shape[-2], v.shape[-1])
    if spec.mean is not None:
        v = v - v.new_tensor(spec.mean).view(1, -1, 1, 1)
    if spec.std is not None:
        v = v / v.new_tensor(spec.std).view(1, -1, 1, 1)
    if spec.channels is not None:
        v = v[:, list(spec.channels)]
    return v


class SobelFrontEnd(nn.Module):
    """DeepCluster's fixed input stage: a 1x1 conv to one grey channel, then Sobel x and y (3x3,
    padding 1) -> 2 channels. Its weights are part of the checkpoint (and never trained)."""

    def __init__(self):
        super().__init__()
        self.grey = nn.Conv2d(3, 1, 1)
        self.sobel = nn.Conv2d(1, 2, 3, padding=1)
        with torch.no_grad():
            self.grey.weight.fill_(1.0 / 3.0)
            self.grey.bias.zero_()
            kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
            self.sobel.weight.copy_(torch.stack([kx, kx.t()])[:, None])
            self.sobel.bias.zero_()
        for p in self.parameters():
            p.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sobel(self.grey(x))


class AlexNet(nn.Module):
    """An AlexNet of the family; ``forward`` returns fc8 logits (or fc7 without a head).

    ``activations(x, names)`` returns any subset of :data:`ACTIVATIONS` by name and only runs the
    network as deep as the deepest requested layer. ``x`` is the canonical input (module docstring).
    """

    def __init__(self, layout: str = "caffenet", batchnorm: bool = False, num_classes: int | None = None,
                 dropout: float = 0.5, *, arch: AlexNetArch | None = None):
        super().__init__()
        if arch is None:
            arch = AlexNetArch(layout, batchnorm, num_classes, dropout)
        self.arch = arch
        if arch.frontend == "sobel":
            self.sobel = SobelFrontEnd()
        cin = arch.in_channels
        for i, (cout, k, s, p, g) in enumerate(arch.convs, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g))
            if arch.batchnorm:
                setattr(self, f"bn{i}", nn.BatchNorm2d(cout, affine=False))
            cin = cout
        fc6, fc7 = arch.fc_widths
        self.fc6 = nn.Linear(cin * FC6_GRID * FC6_GRID, fc6)
        self.fc7 = nn.Linear(fc6, fc7)
        if arch.batchnorm:
            self.bn6 = nn.BatchNorm1d(fc6, affine=False)
            self.bn7 = nn.BatchNorm1d(fc7, affine=False)
        self.fc8 = nn.Linear(fc7, arch.num_classes) if arch.num_classes else None
        self.drop = nn.Dropout(arch.dropout)

    @property
    def layout(self) -> str:
        return self.arch.layout

    @property
    def has_batchnorm(self) -> bool:
        return self.arch.batchnorm

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Canonical input -> what conv1 reads: the checkpoint's input spec, then the front-end."""
        x = convert_input(x, self.arch.input)
        return self.sobel(x) if self.arch.frontend == "sobel" else x

    def _bn(self, name: str, x: torch.Tensor) -> torch.Tensor:
        bn = getattr(self, name, None)
        if bn is None:
            return x
        if x.dim() == 4 and isinstance(bn, nn.BatchNorm1d):  # fc layer run convolutionally
            n, c, h, w = x.shape
            return bn(x.reshape(n, c, h * w)).reshape(n, c, h, w)
        return bn(x)

    def _lrn(self, x: torch.Tensor) -> torch.Tensor:
        size, alpha, beta, k = self.arch.lrn
        return F.local_response_norm(x, int(size), alpha=alpha, beta=beta, k=k)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, POOL_KERNEL, POOL_STRIDE, ceil_mode=self.arch.ceil_pool)

    def rectify(self, x: torch.Tensor) -> torch.Tensor:
        """The member's rectifier: ReLU, or a leaky ReLU when ``arch.relu_slope`` > 0."""
        slope = self.arch.relu_slope
        return F.leaky_relu(x, slope) if slope else F.relu(x)

    def after_conv(self, name: str, rectified: torch.Tensor) -> torch.Tensor:
        """What follows the rectified ``convK``: LRN and pooling in the member's order
        (the identity for conv3/conv4)."""
        x, lrn = rectified, self.arch.lrn is not None and name in NORMALISED
        if lrn and self.arch.lrn_before_pool:
            x = self._lrn(x)
        if name in POOLED:
            x = self._pool(x)
        if lrn and not self.arch.lrn_before_pool:
            x = self._lrn(x)
        return x

    def _fc(self, idx: int, x: torch.Tensor, dense: bool) -> torch.Tensor:
        fc = getattr(self, f"fc{idx}")
        if dense:
            cin = fc.in_features if idx != 6 else fc.in_features // (FC6_GRID * FC6_GRID)
            k = FC6_GRID if idx == 6 else 1
            x = F.conv2d(x, fc.weight.reshape(fc.out_features, cin, k, k), fc.bias)
        else:
            x = fc(x)
        return self.rectify(self._bn(f"bn{idx}", x))

    def activations(self, x: torch.Tensor, names: Iterable[str], dense: bool = False) -> dict[str, torch.Tensor]:
        """Run the network up to the deepest of ``names`` and return those activations.

        ``dense=True`` applies fc6/fc7 as convolutions (fc6 is a 6x6 kernel over pool5), giving
        spatial maps; otherwise pool5 is flattened (after an adaptive 6x6 average pool, the identity
        for 224-227 px inputs) and fc6/fc7 are vectors.
        """
        wanted = list(dict.fromkeys(names))
        unknown = [n for n in wanted if n not in ACTIVATIONS]
        if unknown:
            raise KeyError(f"unknown activation(s) {unknown}; available: {ACTIVATIONS}")
        if "fc8" in wanted and self.fc8 is None:
            raise KeyError("fc8 requested but this AlexNet has no classifier head (num_classes=None)")
        if "fc8" in wanted and dense:
            raise KeyError("fc8 is not available densely; request fc7 with dense=True instead")
        last = max(ACTIVATIONS.index(n) for n in wanted)
        out: dict[str, torch.Tensor] = {}

        def keep(name: str, value: torch.Tensor) -> bool:
            if name in wanted:
                out[name] = value
            return ACTIVATIONS.index(name) >= last

        x = self.prepare_input(x)
        for i in range(1, 6):
            name = f"conv{i}"
            x = self.rectify(self._bn(f"bn{i}", getattr(self, name)(x)))
            if keep(name, x):
                return out
            x = self.after_conv(name, x)
            if name in POOLED and keep(f"pool{i}", x):
                return out
        if not dense:
            x = self._flatten_pool5(x)
        before = self.arch.dropout_before_fc
        for idx in (6, 7):
            if before:  # torchvision: dropout *before* fc6 and fc7
                x = self.drop(x)
            x = self._fc(idx, x, dense)
            if keep(f"fc{idx}", x):
                return out
            if not before:  # Caffe: dropout after relu6 and relu7
                x = self.drop(x)
        keep("fc8", self.fc8(x))
        return out

    def _flatten_pool5(self, x: torch.Tensor) -> torch.Tensor:
        # The identity for 224-227 px inputs (pool5 is already 6x6). Other sizes (the CPU-sized
        # demo presets) are average-pooled to 6x6 as torchvision's AlexNet always does.
        return torch.flatten(F.adaptive_avg_pool2d(x, FC6_GRID), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activations(x, ["fc8" if self.fc8 is not None else "fc7"])[
            "fc8" if self.fc8 is not None else "fc7"]


# --- the linear probe's pooling (P5) -------------------------------------------------------------------

PROBE_VALUES = 9216  # P5: each rectified conv map resized to about 9k values


def probe_pool_sizes(arch: AlexNetArch, layers: Sequence[str] = CONV_LAYERS) -> tuple[int, ...]:
    """The side each conv map is resized to for the linear probe, so that it holds about
    :data:`PROBE_VALUES` values: ``round(sqrt(9216 / channels))``. For CaffeNet's widths this is
    exactly the protocol's (10, 6, 5, 5, 6); other members (torchvision's 64-192-384-256-256,
    DeepCluster's, ...) get the sizes that keep the same feature budget."""
    widths = {f"conv{i}": c[0] for i, c in enumerate(arch.convs, start=1)}
    return tuple(max(1, round(math.sqrt(PROBE_VALUES / widths[name]))) for name in layers)


# --- receptive-field geometry (used to sample hypercolumns, P1/P4) --------------------------------

def layer_geometry(arch: "AlexNetArch | AlexNet | str" = "caffenet") -> dict[str, tuple[float, float]]:
    """``{name: (stride, offset)}``: unit ``i`` of that activation is centred on input pixel
    ``offset + stride * i`` (pixel centres at integer coordinates), for a family member (an
    :class:`AlexNetArch`, a model, or a member's name).

    For a layer with kernel k, stride s, padding p on an input of geometry (S, O), output unit i
    covers input units ``i*s - p .. i*s - p + k - 1``, whose centre is ``i*s - p + (k - 1) / 2``;
    hence the new geometry is ``(S*s, O + S*((k - 1)/2 - p))``. LRN and the Sobel front-end
    (padded 3x3) move nothing; ceil-mode pooling only adds units at the far end.
    """
    if isinstance(arch, AlexNet):
        arch = arch.arch
    elif isinstance(arch, str):
        if arch not in _MEMBERS:
            raise ValueError(f"unknown AlexNet layout {arch!r}")
        arch = AlexNetArch(arch)
    stride, offset = 1.0, 0.0
    geometry: dict[str, tuple[float, float]] = {}

    def step(k: int, s: int, p: int) -> None:
        nonlocal stride, offset
        offset += stride * ((k - 1) / 2 - p)
        stride *= s

    for i, (_, k, s, p, _) in enumerate(arch.convs, start=1):
        step(k, s, p)
        geometry[f"conv{i}"] = (stride, offset)
        if f"conv{i}" in POOLED:
            step(POOL_KERNEL, POOL_STRIDE, 0)
            geometry[f"pool{i}"] = (stride, offset)
    step(FC6_GRID, 1, 0)  # fc6 as a 6x6 convolution (dense mode)
    geometry["fc6"] = geometry["fc7"] = (stride, offset)
    return geometry


# --- BatchNorm folding (P1: "BN statistics are folded into the conv/fc weights afterwards") -------

def fold_batchnorm(model: AlexNet) -> AlexNet:
    """Absorb every BN layer's running statistics into the conv/fc before it.

    BN(Wx + b) = (Wx + b - mean) / sqrt(var + eps) * gamma + beta, so per output channel
    W' = W * gamma / sqrt(var + eps) and b' = (b - mean) * gamma / sqrt(var + eps) + beta
    (gamma = 1, beta = 0 for the paper's parameter-free BN). Returns a new plain AlexNet (same
    layout, ``batchnorm=False``) that matches the BN network in eval mode; the input is unchanged.
    """
    if not model.has_batchnorm:
        return copy.deepcopy(model)
    arch = model.arch
    plain = AlexNet(arch=dataclasses.replace(arch, batchnorm=False))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("bn")}
    with torch.no_grad():
        for layer in CONV_LAYERS + FC_LAYERS:
            bn = getattr(model, "bn" + layer[-1])
            weight = state[f"{layer}.weight"].double()
            bias = state[f"{layer}.bias"].double()
            scale = (bn.running_var.double() + bn.eps).rsqrt()
            shift = -bn.running_mean.double() * scale
            if bn.affine:
                scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
            shape = (-1,) + (1,) * (weight.dim() - 1)
            dtype = state[f"{layer}.weight"].dtype
            state[f"{layer}.weight"] = (weight * scale.reshape(shape)).to(dtype)
            state[f"{layer}.bias"] = (bias * scale + shift).to(dtype)
    plain.load_state_dict(state, strict=True)
    return plain.train(model.training)
