"""Caffe2 ``.pkl`` weights as released by FAIR's self-supervision benchmark (Goyal et al. 2019).

The file is a pickle (usually Python 2, protocol 2, hence ``encoding="latin1"``) of
``{"blobs": {name: ndarray}}`` or a bare ``{name: ndarray}``. It is unpickled by an unpickler that
resolves only the globals numpy arrays need and refuses every other one by name, so a crafted file
cannot run code.

The pickle keeps no network description, only blob names, which follow Caffe2's model helpers
(checked in facebookresearch/fair_self_supervision_benchmark, ``self_supervision_benchmark/
modeling/*/alexnet_*.py`` and ``extra_scripts/pickle_caffe2_to_pytorch.py``):

* ``<layer>_w`` / ``<layer>_b``: conv (4-d weight, out x in/groups x kh x kw) or FC (2-d, out x in)
  weight and bias. Layer names seen: ``conv1`` .. ``conv5``, ``fc6`` .. ``fc8`` (supervised
  CaffeNet), ``conv1_s0`` .. ``fc7_s0`` and ``fc8_s0`` (Jigsaw: tower 0; towers ``_s1``..``_s8`` of a
  pretext model are other copies), ``fc6_1`` / ``fc7_1`` (Colorization: FC layers run as 6x6 and 1x1
  convolutions, so their weights are 4-d), ``fc8_cls``.
* ``<bn>_s``, ``<bn>_b``, ``<bn>_rm``, ``<bn>_riv`` (SpatialBN): scale, shift, running mean and
  running variance. Despite its name ("running inverse variance") ``_riv`` holds the variance:
  Caffe2's SpatialBN in test mode computes ``scale / sqrt(riv + eps)``, and FAIR's own converter
  maps ``_bn_riv`` to PyTorch's ``running_var``. BN names seen: ``conv3_s0_bn``, ``fc6_reshape_bn``,
  ``fc7_s0_reshape_bn`` (Jigsaw), ``conv1norm`` .. ``conv5norm``, ``fc6_1_norm`` (Colorization).
* ``<name>_s`` and ``<name>_b`` alone: an AffineChannel (Detectron's frozen BN), read as a scale.
* ``*_momentum`` (SGD state), ``lr``, ``model_iter``: training bookkeeping, not weights.

Layer order is not stored either: layers are ordered by the stage number in their name (``conv<k>``
before ``fc<k>``, ascending ``k``), a BN after the conv/FC of its stage. Strides, padding and the
BN epsilon are not stored: ``stride``/``pad``/``dilation`` are None, ``groups`` is inferred from
the previous layer's output channels, and ``eps`` is FAIR's configured ``BN_EPSILON``.
Blobs that fit none of these rules are listed in ``SourceNet.notes``, not used.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
from numpy._core import multiarray as _multiarray

from backbones.formats import SourceLayer, SourceNet
from runtime.errors import CheckpointError

FAIR_BN_EPSILON = 1.0000001e-5  # fair_self_supervision_benchmark config: MODEL.BN_EPSILON
NOTE_INPUT = "FAIR's Caffe2 models read images with OpenCV: BGR channel order"

# (module, name) -> the object; old and new numpy module paths both resolve to numpy 2's objects.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("_codecs", "encode"): __import__("codecs").encode,  # how Python 3 pickles bytes at protocol 2
}
_BOOKKEEPING = re.compile(r"(_momentum$|^lr$|^model_iter$|^iter$)")
_SUFFIX = re.compile(r"^(?P<layer>.+)_(?P<suffix>w|b|s|rm|riv)$")
_STAGE = re.compile(r"^(?P<kind>conv|fc)(?P<number>\d+)")
_OTHER_TOWER = re.compile(r"_s[1-9](_|$)")


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``_ALLOWED_GLOBALS``; anything else is refused, not imported."""

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name}") from None


def load_pickle(path: Path) -> dict:
    """The blob dict of a Caffe2 pickle: name -> ndarray; CheckpointError for anything else."""
    data = path.read_bytes()
    try:
        obj = _ArraysOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        if str(err).startswith("GLOBAL "):
            raise CheckpointError(path, f"refused to load: the file contains pickled Python objects ({err}); "
                                        f"Caffe2 weights must hold numpy arrays only") from None
        raise CheckpointError(path, f"truncated or corrupt pickle ({err})") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError) as err:
        raise CheckpointError(path, f"truncated or corrupt pickle ({type(err).__name__}: {err})") from None
    blobs = obj.get("blobs", obj) if isinstance(obj, dict) else None
    if not isinstance(blobs, dict) or not blobs:
        raise CheckpointError(path, f"not Caffe2 weights: the pickle holds a {type(obj).__name__}, expected "
                                    f"{{'blobs': {{name: array}}}}")
    if not all(isinstance(name, str) for name in blobs):
        raise CheckpointError(path, "not Caffe2 weights: blob names must be strings")
    return blobs


def _is_numeric(value) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind in "fiub"


def _group(blobs: dict, path: Path) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """Blobs grouped by layer prefix ({"conv1": {"w": ..., "b": ...}}) and the names set aside."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    ignored = []
    for name, value in blobs.items():
        match = _SUFFIX.match(name)
        if _BOOKKEEPING.search(name) or match is None or _OTHER_TOWER.search(match.group("layer")) \
                or not _STAGE.match(match.group("layer")):
            ignored.append(name)
            continue
        if not _is_numeric(value):
            kind = f"{value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__
            raise CheckpointError(path, f"blob {name!r} is a {kind}, expected a numeric array")
        groups.setdefault(match.group("layer"), {})[match.group("suffix")] = value
    return groups, ignored


def _order_key(layer_name: str, is_bn: bool) -> tuple:
    stage = _STAGE.match(layer_name)
    return (stage.group("kind") == "fc", int(stage.group("number")), is_bn, layer_name)


def _weight_layer(name: str, parts: dict, in_channels: int | None, path: Path) -> SourceLayer:
    weight = np.ascontiguousarray(parts["w"], dtype=np.float32)
    blobs = [weight]
    if "b" in parts:
        bias = np.ascontiguousarray(parts["b"], dtype=np.float32).reshape(-1)
        if bias.size != weight.shape[0]:
            raise CheckpointError(path, f"blob {name}_b has {bias.size} values, {name}_w has {weight.shape[0]} outputs")
        blobs.append(bias)
    unexpected = sorted(set(parts) - {"w", "b"})
    if unexpected:
        raise CheckpointError(path, f"layer {name}: unexpected blobs {[f'{name}_{s}' for s in unexpected]}")
    if weight.ndim == 2:
        return SourceLayer(name, "fc", {"out": int(weight.shape[0]), "bias": "b" in parts, "transpose": False},
                           blobs, source_type="FC")
    if weight.ndim != 4:
        raise CheckpointError(path, f"blob {name}_w has shape {weight.shape}, expected 2-d (FC) or 4-d (conv)")
    groups = 1
    if in_channels is not None and in_channels != weight.shape[1]:
        if in_channels % weight.shape[1]:
            raise CheckpointError(path, f"blob {name}_w has {weight.shape[1]} input channels, the previous "
                                        f"layer gives {in_channels}")
        groups = in_channels // weight.shape[1]
    params = {"out": int(weight.shape[0]), "kernel": tuple(int(d) for d in weight.shape[2:]),
              "stride": None, "pad": None, "dilation": None, "groups": groups, "groups_inferred": True,
              "bias": "b" in parts}
    return SourceLayer(name, "conv", params, blobs, source_type="Conv")


def _bn_layer(name: str, parts: dict, path: Path) -> SourceLayer:
    missing = [s for s in ("rm", "riv") if s not in parts]
    if missing:
        raise CheckpointError(path, f"batch norm {name}: missing blobs {[f'{name}_{s}' for s in missing]}")
    affine = "s" in parts and "b" in parts
    order = ("rm", "riv", "s", "b") if affine else ("rm", "riv")
    blobs = [np.ascontiguousarray(parts[s], dtype=np.float32).reshape(-1) for s in order]
    if len({b.size for b in blobs}) != 1:
        raise CheckpointError(path, f"batch norm {name}: blob sizes {[b.size for b in blobs]} differ")
    return SourceLayer(name, "bn", {"eps": FAIR_BN_EPSILON, "eps_stored": False, "affine": affine}, blobs,
                       source_type="SpatialBN")


def read_caffe2_pickle(path: Path) -> SourceNet:
    """FAIR's Caffe2 weights as conv / fc / bn layers in stage order (see the module docstring)."""
    groups, ignored = _group(load_pickle(path), path)
    if not groups:
        raise CheckpointError(path, f"no conv/fc weights among the blobs (names start with {sorted(ignored)[:5]})")
    is_bn = {name: ("rm" in parts or "riv" in parts) and "w" not in parts for name, parts in groups.items()}
    layers, channels = [], None
    for name in sorted(groups, key=lambda n: _order_key(n, is_bn[n])):
        parts = groups[name]
        if is_bn[name]:
            layers.append(_bn_layer(name, parts, path))
        elif "w" in parts:
            layer = _weight_layer(name, parts, channels if layers and parts["w"].ndim == 4 else None, path)
            channels = layer.params["out"]
            layers.append(layer)
        elif set(parts) == {"s", "b"}:  # AffineChannel: a frozen BN folded into scale and shift
            layers.append(SourceLayer(name, "scale", {"bias": True},
                                      [np.ascontiguousarray(parts[s], dtype=np.float32).reshape(-1) for s in "sb"],
                                      source_type="AffineChannel"))
        else:
            ignored += [f"{name}_{s}" for s in parts]
    notes = [NOTE_INPUT, "Caffe2 pickles store no strides, padding, pooling or BN epsilon; layer order "
                         "follows the stage numbers in the blob names"]
    if ignored:
        notes.append(f"blobs not used: {', '.join(sorted(ignored))}")
    return SourceNet(str(path), "caffe2", layers, notes=notes)
