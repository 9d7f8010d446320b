"""Convert a published AlexNet into a cpfs-bench checkpoint, with its input convention.

    python -m backbones.convert SRC [--prototxt DEPLOY] [--mean FILE.binaryproto | --mean-values B,G,R]
                                [--format auto|caffe|caffe-h5|torch7|caffe2|pytorch|vissl]
                                [--input SPEC] [--map REGEX=REPL ...] [--discard GLOB ...]
                                [--allow-missing GLOB ...] [--keep-head] [--layout MEMBER]
                                [--frontend auto|sobel] --out OUT.pt

The source is read without its framework (``backbones.formats``: Caffe's protobuf through a
descriptor declared in Python, Torch7 through ``torchfile``, Caffe2 pickles through an unpickler
that admits numpy arrays only, PyTorch files through ``runtime.safe_load``), then mapped onto the
AlexNet family (``backbones.alexnet.AlexNetArch``):

* the five convolutions and fc6/fc7 (and an fc8 with ``--keep-head``) in execution order, fc
  layers written as convolutions (6x6 then 1x1) included; each conv's width, kernel, stride,
  padding and groups from the source (PyTorch files and Caffe2 pickles store no geometry:
  AlexNet's conventional 11x11/4 pad 2, 5x5 pad 2, 3x3 pad 1 is assumed, which DeepCluster,
  RotNet, VISSL, torchvision and FAIR's Caffe2 AlexNets share);
* Torch7's old Dropout (no ``v2`` flag), which scales by (1 - p) at test time, folded into the
  next layer's weights;
* LRN (size, alpha, beta, k; before or after pooling) and the pooling's rounding (Caffe rounds up,
  Torch7 per layer, PyTorch down) from the source's own layers;
* BatchNorm (and Caffe's Scale) folded into the conv/fc before it: the written network is plain;
* DeepCluster's Sobel front-end kept as fixed weights (``sobel.*``);
* the input spec: from ``--input`` (see :func:`parse_input_spec`), ``--mean`` / ``--mean-values``,
  or the format's usual convention (PyTorch: RGB in [0, 1] with ImageNet mean/std). Caffe sources
  (BGR, 0-255) need their mean stated: it is not in the caffemodel.

Every source tensor is accounted for in the load report (source name and shape -> target
parameter and shape, and how: copied, transposed, BN folded); a tensor that maps nowhere, or a
family parameter the source lacks, stops the conversion naming it unless declared with
``--discard`` (e.g. a pretext-task classifier: ``--discard 'top_layer'``), ``--keep-head`` (a
classifier after fc7 becomes the checkpoint's fc8) or ``--allow-missing`` (kept at a fresh
initialisation, e.g. ``--allow-missing 'fc6.*'``). ``--map`` renames source
layers / PyTorch module prefixes by regular expression before anything else (``--map
'conv1_s1=conv1'``). Errors are one line naming the file and the layer or tensor; exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import re
import sys
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from backbones.alexnet import (CAFFE_MEAN_BGR, CANONICAL_INPUT, FC6_GRID, FC_LAYERS, NORMALISED,
                               POOL_KERNEL, POOL_STRIDE, POOLED, AlexNet, AlexNetArch, InputSpec, SobelFrontEnd,
                               _MEMBERS)
from backbones.checkpoint import EXPORT_FORMAT, fingerprint
from backbones.formats import SourceLayer, SourceNet, detect_format, read_mean, read_source
from runtime.atomic import NoSpaceError, atomic_torch_save
from runtime.errors import CheckpointError, one_line
from runtime.safe_load import safe_torch_load

FORMATS = ("auto", "caffe", "caffe-h5", "torch7", "caffe2", "pytorch", "vissl")
# PyTorch files hold no geometry: AlexNet's conventional (stride, pad) per kernel size
_TORCH_CONV_GEOMETRY = {11: (4, 2), 5: (1, 2), 3: (1, 1)}
_INPUT_PRESETS = {
    "imagenet": CANONICAL_INPUT,  # RGB [0, 1], ImageNet mean/std (torchvision, DeepCluster, RotNet, VISSL)
    "caffe": InputSpec(channel_order="BGR", scale=1.0, mean=CAFFE_MEAN_BGR, std=None),  # BGR 0-255 - mean
    "caffe-nomean": InputSpec(channel_order="BGR", scale=1.0, mean=None, std=None),
    # BiGAN's Caffe release: (x - 127.5) * 2/255, BGR (export_params.py reverses conv1's channels)
    "bigan": InputSpec(channel_order="BGR", scale=2.0 / 255.0, mean=(1.0, 1.0, 1.0), std=None),
    "lab-l": InputSpec(colorspace="lab", scale=1.0, mean=(50.0, 0.0, 0.0), std=None, channels=(0,)),
}


class UsageError(ValueError):
    """A bad command-line value; one line."""


# --- the input spec from the command line ---------------------------------------------------------

def _spec_fields(spec: InputSpec) -> dict:
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def parse_input_spec(text: str, base: InputSpec = CANONICAL_INPUT) -> InputSpec:
    """``--input``: a preset name (``imagenet``, ``caffe``, ``caffe-nomean``, ``bigan``, ``lab-l``)
    and/or ``key=value`` items separated by commas, applied in order on top of ``base`` (a preset starts afresh):
    ``order=RGB|BGR``, ``scale=1/255`` (a number or a fraction), ``mean=a:b:c|none``,
    ``std=a:b:c|none``, ``colorspace=rgb|gray|lab``, ``per_image_mean=0|1``, ``channels=0[:1...]``;
    the result is checked as a whole. Example: ``caffe,mean=none,per_image_mean=1`` (Doersch et al.'s per-image centring)."""
    values = _spec_fields(base)
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            if item not in _INPUT_PRESETS:
                raise UsageError(f"--input: unknown preset {item!r}; presets: {', '.join(_INPUT_PRESETS)}")
            values = _spec_fields(_INPUT_PRESETS[item])
            continue
        key, value = (s.strip() for s in item.split("=", 1))
        try:
            if key == "order":
                values["channel_order"] = value.upper()
            elif key == "scale":
                num, _, den = value.partition("/")
                values["scale"] = float(num) / (float(den) if den else 1.0)
            elif key in ("mean", "std"):
                values[key] = None if value.lower() == "none" else tuple(float(v) for v in value.split(":"))
            elif key == "colorspace":
                values["colorspace"] = value.lower()
            elif key == "per_image_mean":
                values["per_image_mean"] = value.lower() in ("1", "true", "yes")
            elif key == "channels":
                values["channels"] = tuple(int(v) for v in value.split(":"))
            else:
                raise UsageError(f"--input: unknown key {key!r} (order, scale, mean, std, colorspace, "
                                 f"per_image_mean, channels)")
        except ValueError as err:
            raise UsageError(f"--input {item!r}: {one_line(err)}") from None
    try:  # checked once, whole: the items may come in any order (colorspace=gray before mean=...)
        return InputSpec(**values)
    except ValueError as err:
        raise UsageError(f"--input {text!r}: {one_line(err)}") from None


def input_for(fmt: str, args) -> InputSpec:
    """The input spec from ``--input`` / ``--mean`` / ``--mean-values`` and the format's convention."""
    caffe_like = fmt in ("caffe", "caffe-h5")
    base = _INPUT_PRESETS["caffe-nomean"] if caffe_like else CANONICAL_INPUT
    if args.input:
        base = parse_input_spec(args.input, base)
    if args.mean and args.mean_values:
        raise UsageError("--mean and --mean-values exclude each other")
    if args.mean:
        image = read_mean(args.mean)
        width = 1 if base.colorspace == "gray" else 3
        if image.ndim != 3 or image.shape[0] != width:
            raise CheckpointError(args.mean, f"mean blob of shape {image.shape} does not fit the input spec")
        base = dataclasses.replace(base, mean=None, mean_image=torch.from_numpy(np.ascontiguousarray(image)))
    elif args.mean_values:
        try:
            values = tuple(float(v) for v in args.mean_values.split(","))
        except ValueError:
            raise UsageError(f"--mean-values {args.mean_values!r}: expected numbers like 104,117,123") from None
        base = dataclasses.replace(base, mean=values)
    elif caffe_like and not args.input:
        raise UsageError("a Caffe network's input mean is not stored in the caffemodel: give --mean "
                         "FILE.binaryproto or --mean-values B,G,R (or --input to state the convention, "
                         "e.g. --input caffe for the ILSVRC-2012 per-channel mean)")
    return base


# --- PyTorch sources (DeepCluster, RotNet, VISSL, torchvision-like) --------------------------------

def _tensor_dicts(obj, prefix: str = ""):
    """Every nested mapping that holds tensors directly, with its key path."""
    if isinstance(obj, Mapping):
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            yield prefix, obj
        for key, value in obj.items():
            if isinstance(value, Mapping):
                yield from _tensor_dicts(value, f"{prefix}{key}/")


def _pick_state(path: Path, obj, fmt: str) -> dict[str, torch.Tensor]:
    """The state dict with the AlexNet in it: the largest nested tensor mapping holding a 4-d
    weight (DeepCluster's ``state_dict``, RotNet's ``network``, VISSL's
    ``classy_state_dict/base_model/model/trunk``, a bare state dict)."""
    candidates = [(p, d) for p, d in _tensor_dicts(obj) if any(
        isinstance(v, torch.Tensor) and v.dim() == 4 for v in d.values())]
    if fmt == "vissl":
        candidates = [(p, d) for p, d in candidates if "trunk" in p] or candidates
    if not candidates:
        raise CheckpointError(path, "no convolution weights found in the file (not an AlexNet checkpoint?)")
    _, state = max(candidates, key=lambda c: sum(v.numel() for v in c[1].values() if isinstance(v, torch.Tensor)))
    heads = [d for p, d in _tensor_dicts(obj) if "heads" in p and d is not state]
    merged = OrderedDict((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))
    for head in heads:  # VISSL keeps the pretext head beside the trunk: it must be accounted for
        merged.update((f"heads.{k}", v) for k, v in head.items() if isinstance(v, torch.Tensor))
    return merged


def read_pytorch(path: Path, fmt: str = "pytorch", renames: Sequence[tuple[str, str]] = ()) -> SourceNet:
    """A PyTorch AlexNet (module prefixes in registration order) as a :class:`SourceNet`.

    Parameters are grouped by module prefix; a 4-d weight is a conv, a 2-d one an fc, a module with
    ``running_mean`` a BatchNorm; a module whose name contains ``sobel`` (DeepCluster) is the
    front-end. DDP's ``module.`` prefix is dropped."""
    obj = safe_torch_load(path)
    state = _pick_state(path, obj, fmt)
    modules: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        key = key.replace(".module.", ".")
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        prefix, _, param = key.rpartition(".")
        modules.setdefault(prefix, {})[param] = value
    layers = []
    for name, params in modules.items():
        weight = params.get("weight")
        if "running_mean" in params:
            blobs = [params["running_mean"], params["running_var"]]
            affine = weight is not None
            if affine:
                blobs += [weight, params.get("bias", torch.zeros_like(weight))]
            layers.append(SourceLayer(name, "bn", {"eps": 1e-5, "affine": affine}, [_np(b) for b in blobs],
                                      "torch.nn.BatchNorm"))
        elif weight is not None and weight.dim() == 4:
            out, cin_g, kh, kw = weight.shape
            stride, pad = _TORCH_CONV_GEOMETRY.get(int(kh), (1, (int(kh) - 1) // 2))
            blobs = [_np(weight)] + ([_np(params["bias"])] if "bias" in params else [])
            layers.append(SourceLayer(name, "conv", {
                "out": int(out), "kernel": (int(kh), int(kw)), "stride": (stride, stride), "pad": (pad, pad),
                "groups": None, "bias": "bias" in params, "dilation": (1, 1), "geometry_guessed": True},
                blobs, "torch.nn.Conv2d"))
        elif weight is not None and weight.dim() == 2:
            blobs = [_np(weight)] + ([_np(params["bias"])] if "bias" in params else [])
            layers.append(SourceLayer(name, "fc", {"out": int(weight.shape[0]), "bias": "bias" in params,
                                                   "transpose": False}, blobs, "torch.nn.Linear"))
        else:
            shapes = {k: tuple(v.shape) for k, v in params.items()}
            layers.append(SourceLayer(name, "other", {"type": "unknown module", "tensors": shapes},
                                      [_np(v) for v in params.values() if v.is_floating_point()], "?"))
    return SourceNet(str(path), fmt, layers)


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float32).numpy()


# --- mapping a SourceNet onto the family -------------------------------------------------------------

@dataclasses.dataclass
class _Affine:
    layer: SourceLayer
    norms: list[SourceLayer] = dataclasses.field(default_factory=list)  # bn / scale after it
    after: list[SourceLayer] = dataclasses.field(default_factory=list)  # lrn / pool after it
    input_scale: float = 1.0  # old Torch7 Dropout multiplies its output by (1 - p) at test time


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _shape(a) -> str:
    return "x".join(str(int(v)) for v in a.shape)


class _Converted:
    """Accumulates the converted tensors and the load report."""

    def __init__(self, path: str):
        self.path = path
        self.state: dict[str, torch.Tensor] = {}
        self.report: list[dict] = []

    def put(self, target: str, value: np.ndarray, source: str, how: str = "copied") -> None:
        tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        self.state[target] = tensor
        self.report.append({"source": source, "target": target, "shape": _shape(tensor), "how": how})


def _fold(weight: np.ndarray, bias: np.ndarray, norms: list[SourceLayer], path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """``weight``/``bias`` with the BN/Scale layers after them folded in (float64 arithmetic)."""
    w, b = weight.astype(np.float64), bias.astype(np.float64)
    done = []
    for norm in norms:
        if norm.kind == "bn":
            mean, var = (np.asarray(x, np.float64) for x in norm.blobs[:2])
            scale = 1.0 / np.sqrt(var + float(norm.params.get("eps", 1e-5)))
            shift = -mean * scale
            if norm.params.get("affine") and len(norm.blobs) >= 4:
                gamma, beta = (np.asarray(x, np.float64) for x in norm.blobs[2:4])
                scale, shift = scale * gamma, shift * gamma + beta
        elif norm.kind == "scale":
            scale = np.asarray(norm.blobs[0], np.float64)
            shift = np.asarray(norm.blobs[1], np.float64) if len(norm.blobs) > 1 else np.zeros_like(scale)
        else:
            continue
        if scale.shape[0] != w.shape[0]:
            raise CheckpointError(path, f"layer {norm.name}: {scale.shape[0]} channels after a layer with {w.shape[0]}")
        w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        b = b * scale + shift
        done.append(norm.name)
    return w.astype(np.float32), b.astype(np.float32), ("folded " + "+".join(done)) if done else "copied"


@dataclasses.dataclass
class _Collected:
    affine: list[_Affine]  # conv/fc layers with what follows each
    frontend: list[SourceLayer]  # DeepCluster's fixed grey + Sobel convolutions
    discarded: list[str]  # "layer/blob (shape)" of every tensor left out by --discard
    relus: list[SourceLayer]  # every rectifier kept (their negative slopes must agree)
    input_affine: SourceLayer | None = None  # a per-channel 1x1 convolution before conv1 (colorization's data_l)


def _is_input_affine(layer: SourceLayer) -> bool:
    """A 1x1 convolution mapping each input channel to itself (``y_c = w_c x_c + b_c``)."""
    weight = layer.blobs[0] if layer.blobs else None
    if weight is None or weight.ndim != 4 or weight.shape[2:] != (1, 1) or weight.shape[0] != weight.shape[1]:
        return False
    matrix = weight[:, :, 0, 0]
    return bool(np.all(matrix[~np.eye(len(matrix), dtype=bool)] == 0) and np.all(np.diag(matrix) != 0))


def _collect(net: SourceNet, discard: Sequence[str]) -> _Collected:
    """The source's layers sorted into what the family needs (see :class:`_Collected`)."""
    found = _Collected([], [], [], [])
    affine, frontend, discarded = found.affine, found.frontend, found.discarded
    pending_scale = 1.0
    for layer in net.layers:
        if _matches(layer.name, discard):
            if layer.blobs:
                discarded += [f"{layer.name}/{i} ({_shape(b)})" for i, b in enumerate(layer.blobs)]
            continue
        if "sobel" in layer.name.lower() and layer.kind == "conv":
            frontend.append(layer)
        elif layer.kind == "conv" and not affine and found.input_affine is None and not frontend \
                and _is_input_affine(layer):
            found.input_affine = layer
        elif layer.kind == "relu":
            if not affine:
                raise CheckpointError(net.path, f"layer {layer.name}: a rectifier before conv1")
            found.relus.append(layer)
        elif layer.kind in ("conv", "fc"):
            affine.append(_Affine(layer, input_scale=pending_scale))
            pending_scale = 1.0
        elif layer.kind == "dropout" and layer.params.get("scale_at_test"):
            pending_scale *= 1.0 - float(layer.params.get("ratio", 0.5))
        elif layer.kind in ("bn", "scale"):
            if not affine:
                raise CheckpointError(net.path, f"layer {layer.name}: a {layer.kind} layer before any conv")
            affine[-1].norms.append(layer)
        elif layer.kind in ("lrn", "pool"):
            if not affine:
                raise CheckpointError(net.path, f"layer {layer.name}: {layer.kind} before conv1")
            affine[-1].after.append(layer)
        elif layer.kind == "other":
            what = layer.params.get("type", layer.source_type)
            raise CheckpointError(net.path, f"layer {layer.name} ({layer.source_type or what}) is not part of the "
                                            f"AlexNet family; if the network does not need it (a pre-processing "
                                            f"layer: state it with --input instead), pass --discard '{layer.name}'")
        # dropout / flatten / softmax / input: nothing to carry
    return found


def _relu_slope(net: SourceNet, relus: list[SourceLayer]) -> float:
    """The one negative slope of the source's rectifiers (0 for ReLU, or when none is listed)."""
    slopes = {float(l.params.get("negative_slope", 0.0) or 0.0) for l in relus}
    if len(slopes) > 1:
        named = ", ".join(f"{l.name} {float(l.params.get('negative_slope', 0.0) or 0.0):g}" for l in relus)
        raise CheckpointError(net.path, f"rectifiers with different negative slopes ({named}); the family has one")
    return slopes.pop() if slopes else 0.0


def _fold_input_affine(net: SourceNet, layer: SourceLayer, spec: InputSpec) -> InputSpec:
    """``spec`` with a per-channel ``y = w x + b`` before conv1 folded into its mean and std:
    ``w (x - m) / s + b = (x - (m - b s / w)) / (s / w)`` for each channel fed to the network."""
    width = 1 if spec.colorspace == "gray" else 3
    kept = spec.channels if spec.channels is not None else tuple(range(width))
    weight = np.diag(layer.blobs[0][:, :, 0, 0]).astype(np.float64)
    bias = layer.blobs[1].astype(np.float64) if len(layer.blobs) > 1 else np.zeros(len(weight))
    if len(weight) != len(kept):
        raise CheckpointError(net.path, f"layer {layer.name}: a {len(weight)}-channel input transform, but --input "
                                        f"feeds {len(kept)} channel(s)")
    mean = list(spec.mean or (0.0,)) * (width if len(spec.mean or (0.0,)) == 1 else 1)
    std = list(spec.std or (1.0,)) * (width if len(spec.std or (1.0,)) == 1 else 1)
    for j, c in enumerate(kept):
        mean[c] -= bias[j] * std[c] / weight[j]
        std[c] /= weight[j]
    return dataclasses.replace(spec, mean=tuple(mean), std=tuple(std))


def _pooling(net: SourceNet, convs: list[_Affine]) -> tuple[bool, tuple | None, bool]:
    """(ceil, lrn, lrn_before_pool) from the layers after each conv; checks the family's shape."""
    if not any(a.after for a in convs):  # a state dict: no pooling layers stated
        return False, None, False
    ceil_modes, lrns, orders = set(), [], set()
    for i, conv in enumerate(convs, start=1):
        name = conv.layer.name
        pools = [l for l in conv.after if l.kind == "pool"]
        norms = [l for l in conv.after if l.kind == "lrn"]
        expected = f"conv{i}" in POOLED
        if len(pools) != int(expected):
            raise CheckpointError(net.path, f"after layer {name} (conv{i}): {len(pools)} pooling layer(s), the "
                                            f"AlexNet family has {int(expected)}")
        for pool in pools:
            p = pool.params
            if p.get("method", "max") != "max" or tuple(p["kernel"]) != (POOL_KERNEL,) * 2 or \
                    tuple(p["stride"]) != (POOL_STRIDE,) * 2 or tuple(p.get("pad", (0, 0))) != (0, 0):
                raise CheckpointError(net.path, f"layer {pool.name}: {p.get('method')} pool {p.get('kernel')}/"
                                                f"{p.get('stride')} pad {p.get('pad')}; the family pools max 3x3/2 pad 0")
            ceil_modes.add(bool(p.get("ceil", False)))
        if norms:
            if f"conv{i}" not in NORMALISED or len(norms) > 1:
                raise CheckpointError(net.path, f"layer {norms[0].name}: LRN after conv{i}; the family normalises "
                                                f"conv1 and conv2 only")
            lrn = norms[0].params
            if lrn.get("region", "across") != "across":
                raise CheckpointError(net.path, f"layer {norms[0].name}: within-channel LRN is not supported")
            lrns.append((float(lrn["size"]), float(lrn["alpha"]), float(lrn["beta"]), float(lrn.get("k", 1.0))))
            if pools:
                orders.add(conv.after.index(norms[0]) < conv.after.index(pools[0]))
    if len(ceil_modes) > 1:
        raise CheckpointError(net.path, "pooling layers mix ceil and floor rounding")
    if lrns and (len(lrns) != 2 or lrns[0] != lrns[1] or len(orders) > 1):
        raise CheckpointError(net.path, f"LRN layers {lrns} differ between conv1 and conv2 (the family has one LRN)")
    return ceil_modes.pop() if ceil_modes else False, (lrns[0] if lrns else None), (orders.pop() if orders else False)


def map_source(net: SourceNet, spec: InputSpec, *, discard: Sequence[str] = (),
               allow_missing: Sequence[str] = (), keep_head: bool = False,
               layout: str | None = None, sobel: bool = False) -> tuple[AlexNet, list[dict], dict]:
    """The plain AlexNet holding ``net``'s weights, the load report and a summary. ``layout``
    (a family member) supplies what the source does not store (PyTorch state dicts and Caffe2
    pickles keep no strides, padding, pooling or LRN): its conv strides and padding, LRN and
    pooling rounding; widths and groups still come from the weights. ``sobel``: the source's
    conv1 reads DeepCluster's fixed grey + Sobel stage, whose weights it does not store (VISSL's
    DeepCluster AlexNet): the stage is added with its defining filters."""
    member = AlexNetArch(layout) if layout else None
    found = _collect(net, discard)
    affine, frontend, discarded = found.affine, found.frontend, found.discarded
    if found.input_affine is not None:
        spec = _fold_input_affine(net, found.input_affine, spec)
    for extra in affine[5:]:  # fc6/fc7 written as convolutions (6x6 then 1x1, e.g. Caffe2 colorization)
        if extra.layer.kind == "conv":
            weight = extra.layer.blobs[0]
            extra.layer = dataclasses.replace(extra.layer, kind="fc", blobs=[weight.reshape(weight.shape[0], -1)]
                                              + list(extra.layer.blobs[1:]), params={"out": int(weight.shape[0])})
    convs = [a for a in affine if a.layer.kind == "conv"]
    fcs = [a for a in affine if a.layer.kind == "fc"]
    if len(convs) != 5 or affine[:5] != convs:
        raise CheckpointError(net.path, f"expected 5 convolutions before the fc layers, found {len(convs)} "
                                        f"({', '.join(a.layer.name for a in convs)})")
    if len(fcs) > 3:
        raise CheckpointError(net.path, f"{len(fcs)} fc layers ({', '.join(a.layer.name for a in fcs)}): the family "
                                        f"has fc6, fc7 and an optional fc8; --discard the extra ones")
    if len(fcs) == 3 and not keep_head:
        head = fcs[2].layer
        raise CheckpointError(net.path, f"layer {head.name} ({_shape(head.blobs[0])}) is a classifier head after fc7: "
                                        f"keep it as fc8 with --keep-head or leave it out with --discard '{head.name}'")
    named_fcs = list(zip(("fc6", "fc7", "fc8"), fcs))
    missing_fc = [name for name in FC_LAYERS if name not in dict(named_fcs)]
    undeclared = [name for name in missing_fc if not _matches(f"{name}.weight", allow_missing)]
    if undeclared:
        raise CheckpointError(net.path, f"the source has no {', '.join(undeclared)} (found "
                                        f"{len(fcs)} fc layers); declare it with --allow-missing '{undeclared[0]}.*'")
    ceil, lrn, lrn_before = _pooling(net, convs)
    if member is not None and not any(a.after for a in convs):  # nothing stated: the member's
        ceil, lrn, lrn_before = member.ceil_pool, member.lrn, member.lrn_before_pool

    mapping = _Converted(net.path)
    conv_specs = []
    if sobel and frontend:
        raise CheckpointError(net.path, f"--frontend sobel, but the source has its own Sobel layers "
                                        f"({', '.join(l.name for l in frontend)}): leave the option out")
    cin = 2 if frontend or sobel else spec.channels_out
    for i, conv in enumerate(convs, start=1):
        layer, p = conv.layer, conv.layer.params
        weight = layer.blobs[0]
        if weight.ndim != 4:
            raise CheckpointError(net.path, f"layer {layer.name}: weight of shape {weight.shape}, expected 4-d")
        out, cin_g, kh, kw = weight.shape
        if member is not None and (p.get("stride") is None or p.get("geometry_guessed")):
            _, k, stride, pad, _ = member.convs[i - 1]
            if k != kh:
                raise CheckpointError(net.path, f"layer {layer.name}: a {kh}x{kw} kernel, but --layout {layout}'s "
                                                f"conv{i} is {k}x{k}")
            p = {**p, "stride": (stride, stride), "pad": (pad, pad), "dilation": (1, 1)}
        elif p.get("stride") is None or p.get("pad") is None:  # Caffe2 pickles store no geometry
            stride, pad = _TORCH_CONV_GEOMETRY.get(int(kh), (1, (int(kh) - 1) // 2))
            p = {**p, "stride": (stride, stride), "pad": (pad, pad), "dilation": (1, 1)}
        if kh != kw or tuple(p["stride"])[0] != tuple(p["stride"])[-1] or tuple(p["pad"])[0] != tuple(p["pad"])[-1]:
            raise CheckpointError(net.path, f"layer {layer.name}: non-square kernel, stride or padding")
        if tuple(p.get("dilation") or (1, 1)) != (1, 1):
            raise CheckpointError(net.path, f"layer {layer.name}: dilated convolutions are not in the family")
        if i == 1 and cin_g != cin and (cin % cin_g or not p.get("groups")):
            hint = "; 2 channels: DeepCluster's Sobel stage? (--frontend sobel)" if cin_g == 2 else ""
            raise CheckpointError(net.path, f"layer {layer.name}: weight {_shape(weight)} reads {cin_g} channel(s) "
                                            f"but --input feeds {cin} (check its colorspace / channels{hint})")
        if cin % cin_g:
            raise CheckpointError(net.path, f"layer {layer.name}: weight {_shape(weight)} does not divide the "
                                            f"{cin} input channels")
        groups = cin // cin_g
        if p.get("groups") not in (None, groups):
            raise CheckpointError(net.path, f"layer {layer.name}: group {p['groups']} but weight {_shape(weight)} "
                                            f"on {cin} input channels")
        if out != p.get("out", out):
            raise CheckpointError(net.path, f"layer {layer.name}: num_output {p['out']} but weight {_shape(weight)}")
        bias = layer.blobs[1] if len(layer.blobs) > 1 else np.zeros(out, np.float32)
        w, b, how = _fold(weight * conv.input_scale, bias, conv.norms, net.path)
        mapping.put(f"conv{i}.weight", w, f"{layer.name}/0 ({_shape(weight)})", how)
        mapping.put(f"conv{i}.bias", b, f"{layer.name}/1 ({_shape(bias)})" if len(layer.blobs) > 1
                    else f"{layer.name} (no bias term: zero)", how)
        conv_specs.append((int(out), int(kh), int(p["stride"][0]), int(p["pad"][0]), int(groups)))
        cin = int(out)
    widths = []
    for name, fc in named_fcs:
        layer = fc.layer
        weight = layer.blobs[0].reshape(layer.blobs[0].shape[0], -1) if layer.blobs[0].ndim != 2 else layer.blobs[0]
        expected_in = cin * FC6_GRID * FC6_GRID if name == "fc6" else (widths[-1] if widths else None)
        if expected_in is not None and weight.shape[1] != expected_in:
            raise CheckpointError(net.path, f"layer {layer.name} ({name}): weight {_shape(weight)} takes "
                                            f"{weight.shape[1]} inputs, expected {expected_in}")
        bias = layer.blobs[1] if len(layer.blobs) > 1 else np.zeros(weight.shape[0], np.float32)
        w, b, how = _fold(weight * fc.input_scale, bias, fc.norms, net.path)
        if fc.input_scale != 1.0:
            how += f", x{fc.input_scale:g} (Torch7 test-time dropout scaling before it)"
        mapping.put(f"{name}.weight", w, f"{layer.name}/0 ({_shape(layer.blobs[0])})", how)
        mapping.put(f"{name}.bias", b, f"{layer.name}/1 ({_shape(bias)})" if len(layer.blobs) > 1
                    else f"{layer.name} (no bias term: zero)", how)
        widths.append(int(weight.shape[0]))
    if sobel:
        for name, tensor in SobelFrontEnd().state_dict().items():
            mapping.put(f"sobel.{name}", tensor.numpy(), "(not in the source: DeepCluster's fixed grey 1/3 + "
                                                          "Sobel filters, --frontend sobel)", "defined")
    for layer in frontend:
        target = "sobel.grey" if layer.blobs[0].shape[0] == 1 else "sobel.sobel"
        mapping.put(f"{target}.weight", layer.blobs[0], f"{layer.name}/0 ({_shape(layer.blobs[0])})")
        bias = layer.blobs[1] if len(layer.blobs) > 1 else np.zeros(layer.blobs[0].shape[0], np.float32)
        mapping.put(f"{target}.bias", bias, f"{layer.name}/1")

    fc_widths = (widths + [4096, 4096])[:2] if len(widths) < 2 else tuple(widths[:2])
    fields = dict(convs=tuple(conv_specs), lrn=lrn, lrn_before_pool=lrn_before, ceil_pool=ceil,
                  fc_widths=tuple(fc_widths), frontend="sobel" if frontend or sobel else "none", input=spec,
                  dropout_before_fc=net.format in ("pytorch", "vissl"), relu_slope=_relu_slope(net, found.relus))
    layout = next((name for name, member in _MEMBERS.items() if AlexNetArch(name, **{
        **fields, **{k: v for k, v in member.items() if k == "dropout_before_fc"}}) == AlexNetArch(name)), "custom")
    arch = AlexNetArch(layout, num_classes=widths[2] if len(widths) > 2 else None, **fields)
    model = AlexNet(arch=arch)
    target = model.state_dict()
    missing = sorted(k for k in target if k not in mapping.state)
    undeclared = [k for k in missing if not _matches(k, allow_missing)]
    if undeclared:
        raise CheckpointError(net.path, f"no source tensor for {undeclared}; declare with --allow-missing")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in mapping.state.items()
             if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if wrong:
        raise CheckpointError(net.path, f"shape mismatch: {wrong[0]}")
    with torch.no_grad():
        for key, value in mapping.state.items():
            target[key].copy_(value)
    for key in missing:
        mapping.report.append({"source": "(none: --allow-missing)", "target": key, "shape": "x".join(
            map(str, target[key].shape)), "how": "fresh initialisation"})
    if found.input_affine is not None:
        layer = found.input_affine
        mapping.report.append({"source": f"{layer.name} ({_shape(layer.blobs[0])} + bias)", "target": "input spec",
                               "shape": "-", "how": f"folded into the input's mean and std: {spec.describe()}"})
    summary = {"layout": layout, "discarded": discarded, "missing": missing,
               "folded": sorted({r["how"] for r in mapping.report if r["how"].startswith("folded")})}
    return model.eval(), mapping.report, summary


# --- command line -------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(args) -> tuple[str, list[dict], dict]:
    """Read, map and write; returns the fingerprint, the load report and the summary."""
    src = Path(args.src)
    renames = [_parse_map(m) for m in args.map]
    fmt = args.format
    if fmt == "auto":
        fmt = detect_format(src)
        if fmt in ("caffe-prototxt", "caffe-mean", "unknown"):
            raise CheckpointError(src, {"caffe-prototxt": "a prototxt holds no weights: pass the .caffemodel as SRC "
                                                          "and this file as --prototxt",
                                        "caffe-mean": "a .binaryproto mean holds no weights: pass it as --mean",
                                        "unknown": "format not recognised (caffe, caffe-h5, torch7, caffe2, pytorch "
                                                   "or vissl expected; --format to force one)"}[fmt])
    spec = input_for(fmt, args)
    if fmt in ("pytorch", "vissl"):
        net = read_pytorch(src, fmt, renames)
    else:
        net = read_source(src, prototxt=args.prototxt, fmt=fmt)
        for layer in net.layers:
            for pattern, repl in renames:
                layer.name = re.sub(pattern, repl, layer.name)
    model, report, summary = map_source(net, spec, discard=args.discard, allow_missing=args.allow_missing,
                                        keep_head=args.keep_head, layout=args.layout,
                                        sobel=args.frontend == "sobel")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    fp = fingerprint(state, model.arch)
    meta = {"label": args.label or src.stem, "supervision": args.supervision, "converted_from": str(src),
            "source_format": fmt, "source_sha256": _sha256(src),
            "conversion": {"discarded": summary["discarded"], "missing": summary["missing"],
                           "folded": summary["folded"], "load_report": report}}
    if args.prototxt:
        meta["prototxt"] = str(args.prototxt)
    atomic_torch_save({"format": EXPORT_FORMAT, "version": 1, "arch": model.arch.to_dict(), "state_dict": state,
                       "fingerprint": fp, "meta": meta}, args.out)
    return fp, report, summary


def _parse_map(text: str) -> tuple[str, str]:
    pattern, sep, repl = text.partition("=")
    if not sep or not pattern:
        raise UsageError(f"--map {text!r}: expected REGEX=REPLACEMENT")
    try:
        re.compile(pattern)
    except re.error as err:
        raise UsageError(f"--map {text!r}: bad regular expression ({err})") from None
    return pattern, repl


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backbones.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="the published weights (.caffemodel, .caffemodel.h5, .t7, .pkl, .pth/.pth.tar, "
                                    ".torch)")
    parser.add_argument("--prototxt", help="Caffe deploy prototxt (layer hyper-parameters; required for caffe-h5)")
    parser.add_argument("--mean", help="Caffe .binaryproto mean image (BGR, subtracted per pixel)")
    parser.add_argument("--mean-values", help="per-channel mean in the network's channel order, e.g. 104,117,123")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="source format (default: from the content)")
    parser.add_argument("--input", default="", help="input spec: preset and/or key=value items (see "
                                                   "backbones.convert.parse_input_spec), e.g. 'caffe,mean=none'")
    parser.add_argument("--map", action="append", default=[], metavar="REGEX=REPL",
                        help="rename source layers / module prefixes before mapping (repeatable)")
    parser.add_argument("--discard", action="append", default=[], metavar="GLOB",
                        help="source layers deliberately not converted, e.g. a pretext head (repeatable)")
    parser.add_argument("--allow-missing", action="append", default=[], metavar="GLOB",
                        help="family parameters the source lacks, kept freshly initialised (repeatable)")
    parser.add_argument("--layout", choices=[name for name in _MEMBERS],
                        help="for sources that store no geometry (PyTorch state dicts, Caffe2 pickles): take conv "
                             "strides/padding, LRN and pooling rounding from this family member (default: "
                             "torchvision's strides and padding, floor pooling, no LRN)")
    parser.add_argument("--frontend", choices=("auto", "sobel"), default="auto",
                        help="sobel: conv1 reads DeepCluster's fixed grey + Sobel stage, which the file does not "
                             "store (VISSL's DeepCluster AlexNet); auto: only what the file holds")
    parser.add_argument("--keep-head", action="store_true",
                        help="keep a classifier after fc7 as the checkpoint's fc8 (otherwise it must be --discard-ed)")
    parser.add_argument("--label", help="the row label results tables use (default: the file name)")
    parser.add_argument("--supervision", default="-", help="the supervision column of the tables")
    parser.add_argument("--out", required=True, help="the checkpoint to write (.pt)")
    parser.add_argument("--quiet", action="store_true", help="do not print the load report")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        fp, report, summary = convert(args)
    except (UsageError, CheckpointError, FileNotFoundError, IsADirectoryError, NoSpaceError, ValueError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    if not args.quiet:
        width = max(len(r["source"]) for r in report)
        for row in report:
            print(f"  {row['source']:<{width}} -> {row['target']:<12} {row['shape']:<14} {row['how']}")
    extra = (f"; discarded {len(summary['discarded'])} tensor(s)" if summary["discarded"] else "") + (
        f"; {len(summary['missing'])} freshly initialised" if summary["missing"] else "")
    print(f"wrote {args.out}: layout {summary['layout']}, fingerprint {fp[:16]}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
