"""Readers for the checkpoint formats published AlexNets come in, into one neutral description.

Each reader turns a file into a :class:`SourceNet`: the layers in execution order, each with its
kind, hyper-parameters and weight blobs as float32 numpy arrays. Nothing here knows our AlexNet;
``backbones.convert`` maps a SourceNet onto it. No original framework is used and nothing read can
execute code: Caffe files are parsed with a protobuf descriptor declared in Python
(:mod:`backbones.formats.caffe_proto`), Torch7 files with ``torchfile`` (a plain binary reader),
Caffe2 pickles with an unpickler that admits only numpy arrays.

Formats, detected from the content (never the file name):

=============  ==========================================================================
``caffe``      binary NetParameter (``.caffemodel``), V1 ``layers`` or V2 ``layer``
``caffe-h5``   Caffe's HDF5 weights (``.caffemodel.h5``); needs the deploy prototxt
``torch7``     Torch7 ``.t7`` (``torch.save`` of Lua torch), nn.Sequential models
``caffe2``     FAIR's Caffe2 ``.pkl`` (a pickle of ``{"blobs": {name: ndarray}}``)
=============  ==========================================================================

:func:`detect_format` also names files that are not weights or not ours to read:
``caffe-prototxt`` (a text NetParameter), ``caffe-mean`` (a ``.binaryproto`` BlobProto, read with
:func:`read_mean`), ``pytorch`` (``torch.save`` zip or legacy pickle: see ``backbones.checkpoint``)
and ``unknown``.

Conventions of the neutral description (what a converter may rely on):

* conv: ``out, kernel (kh, kw), stride (sh, sw), pad (ph, pw), groups, bias, dilation (dh, dw)``;
  blobs ``[weight out x in/groups x kh x kw, bias]``.
* fc: ``out, bias, transpose``; the weight is always stored ``out x in`` (a Caffe ``transpose: true``
  layer's weight is transposed here, so ``transpose`` is always False afterwards and
  ``transposed_from_source`` records it).
* pool: ``method ("max" | "avg" | "stochastic"), kernel, stride, pad, ceil, global``.
* lrn: ``size, alpha, beta, k, region ("across" | "within"), alpha_divided_by_size``. ``alpha`` is
  the value written in the source; both Caffe and Torch divide it by ``size`` inside the layer
  (``scale = k + alpha/size * sum x^2``), hence ``alpha_divided_by_size: True`` for both. (Caffe's
  WITHIN_CHANNEL divides by ``size**2``.)
* bn: ``eps, affine``; blobs ``[mean, var]`` (Caffe BatchNorm, already divided by its scale-factor
  blob) or ``[mean, var, weight, bias]`` with ``affine: True`` (Torch, Caffe2).
* scale: ``bias``; blobs ``[gamma]`` or ``[gamma, beta]``.
* dropout: ``ratio``. relu: ``negative_slope``. flatten / softmax / input: a few raw values.
* sink: a layer whose output nothing reads (losses, accuracy, ``Silence``): ignored.
* other: ``type`` plus the raw parameters (a Caffe ``Python`` layer's ``module`` and ``layer``).
"""
from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import CheckpointError
from runtime.safe_load import check_file

KINDS = ("input", "conv", "fc", "relu", "lrn", "pool", "bn", "scale", "dropout", "flatten", "softmax", "sink",
         "other")
READABLE_FORMATS = ("caffe", "caffe-h5", "torch7", "caffe2")


@dataclass
class SourceLayer:
    """One layer as the source file describes it (see the module docstring for ``params``)."""

    name: str                 # the layer's name in the source ("conv1", "3", "conv1_s0", ...)
    kind: str                 # one of KINDS
    params: dict              # plain Python values
    blobs: list[np.ndarray]   # float32, in the source's order
    source_type: str = ""     # the source's own type name ("Convolution", "nn.SpatialConvolution", ...)
    bottoms: list[str] = field(default_factory=list)
    tops: list[str] = field(default_factory=list)


@dataclass
class SourceNet:
    """A whole network read from one file: layers in execution order."""

    path: str
    format: str               # one of READABLE_FORMATS
    layers: list[SourceLayer]
    input_shape: tuple[int, ...] | None = None  # from the prototxt's input_dim/input_shape/Input layer
    notes: list[str] = field(default_factory=list)

    def layer(self, name: str) -> SourceLayer:
        """The layer called ``name`` (KeyError if none)."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


# --- detection -------------------------------------------------------------------------------------

_HEAD_BYTES = 1 << 16
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# torch.save's legacy (pre-1.6) format starts with a pickled magic number: LONG1 0x1950a86a20f9469cfc6c.
_TORCH_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# Top-level fields (number -> allowed wire types) of the two binary Caffe messages.
_NET_FIELDS = {1: {2}, 2: {2}, 3: {2}, 4: {0, 2}, 5: {0}, 6: {2}, 7: {0}, 8: {2}, 100: {2}}
_BLOB_FIELDS = {1: {0}, 2: {0}, 3: {0}, 4: {0}, 5: {2, 5}, 6: {2, 5}, 7: {2}, 8: {2, 1}, 9: {2, 1}}


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _protobuf_fields(head: bytes, limit: int = 8) -> list[tuple[int, int]] | None:
    """(field number, wire type) of the first top-level protobuf fields in ``head``, or None if
    ``head`` cannot start a protobuf message. A length running past the end of ``head`` is fine (a
    layer is usually longer than the head; a truncated file is the reader's to report)."""
    pos, fields = 0, []
    try:
        while pos < len(head) and len(fields) < limit:
            key, pos = _read_varint(head, pos)
            number, wire = key >> 3, key & 7
            if number == 0 or wire not in (0, 1, 2, 5):
                return None
            fields.append((number, wire))
            if wire == 0:
                _, pos = _read_varint(head, pos)
            elif wire == 2:
                length, pos = _read_varint(head, pos)
                pos += length
            else:
                pos += 8 if wire == 1 else 4
    except ValueError:  # a varint cut by the end of ``head``
        pass
    return fields


def _looks_like(fields: list | None, allowed: dict) -> bool:
    return bool(fields) and all(number in allowed and wire in allowed[number] for number, wire in fields)


def _is_torch7(head: bytes) -> bool:
    """A Torch7 binary file starts with an int32 type code: 4 (a torch object: index, then the
    version string "V 1" and a class name, or a bare class name in pre-versioning files) or 3 (a
    Lua table: index, size, then a key whose type code is 1..5)."""
    if len(head) < 16:
        return False
    type_code, _index, word = struct.unpack("<iii", head[:12])
    if type_code == 4:
        text = head[12:12 + word] if 0 < word < 256 else b""
        return text.startswith(b"V ") or (b"." in text and text.replace(b".", b"").replace(b"_", b"").isalnum())
    if type_code == 3 and 0 <= word < 1 << 24:
        return struct.unpack("<i", head[12:16])[0] in (1, 2, 3, 4, 5) or word == 0
    return False


def _is_prototxt(head: bytes) -> bool:
    """Plain UTF-8 text (no control bytes, which every binary protobuf has in its tags and lengths)
    using NetParameter's words. Checked before the binary test: text such as "\\nlayer {" also reads
    as a plausible protobuf prefix (0x0a is field 1's tag)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not merely a character cut by the end of ``head``
            return False
        text = head[:err.start].decode("utf-8")
    if any(ord(char) < 32 and char not in "\t\n\r\f" for char in text):
        return False
    words = text.replace("{", " ").replace(":", " ").split()
    return any(word in ("layer", "layers", "input", "input_dim", "name") for word in words[:200])


def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path`` judged from its content (module docstring lists the answers).

    CheckpointError if the file is missing, a directory or empty; ``"unknown"`` if nothing matches.
    """
    path = Path(path)
    check_file(path)
    with open(path, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
    if head.startswith(HDF5_SIGNATURE):
        return "caffe-h5"
    if head.startswith(b"PK\x03\x04"):
        return "pytorch" if _zip_holds_torch_pickle(path) else "unknown"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pytorch" if head[2:14] == _TORCH_LEGACY_MAGIC else "caffe2"
    if head.startswith((b"(dp", b"}q", b"}(")):  # a dict pickled at protocol 0 or 1 (Python 2's default)
        return "caffe2"
    if _is_torch7(head):
        return "torch7"
    if _is_prototxt(head):
        return "caffe-prototxt"
    fields = _protobuf_fields(head)
    if _looks_like(fields, _BLOB_FIELDS) and any(number in (1, 2, 3, 5, 7) for number, _ in fields):
        return "caffe-mean"
    if _looks_like(fields, _NET_FIELDS):
        return "caffe"
    return "unknown"


def _zip_holds_torch_pickle(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist())
    except zipfile.BadZipFile:
        return True  # a truncated torch.save zip: let the PyTorch reader say so


# --- reading ---------------------------------------------------------------------------------------

def read_source(path: str | os.PathLike, *, prototxt: str | os.PathLike | None = None,
                fmt: str = "auto") -> SourceNet:
    """Read ``path`` into a :class:`SourceNet`.

    ``prototxt``: a Caffe deploy file; required for ``caffe-h5`` (the HDF5 file holds only blobs),
    optional for ``caffe`` (when given, its hyper-parameters win and blobs are matched by layer
    name). ``fmt``: one of ``READABLE_FORMATS`` to skip detection, or ``"auto"``.
    Every problem is a one-line CheckpointError naming the file and the layer or tensor.
    """
    path = Path(path)
    check_file(path)
    if fmt == "auto":
        fmt = detect_format(path)
    if prototxt is not None:
        check_file(Path(prototxt))
        if fmt not in ("caffe", "caffe-h5"):
            raise CheckpointError(path, f"a prototxt was given but the file is {fmt}, not a Caffe model")
    if fmt == "caffe":
        from backbones.formats import caffe
        return caffe.read_caffemodel(path, prototxt=prototxt)
    if fmt == "caffe-h5":
        from backbones.formats import caffe
        return caffe.read_caffe_h5(path, prototxt=prototxt)
    if fmt == "torch7":
        from backbones.formats import torch7
        return torch7.read_t7(path)
    if fmt == "caffe2":
        from backbones.formats import caffe2
        return caffe2.read_caffe2_pickle(path)
    hints = {
        "pytorch": "a PyTorch checkpoint: read it with backbones.checkpoint, not the format readers",
        "caffe-prototxt": "a Caffe prototxt (network description without weights): pass it as "
                          "prototxt= beside the .caffemodel",
        "caffe-mean": "a Caffe mean image (.binaryproto): read it with read_mean",
    }
    raise CheckpointError(path, hints.get(fmt, f"unrecognised checkpoint format ({fmt}); expected a Caffe "
                                               f"caffemodel/HDF5, Torch7 .t7 or Caffe2 .pkl file"))


def read_mean(path: str | os.PathLike) -> np.ndarray:
    """A mean image as a C x H x W float32 array: a Caffe ``.binaryproto`` (BGR, as Caffe stores
    it) or a ``.npy`` array (read without pickles)."""
    path = Path(path)
    check_file(path)
    with open(path, "rb") as handle:
        head = handle.read(6)
    if head == b"\x93NUMPY":
        try:
            mean = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise CheckpointError(path, f"unreadable .npy mean ({err})") from None
        if mean.ndim != 3:
            raise CheckpointError(path, f"mean image has shape {mean.shape}, expected C x H x W")
        return mean.astype(np.float32)
    from backbones.formats import caffe
    return caffe.read_binaryproto_mean(path)
