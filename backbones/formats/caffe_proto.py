"""The part of Caffe's ``caffe.proto`` that AlexNet checkpoints use, as a protobuf descriptor built here.

No Caffe, no ``protoc`` and no generated ``caffe_pb2`` are needed: the messages are declared in Python
with caffe.proto's own field numbers and enum values, so that ``.caffemodel`` (binary NetParameter),
``.binaryproto`` (binary BlobProto) and deploy ``.prototxt`` (text NetParameter) parse exactly as in
Caffe. Fields we do not declare (solver settings, fillers, lr multipliers, data-layer options,
custom layers' parameters) are kept as unknown fields by the binary parser and skipped by the text
parser (``allow_unknown_field=True``).

Source of every number below: BVLC/caffe ``src/caffe/proto/caffe.proto`` (master; ``round_mode``
was added to PoolingParameter as field 13 in 2018). The file is proto2; repeated scalars parse in
both packed and unpacked encodings whatever is declared, so declaring ``pad``/``kernel_size``/
``stride`` as ``repeated`` also reads files from when they were ``optional``.
"""
from __future__ import annotations

from functools import lru_cache

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_TYPES = {
    "string": _F.TYPE_STRING, "bool": _F.TYPE_BOOL, "float": _F.TYPE_FLOAT, "double": _F.TYPE_DOUBLE,
    "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32, "bytes": _F.TYPE_BYTES,
}

# Enums: name -> [(value name, number)], exactly as in caffe.proto.
_ENUMS = {
    "PoolingParameter.PoolMethod": [("MAX", 0), ("AVE", 1), ("STOCHASTIC", 2)],
    "PoolingParameter.RoundMode": [("CEIL", 0), ("FLOOR", 1)],
    "LRNParameter.NormRegion": [("ACROSS_CHANNELS", 0), ("WITHIN_CHANNEL", 1)],
    "V1LayerParameter.LayerType": [
        ("NONE", 0), ("ABSVAL", 35), ("ACCURACY", 1), ("ARGMAX", 30), ("BNLL", 2), ("CONCAT", 3),
        ("CONTRASTIVE_LOSS", 37), ("CONVOLUTION", 4), ("DATA", 5), ("DECONVOLUTION", 39),
        ("DROPOUT", 6), ("DUMMY_DATA", 32), ("EUCLIDEAN_LOSS", 7), ("ELTWISE", 25), ("EXP", 38),
        ("FLATTEN", 8), ("HDF5_DATA", 9), ("HDF5_OUTPUT", 10), ("HINGE_LOSS", 28), ("IM2COL", 11),
        ("IMAGE_DATA", 12), ("INFOGAIN_LOSS", 13), ("INNER_PRODUCT", 14), ("LRN", 15),
        ("MEMORY_DATA", 29), ("MULTINOMIAL_LOGISTIC_LOSS", 16), ("MVN", 34), ("POOLING", 17),
        ("POWER", 26), ("RELU", 18), ("SIGMOID", 19), ("SIGMOID_CROSS_ENTROPY_LOSS", 27),
        ("SILENCE", 36), ("SOFTMAX", 20), ("SOFTMAX_LOSS", 21), ("SPLIT", 22), ("SLICE", 33),
        ("TANH", 23), ("WINDOW_DATA", 24), ("THRESHOLD", 31),
    ],
}

# Messages: name -> [(field name, number, label, type, default)]; label "?" optional, "*" repeated;
# type is a scalar name, a message name or "enum:<enum name>".
_MESSAGES = {
    "BlobShape": [("dim", 1, "*", "int64", None)],
    "BlobProto": [
        ("num", 1, "?", "int32", None), ("channels", 2, "?", "int32", None),
        ("height", 3, "?", "int32", None), ("width", 4, "?", "int32", None),
        ("data", 5, "*", "float", None), ("diff", 6, "*", "float", None),
        ("shape", 7, "?", "BlobShape", None),
        ("double_data", 8, "*", "double", None), ("double_diff", 9, "*", "double", None),
    ],
    "ConvolutionParameter": [
        ("num_output", 1, "?", "uint32", None), ("bias_term", 2, "?", "bool", "true"),
        ("pad", 3, "*", "uint32", None), ("kernel_size", 4, "*", "uint32", None),
        ("group", 5, "?", "uint32", "1"), ("stride", 6, "*", "uint32", None),
        ("pad_h", 9, "?", "uint32", "0"), ("pad_w", 10, "?", "uint32", "0"),
        ("kernel_h", 11, "?", "uint32", None), ("kernel_w", 12, "?", "uint32", None),
        ("stride_h", 13, "?", "uint32", None), ("stride_w", 14, "?", "uint32", None),
        ("axis", 16, "?", "int32", "1"), ("dilation", 18, "*", "uint32", None),
    ],
    "PoolingParameter": [
        ("pool", 1, "?", "enum:PoolingParameter.PoolMethod", "MAX"),
        ("kernel_size", 2, "?", "uint32", None), ("stride", 3, "?", "uint32", "1"),
        ("pad", 4, "?", "uint32", "0"), ("kernel_h", 5, "?", "uint32", None),
        ("kernel_w", 6, "?", "uint32", None), ("stride_h", 7, "?", "uint32", None),
        ("stride_w", 8, "?", "uint32", None), ("pad_h", 9, "?", "uint32", "0"),
        ("pad_w", 10, "?", "uint32", "0"), ("global_pooling", 12, "?", "bool", "false"),
        ("round_mode", 13, "?", "enum:PoolingParameter.RoundMode", "CEIL"),
    ],
    "LRNParameter": [
        ("local_size", 1, "?", "uint32", "5"), ("alpha", 2, "?", "float", "1"),
        ("beta", 3, "?", "float", "0.75"),
        ("norm_region", 4, "?", "enum:LRNParameter.NormRegion", "ACROSS_CHANNELS"),
        ("k", 5, "?", "float", "1"),
    ],
    "InnerProductParameter": [
        ("num_output", 1, "?", "uint32", None), ("bias_term", 2, "?", "bool", "true"),
        ("axis", 5, "?", "int32", "1"), ("transpose", 6, "?", "bool", "false"),
    ],
    "BatchNormParameter": [
        ("use_global_stats", 1, "?", "bool", None),
        ("moving_average_fraction", 2, "?", "float", "0.999"), ("eps", 3, "?", "float", "1e-05"),
    ],
    "ScaleParameter": [
        ("axis", 1, "?", "int32", "1"), ("num_axes", 2, "?", "int32", "1"),
        ("bias_term", 4, "?", "bool", "false"),
    ],
    "DropoutParameter": [("dropout_ratio", 1, "?", "float", "0.5")],
    "ReLUParameter": [("negative_slope", 1, "?", "float", "0")],
    "FlattenParameter": [("axis", 1, "?", "int32", "1"), ("end_axis", 2, "?", "int32", "-1")],
    "SoftmaxParameter": [("axis", 2, "?", "int32", "1")],
    "InputParameter": [("shape", 1, "*", "BlobShape", None)],
    "PythonParameter": [
        ("module", 1, "?", "string", None), ("layer", 2, "?", "string", None),
        ("param_str", 3, "?", "string", ""),
    ],
    # Only to recognise (and refuse) the pre-2014 V0 format nested in V1's field 1.
    "V0LayerParameter": [("name", 1, "?", "string", None), ("type", 2, "?", "string", None)],
    "V1LayerParameter": [
        ("layer", 1, "?", "V0LayerParameter", None),
        ("bottom", 2, "*", "string", None), ("top", 3, "*", "string", None),
        ("name", 4, "?", "string", None),
        ("type", 5, "?", "enum:V1LayerParameter.LayerType", None),
        ("blobs", 6, "*", "BlobProto", None),
        ("convolution_param", 10, "?", "ConvolutionParameter", None),
        ("dropout_param", 12, "?", "DropoutParameter", None),
        ("inner_product_param", 17, "?", "InnerProductParameter", None),
        ("lrn_param", 18, "?", "LRNParameter", None),
        ("pooling_param", 19, "?", "PoolingParameter", None),
        ("relu_param", 30, "?", "ReLUParameter", None),
        ("softmax_param", 39, "?", "SoftmaxParameter", None),
    ],
    "LayerParameter": [
        ("name", 1, "?", "string", None), ("type", 2, "?", "string", None),
        ("bottom", 3, "*", "string", None), ("top", 4, "*", "string", None),
        ("blobs", 7, "*", "BlobProto", None),
        ("convolution_param", 106, "?", "ConvolutionParameter", None),
        ("dropout_param", 108, "?", "DropoutParameter", None),
        ("inner_product_param", 117, "?", "InnerProductParameter", None),
        ("lrn_param", 118, "?", "LRNParameter", None),
        ("pooling_param", 121, "?", "PoolingParameter", None),
        ("relu_param", 123, "?", "ReLUParameter", None),
        ("softmax_param", 125, "?", "SoftmaxParameter", None),
        ("python_param", 130, "?", "PythonParameter", None),
        ("flatten_param", 135, "?", "FlattenParameter", None),
        ("batch_norm_param", 139, "?", "BatchNormParameter", None),
        ("scale_param", 142, "?", "ScaleParameter", None),
        ("input_param", 143, "?", "InputParameter", None),
    ],
    "NetParameter": [
        ("name", 1, "?", "string", None),
        ("layers", 2, "*", "V1LayerParameter", None),
        ("input", 3, "*", "string", None), ("input_dim", 4, "*", "int32", None),
        ("input_shape", 8, "*", "BlobShape", None),
        ("layer", 100, "*", "LayerParameter", None),
    ],
}

PACKAGE = "caffe"


def _field(name: str, number: int, label: str, kind: str, default: str | None) -> _F:
    field = _F(name=name, number=number,
               label=_F.LABEL_REPEATED if label == "*" else _F.LABEL_OPTIONAL)
    if kind.startswith("enum:"):
        field.type, field.type_name = _F.TYPE_ENUM, f".{PACKAGE}.{kind[5:]}"
    elif kind in _TYPES:
        field.type = _TYPES[kind]
    else:
        field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{kind}"
    if default is not None:
        field.default_value = default
    if label == "*" and kind in ("float", "double", "int64") and name in ("data", "diff", "double_data",
                                                                           "double_diff", "dim"):
        field.options.packed = True  # as caffe.proto declares them; matters only when writing
    return field


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(name="cpfs_caffe_subset.proto", package=PACKAGE,
                                               syntax="proto2")
    for message_name, fields in _MESSAGES.items():
        message = proto.message_type.add(name=message_name)
        message.field.extend(_field(*spec) for spec in fields)
        for enum_name, values in _ENUMS.items():
            owner, _, short = enum_name.partition(".")
            if owner == message_name:
                enum = message.enum_type.add(name=short)
                enum.value.extend(descriptor_pb2.EnumValueDescriptorProto(name=n, number=v) for n, v in values)
    return proto


@lru_cache(maxsize=None)
def message_class(name: str):
    """The Python class of the caffe message ``name`` (e.g. ``"NetParameter"``), built once.

    The descriptor lives in a private pool so it can never clash with a real ``caffe_pb2`` that
    another library may have registered in protobuf's default pool.
    """
    pool = _pool()
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))


@lru_cache(maxsize=None)
def _pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file_descriptor())
    return pool


def v1_type_name(number: int) -> str:
    """The V1 LayerType enum name of ``number`` ("CONVOLUTION" for 4), or ``"V1_TYPE_<n>"``."""
    for name, value in _ENUMS["V1LayerParameter.LayerType"]:
        if value == number:
            return name
    return f"V1_TYPE_{number}"
