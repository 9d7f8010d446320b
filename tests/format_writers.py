"""Writers of the checkpoint formats that ``backbones.formats`` reads, for tests.

They are deliberately independent of the readers: Caffe files are encoded by hand with a tiny
protobuf wire-format encoder and caffe.proto's field numbers written out again here, so a wrong
number in ``backbones/formats/caffe_proto.py`` makes the round trip fail; Torch7 files follow
Torch's serialisation (``torch.File:writeObject``) byte by byte; Caffe2 pickles are what Python 2
``pickle.dump(..., protocol=2)`` of numpy arrays produces.

Every writer takes a list of :class:`SourceLayer` in the neutral shapes (conv weight
out x in/groups x kh x kw, fc weight out x in, BN blobs [mean, var(, weight, bias)]) and stores them
the way the source framework would, so a reader must undo exactly what the writer did.
"""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

from backbones.formats import SourceLayer

# --- protobuf wire format --------------------------------------------------------------------------

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 are sent as 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def f_varint(number: int, value: int) -> bytes:
    return key(number, VARINT) + varint(int(value))


def f_bytes(number: int, payload: bytes) -> bytes:
    return key(number, LEN) + varint(len(payload)) + payload


def f_string(number: int, text: str) -> bytes:
    return f_bytes(number, text.encode("utf-8"))


def f_float(number: int, value: float) -> bytes:
    return key(number, FIXED32) + struct.pack("<f", value)


def f_packed_floats(number: int, values: np.ndarray) -> bytes:
    return f_bytes(number, np.ascontiguousarray(values, dtype="<f4").tobytes())


def f_packed_varints(number: int, values) -> bytes:
    return f_bytes(number, b"".join(varint(int(v)) for v in values))


# --- Caffe (field numbers from BVLC caffe.proto, written out independently of the reader) -----------

BLOB = {"num": 1, "channels": 2, "height": 3, "width": 4, "data": 5, "shape": 7}
NET = {"name": 1, "layers": 2, "input": 3, "input_dim": 4, "input_shape": 8, "layer": 100}
V1 = {"bottom": 2, "top": 3, "name": 4, "type": 5, "blobs": 6, "conv": 10, "dropout": 12, "fc": 17,
      "lrn": 18, "pool": 19, "relu": 30}
V2 = {"name": 1, "type": 2, "bottom": 3, "top": 4, "blobs": 7, "conv": 106, "dropout": 108, "fc": 117,
      "lrn": 118, "pool": 121, "relu": 123, "python": 130, "bn": 139, "scale": 142, "input": 143}
V1_TYPES = {"conv": 4, "fc": 14, "relu": 18, "lrn": 15, "pool": 17, "dropout": 6, "softmax": 20, "input": 5}
V2_TYPES = {"conv": "Convolution", "fc": "InnerProduct", "relu": "ReLU", "lrn": "LRN", "pool": "Pooling",
            "dropout": "Dropout", "bn": "BatchNorm", "scale": "Scale", "softmax": "Softmax", "input": "Input"}
BN_SCALE_FACTOR = 4.0  # Caffe's BatchNorm stores mean*s, var*s, s; a power of two keeps it exact


def blob_bytes(array: np.ndarray, legacy_shape: tuple[int, ...] | None = None) -> bytes:
    """A BlobProto: legacy num/channels/height/width if ``legacy_shape`` (4 values), else BlobShape."""
    if legacy_shape is not None:
        dims = b"".join(f_varint(BLOB[n], d) for n, d in zip(("num", "channels", "height", "width"), legacy_shape))
    else:
        dims = f_bytes(BLOB["shape"], f_packed_varints(1, array.shape))
    return dims + f_packed_floats(BLOB["data"], array.reshape(-1))


def _legacy(array: np.ndarray) -> tuple[int, ...]:
    """V1 4-d shape: weights as they are (fc 1 x 1 x out x in), vectors 1 x 1 x 1 x n."""
    return (1,) * (4 - array.ndim) + tuple(array.shape)


def _caffe_blobs(layer: SourceLayer) -> list[np.ndarray]:
    """The blobs as Caffe stores them: BN with its scale factor, transposed FC weights."""
    blobs = list(layer.blobs)
    if layer.kind == "bn":
        s = np.float32(BN_SCALE_FACTOR)
        return [blobs[0] * s, blobs[1] * s, np.array([s], np.float32)]
    if layer.kind == "fc" and layer.params.get("transposed_from_source"):
        return [np.ascontiguousarray(blobs[0].T)] + blobs[1:]
    return blobs


def conv_param_bytes(p: dict) -> bytes:
    out = f_varint(1, p["out"]) + f_varint(2, p["bias"])
    kh, kw = p["kernel"]
    out += f_varint(4, kh) if kh == kw else f_varint(11, kh) + f_varint(12, kw)
    sh, sw = p["stride"]
    out += f_varint(6, sh) if sh == sw else f_varint(13, sh) + f_varint(14, sw)
    ph, pw = p["pad"]
    out += f_varint(3, ph) if ph == pw else f_varint(9, ph) + f_varint(10, pw)
    if p["groups"] != 1:
        out += f_varint(5, p["groups"])
    if tuple(p.get("dilation", (1, 1))) != (1, 1):
        out += f_varint(18, p["dilation"][0])
    return out


def pool_param_bytes(p: dict) -> bytes:
    out = f_varint(1, {"max": 0, "avg": 1, "stochastic": 2}[p["method"]])
    if p["global"]:
        out += f_varint(12, 1)
    else:
        kh, kw = p["kernel"]
        out += f_varint(2, kh) if kh == kw else f_varint(5, kh) + f_varint(6, kw)
    sh, sw = p["stride"]
    out += f_varint(3, sh) if sh == sw else f_varint(7, sh) + f_varint(8, sw)
    ph, pw = p["pad"]
    out += f_varint(4, ph) if ph == pw else f_varint(9, ph) + f_varint(10, pw)
    if not p["ceil"]:
        out += f_varint(13, 1)  # round_mode: FLOOR
    return out


def lrn_param_bytes(p: dict) -> bytes:
    return (f_varint(1, p["size"]) + f_float(2, p["alpha"]) + f_float(3, p["beta"])
            + f_varint(4, 0 if p["region"] == "across" else 1) + f_float(5, p["k"]))


def fc_param_bytes(p: dict) -> bytes:
    out = f_varint(1, p["out"]) + f_varint(2, p["bias"])
    if p.get("transposed_from_source"):
        out += f_varint(6, 1)
    return out


def _param_bytes(layer: SourceLayer, fields: dict) -> bytes:
    p, kind = layer.params, layer.kind
    if kind == "conv":
        return f_bytes(fields["conv"], conv_param_bytes(p))
    if kind == "fc":
        return f_bytes(fields["fc"], fc_param_bytes(p))
    if kind == "pool":
        return f_bytes(fields["pool"], pool_param_bytes(p))
    if kind == "lrn":
        return f_bytes(fields["lrn"], lrn_param_bytes(p))
    if kind == "dropout":
        return f_bytes(fields["dropout"], f_float(1, p["ratio"]))
    if kind == "relu" and p.get("negative_slope"):
        return f_bytes(fields["relu"], f_float(1, p["negative_slope"]))
    if kind == "bn":
        return f_bytes(fields["bn"], f_float(3, p["eps"]))
    if kind == "scale":
        return f_bytes(fields["scale"], f_varint(4, p["bias"]))
    if kind == "input" and p.get("shapes"):
        return f_bytes(fields["input"], b"".join(f_bytes(1, f_packed_varints(1, s)) for s in p["shapes"]))
    if kind == "other" and p.get("type") == "Python":
        return f_bytes(fields["python"], f_string(1, p["module"]) + f_string(2, p["layer"]))
    return b""


def caffe_layer_bytes(layer: SourceLayer, *, v1: bool, with_params: bool = True, with_blobs: bool = True) -> bytes:
    """One serialised V1LayerParameter or LayerParameter."""
    fields = V1 if v1 else V2
    out = f_string(fields["name"], layer.name)
    if v1:
        out += f_varint(fields["type"], V1_TYPES[layer.kind])
    else:
        out += f_string(fields["type"], layer.source_type if layer.kind == "other" else V2_TYPES[layer.kind])
    out += b"".join(f_string(fields["bottom"], b) for b in layer.bottoms)
    out += b"".join(f_string(fields["top"], t) for t in layer.tops)
    if with_params:
        out += _param_bytes(layer, fields)
    if with_blobs:
        out += b"".join(f_bytes(fields["blobs"], blob_bytes(b, _legacy(b) if v1 else None))
                        for b in _caffe_blobs(layer))
    return out


def caffemodel_bytes(layers: list[SourceLayer], *, v1: bool = False, name: str = "tiny",
                     input_dim: tuple[int, ...] | None = None, with_params: bool = True) -> bytes:
    """A binary NetParameter (``.caffemodel``) with V1 ``layers`` (field 2) or V2 ``layer`` (100)."""
    out = f_string(NET["name"], name)
    if input_dim:
        out += f_string(NET["input"], "data") + b"".join(f_varint(NET["input_dim"], d) for d in input_dim)
    field = NET["layers"] if v1 else NET["layer"]
    return out + b"".join(f_bytes(field, caffe_layer_bytes(layer, v1=v1, with_params=with_params))
                          for layer in layers)


def write_caffemodel(path: Path, layers: list[SourceLayer], **kwargs) -> Path:
    Path(path).write_bytes(caffemodel_bytes(layers, **kwargs))
    return Path(path)


def write_binaryproto(path: Path, mean: np.ndarray, *, double: bool = False) -> Path:
    """A mean image as Caffe's ``compute_image_mean`` writes it: legacy dims 1 x C x H x W, floats
    in ``data`` (field 5) or, with ``double``, in ``double_data`` (field 8)."""
    if double:
        dims = b"".join(f_varint(BLOB[n], d) for n, d in zip(("num", "channels", "height", "width"),
                                                              (1,) + tuple(mean.shape)))
        payload = dims + f_bytes(8, np.ascontiguousarray(mean, dtype="<f8").tobytes())
    else:
        payload = blob_bytes(mean, (1,) + tuple(mean.shape))
    Path(path).write_bytes(payload)
    return Path(path)


def write_caffe_h5(path: Path, layers: list[SourceLayer]) -> Path:
    """Caffe's HDF5 snapshot layout: ``data/<layer>/<i>`` for each blob (BlobShape dims)."""
    import h5py
    with h5py.File(path, "w") as handle:
        data = handle.create_group("data")
        handle.create_group("diff")
        for layer in layers:
            blobs = _caffe_blobs(layer)
            if blobs:
                group = data.create_group(layer.name)
                for i, blob in enumerate(blobs):
                    group.create_dataset(str(i), data=blob)
    return Path(path)


# --- deploy prototxt text --------------------------------------------------------------------------

def _text_pair(name: str, value: tuple[int, int], single: str | None = None) -> str:
    """``single: v`` if both sides agree (``single`` defaults to ``name``), else ``name_h`` / ``name_w``."""
    if value[0] == value[1]:
        return f"{single or name}: {value[0]} "
    return f"{name}_h: {value[0]} {name}_w: {value[1]} "


def _text_params(layer: SourceLayer) -> str:
    p, kind = layer.params, layer.kind
    if kind == "conv":
        text = (f"num_output: {p['out']} bias_term: {str(p['bias']).lower()} "
                + _text_pair("kernel", p["kernel"], "kernel_size") + _text_pair("stride", p["stride"])
                + _text_pair("pad", p["pad"]))
        if p["groups"] != 1:
            text += f"group: {p['groups']} "
        return f"convolution_param {{ {text}weight_filler {{ type: \"gaussian\" std: 0.01 }} engine: CUDNN }}"
    if kind == "fc":
        transpose = " transpose: true" if p.get("transposed_from_source") else ""
        return f"inner_product_param {{ num_output: {p['out']} bias_term: {str(p['bias']).lower()}{transpose} }}"
    if kind == "pool":
        method = {"max": "MAX", "avg": "AVE", "stochastic": "STOCHASTIC"}[p["method"]]
        size = "global_pooling: true " if p["global"] else _text_pair("kernel", p["kernel"], "kernel_size")
        floor = "" if p["ceil"] else "round_mode: FLOOR "
        return (f"pooling_param {{ pool: {method} {size}{_text_pair('stride', p['stride'])}"
                f"{_text_pair('pad', p['pad'])}{floor}}}")
    if kind == "lrn":
        region = "ACROSS_CHANNELS" if p["region"] == "across" else "WITHIN_CHANNEL"
        return (f"lrn_param {{ local_size: {p['size']} alpha: {p['alpha']!r} beta: {p['beta']!r} "
                f"k: {p['k']!r} norm_region: {region} }}")
    if kind == "relu" and p.get("negative_slope"):
        return f"relu_param {{ negative_slope: {p['negative_slope']!r} }}"
    if kind == "dropout":
        return f"dropout_param {{ dropout_ratio: {p['ratio']!r} }}"
    if kind == "bn":
        return f"batch_norm_param {{ use_global_stats: true eps: {p['eps']!r} }}"
    if kind == "scale":
        return f"scale_param {{ bias_term: {str(p['bias']).lower()} }}"
    if kind == "input" and p.get("shapes"):
        shapes = " ".join("shape { " + " ".join(f"dim: {d}" for d in s) + " }" for s in p["shapes"])
        return f"input_param {{ {shapes} }}"
    if kind == "other" and p.get("type") == "Python":
        # a custom layer's own parameter block, unknown to caffe.proto: must be skipped, not fatal
        return (f"python_param {{ module: \"{p['module']}\" layer: \"{p['layer']}\" param_str: \"{{'a': 1}}\" }} "
                f"my_custom_param {{ stride: 2 mode: FAST nested {{ x: 1.5 }} }}")
    return ""


def prototxt_text(layers: list[SourceLayer], *, v1: bool = False, input_dim: tuple[int, ...] | None = None) -> str:
    """A deploy prototxt in V1 (``layers { type: CONVOLUTION }``) or V2 (``layer { type: "..." }``) syntax."""
    lines = ['name: "tiny"  # written by tests/format_writers.py']
    if input_dim:
        lines.append('input: "data"\n' + "\n".join(f"input_dim: {d}" for d in input_dim))
    for layer in layers:
        if v1:
            head = f"layers {{\n  name: \"{layer.name}\"\n  type: {_V1_NAMES[layer.kind]}"
        else:
            kind = layer.source_type if layer.kind == "other" else V2_TYPES[layer.kind]
            head = f"layer {{\n  name: \"{layer.name}\"\n  type: \"{kind}\""
        wiring = "".join(f"\n  bottom: \"{b}\"" for b in layer.bottoms)
        wiring += "".join(f"\n  top: \"{t}\"" for t in layer.tops)
        extra = "\n  param { lr_mult: 1 decay_mult: 1 }" if layer.kind == "conv" and not v1 else ""
        lines.append(f"{head}{wiring}{extra}\n  {_text_params(layer)}\n}}")
    return "\n".join(lines) + "\n"


_V1_NAMES = {"conv": "CONVOLUTION", "fc": "INNER_PRODUCT", "relu": "RELU", "lrn": "LRN", "pool": "POOLING",
             "dropout": "DROPOUT", "softmax": "SOFTMAX", "input": "DATA"}


def write_prototxt(path: Path, layers: list[SourceLayer], **kwargs) -> Path:
    Path(path).write_text(prototxt_text(layers, **kwargs), encoding="utf-8")
    return Path(path)


# --- Torch7 ----------------------------------------------------------------------------------------

T7_NIL, T7_NUMBER, T7_STRING, T7_TABLE, T7_TORCH, T7_BOOLEAN = 0, 1, 2, 3, 4, 5


class T7Object:
    """A torch class instance to serialise: its class name and its field table."""

    def __init__(self, class_name: str, fields: dict):
        self.class_name, self.fields = class_name, fields


class T7Writer:
    """Torch7's binary serialisation (``torch.File:writeObject``, 64-bit longs, little-endian).

    Tables and torch objects get an object index; writing the same Python object again writes only
    its type and index (a reference), as Torch does for shared objects.
    """

    def __init__(self):
        self.out = bytearray()
        self.indices: dict[int, int] = {}
        self.keep: list = []  # objects whose id() is memoised must stay alive

    def int(self, value: int):
        self.out += struct.pack("<i", value)

    def long(self, value: int):
        self.out += struct.pack("<q", value)

    def string(self, text: str | bytes):
        data = text.encode("utf-8") if isinstance(text, str) else text
        self.int(len(data))
        self.out += data

    def _reference(self, type_code: int, value) -> bool:
        """Write type + index; True if ``value`` was written before (nothing more to write)."""
        self.int(type_code)
        seen = id(value) in self.indices
        if not seen:
            self.indices[id(value)] = len(self.indices) + 1
            self.keep.append(value)
        self.int(self.indices[id(value)])
        return seen

    def obj(self, value):
        if value is None:
            self.int(T7_NIL)
        elif isinstance(value, bool):
            self.int(T7_BOOLEAN)
            self.int(int(value))
        elif isinstance(value, (int, float)):
            self.int(T7_NUMBER)
            self.out += struct.pack("<d", float(value))
        elif isinstance(value, str):
            self.int(T7_STRING)
            self.string(value)
        elif isinstance(value, np.ndarray):
            self.tensor(value)
        elif isinstance(value, T7Object):
            if not self._reference(T7_TORCH, value):
                self.string("V 1")
                self.string(value.class_name)
                self.obj(value.fields)
        elif isinstance(value, (dict, list)):
            if not self._reference(T7_TABLE, value):
                items = list(value.items()) if isinstance(value, dict) else [(i + 1, v) for i, v in enumerate(value)]
                self.int(len(items))
                for k, v in items:
                    self.obj(k)
                    self.obj(v)
        else:
            raise TypeError(f"cannot serialise {type(value).__name__}")

    def tensor(self, array: np.ndarray):
        """torch.FloatTensor / torch.LongTensor: ndim, sizes, strides, 1-based offset, storage."""
        kind = {np.dtype(np.float32): "Float", np.dtype(np.int64): "Long", np.dtype(np.float64): "Double"}[array.dtype]
        if self._reference(T7_TORCH, array):
            return
        self.string("V 1")
        self.string(f"torch.{kind}Tensor")
        self.int(array.ndim)
        for size in array.shape:
            self.long(size)
        contiguous = np.ascontiguousarray(array)
        for stride in contiguous.strides:
            self.long(stride // array.itemsize)
        self.long(1)
        if array.size == 0:
            self.int(T7_NIL)
            return
        self._reference(T7_TORCH, object())
        self.string("V 1")
        self.string(f"torch.{kind}Storage")
        self.long(array.size)
        self.out += contiguous.astype(contiguous.dtype.newbyteorder("<")).tobytes()


def t7_module(layer: SourceLayer, *, cudnn: bool = False, mm: bool = False) -> T7Object:
    """The nn module Torch would save for a neutral layer (fields as nn's Lua classes name them)."""
    p, b = layer.params, layer.blobs
    pkg = "cudnn" if cudnn else "nn"
    common = {"train": False, "output": np.zeros(0, np.float32), "gradInput": np.zeros(0, np.float32)}
    if layer.kind == "conv":
        weight = b[0].reshape(b[0].shape[0], -1) if mm else b[0]
        fields = {"nInputPlane": b[0].shape[1] * p["groups"], "nOutputPlane": p["out"],
                  "kH": p["kernel"][0], "kW": p["kernel"][1], "dH": p["stride"][0], "dW": p["stride"][1],
                  "padH": p["pad"][0], "padW": p["pad"][1], "weight": weight,
                  "gradWeight": np.zeros_like(weight), "bias": b[1] if p["bias"] else None}
        if p["groups"] != 1:
            fields["groups"] = p["groups"]
        name = "nn.SpatialConvolutionMM" if mm else f"{pkg}.SpatialConvolution"
        return T7Object(name, {**common, **fields})
    if layer.kind == "fc":
        return T7Object("nn.Linear", {**common, "weight": b[0], "bias": b[1] if p["bias"] else None,
                                      "gradWeight": np.zeros_like(b[0])})
    if layer.kind == "relu":
        return T7Object(f"{pkg}.ReLU", {**common, "threshold": 0, "val": 0, "inplace": True})
    if layer.kind == "pool":
        name = "SpatialMaxPooling" if p["method"] == "max" else "SpatialAveragePooling"
        return T7Object(f"{pkg}.{name}", {**common, "kH": p["kernel"][0], "kW": p["kernel"][1],
                                          "dH": p["stride"][0], "dW": p["stride"][1], "padH": p["pad"][0],
                                          "padW": p["pad"][1], "ceil_mode": p["ceil"]})
    if layer.kind == "lrn":
        return T7Object(f"{pkg}.SpatialCrossMapLRN", {**common, "size": p["size"], "alpha": p["alpha"],
                                                      "beta": p["beta"], "k": p["k"]})
    if layer.kind == "bn":
        name = "nn.SpatialBatchNormalization" if p.get("spatial", True) else "nn.BatchNormalization"
        fields = {"running_mean": b[0], "running_var": b[1], "eps": p["eps"], "momentum": 0.1, "affine": p["affine"]}
        if p["affine"]:
            fields.update(weight=b[2], bias=b[3])
        return T7Object(name, {**common, **fields})
    if layer.kind == "dropout":
        return T7Object("nn.Dropout", {**common, "p": p["ratio"], "v2": not p["scale_at_test"],
                                       "noise": np.zeros(0, np.float32)})
    if layer.kind == "flatten":
        return T7Object("nn.View", {**common, "size": np.array(p["size"], np.int64),
                                    "numElements": int(np.prod(p["size"]))})
    if layer.kind == "softmax":
        return T7Object("nn.LogSoftMax" if p["log"] else "nn.SoftMax", common)
    raise ValueError(f"no Torch7 module for {layer.kind}")


def t7_sequential(modules: list) -> T7Object:
    return T7Object("nn.Sequential", {"modules": modules, "train": False, "output": np.zeros(0, np.float32),
                                      "gradInput": np.zeros(0, np.float32)})


def t7_bytes(value) -> bytes:
    writer = T7Writer()
    writer.obj(value)
    return bytes(writer.out)


def write_t7(path: Path, value) -> Path:
    Path(path).write_bytes(t7_bytes(value))
    return Path(path)


# --- Caffe2 ----------------------------------------------------------------------------------------

def caffe2_blobs(layers: list[SourceLayer]) -> dict[str, np.ndarray]:
    """FAIR's blob names for neutral layers: ``<name>_w``/``_b``; BN ``<name>_s/_b/_rm/_riv``."""
    blobs = {}
    for layer in layers:
        if layer.kind in ("conv", "fc"):
            blobs[f"{layer.name}_w"] = layer.blobs[0]
            if len(layer.blobs) > 1:
                blobs[f"{layer.name}_b"] = layer.blobs[1]
        elif layer.kind == "bn":
            blobs[f"{layer.name}_rm"], blobs[f"{layer.name}_riv"] = layer.blobs[:2]
            if layer.params["affine"]:
                blobs[f"{layer.name}_s"], blobs[f"{layer.name}_b"] = layer.blobs[2:]
    return blobs


def caffe2_pickle_bytes(blobs: dict[str, np.ndarray], *, wrap: bool = True, python2_names: bool = True,
                        protocol: int = 2) -> bytes:
    """``pickle.dump({"blobs": blobs}, protocol=2)``; with ``python2_names`` the numpy globals are
    spelled ``numpy.core.multiarray`` as Python 2 numpy wrote them (GLOBAL opcodes are plain text)."""
    data = pickle.dumps({"blobs": blobs} if wrap else blobs, protocol=protocol)
    if python2_names:
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return data


def write_caffe2_pickle(path: Path, blobs: dict[str, np.ndarray], **kwargs) -> Path:
    Path(path).write_bytes(caffe2_pickle_bytes(blobs, **kwargs))
    return Path(path)
