"""AlexNet in the two layouts the benchmarks need, with every activation reachable by name.

* ``caffenet``: the layout of the paper (protocols.md P1; §4.1): 96-256-384-384-256 channels,
  groups=2 on conv2/conv4/conv5, fc6/fc7 with 4096 units. conv1 is padded by 5 pixels (the
  "padding adapted so a hypercolumn head can attach" of P1): a 224 crop (pretraining) and a 227
  crop (VOC classification) both give a 6x6 pool5, so fc6 is the usual 6x6x256 -> 4096 layer and
  the same weights serve every benchmark. There is no LRN: the paper replaces it by BatchNorm
  during pretraining and folds BN away afterwards, so the evaluated network is plain.
* ``torchvision``: ``torchvision.models.alexnet`` (64-192-384-256-256, adaptive 6x6 average pool
  before fc6), so torchvision's ImageNet weights can be evaluated as the supervised row.

Parameter-free BatchNorm (``affine=False``) after every conv/fc is optional (``batchnorm=True``
during pretraining, P1). Activations are named as in Caffe, whose ReLUs run in place: ``convK``
and ``fc6``/``fc7`` are the rectified outputs; ``pool1``/``pool2``/``pool5`` the pooled maps.
With ``dense=True`` fc6/fc7 run as 6x6 / 1x1 convolutions over the pool5 map, which is what a
hypercolumn needs (P4).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

LAYOUTS = ("caffenet", "torchvision")
# The input convention of every network here, pretraining included: RGB in [0, 1] normalised by
# torchvision's ImageNet statistics, so a checkpoint's expected input never needs guessing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_LAYERS = ("fc6", "fc7")
ACTIVATIONS = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7", "fc8")

# (in, out, kernel, stride, padding, groups) per conv; pools are 3x3 stride 2 after conv1, conv2, conv5.
_CONVS = {
    "caffenet": (
        (3, 96, 11, 4, 5, 1),
        (96, 256, 5, 1, 2, 2),
        (256, 384, 3, 1, 1, 1),
        (384, 384, 3, 1, 1, 2),
        (384, 256, 3, 1, 1, 2),
    ),
    "torchvision": (
        (3, 64, 11, 4, 2, 1),
        (64, 192, 5, 1, 2, 1),
        (192, 384, 3, 1, 1, 1),
        (384, 256, 3, 1, 1, 1),
        (256, 256, 3, 1, 1, 1),
    ),
}
POOL_KERNEL, POOL_STRIDE = 3, 2
FC6_GRID = 6  # pool5 is 6x6 for a 224/227 input; fc6 sees 6*6*256 inputs
FC_WIDTH = 4096


@dataclass(frozen=True)
class AlexNetArch:
    """Everything needed to rebuild the network; stored inside every checkpoint."""

    layout: str = "caffenet"
    batchnorm: bool = False
    num_classes: int | None = None  # fc8; None for a headless backbone
    dropout: float = 0.5

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown AlexNet layout {self.layout!r}; expected one of {LAYOUTS}")

    def to_dict(self) -> dict:
        return asdict(self)


class AlexNet(nn.Module):
    """AlexNet backbone; ``forward`` returns fc8 logits (or fc7 without a head).

    ``activations(x, names)`` returns any subset of :data:`ACTIVATIONS` by name and only runs the
    network as deep as the deepest requested layer.
    """

    def __init__(self, layout: str = "caffenet", batchnorm: bool = False, num_classes: int | None = None,
                 dropout: float = 0.5):
        super().__init__()
        self.arch = AlexNetArch(layout, batchnorm, num_classes, dropout)
        for i, (cin, cout, k, s, p, g) in enumerate(_CONVS[layout], start=1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g))
            if batchnorm:
                setattr(self, f"bn{i}", nn.BatchNorm2d(cout, affine=False))
        pool5_channels = _CONVS[layout][-1][1]
        self.fc6 = nn.Linear(pool5_channels * FC6_GRID * FC6_GRID, FC_WIDTH)
        self.fc7 = nn.Linear(FC_WIDTH, FC_WIDTH)
        if batchnorm:
            self.bn6 = nn.BatchNorm1d(FC_WIDTH, affine=False)
            self.bn7 = nn.BatchNorm1d(FC_WIDTH, affine=False)
        self.fc8 = nn.Linear(FC_WIDTH, num_classes) if num_classes else None
        self.drop = nn.Dropout(dropout)

    @property
    def layout(self) -> str:
        return self.arch.layout

    @property
    def has_batchnorm(self) -> bool:
        return self.arch.batchnorm

    def _bn(self, name: str, x: torch.Tensor) -> torch.Tensor:
        bn = getattr(self, name, None)
        if bn is None:
            return x
        if x.dim() == 4 and isinstance(bn, nn.BatchNorm1d):  # fc layer run convolutionally
            n, c, h, w = x.shape
            return bn(x.reshape(n, c, h * w)).reshape(n, c, h, w)
        return bn(x)

    def _fc(self, idx: int, x: torch.Tensor, dense: bool) -> torch.Tensor:
        fc = getattr(self, f"fc{idx}")
        if dense:
            cin = fc.in_features if idx != 6 else fc.in_features // (FC6_GRID * FC6_GRID)
            k = FC6_GRID if idx == 6 else 1
            x = F.conv2d(x, fc.weight.reshape(fc.out_features, cin, k, k), fc.bias)
        else:
            x = fc(x)
        return F.relu(self._bn(f"bn{idx}", x))

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

        for i in range(1, 6):
            x = F.relu(self._bn(f"bn{i}", getattr(self, f"conv{i}")(x)))
            if keep(f"conv{i}", x):
                return out
            if i in (1, 2, 5):
                x = F.max_pool2d(x, POOL_KERNEL, POOL_STRIDE)
                if keep(f"pool{i}", x):
                    return out
        if not dense:
            x = self._flatten_pool5(x)
        caffe = self.layout == "caffenet"
        for idx in (6, 7):
            if not caffe:  # torchvision: dropout *before* fc6 and fc7
                x = self.drop(x)
            x = self._fc(idx, x, dense)
            if keep(f"fc{idx}", x):
                return out
            if caffe:  # Caffe: dropout after relu6 and relu7
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


# --- receptive-field geometry (used to sample hypercolumns, P1/P4) --------------------------------

def layer_geometry(layout: str = "caffenet") -> dict[str, tuple[float, float]]:
    """``{name: (stride, offset)}``: unit ``i`` of that activation is centred on input pixel
    ``offset + stride * i`` (pixel centres at integer coordinates).

    For a layer with kernel k, stride s, padding p on an input of geometry (S, O), output unit i
    covers input units ``i*s - p .. i*s - p + k - 1``, whose centre is ``i*s - p + (k - 1) / 2``;
    hence the new geometry is ``(S*s, O + S*((k - 1)/2 - p))``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown AlexNet layout {layout!r}")
    stride, offset = 1.0, 0.0
    geometry: dict[str, tuple[float, float]] = {}

    def step(k: int, s: int, p: int) -> None:
        nonlocal stride, offset
        offset += stride * ((k - 1) / 2 - p)
        stride *= s

    for i, (_, _, k, s, p, _) in enumerate(_CONVS[layout], start=1):
        step(k, s, p)
        geometry[f"conv{i}"] = (stride, offset)
        if i in (1, 2, 5):
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
    plain = AlexNet(arch.layout, batchnorm=False, num_classes=arch.num_classes, dropout=arch.dropout)
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
