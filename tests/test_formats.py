"""Readers of published checkpoint formats (backbones.formats): round trips through independent
writers (tests/format_writers.py), detection from content, and one-line errors for broken files."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from backbones.formats import SourceLayer, detect_format, read_mean, read_source
from runtime.errors import CheckpointError
from tests import format_writers as fw


# --- tiny nets -------------------------------------------------------------------------------------

def _layer(name, kind, params=None, blobs=(), source_type="", bottom=None, top=None):
    return SourceLayer(name, kind, dict(params or {}), list(blobs), source_type,
                       [bottom] if bottom else [], [top or name])


def _conv(rng, name, out, inp, kernel, stride=(1, 1), pad=(0, 0), groups=1, bias=True, bottom=None):
    blobs = [rng.standard_normal((out, inp // groups, *kernel)).astype(np.float32)]
    if bias:
        blobs.append(rng.standard_normal(out).astype(np.float32))
    return _layer(name, "conv", {"out": out, "kernel": kernel, "stride": stride, "pad": pad, "groups": groups,
                                 "bias": bias, "dilation": (1, 1)}, blobs, bottom=bottom)


def _fc(rng, name, out, inp, transposed=False, bottom=None):
    params = {"out": out, "bias": True, "transpose": False}
    if transposed:
        params["transposed_from_source"] = True
    return _layer(name, "fc", params, [rng.standard_normal((out, inp)).astype(np.float32),
                                       rng.standard_normal(out).astype(np.float32)], bottom=bottom)


def _pool(name, method="max", kernel=(3, 3), stride=(2, 2), pad=(0, 0), ceil=True, bottom=None):
    return _layer(name, "pool", {"method": method, "kernel": kernel, "stride": stride, "pad": pad, "ceil": ceil,
                                 "global": False}, bottom=bottom)


def _lrn(name, bottom=None, beta=0.75, k=1.0, region="across"):
    return _layer(name, "lrn", {"size": 5, "alpha": 1e-4, "beta": beta, "k": k, "region": region,
                                "alpha_divided_by_size": True}, bottom=bottom)


def tiny_caffenet(v1: bool, seed: int = 0) -> list[SourceLayer]:
    """A CaffeNet-shaped net small enough to write in milliseconds; V2 adds BN, Scale and Python.
    Values differ from caffe.proto's defaults where they can, so a wrong field number shows."""
    rng = np.random.default_rng(seed)
    layers = [
        _conv(rng, "conv1", 8, 3, (5, 5), stride=(2, 2), bias=False, bottom="data"),
        _layer("relu1", "relu", {"negative_slope": 0.0}, bottom="conv1", top="conv1"),
        _pool("pool1", bottom="conv1"),
        _lrn("norm1", bottom="pool1", beta=0.7, k=2.0, region="within"),
        _conv(rng, "conv2", 16, 8, (3, 3), pad=(1, 1), groups=2, bottom="norm1"),
    ]
    if not v1:
        layers += [
            _layer("bn2", "bn", {"eps": 2e-5, "affine": False},
                   [rng.standard_normal(16).astype(np.float32), rng.random(16).astype(np.float32) + 0.5],
                   bottom="conv2", top="conv2"),
            _layer("scale2", "scale", {"bias": True},
                   [rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)],
                   bottom="conv2", top="conv2"),
        ]
    layers += [
        _layer("relu2", "relu", {"negative_slope": 0.0}, bottom="conv2", top="conv2"),
        _pool("pool2", method="avg", kernel=(3, 2), stride=(2, 1), pad=(1, 0), ceil=False, bottom="conv2"),
        _fc(rng, "fc6", 10, 64, bottom="pool2"),
        _layer("drop6", "dropout", {"ratio": 0.4}, bottom="fc6", top="fc6"),
        _fc(rng, "fc7", 6, 10, transposed=not v1, bottom="fc6"),
    ]
    if not v1:
        layers.append(_layer("py", "other", {"type": "Python", "module": "my_layers", "layer": "Identity"},
                             source_type="Python", bottom="fc7"))
    layers.append(_layer("prob", "softmax", {}, bottom="fc7"))
    return layers


def _same_value(got, want) -> bool:
    if isinstance(want, float):
        return np.float32(got) == np.float32(want)  # Caffe stores float32
    return got == want


def assert_same_layers(got: list[SourceLayer], want: list[SourceLayer], *, check_wiring: bool = True):
    """Same names, kinds, the given params (readers may add more) and bit-identical blobs."""
    assert [layer.name for layer in got] == [layer.name for layer in want]
    for g, w in zip(got, want):
        assert g.kind == w.kind, g.name
        for key, value in w.params.items():
            assert key in g.params and _same_value(g.params[key], value), (g.name, key, g.params.get(key), value)
        assert len(g.blobs) == len(w.blobs), g.name
        for gb, wb in zip(g.blobs, w.blobs):
            assert gb.dtype == np.float32 and gb.shape == wb.shape and np.array_equal(gb, wb), g.name
        if check_wiring:
            assert (g.bottoms, g.tops) == (w.bottoms, w.tops), g.name


def assert_one_line_error(err: pytest.ExceptionInfo, path, *words):
    message = str(err.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for word in words:
        assert word in message, message


# --- Caffe -----------------------------------------------------------------------------------------

def test_caffemodel_v2_round_trip(tmp_path):
    layers = tiny_caffenet(v1=False)
    path = fw.write_caffemodel(tmp_path / "net.bin", layers, input_dim=(1, 3, 32, 32))
    net = read_source(path)
    assert net.format == "caffe" and net.input_shape == (1, 3, 32, 32)
    assert_same_layers(net.layers, layers)
    assert net.layer("conv2").source_type == "Convolution"
    assert net.layer("py").params["module"] == "my_layers" and net.layer("py").params["layer"] == "Identity"
    assert net.layer("norm1").params["alpha_divided_by_size"] is True


def test_caffemodel_v1_round_trip_unsqueezes_legacy_blobs(tmp_path):
    layers = tiny_caffenet(v1=True)
    path = fw.write_caffemodel(tmp_path / "net.caffemodel", layers, v1=True)
    net = read_source(path)
    assert_same_layers(net.layers, layers)
    assert net.layer("fc6").source_type == "INNER_PRODUCT" and net.layer("fc6").blobs[0].shape == (10, 64)


@pytest.mark.parametrize("v1", [True, False])
def test_prototxt_supplies_hyper_parameters(tmp_path, v1):
    """Weights-only caffemodel + deploy prototxt (V1 or V2 text syntax, with fields caffe.proto
    does not know, like a Python layer's own parameter block)."""
    layers = tiny_caffenet(v1=v1)
    weights = [copy.copy(layer) for layer in layers]
    model = fw.write_caffemodel(tmp_path / "w.caffemodel", weights, v1=v1, with_params=False)
    deploy = fw.write_prototxt(tmp_path / "deploy.prototxt", layers, v1=v1, input_dim=(1, 3, 32, 32))
    assert detect_format(deploy) == "caffe-prototxt"
    net = read_source(model, prototxt=deploy)
    assert_same_layers(net.layers, layers)
    assert net.input_shape == (1, 3, 32, 32)


def test_prototxt_input_layer_shape(tmp_path):
    layers = [_layer("data", "input", {"shapes": [(1, 3, 16, 16)]}, top="data")] + tiny_caffenet(v1=False)
    model = fw.write_caffemodel(tmp_path / "m.caffemodel", layers)
    deploy = fw.write_prototxt(tmp_path / "d.prototxt", layers)
    assert read_source(model, prototxt=deploy).input_shape == (1, 3, 16, 16)
    assert read_source(model).layers[0].kind == "input"


@pytest.mark.parametrize("double", [False, True])
def test_binaryproto_mean_is_chw_float32(tmp_path, double):
    mean = np.random.default_rng(1).random((3, 4, 5)).astype(np.float32) * 255
    path = fw.write_binaryproto(tmp_path / "mean.binaryproto", mean, double=double)
    assert detect_format(path) == "caffe-mean"
    got = read_mean(path)
    assert got.dtype == np.float32 and np.array_equal(got, mean)


def test_npy_mean(tmp_path):
    mean = np.ones((3, 2, 2), np.float64)
    np.save(tmp_path / "mean.npy", mean)
    got = read_mean(tmp_path / "mean.npy")
    assert got.dtype == np.float32 and np.array_equal(got, mean)


def test_caffe_hdf5_round_trip_needs_prototxt(tmp_path):
    layers = tiny_caffenet(v1=False)
    path = fw.write_caffe_h5(tmp_path / "net.caffemodel.h5", layers)
    deploy = fw.write_prototxt(tmp_path / "deploy.prototxt", layers)
    assert detect_format(path) == "caffe-h5"
    net = read_source(path, prototxt=deploy)
    assert net.format == "caffe-h5"
    assert_same_layers(net.layers, layers)
    with pytest.raises(CheckpointError) as err:
        read_source(path)
    assert_one_line_error(err, path, "prototxt")


# --- Torch7 ----------------------------------------------------------------------------------------

def tiny_torch_net(seed: int = 0) -> tuple[object, list[SourceLayer]]:
    """An nn.Sequential with a nested Sequential, MM and cudnn grouped convolutions, BN, View."""
    rng = np.random.default_rng(seed)
    conv1 = _conv(rng, "1", 8, 3, (5, 5), stride=(2, 2), pad=(2, 2))
    relu = _layer("2", "relu", {"negative_slope": 0.0})
    pool = _pool("3", ceil=True)
    lrn = _lrn("4")
    conv2 = _conv(rng, "5.1", 16, 8, (3, 3), pad=(1, 1), groups=2)
    bn2 = _layer("5.2", "bn", {"eps": 1e-5, "affine": True},
                 [rng.standard_normal(16).astype(np.float32) for _ in range(4)])
    conv3 = _conv(rng, "5.4", 12, 16, (3, 3), pad=(1, 1))
    flat = _layer("6", "flatten", {"size": [-1, 48]})
    fc = _fc(rng, "7", 10, 48)
    bn7 = _layer("8", "bn", {"eps": 1e-3, "affine": False, "spatial": False},
                 [rng.standard_normal(10).astype(np.float32), rng.random(10).astype(np.float32)])
    drop = _layer("9", "dropout", {"ratio": 0.5, "scale_at_test": False})
    soft = _layer("10", "softmax", {"log": True})
    relu_module = fw.t7_module(relu)  # the same module object twice: written once, then referenced
    inner = fw.t7_sequential([fw.t7_module(conv2, cudnn=True), fw.t7_module(bn2), relu_module,
                              fw.t7_module(conv3, mm=True)])
    model = fw.t7_sequential([fw.t7_module(conv1), relu_module, fw.t7_module(pool), fw.t7_module(lrn), inner,
                              fw.t7_module(flat), fw.t7_module(fc), fw.t7_module(bn7), fw.t7_module(drop),
                              fw.t7_module(soft)])
    relu_inner = _layer("5.3", "relu", {"negative_slope": 0.0})
    bn7.params.pop("spatial")
    return model, [conv1, relu, pool, lrn, conv2, bn2, relu_inner, conv3, flat, fc, bn7, drop, soft]


def test_torch7_round_trip(tmp_path):
    model, layers = tiny_torch_net()
    path = fw.write_t7(tmp_path / "alexnet.t7", model)
    assert detect_format(path) == "torch7"
    net = read_source(path)
    assert net.format == "torch7"
    assert_same_layers(net.layers, layers, check_wiring=False)
    assert net.layer("5.1").source_type == "cudnn.SpatialConvolution"
    assert net.layer("5.4").source_type == "nn.SpatialConvolutionMM"
    assert net.layer("5.4").blobs[0].shape == (12, 16, 3, 3)


def test_torch7_model_inside_a_table(tmp_path):
    model, layers = tiny_torch_net()
    path = fw.write_t7(tmp_path / "checkpoint.t7", {"model": model, "epoch": 30, "optimState": {"lr": 0.01}})
    assert_same_layers(read_source(path).layers, layers, check_wiring=False)


# --- Caffe2 ----------------------------------------------------------------------------------------

def tiny_fair_jigsaw(seed: int = 0) -> list[SourceLayer]:
    """FAIR's Jigsaw AlexNet naming (conv<k>_s0, <conv>_bn, fc6, fc6_reshape_bn, fc7_s0), tiny."""
    rng = np.random.default_rng(seed)

    def bn(name, channels):
        return _layer(name, "bn", {"affine": True}, [rng.standard_normal(channels).astype(np.float32),
                                                     rng.random(channels).astype(np.float32),
                                                     rng.standard_normal(channels).astype(np.float32),
                                                     rng.standard_normal(channels).astype(np.float32)])
    conv = [_conv(rng, "conv1_s0", 8, 3, (5, 5)), _conv(rng, "conv2_s0", 16, 8, (3, 3), groups=2),
            _conv(rng, "conv3_s0", 12, 16, (3, 3))]
    for layer in conv:  # Caffe2 pickles store no stride/pad
        layer.params = {"out": layer.params["out"], "kernel": layer.params["kernel"],
                        "groups": layer.params["groups"], "bias": True}
    fc6, fc7 = _fc(rng, "fc6", 10, 48), _fc(rng, "fc7_s0", 6, 10)
    return [conv[0], conv[1], conv[2], bn("conv3_s0_bn", 12), fc6, bn("fc6_reshape_bn", 10), fc7]


@pytest.mark.parametrize("wrap,python2_names,protocol", [(True, True, 2), (False, False, 2), (True, True, 0)])
def test_caffe2_round_trip_in_stage_order(tmp_path, wrap, python2_names, protocol):
    layers = tiny_fair_jigsaw()
    blobs = fw.caffe2_blobs(layers)
    shuffled = dict(sorted(blobs.items(), key=lambda item: item[0][::-1]))  # file order means nothing
    shuffled.update({"conv1_s0_w_momentum": np.zeros(1, np.float32), "lr": np.array([0.1], np.float32),
                     "model_iter": np.array([5], np.int64), "conv1_s1_w": np.zeros((8, 3, 5, 5), np.float32)})
    path = fw.write_caffe2_pickle(tmp_path / "jigsaw.pkl", shuffled, wrap=wrap, python2_names=python2_names,
                                  protocol=protocol)
    assert detect_format(path) == "caffe2"
    net = read_source(path)
    assert_same_layers(net.layers, layers, check_wiring=False)
    bn = net.layer("conv3_s0_bn")
    assert bn.params["affine"] is True and bn.params["eps"] == pytest.approx(1e-5)
    assert net.layer("conv3_s0").params["stride"] is None
    assert all(name in " ".join(net.notes) for name in ("conv1_s1_w", "lr", "model_iter", "conv1_s0_w_momentum"))


def test_caffe2_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"conv1_w": Exploit()}}, protocol=2))
    assert detect_format(path) == "caffe2"
    with pytest.raises(CheckpointError) as err:
        read_source(path)
    assert_one_line_error(err, path, "refused to load", "GLOBAL posix.system")
    assert not marker.exists()


# --- detection -------------------------------------------------------------------------------------

def test_detection_uses_content_not_extension(tmp_path):
    torch = pytest.importorskip("torch")
    layers = tiny_caffenet(v1=False)
    files = {
        "caffe": fw.write_caffemodel(tmp_path / "a.pkl", layers),
        "torch7": fw.write_t7(tmp_path / "b.caffemodel", tiny_torch_net()[0]),
        "caffe2": fw.write_caffe2_pickle(tmp_path / "c.t7", fw.caffe2_blobs(tiny_fair_jigsaw())),
        "caffe-h5": fw.write_caffe_h5(tmp_path / "d.pth", layers),
        "caffe-prototxt": fw.write_prototxt(tmp_path / "e.bin", tiny_caffenet(v1=True), v1=True),
        "caffe-mean": fw.write_binaryproto(tmp_path / "f.caffemodel", np.ones((3, 2, 2), np.float32)),
    }
    torch.save({"w": torch.zeros(2)}, tmp_path / "g.caffemodel")
    torch.save({"w": torch.zeros(2)}, tmp_path / "h.t7", _use_new_zipfile_serialization=False)
    files["pytorch"] = tmp_path / "g.caffemodel"
    (tmp_path / "i.bin").write_bytes(b"\x00\x01 no known format \xff" * 10)
    text = "\n# deploy file\n" + fw.prototxt_text(layers)  # "\n" + "#..." is also a protobuf prefix
    (tmp_path / "j.caffemodel").write_text(text, encoding="utf-8")
    assert detect_format(tmp_path / "j.caffemodel") == "caffe-prototxt"
    assert {fmt: detect_format(path) for fmt, path in files.items()} == {fmt: fmt for fmt in files}
    assert detect_format(tmp_path / "h.t7") == "pytorch"
    assert detect_format(tmp_path / "i.bin") == "unknown"
    with pytest.raises(CheckpointError) as err:
        read_source(tmp_path / "h.t7")
    assert_one_line_error(err, tmp_path / "h.t7", "PyTorch")


# --- broken files ----------------------------------------------------------------------------------

def test_empty_file(tmp_path):
    path = tmp_path / "empty.caffemodel"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        read_source(path)
    assert_one_line_error(err, path, "empty")


def test_truncated_caffemodel_names_the_layer(tmp_path):
    layers = tiny_caffenet(v1=False)
    data = fw.caffemodel_bytes(layers)
    fc6_end = data.index(b"fc6") + 300  # inside fc6's weight blob
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(data[:fc6_end])
    assert detect_format(path) == "caffe"
    with pytest.raises(CheckpointError) as err:
        read_source(path)
    assert_one_line_error(err, path, "truncated", "'fc6'")


def test_prototxt_missing_a_weighted_layer(tmp_path):
    layers = tiny_caffenet(v1=False)
    model = fw.write_caffemodel(tmp_path / "m.caffemodel", [l for l in layers if l.name != "conv2"])
    deploy = fw.write_prototxt(tmp_path / "d.prototxt", layers)
    with pytest.raises(CheckpointError) as err:
        read_source(model, prototxt=deploy)
    assert_one_line_error(err, model, "'conv2'", "no weights")


def test_prototxt_num_output_disagrees_with_blob(tmp_path):
    layers = tiny_caffenet(v1=False)
    model = fw.write_caffemodel(tmp_path / "m.caffemodel", layers)
    wrong = copy.deepcopy(layers)
    wrong[4].params["out"] = 32  # conv2
    deploy = fw.write_prototxt(tmp_path / "d.prototxt", wrong)
    with pytest.raises(CheckpointError) as err:
        read_source(model, prototxt=deploy)
    assert_one_line_error(err, model, "'conv2'", "num_output 32", "16x4x3x3")


def test_unused_caffemodel_weights_are_noted_not_dropped_silently(tmp_path):
    layers = tiny_caffenet(v1=False)
    model = fw.write_caffemodel(tmp_path / "m.caffemodel", layers)
    deploy = fw.write_prototxt(tmp_path / "d.prototxt", [l for l in layers if l.name not in ("fc7", "py", "prob")])
    net = read_source(model, prototxt=deploy)
    assert any("fc7" in note for note in net.notes)


@pytest.mark.parametrize("class_name,words", [("nn.SpatialFancyConvolution", ["unknown class"]),
                                               ("nn.gModule", ["out of scope"]),
                                               ("mylib.Thing", ["unknown class"])])
def test_torch7_unknown_class(tmp_path, class_name, words):
    model, _ = tiny_torch_net()
    model.fields["modules"][2] = fw.T7Object(class_name, {"train": False})
    path = fw.write_t7(tmp_path / "net.t7", model)
    with pytest.raises(CheckpointError) as err:
        read_source(path)
    assert_one_line_error(err, path, "module 3", class_name, *words)


def test_truncated_torch7_storage(tmp_path):
    model, _ = tiny_torch_net()
    data = fw.t7_bytes(model)
    path = tmp_path / "cut.t7"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        read_source(path)
    assert_one_line_error(err, path, "truncated")


def test_caffe2_blob_shapes_must_agree(tmp_path):
    blobs = fw.caffe2_blobs(tiny_fair_jigsaw())
    blobs["conv2_s0_b"] = np.zeros(3, np.float32)
    path = fw.write_caffe2_pickle(tmp_path / "bad.pkl", blobs)
    with pytest.raises(CheckpointError) as err:
        read_source(path)
    assert_one_line_error(err, path, "conv2_s0_b")
