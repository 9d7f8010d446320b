"""Torch7 ``.t7`` files (Lua torch's binary ``torch.save``) holding an AlexNet-like ``nn.Sequential``.

The file is read with ``torchfile``, a plain decoder of Torch's serialisation: numbers, strings,
booleans, Lua tables and torch objects (class name + fields). It uses neither pickle nor eval; a
serialised Lua function comes back as its bytecode bytes and is never run. Tensors and storages are
decoded here instead of by torchfile's own handlers, which trust the file: a storage cut short by a
truncated file would otherwise back a numpy view reaching past its end.

Accepted modules (``nn.`` or ``cudnn.``): Sequential (nested), SpatialConvolution(MM),
SpatialMaxPooling, SpatialAveragePooling, SpatialCrossMapLRN, ReLU, Threshold(0, 0), Dropout,
View, Reshape, Linear, SpatialBatchNormalization, BatchNormalization, SoftMax, LogSoftMax, Identity.
Anything else is refused by name; graphs (``nn.gModule``) and branching containers (Concat,
ConcatTable, Parallel) are out of scope. Layers are named by their 1-based position, dotted for
nested containers (``"3"``, ``"2.4"``), as Lua's ``model:get(i)`` counts them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torchfile

from backbones.formats import SourceLayer, SourceNet
from runtime.errors import CheckpointError

_DTYPES = {"Float": np.float32, "Double": np.float64, "Cuda": np.float32, "CudaDouble": np.float64,
           "Long": np.int64, "Int": np.int32, "Short": np.int16, "Char": np.int8, "Byte": np.uint8,
           "CudaLong": np.int64, "CudaInt": np.int32, "CudaByte": np.uint8}
NOTE_INPUT = "Torch7 models usually expect RGB input; check the model's own preprocessing"


class _T7Problem(Exception):
    """A malformed file; converted to a CheckpointError naming the file."""


def _data_class(class_name: str) -> tuple[str, type] | None:
    """("tensor" | "storage", dtype) for torch.<T>Tensor / torch.<T>Storage, else None."""
    if not class_name.startswith("torch."):
        return None
    for suffix in ("Tensor", "Storage"):
        stem = class_name[len("torch."):-len(suffix)]
        if class_name.endswith(suffix) and stem in _DTYPES:
            return suffix.lower(), _DTYPES[stem]
    return None


class _CheckedReader(torchfile.T7Reader):
    """torchfile's reader with bounds-checked tensors and storages and str class names."""

    def __init__(self, handle, file_size: int):
        super().__init__(handle, use_list_heuristic=True, use_int_heuristic=True, utf8_decode_strings=True)
        self.file_size = file_size
        self.reading: list[str] = []  # classes being read, outermost first; left as is by an error

    def where(self) -> str:
        return f" (in {' > '.join(self.reading)})" if self.reading else ""

    def _read(self, fmt):
        try:
            return super()._read("<" + fmt.lstrip("<"))
        except Exception as err:  # struct.error at the end of the file
            raise _T7Problem(f"truncated file (at byte {self.f.tell()}: {err})") from None

    def read_long(self):
        return self._read("q")[0]  # Torch7 on 64-bit Linux/macOS writes longs as 8 bytes

    def read_string(self, disable_utf8=False):
        size = self.read_int()
        left = self.file_size - self.f.tell()
        if not 0 <= size <= left:
            raise _T7Problem(f"truncated file: a string of {size} bytes at byte {self.f.tell()}, {left} remain")
        text = self.f.read(size)
        return text if disable_utf8 else text.decode("utf-8")

    def read_obj(self):
        start = self.f.tell()
        if self.read_int() != torchfile.TYPE_TORCH:
            self.f.seek(start)
            return super().read_obj()
        index = self.read_int()
        if index in self.objects:
            return self.objects[index]
        version = self.read_string(disable_utf8=True)
        raw_name = self.read_string(disable_utf8=True) if version.startswith(b"V ") else version
        class_name = raw_name.decode("utf-8", "replace")
        self.reading.append(class_name)
        data_class = _data_class(class_name)
        if data_class is not None:
            obj = self._read_tensor(data_class[1]) if data_class[0] == "tensor" else self._read_storage(data_class[1])
            self.objects[index] = obj
        elif class_name.startswith(("torch.", "tds.")):
            raise _T7Problem(f"unsupported data class {class_name}")
        else:
            obj = torchfile.TorchObject(class_name)
            self.objects[index] = obj  # registered before its fields, which may refer back to it
            fields = self.read_obj()
            if fields == []:  # torchfile turns an empty Lua table into an empty list
                fields = torchfile.hashable_uniq_dict()
            if not isinstance(fields, dict):
                raise _T7Problem(f"object of class {class_name} has no field table")
            obj._obj = fields
        self.reading.pop()
        return obj

    def _read_storage(self, dtype) -> np.ndarray:
        count = self.read_long()
        nbytes = count * np.dtype(dtype).itemsize
        left = self.file_size - self.f.tell()
        if count < 0 or nbytes > left:
            raise _T7Problem(f"truncated file: a storage of {count} values needs {nbytes} bytes, {left} remain")
        return np.frombuffer(self.f.read(nbytes), dtype=dtype).copy()

    def _read_tensor(self, dtype) -> np.ndarray:
        ndim = self.read_int()
        if not 0 <= ndim <= 8:
            raise _T7Problem(f"tensor with {ndim} dimensions")
        size = [self.read_long() for _ in range(ndim)]
        stride = [self.read_long() for _ in range(ndim)]
        offset = self.read_long() - 1  # Lua counts from 1
        storage = self.read_obj()
        if ndim == 0 or storage is None:
            return np.empty(0, dtype=dtype)
        if not isinstance(storage, np.ndarray) or min(size + stride + [offset]) < 0:
            raise _T7Problem(f"tensor of size {size} with a bad storage, stride {stride} or offset {offset}")
        needed = 0 if 0 in size else offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
        if needed > storage.size:
            raise _T7Problem(f"tensor of size {size} needs {needed} storage values, the storage holds {storage.size}")
        view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                               strides=[s * storage.itemsize for s in stride])
        return np.array(view, dtype=dtype)


def load_t7(path: Path):
    """The object in a Torch7 binary file, with tensors as numpy arrays and classes as TorchObjects."""
    with open(path, "rb") as handle:
        reader = _CheckedReader(handle, os.path.getsize(path))
        try:
            return reader.read_obj()
        except _T7Problem as err:
            raise CheckpointError(path, f"{err}{reader.where()}") from None
        except (torchfile.T7ReaderException, UnicodeDecodeError, ValueError, RecursionError, MemoryError) as err:
            detail = str(err).splitlines()[0] if str(err) else ""
            raise CheckpointError(path, f"not a readable Torch7 file ({type(err).__name__}: {detail})"
                                        f"{reader.where()}") from None


# --- modules ---------------------------------------------------------------------------------------

def _field(module, name: str, default=None):
    value = module._obj.get(name, default)
    return default if value is None else value


def _f32(array) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


def _conv(module, where: str, path: Path) -> tuple[dict, list]:
    out, inp = int(_field(module, "nOutputPlane")), int(_field(module, "nInputPlane"))
    kh, kw = int(_field(module, "kH")), int(_field(module, "kW"))
    groups = int(_field(module, "groups", 1))
    pad_default = int(_field(module, "padding", 0))  # pre-2015 nn used one "padding" field
    params = {"out": out, "kernel": (kh, kw),
              "stride": (int(_field(module, "dH", 1)), int(_field(module, "dW", 1))),
              "pad": (int(_field(module, "padH", pad_default)), int(_field(module, "padW", pad_default))),
              "groups": groups, "dilation": (1, 1)}
    weight, bias = _field(module, "weight"), _field(module, "bias")
    expected = (out, inp // groups, kh, kw)
    if not isinstance(weight, np.ndarray) or weight.size != np.prod(expected):
        shape = getattr(weight, "shape", None)
        raise CheckpointError(path, f"{where}: weight of shape {shape}, expected {expected}")
    blobs = [_f32(weight).reshape(expected)]  # SpatialConvolutionMM stores it as out x (in*kH*kW)
    params["bias"] = isinstance(bias, np.ndarray) and bias.size > 0
    if params["bias"]:
        blobs.append(_check_vector(bias, out, where, "bias", path))
    return params, blobs


def _check_vector(array, size: int, where: str, what: str, path: Path) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.size != size:
        raise CheckpointError(path, f"{where}: {what} has shape {getattr(array, 'shape', None)}, expected ({size},)")
    return _f32(array).reshape(-1)


def _linear(module, where: str, path: Path) -> tuple[dict, list]:
    weight, bias = _field(module, "weight"), _field(module, "bias")
    if not isinstance(weight, np.ndarray) or weight.ndim != 2:
        raise CheckpointError(path, f"{where}: weight of shape {getattr(weight, 'shape', None)}, expected out x in")
    params = {"out": int(weight.shape[0]), "bias": isinstance(bias, np.ndarray) and bias.size > 0,
              "transpose": False}
    blobs = [_f32(weight)]
    if params["bias"]:
        blobs.append(_check_vector(bias, weight.shape[0], where, "bias", path))
    return params, blobs


def _pool(module, method: str) -> dict:
    params = {"method": method, "kernel": (int(_field(module, "kH")), int(_field(module, "kW"))),
              "stride": (int(_field(module, "dH", 1)), int(_field(module, "dW", 1))),
              "pad": (int(_field(module, "padH", 0)), int(_field(module, "padW", 0))),
              "ceil": bool(_field(module, "ceil_mode", False)), "global": False}
    if method == "avg":
        params["count_include_pad"] = bool(_field(module, "count_include_pad", True))
    return params


def _batchnorm(module, where: str, path: Path) -> tuple[dict, list]:
    mean = _field(module, "running_mean")
    if not isinstance(mean, np.ndarray):
        raise CheckpointError(path, f"{where}: no running_mean")
    channels, eps = mean.size, float(_field(module, "eps", 1e-5))
    var = _field(module, "running_var")
    if var is None and isinstance(_field(module, "running_std"), np.ndarray):
        # Before 2016 nn stored running_std = 1/sqrt(var + eps).
        inv_std = _check_vector(_field(module, "running_std"), channels, where, "running_std", path)
        var = 1.0 / np.square(inv_std.astype(np.float64)) - eps
    blobs = [_f32(mean).reshape(-1), _check_vector(var, channels, where, "running_var", path)]
    weight, bias = _field(module, "weight"), _field(module, "bias")
    affine = isinstance(weight, np.ndarray) and weight.size > 0
    if affine:
        blobs += [_check_vector(weight, channels, where, "weight", path),
                  _check_vector(bias, channels, where, "bias", path)]
    return {"eps": eps, "affine": affine}, blobs


_OUT_OF_SCOPE = {
    "gModule": "nngraph models (nn.gModule) are out of scope: export the network as an nn.Sequential",
    "Concat": "branching containers (Concat) are out of scope", "ConcatTable": "branching containers "
    "(ConcatTable) are out of scope", "Parallel": "branching containers (Parallel) are out of scope",
    "DepthConcat": "branching containers (DepthConcat) are out of scope",
}


def _module_layer(module, name: str, path: Path) -> SourceLayer:
    """One non-container module as a SourceLayer; CheckpointError for classes we do not read."""
    class_name = module.torch_typename()
    where = f"module {name} ({class_name})"
    package, _, base = class_name.partition(".")
    if package not in ("nn", "cudnn") or not base:
        raise CheckpointError(path, f"{where}: unknown class")
    if base in _OUT_OF_SCOPE:
        raise CheckpointError(path, f"{where}: {_OUT_OF_SCOPE[base]}")
    kind, params, blobs = _module_kind(module, base, where, path)
    return SourceLayer(name=name, kind=kind, params=params, blobs=blobs, source_type=class_name)


def _module_kind(module, base: str, where: str, path: Path) -> tuple[str, dict, list]:
    if base in ("SpatialConvolution", "SpatialConvolutionMM"):
        return ("conv", *_conv(module, where, path))
    if base == "Linear":
        return ("fc", *_linear(module, where, path))
    if base in ("SpatialBatchNormalization", "BatchNormalization"):
        return ("bn", *_batchnorm(module, where, path))
    if base in ("SpatialMaxPooling", "SpatialAveragePooling"):
        return "pool", _pool(module, "max" if "Max" in base else "avg"), []
    if base == "SpatialCrossMapLRN":
        return "lrn", {"size": int(_field(module, "size", 5)), "alpha": float(_field(module, "alpha", 1e-4)),
                       "beta": float(_field(module, "beta", 0.75)), "k": float(_field(module, "k", 1.0)),
                       "region": "across", "alpha_divided_by_size": True}, []
    is_zero_threshold = base == "Threshold" and _field(module, "threshold", 0) == 0 and _field(module, "val", 0) == 0
    if base == "ReLU" or is_zero_threshold:
        return "relu", {"negative_slope": 0.0}, []
    if base == "Dropout":
        # Before nn's "v2" dropout, outputs were scaled by (1 - p) at test time instead of in training.
        return "dropout", {"ratio": float(_field(module, "p", 0.5)),
                           "scale_at_test": not bool(_field(module, "v2", False))}, []
    if base in ("View", "Reshape"):
        size = _field(module, "size")
        return "flatten", {"size": [int(v) for v in np.asarray(size).reshape(-1)] if size is not None else None}, []
    if base in ("SoftMax", "LogSoftMax"):
        return "softmax", {"log": base == "LogSoftMax"}, []
    if base == "Identity":
        return "other", {"type": "Identity"}, []
    raise CheckpointError(path, f"{where}: unknown class")


def _walk(module, name: str, path: Path) -> list[SourceLayer]:
    """The layers of ``module`` in execution order, containers flattened."""
    if not isinstance(module, torchfile.TorchObject):
        raise CheckpointError(path, f"module {name or '<top>'}: a {type(module).__name__}, not a torch object")
    if module.torch_typename() in ("nn.Sequential", "cudnn.Sequential"):
        children = _field(module, "modules", [])
        if isinstance(children, dict) and not children:
            children = []
        if not isinstance(children, list):
            raise CheckpointError(path, f"module {name or '<top>'} (nn.Sequential): malformed 'modules' list")
        layers = []
        for i, child in enumerate(children, start=1):
            layers += _walk(child, f"{name}.{i}" if name else str(i), path)
        return layers
    return [_module_layer(module, name or "1", path)]


def read_t7(path: Path) -> SourceNet:
    """A Torch7 file holding an nn.Sequential (or a table with it under "model"/"net")."""
    obj = load_t7(path)
    if isinstance(obj, dict):
        found = [obj[key] for key in ("model", "net", "network") if isinstance(obj.get(key), torchfile.TorchObject)]
        if not found:
            raise CheckpointError(path, f"a Lua table without a model (keys {sorted(map(str, obj))[:5]})")
        obj = found[0]
    layers = _walk(obj, "", path)
    return SourceNet(str(path), "torch7", layers, notes=[NOTE_INPUT])
