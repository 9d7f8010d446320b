"""Caffe files: ``.caffemodel`` (binary NetParameter), deploy ``.prototxt`` (text NetParameter),
``.binaryproto`` mean images (BlobProto) and ``.caffemodel.h5`` (Caffe's HDF5 weights).

Both network syntaxes are read: V1 (``layers { type: CONVOLUTION }``, NetParameter field 2) and V2
(``layer { type: "Convolution" }``, field 100). Blob shapes come either as the legacy 4-d
num/channels/height/width (V1 fully connected weights are 1 x 1 x out x in, biases 1 x 1 x 1 x out)
or as BlobShape dims; both are normalised to the shapes of the neutral description.

With a deploy prototxt, the prototxt says what the network is (layer order and hyper-parameters)
and the weights file only supplies blobs, matched by layer name, as Caffe's
``Net::CopyTrainedLayersFrom`` does. Blob-carrying layers of the weights file that the prototxt does
not use are listed in ``SourceNet.notes``, never dropped silently.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from backbones.formats import SourceLayer, SourceNet
from backbones.formats.caffe_proto import message_class, v1_type_name
from runtime.errors import CheckpointError

V2_KINDS = {
    "Convolution": "conv", "InnerProduct": "fc", "ReLU": "relu", "LRN": "lrn", "Pooling": "pool",
    "BatchNorm": "bn", "Scale": "scale", "Dropout": "dropout", "Flatten": "flatten",
    "Softmax": "softmax", "Input": "input", "Data": "input", "ImageData": "input",
    "MemoryData": "input", "HDF5Data": "input", "DummyData": "input", "WindowData": "input",
    # train/test prototxts end in these; nothing reads their outputs
    "SoftmaxWithLoss": "sink", "Accuracy": "sink", "Silence": "sink", "EuclideanLoss": "sink",
    "SigmoidCrossEntropyLoss": "sink", "HingeLoss": "sink", "InfogainLoss": "sink",
}
V1_KINDS = {
    "CONVOLUTION": "conv", "INNER_PRODUCT": "fc", "RELU": "relu", "LRN": "lrn", "POOLING": "pool",
    "DROPOUT": "dropout", "FLATTEN": "flatten", "SOFTMAX": "softmax", "DATA": "input",
    "IMAGE_DATA": "input", "MEMORY_DATA": "input", "HDF5_DATA": "input", "DUMMY_DATA": "input",
    "WINDOW_DATA": "input", "SOFTMAX_LOSS": "sink", "ACCURACY": "sink", "SILENCE": "sink",
    "EUCLIDEAN_LOSS": "sink", "SIGMOID_CROSS_ENTROPY_LOSS": "sink", "HINGE_LOSS": "sink", "INFOGAIN_LOSS": "sink",
}
WEIGHTED_KINDS = ("conv", "fc", "bn", "scale")  # kinds that cannot work without blobs
NOTE_INPUT = "Caffe reference models expect BGR input in 0-255 with the mean image subtracted"


# --- parsing ---------------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def parse_binary(path: Path, message_name: str):
    """The binary protobuf message in ``path``; CheckpointError naming where it is cut or broken."""
    data = _read_bytes(path)
    message = message_class(message_name)()
    try:
        message.ParseFromString(data)
    except DecodeError as err:
        where = _truncation_site(data) if message_name == "NetParameter" else ""
        raise CheckpointError(path, f"truncated or corrupt {message_name} ({where or err})") from None
    return message


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < len(data):
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos
    raise IndexError("varint runs past the end")


def _truncation_site(data: bytes) -> str:
    """Which layer a broken NetParameter is cut in ("layer 'fc6' (#7) is cut off: ..."), found by
    walking the top-level wire format; empty if the damage is elsewhere."""
    pos, count = 0, 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire != 2:
                pos = _varint(data, pos)[1] if wire == 0 else pos + {1: 8, 5: 4}.get(wire, 0)
                continue
            length, pos = _varint(data, pos)
            if number in (2, 100):
                count += 1
                if pos + length > len(data):
                    name = _layer_name(data[pos:], name_field=4 if number == 2 else 1)
                    return (f"layer {name!r} (#{count}) is cut off: it needs {length} bytes, "
                            f"{len(data) - pos} remain")
            pos += length
    except IndexError:
        return f"the file ends inside a field header after {count} layers"
    return ""


def _layer_name(partial: bytes, name_field: int) -> str:
    """The name field of a (possibly cut) serialised layer, or "?"."""
    pos = 0
    try:
        while pos < len(partial):
            key, pos = _varint(partial, pos)
            number, wire = key >> 3, key & 7
            if wire == 2:
                length, pos = _varint(partial, pos)
                if number == name_field:
                    return partial[pos:pos + length].decode("utf-8", "replace")
                pos += length
            elif wire == 0:
                pos = _varint(partial, pos)[1]
            else:
                pos += {1: 8, 5: 4}.get(wire, len(partial))
    except IndexError:
        pass
    return "?"


def parse_prototxt(path: Path):
    """The NetParameter in a text prototxt. Fields this reader does not declare (solver settings,
    custom layers' parameters) are skipped, so unknown layer types never break parsing."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(path, "not a text prototxt (not UTF-8)") from None
    net = message_class("NetParameter")()
    try:
        text_format.Parse(text, net, allow_unknown_field=True)
    except text_format.ParseError as err:
        raise CheckpointError(path, f"not a valid Caffe prototxt ({str(err).splitlines()[0]})") from None
    return net


# --- blobs -----------------------------------------------------------------------------------------

def blob_array(blob, source: Path, where: str) -> np.ndarray:
    """A BlobProto as a float32 array in its stored shape (BlobShape dims, else legacy 4-d)."""
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    values = blob.data if len(blob.data) else blob.double_data
    count = math.prod(shape)
    if len(values) != count or any(d < 0 for d in shape):
        raise CheckpointError(source, f"{where}: blob shape {shape} needs {count} values, the file holds "
                                      f"{len(values)}")
    dtype = np.float32 if len(blob.data) else np.float64
    return np.array(values, dtype=dtype).astype(np.float32, copy=False).reshape(shape)


def _check(ok: bool, source: Path, where: str, problem: str) -> None:
    if not ok:
        raise CheckpointError(source, f"{where}: {problem}")


def _shape_text(array: np.ndarray) -> str:
    return "x".join(str(d) for d in array.shape)


def normalise_blobs(layer: SourceLayer, blobs: list[np.ndarray], source: Path, where: str) -> list[np.ndarray]:
    """The blobs of ``layer`` in the neutral shapes, checked against its hyper-parameters.

    conv: weight out x in/groups x kh x kw, bias (out,). fc: weight out x in (legacy 1 x 1 x out x in
    squeezed; a ``transpose`` layer's in x out weight transposed), bias (out,). bn: Caffe's
    [mean*s, var*s, s] becomes [mean, var] (s = 0 means "no statistics yet": Caffe then uses 0).
    """
    p, kind = layer.params, layer.kind
    if kind == "conv":
        _check(len(blobs) == 1 + p["bias"], source, where,
               f"{len(blobs)} blobs, expected {1 + p['bias']} (weight{' and bias' if p['bias'] else ''})")
        weight = blobs[0]
        _check(weight.ndim == 4, source, where, f"convolution weight has shape {_shape_text(weight)}, not 4-d")
        _check(weight.shape[0] == p["out"], source, where,
               f"num_output {p['out']} but the weight blob is {_shape_text(weight)}")
        if p["kernel"] == (None, None):
            p["kernel"] = tuple(int(d) for d in weight.shape[2:])
        _check(tuple(weight.shape[2:]) == p["kernel"], source, where,
               f"kernel {p['kernel']} but the weight blob is {_shape_text(weight)}")
        return [weight] + _biases(blobs[1:], p["out"], source, where)
    if kind == "fc":
        _check(len(blobs) == 1 + p["bias"], source, where,
               f"{len(blobs)} blobs, expected {1 + p['bias']} (weight{' and bias' if p['bias'] else ''})")
        weight = blobs[0]
        if weight.ndim == 4 and weight.shape[:2] == (1, 1):  # V1 legacy 1 x 1 x out x in
            weight = weight.reshape(weight.shape[2:])
        _check(weight.ndim == 2, source, where, f"inner-product weight has shape {_shape_text(weight)}, not 2-d")
        if p.pop("transpose"):
            weight = np.ascontiguousarray(weight.T)
            p["transposed_from_source"] = True
        p["transpose"] = False
        _check(weight.shape[0] == p["out"], source, where,
               f"num_output {p['out']} but the weight blob is {_shape_text(weight)}")
        return [weight] + _biases(blobs[1:], p["out"], source, where)
    if kind == "bn":
        _check(len(blobs) == 3, source, where, f"{len(blobs)} blobs, expected 3 (mean, variance, scale factor)")
        mean, var, factor = (b.reshape(-1) for b in blobs)
        _check(factor.size == 1 and mean.size == var.size, source, where,
               f"blob sizes {mean.size}, {var.size}, {factor.size}; expected C, C, 1")
        scale = 0.0 if factor[0] == 0 else 1.0 / float(factor[0])
        return [(mean * scale).astype(np.float32), (var * scale).astype(np.float32)]
    if kind == "scale":
        _check(len(blobs) == 1 + p["bias"], source, where, f"{len(blobs)} blobs, expected {1 + p['bias']}")
        return [b.reshape(-1) for b in blobs]
    return blobs


def _biases(blobs: list[np.ndarray], out: int, source: Path, where: str) -> list[np.ndarray]:
    biases = [b.reshape(-1) for b in blobs]
    for bias in biases:
        _check(bias.size == out, source, where, f"bias has {bias.size} values, expected {out}")
    return biases


# --- hyper-parameters ------------------------------------------------------------------------------

def _pair(values, h: int, w: int, has_hw: bool, default):
    """Caffe's rule for 2-d sizes: ``*_h``/``*_w`` if set, else one value for both or two (h, w)."""
    if has_hw:
        return (int(h), int(w))
    values = list(values)
    if not values:
        return (default, default)
    if len(values) == 1:
        return (int(values[0]), int(values[0]))
    if len(values) == 2:
        return (int(values[0]), int(values[1]))
    raise ValueError(f"{len(values)} values given; only 2-d layers are supported")


def _conv_params(p) -> dict:
    return {
        "out": int(p.num_output),
        "kernel": _pair(p.kernel_size, p.kernel_h, p.kernel_w, p.HasField("kernel_h"), None),
        "stride": _pair(p.stride, p.stride_h, p.stride_w, p.HasField("stride_h"), 1),
        "pad": _pair(p.pad, p.pad_h, p.pad_w, p.HasField("pad_h") or p.HasField("pad_w"), 0),
        "groups": int(p.group), "bias": bool(p.bias_term),
        "dilation": _pair(p.dilation, 0, 0, False, 1),
    }


def _pool_params(p) -> dict:
    method = {0: "max", 1: "avg", 2: "stochastic"}[p.pool]
    kernel = (None, None) if p.global_pooling else _pair(
        [p.kernel_size] if p.HasField("kernel_size") else [], p.kernel_h, p.kernel_w, p.HasField("kernel_h"), None)
    return {
        "method": method, "kernel": kernel,
        "stride": _pair([p.stride], p.stride_h, p.stride_w, p.HasField("stride_h"), 1),
        "pad": _pair([p.pad], p.pad_h, p.pad_w, p.HasField("pad_h") or p.HasField("pad_w"), 0),
        "ceil": p.round_mode != 1,  # Caffe rounds the output size up unless round_mode: FLOOR
        "global": bool(p.global_pooling),
    }


def _lrn_params(p) -> dict:
    return {"size": int(p.local_size), "alpha": float(p.alpha), "beta": float(p.beta), "k": float(p.k),
            "region": "across" if p.norm_region == 0 else "within", "alpha_divided_by_size": True}


def _sub(layer, field: str):
    """The parameter message ``field`` of ``layer`` if its syntax declares it and it is set, else None
    (V1 layers have no flatten/input/python parameters)."""
    if field not in layer.DESCRIPTOR.fields_by_name or not layer.HasField(field):
        return None
    return getattr(layer, field)


def _layer_params(kind: str, layer, source_type: str) -> dict:
    """The neutral ``params`` of a V1 or V2 layer message (both use the same parameter messages)."""
    if kind == "conv":
        return _conv_params(layer.convolution_param)
    if kind == "fc":
        p = layer.inner_product_param
        return {"out": int(p.num_output), "bias": bool(p.bias_term), "transpose": bool(p.transpose),
                "axis": int(p.axis)}
    if kind == "pool":
        return _pool_params(layer.pooling_param)
    if kind == "lrn":
        return _lrn_params(layer.lrn_param)
    if kind == "relu":
        return {"negative_slope": float(layer.relu_param.negative_slope)}
    if kind == "dropout":
        return {"ratio": float(layer.dropout_param.dropout_ratio)}
    if kind == "bn":
        p = layer.batch_norm_param
        return {"eps": float(p.eps), "affine": False,
                "use_global_stats": bool(p.use_global_stats) if p.HasField("use_global_stats") else None}
    if kind == "scale":
        p = layer.scale_param
        return {"bias": bool(p.bias_term), "axis": int(p.axis), "num_axes": int(p.num_axes)}
    if kind == "flatten":
        p = _sub(layer, "flatten_param")
        return {"axis": int(p.axis), "end_axis": int(p.end_axis)} if p is not None else {"axis": 1, "end_axis": -1}
    if kind == "softmax":
        return {"axis": int(layer.softmax_param.axis)}
    if kind == "input":
        p = _sub(layer, "input_param")
        return {"shapes": [tuple(int(d) for d in s.dim) for s in p.shape] if p is not None else []}
    params = {"type": source_type}
    p = _sub(layer, "python_param")
    if p is not None:
        params.update(module=p.module, layer=p.layer, param_str=p.param_str)
    return params


def _describe(layer, v1: bool, source: Path, index: int) -> tuple[SourceLayer, list]:
    """A layer message as a SourceLayer without blobs, and its raw BlobProtos."""
    if v1 and layer.HasField("layer"):
        raise CheckpointError(source, f"layer #{index + 1} ({layer.layer.name!r}) is in Caffe's pre-2014 V0 "
                                      f"format; upgrade it with Caffe's upgrade_net_proto_binary first")
    source_type = v1_type_name(layer.type) if v1 else layer.type
    kind = (V1_KINDS if v1 else V2_KINDS).get(source_type, "other")
    name = layer.name or f"#{index + 1}"
    try:
        params = _layer_params(kind, layer, source_type)
    except ValueError as err:
        raise CheckpointError(source, f"layer {name!r} ({source_type}): {err}") from None
    return SourceLayer(name=name, kind=kind, params=params, blobs=[], source_type=source_type,
                       bottoms=list(layer.bottom), tops=list(layer.top)), list(layer.blobs)


def net_layers(net, source: Path) -> list[tuple[SourceLayer, list]]:
    """Every layer of a NetParameter (V1 or V2) with its raw BlobProtos, in file order."""
    if len(net.layer) and len(net.layers):
        raise CheckpointError(source, "the network mixes V1 'layers' and V2 'layer' entries")
    v1 = bool(len(net.layers))
    return [_describe(layer, v1, source, i) for i, layer in enumerate(net.layers if v1 else net.layer)]


def input_shape(net, described: list[tuple[SourceLayer, list]]) -> tuple[int, ...] | None:
    """The first input's shape: ``input_shape``, else ``input_dim`` (4 per input), else an Input layer."""
    if len(net.input_shape):
        return tuple(int(d) for d in net.input_shape[0].dim)
    if len(net.input_dim) >= 4:
        return tuple(int(d) for d in net.input_dim[:4])
    for layer, _ in described:
        if layer.kind == "input" and layer.params.get("shapes"):
            return layer.params["shapes"][0]
    return None


# --- whole files -----------------------------------------------------------------------------------

def _finish(layer: SourceLayer, arrays: list[np.ndarray], source: Path, where: str) -> SourceLayer:
    if layer.kind == "conv" and layer.params["kernel"] == (None, None) and not arrays:
        raise CheckpointError(source, f"{where}: no kernel_size and no weights")
    layer.blobs = normalise_blobs(layer, arrays, source, where)
    return layer


def read_caffemodel(path: Path, prototxt: Path | None = None) -> SourceNet:
    """A binary ``.caffemodel``; with ``prototxt``, its layers and hyper-parameters win."""
    net = parse_binary(path, "NetParameter")
    described = net_layers(net, path)
    if not described:
        raise CheckpointError(path, "the caffemodel holds no layers")
    if prototxt is None:
        layers = []
        for layer, blobs in described:
            where = f"layer {layer.name!r} ({layer.source_type})"
            arrays = [blob_array(b, path, f"{where} blob {i}") for i, b in enumerate(blobs)]
            if layer.kind in ("conv", "fc") and not layer.params["out"] and arrays:
                raise CheckpointError(path, f"{where}: the caffemodel carries no num_output; pass the "
                                            f"deploy prototxt")
            layers.append(_finish(layer, arrays, path, where))
        return SourceNet(str(path), "caffe", layers, input_shape(net, described), notes=[NOTE_INPUT])
    by_name = _blobs_by_name(described, path)
    arrays = {name: [blob_array(b, path, f"layer {name!r} blob {i}") for i, b in enumerate(blobs)]
              for name, blobs in by_name.items()}
    return _merge_with_prototxt(path, Path(prototxt), arrays, "caffe")


def _blobs_by_name(described: list[tuple[SourceLayer, list]], source: Path) -> dict[str, list]:
    found: dict[str, list] = {}
    for layer, blobs in described:
        if not blobs:
            continue
        if layer.name in found:
            raise CheckpointError(source, f"two layers named {layer.name!r} carry weights")
        found[layer.name] = blobs
    return found


def _merge_with_prototxt(path: Path, prototxt: Path, arrays: dict[str, list[np.ndarray]], fmt: str) -> SourceNet:
    """Layers from ``prototxt``, blobs from ``arrays`` (layer name -> arrays read from ``path``)."""
    deploy = parse_prototxt(prototxt)
    described = net_layers(deploy, prototxt)
    layers, used = [], set()
    for layer, inline_blobs in described:
        where = f"layer {layer.name!r} ({layer.source_type}) of {prototxt.name}"
        blobs = arrays.get(layer.name)
        if blobs is None:
            if layer.kind in WEIGHTED_KINDS:
                raise CheckpointError(path, f"{where} has no weights in this file")
            blobs = [blob_array(b, prototxt, f"{where} blob {i}") for i, b in enumerate(inline_blobs)]
        else:
            used.add(layer.name)
        layers.append(_finish(layer, blobs, path, where))
    notes = [NOTE_INPUT, f"hyper-parameters from {prototxt}"]
    unused = [name for name in arrays if name not in used]
    if unused:
        notes.append(f"weights not used by the prototxt (ignored): {', '.join(unused)}")
    return SourceNet(str(path), fmt, layers, input_shape(deploy, described), notes=notes)


def read_caffe_h5(path: Path, prototxt: Path | None) -> SourceNet:
    """Caffe's HDF5 weights: datasets ``data/<layer name>/<blob index>``; the prototxt is required."""
    if prototxt is None:
        raise CheckpointError(path, "a Caffe HDF5 weights file holds no layer types: pass its deploy prototxt")
    import h5py
    arrays: dict[str, list[np.ndarray]] = {}
    try:
        with h5py.File(path, "r") as handle:
            if "data" not in handle or not isinstance(handle["data"], h5py.Group):
                raise CheckpointError(path, "not a Caffe HDF5 weights file (no 'data' group)")
            for name, group in handle["data"].items():
                arrays[name] = _h5_blobs(group, path, name)
    except OSError as err:
        raise CheckpointError(path, f"unreadable HDF5 file ({str(err).splitlines()[0]})") from None
    return _merge_with_prototxt(path, Path(prototxt), arrays, "caffe-h5")


def _h5_blobs(group, path: Path, name: str) -> list[np.ndarray]:
    import h5py
    if not isinstance(group, h5py.Group):
        raise CheckpointError(path, f"data/{name} is not a group of blobs")
    keys = sorted(group.keys(), key=lambda k: int(k) if k.isdigit() else -1)
    if keys != [str(i) for i in range(len(keys))]:
        raise CheckpointError(path, f"data/{name}: blobs must be named 0..{len(keys) - 1}, found {keys}")
    blobs = []
    for key in keys:
        dataset = group[key]
        if not isinstance(dataset, h5py.Dataset) or dataset.dtype.kind != "f":
            raise CheckpointError(path, f"data/{name}/{key} is not a floating-point dataset")
        blobs.append(np.asarray(dataset[()], dtype=np.float32))
    return blobs


def read_binaryproto_mean(path: Path) -> np.ndarray:
    """A ``.binaryproto`` mean image as C x H x W float32 (BGR, as Caffe stores it)."""
    blob = parse_binary(path, "BlobProto")
    mean = blob_array(blob, path, "mean blob")
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3 or mean.size == 0:
        raise CheckpointError(path, f"mean blob has shape {_shape_text(mean)}, expected 1 x C x H x W")
    return mean
