"""Caffe releases through the exact command lines users run: ``backbones.convert`` then
``backbones.features --no-resize``, compared with an independent forward that follows Caffe's
semantics (BGR 0-255 minus the mean image's centre crop, grouped convolutions, cross-channel LRN
with k and alpha/size, max pooling that rounds up, CxHxW flattening into fc6), written here with
loops rather than with the model code under test. The files are binary caffemodels encoded by
hand (tests/format_writers.py), so the field numbers are checked too."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backbones import convert, features
from backbones.alexnet import CAFFE_MEAN_BGR
from backbones.formats import SourceLayer
from format_writers import write_binaryproto, write_caffemodel, write_prototxt

WIDTHS = (16, 32, 24, 24, 16)
GROUPS = (1, 2, 1, 2, 2)
KERNELS = ((11, 4, 0), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1))
FC = (64, 48, 10)
LRN = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0, "region": "across"}


def caffenet_layers(seed: int, lrn_before_pool: bool, *, lrn: bool = True, slope: float = 0.0,
                    cin: int = 3, bottom: str = "data") -> list[SourceLayer]:
    """A small CaffeNet-shaped net as Caffe would list it (names as in the BVLC prototxts);
    ``lrn=False`` leaves LRN out, ``slope`` makes every rectifier leaky (BiGAN)."""
    rng = np.random.default_rng(seed)
    layers = []
    relu = {"negative_slope": slope} if slope else {}

    def add(name, kind, params, blobs=(), top=None):
        layers.append(SourceLayer(name, kind, params, [np.asarray(b, np.float32) for b in blobs],
                                  bottoms=[bottom], tops=[top or name]))

    for i, (out, (k, s, p), g) in enumerate(zip(WIDTHS, KERNELS, GROUPS), start=1):
        fan_in = cin // g * k * k
        weight = rng.normal(0, math.sqrt(2.0 / fan_in), (out, cin // g, k, k)) / (40.0 if i == 1 else 1.0)
        add(f"conv{i}", "conv", {"out": out, "kernel": (k, k), "stride": (s, s), "pad": (p, p), "groups": g,
                                 "bias": True, "dilation": (1, 1)}, [weight, rng.uniform(0, 0.1, out)])
        bottom = f"conv{i}"
        add(f"relu{i}", "relu", relu, top=bottom)
        steps = []
        if i in (1, 2) and lrn:
            steps.append(("norm", "lrn"))
        if i in (1, 2, 5):
            steps.insert(1 if lrn_before_pool else 0, ("pool", "pool"))
        for what, kind in steps:
            name = f"{what}{i}"
            params = dict(LRN) if kind == "lrn" else {"method": "max", "kernel": (3, 3), "stride": (2, 2),
                                                      "pad": (0, 0), "ceil": True, "global": False}
            add(name, kind, params)
            bottom = name
        cin = out
    fan_in = cin * 36
    for j, out in enumerate(FC, start=6):
        add(f"fc{j}", "fc", {"out": out, "bias": True, "transpose": False},
            [rng.normal(0, math.sqrt(2.0 / fan_in), (out, fan_in)), rng.uniform(0, 0.1, out)])
        bottom = f"fc{j}"
        if j < 8:
            add(f"relu{j}", "relu", relu, top=bottom)
            add(f"drop{j}", "dropout", {"ratio": 0.5}, top=bottom)
        fan_in = out
    return layers


# --- Caffe's forward, written out -------------------------------------------------------------------

def caffe_lrn(x: np.ndarray, size: int, alpha: float, beta: float, k: float) -> np.ndarray:
    squares = np.pad(x ** 2, ((size // 2, size // 2), (0, 0), (0, 0)))
    out = np.empty_like(x)
    for c in range(x.shape[0]):
        out[c] = x[c] * (k + alpha / size * squares[c:c + size].sum(axis=0)) ** -beta
    return out


def caffe_max_pool(x: np.ndarray, kernel: int = 3, stride: int = 2) -> np.ndarray:
    c, h, w = x.shape
    oh, ow = (int(math.ceil((n - kernel) / stride)) + 1 for n in (h, w))  # Caffe rounds up
    out = np.empty((c, oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            out[:, i, j] = x[:, i * stride:min(i * stride + kernel, h), j * stride:min(j * stride + kernel, w)].max(
                axis=(1, 2))
    return out


def caffe_forward(layers: list[SourceLayer], bgr: np.ndarray, mean_image: np.ndarray) -> dict[str, np.ndarray]:
    h, w = bgr.shape[:2]
    y0, x0 = (mean_image.shape[1] - h) // 2, (mean_image.shape[2] - w) // 2
    x = bgr.transpose(2, 0, 1).astype(np.float64) - mean_image[:, y0:y0 + h, x0:x0 + w]
    out = {}
    for layer in layers:
        p = layer.params
        if layer.kind == "conv":
            conv = F.conv2d(torch.from_numpy(x)[None], torch.from_numpy(layer.blobs[0].astype(np.float64)),
                            torch.from_numpy(layer.blobs[1].astype(np.float64)), stride=p["stride"][0],
                            padding=p["pad"][0], groups=p["groups"])
            x = conv[0].numpy()
        elif layer.kind == "fc":
            x = layer.blobs[0].astype(np.float64) @ x.reshape(-1) + layer.blobs[1]
        elif layer.kind == "relu":
            x = np.where(x > 0, x, (p.get("negative_slope") or 0.0) * x)
            out[layer.tops[0]] = x
        elif layer.kind == "lrn":
            x = caffe_lrn(x, p["size"], p["alpha"], p["beta"], p["k"])
        elif layer.kind == "pool":
            x = caffe_max_pool(x)
        if layer.name == "pool5" and x.shape[1:] != (6, 6):
            break  # fc6 only takes a 6x6 pool5 in Caffe
    return out


# --- the test files --------------------------------------------------------------------------------

def _image(path, size, seed):
    rng = np.random.default_rng(seed)
    bgr = cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (0, 0), 2.0)
    cv2.imwrite(str(path), bgr)  # PNG: lossless, read back identically by PIL in backbones.features
    return bgr


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours.reshape(ref.shape) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A V2 caffemodel with its deploy prototxt and a 3x240x240 .binaryproto mean (CaffeNet order:
    pooling before LRN)."""
    root = tmp_path_factory.mktemp("caffe_release")
    layers = caffenet_layers(seed=0, lrn_before_pool=False)
    write_caffemodel(root / "net.caffemodel", layers)
    write_prototxt(root / "deploy.prototxt", layers, input_dim=(1, 3, 227, 227))
    mean = (np.random.default_rng(1).uniform(90, 130, (3, 240, 240))).astype(np.float32)
    write_binaryproto(root / "mean.binaryproto", mean)
    out = root / "converted.pt"
    assert convert.main([str(root / "net.caffemodel"), "--prototxt", str(root / "deploy.prototxt"), "--mean",
                         str(root / "mean.binaryproto"), "--discard", "fc8", "--out", str(out), "--quiet"]) == 0
    return root, layers, mean.astype(np.float64), out


@pytest.mark.parametrize("size, layers_checked", [(227, ("conv5", "fc7")), (231, ("conv5",))])
def test_features_reproduce_caffe(release, tmp_path, size, layers_checked):
    root, layers, mean, ckpt = release
    bgr = _image(tmp_path / f"im{size}.png", size, seed=size)
    assert features.main(["--ckpt", str(ckpt), "--image", str(tmp_path / f"im{size}.png"), "--layers",
                          ",".join(layers_checked), "--no-resize", "--out", str(tmp_path / "f.npz")]) == 0
    ours = np.load(tmp_path / "f.npz")
    ref = caffe_forward(layers, bgr, mean)
    for name in layers_checked:
        assert _rel(ours[name], ref[name]) < 1e-3, name
    if size == 231:  # ceil rounding matters here: floor pooling would give a 13x13 conv5... and 7x7 vs 6x6 pool5
        assert ours["conv5"].shape == ref["conv5"].shape == (WIDTHS[4], 14, 14)


def test_v1_caffemodel_lrn_before_pool_with_mean_values(tmp_path):
    layers = caffenet_layers(seed=3, lrn_before_pool=True)  # BVLC AlexNet's order
    write_caffemodel(tmp_path / "v1.caffemodel", layers, v1=True)
    write_prototxt(tmp_path / "v1.prototxt", layers, v1=True, input_dim=(10, 3, 227, 227))
    out = tmp_path / "v1.pt"
    assert convert.main([str(tmp_path / "v1.caffemodel"), "--prototxt", str(tmp_path / "v1.prototxt"),
                         "--mean-values", "104,117,123", "--keep-head", "--out", str(out), "--quiet"]) == 0
    bgr = _image(tmp_path / "im.png", 227, seed=4)
    assert features.main(["--ckpt", str(out), "--image", str(tmp_path / "im.png"), "--layers", "conv5,fc7",
                          "--no-resize", "--out", str(tmp_path / "f.npz")]) == 0
    mean = np.broadcast_to(np.array([104.0, 117.0, 123.0]).reshape(3, 1, 1), (3, 227, 227))
    ref = caffe_forward(layers, bgr, mean)
    ours = np.load(tmp_path / "f.npz")
    assert _rel(ours["conv5"], ref["conv5"]) < 1e-3 and _rel(ours["fc7"], ref["fc7"]) < 1e-3
    from backbones.checkpoint import read_checkpoint
    arch = read_checkpoint(out).arch
    assert arch.layout == "custom" and arch.lrn_before_pool and arch.ceil_pool and arch.num_classes == FC[2]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_caffe_conversion_errors_are_one_line(release, tmp_path, capsys):
    root, layers, _, _ = release
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes((root / "net.caffemodel").read_bytes()[:5000])
    assert convert.main([str(cut), "--prototxt", str(root / "deploy.prototxt"), "--input", "caffe",
                         "--out", str(tmp_path / "x.pt")]) == 2
    assert str(cut) in _one_line_error(capsys)
    wrong = [SourceLayer(l.name, l.kind, {**l.params, "out": 20} if l.name == "conv3" else l.params, l.blobs,
                         bottoms=l.bottoms, tops=l.tops) for l in layers]
    write_prototxt(tmp_path / "wrong.prototxt", wrong)
    assert convert.main([str(root / "net.caffemodel"), "--prototxt", str(tmp_path / "wrong.prototxt"),
                         "--input", "caffe", "--discard", "fc8", "--out", str(tmp_path / "x.pt")]) == 2
    assert "conv3" in _one_line_error(capsys)
    assert convert.main([str(root / "net.caffemodel"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "--mean" in _one_line_error(capsys)  # a Caffe network's mean must be stated
    assert not (tmp_path / "x.pt").exists()


@pytest.fixture(scope="module")
def data_root(tiny, tmp_path_factory):
    """A private copy of the shared tiny data set: detection writes its proposal cache under the
    data root, and the shared set must stay as generated."""
    import shutil
    root = tmp_path_factory.mktemp("caffe_tasks") / "data"
    shutil.copytree(tiny, root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("task", ["voc07_cls", "voc07_det", "voc12_seg", "in1k_linear"])
def test_converted_caffe_checkpoint_runs_every_task(release, data_root, tmp_path, task):
    from evals.run import main as run_main
    from results import store

    _, _, _, ckpt = release
    sets = {"voc07_cls": ["iterations=2", "test_views=1"], "voc07_det": ["iterations=2"],
            "voc12_seg": ["stage1_iterations=1", "stage2_iterations=1"], "in1k_linear": ["iterations=2"]}[task]
    args = ["--task", task, "--preset", "demo", "--ckpt", str(ckpt), "--data-root", str(data_root), "--workers", "0",
            "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results")]
    for item in sets:
        args += ["--set", item]
    assert run_main(args) == 0
    (record,) = store.load_records(tmp_path / "results")
    assert record["checkpoint"]["meta"]["source_format"] == "caffe"


# --- Torch7 and Caffe2 releases: the same check against their frameworks' semantics ----------------

def framework_forward(layers: list[SourceLayer], x: np.ndarray, pools_after=None) -> dict[str, np.ndarray]:
    """A layer list run as Torch7 (floor/ceil pooling per layer, old Dropout scaling by 1 - p at
    test time, BatchNorm with running statistics) or Caffe2 would: ``x`` is the preprocessed input
    ``C x H x W``. ``pools_after``: conv names followed by a 3x3/2 floor max pool (Caffe2 pickles
    hold no pooling layers). Returns the rectified output of every conv/fc, by layer name."""
    out, last = {}, None
    for layer in layers:
        p = layer.params
        if layer.kind == "conv":
            k = p["kernel"][0]
            stride, pad = (p["stride"][0], p["pad"][0]) if p.get("stride") else {11: (4, 2), 5: (1, 2), 3: (1, 1)}[k]
            x = F.conv2d(torch.from_numpy(x)[None], torch.from_numpy(layer.blobs[0].astype(np.float64)),
                         torch.from_numpy(layer.blobs[1].astype(np.float64)), stride=stride, padding=pad,
                         groups=p["groups"])[0].numpy()
            last = layer.name
        elif layer.kind == "fc":
            x = layer.blobs[0].astype(np.float64) @ x.reshape(-1) + layer.blobs[1]
            last = layer.name
        elif layer.kind == "bn":
            mean, var = layer.blobs[0], layer.blobs[1]
            shape = (-1,) + (1,) * (x.ndim - 1)
            x = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + p.get("eps", 1e-5))
            if p.get("affine"):
                x = x * layer.blobs[2].reshape(shape) + layer.blobs[3].reshape(shape)
        elif layer.kind == "relu":
            x = np.maximum(x, 0)
            out[last] = x
            if pools_after and last in pools_after:
                x = F.max_pool2d(torch.from_numpy(x)[None], 3, 2)[0].numpy()
        elif layer.kind == "lrn":
            x = caffe_lrn(x, p["size"], p["alpha"], p["beta"], p["k"])
        elif layer.kind == "pool":
            x = F.max_pool2d(torch.from_numpy(x)[None], 3, 2, ceil_mode=p["ceil"])[0].numpy()
        elif layer.kind == "dropout" and p.get("scale_at_test"):
            x = x * (1.0 - p["ratio"])
        elif layer.kind == "flatten":
            x = x.reshape(-1)
    return out


def _canonical(path) -> tuple[np.ndarray, np.ndarray]:
    """The image as backbones.features feeds it (ImageNet-normalised RGB), and that array."""
    from backbones.inputs import load_input
    x = load_input(path, None).double().numpy()
    return x, x


def torch7_layers(seed: int) -> list[SourceLayer]:
    """caffenet_layers as Torch7's nn would hold it: floor pooling, a View before fc6, the old
    Dropout (scales by 1 - p at test time), a BatchNormalization after fc6."""
    layers = []
    rng = np.random.default_rng(seed + 10)
    for layer in caffenet_layers(seed, lrn_before_pool=True):
        if layer.kind == "pool":
            layer.params = {**layer.params, "ceil": False}
        if layer.name == "fc6":
            layers.append(SourceLayer("view", "flatten", {"size": [-1, WIDTHS[4] * 36]}, []))
        if layer.kind == "dropout":
            layer.params = {**layer.params, "scale_at_test": True}
        layers.append(layer)
        if layer.name == "fc6":
            layers.append(SourceLayer("bn6", "bn", {"eps": 1e-5, "affine": True}, [
                rng.normal(0, 0.1, FC[0]).astype(np.float32), rng.uniform(0.5, 1.5, FC[0]).astype(np.float32),
                rng.uniform(0.5, 1.5, FC[0]).astype(np.float32), rng.normal(0, 0.1, FC[0]).astype(np.float32)]))
    return layers


def test_torch7_release_converts_exactly(tmp_path):
    from format_writers import t7_module, t7_sequential, write_t7
    layers = torch7_layers(seed=5)
    write_t7(tmp_path / "model.t7", t7_sequential([t7_module(l) for l in layers]))
    out = tmp_path / "t7.pt"
    assert convert.main([str(tmp_path / "model.t7"), "--input", "imagenet", "--discard", "24", "--out", str(out),
                         "--quiet"]) == 0
    _image(tmp_path / "im.png", 227, seed=6)
    assert features.main(["--ckpt", str(out), "--image", str(tmp_path / "im.png"), "--layers", "conv5,fc7",
                          "--no-resize", "--out", str(tmp_path / "f.npz")]) == 0
    x, _ = _canonical(tmp_path / "im.png")
    ref = framework_forward(layers, x)
    ours = np.load(tmp_path / "f.npz")
    assert _rel(ours["conv5"], ref["conv5"]) < 1e-3 and _rel(ours["fc7"], ref["fc7"]) < 1e-3


def test_caffe2_release_converts_exactly(tmp_path):
    from format_writers import caffe2_blobs, write_caffe2_pickle
    rng = np.random.default_rng(7)
    layers = []
    cin = 3
    for i, (out, (k, _, _), g) in enumerate(zip(WIDTHS, KERNELS, GROUPS), start=1):
        layers.append(SourceLayer(f"conv{i}_s0", "conv", {"out": out, "kernel": (k, k), "groups": g, "bias": True},
                                  [rng.normal(0, math.sqrt(2 / (cin // g * k * k)), (out, cin // g, k, k)).astype(
                                      np.float32), rng.uniform(0, 0.1, out).astype(np.float32)]))
        layers.append(SourceLayer(f"conv{i}_s0_bn", "bn", {"eps": 1.0000001e-5, "affine": True}, [
            rng.normal(0, 0.1, out).astype(np.float32), rng.uniform(0.5, 1.5, out).astype(np.float32),
            rng.uniform(0.5, 1.5, out).astype(np.float32), rng.normal(0, 0.1, out).astype(np.float32)]))
        layers.append(SourceLayer(f"relu{i}", "relu", {}, []))
        cin = out
    fan = cin * 36
    for name, out in (("fc6", FC[0]), ("fc7_s0", FC[1])):
        layers.append(SourceLayer(name, "fc", {"out": out, "bias": True}, [
            rng.normal(0, math.sqrt(2 / fan), (out, fan)).astype(np.float32),
            rng.uniform(0, 0.1, out).astype(np.float32)]))
        layers.append(SourceLayer(name + "_relu", "relu", {}, []))
        fan = out
    write_caffe2_pickle(tmp_path / "jigsaw.pkl", caffe2_blobs([l for l in layers if l.kind != "relu"]))
    out = tmp_path / "c2.pt"
    assert convert.main([str(tmp_path / "jigsaw.pkl"), "--input", "imagenet", "--out", str(out), "--quiet"]) == 0
    _image(tmp_path / "im.png", 224, seed=8)
    assert features.main(["--ckpt", str(out), "--image", str(tmp_path / "im.png"), "--layers", "conv5,fc7",
                          "--no-resize", "--out", str(tmp_path / "f.npz")]) == 0
    x, _ = _canonical(tmp_path / "im.png")
    ref = framework_forward(layers, x, pools_after={"conv1_s0", "conv2_s0", "conv5_s0"})
    ours = np.load(tmp_path / "f.npz")
    assert _rel(ours["conv5"], ref["conv5_s0"]) < 1e-3 and _rel(ours["fc7"], ref["fc7_s0"]) < 1e-3
    # The pickle stores no geometry: --layout states it (here BVLC CaffeNet's: conv1 4/0, ceil
    # pooling, LRN after pool1/pool2), checked against that network run layer by layer.
    caffenet = tmp_path / "c2_caffenet.pt"
    assert convert.main([str(tmp_path / "jigsaw.pkl"), "--input", "caffe", "--layout", "bvlc_caffenet",
                         "--out", str(caffenet), "--quiet"]) == 0
    bgr = _image(tmp_path / "im227.png", 227, seed=9)
    explicit = []
    for layer in layers:
        stage = layer.name[:5]
        if layer.kind == "conv":
            stride, pad = KERNELS[int(stage[-1]) - 1][1:]
            layer = SourceLayer(layer.name, "conv", {**layer.params, "stride": (stride,) * 2, "pad": (pad,) * 2},
                                layer.blobs)
        explicit.append(layer)
        if layer.kind == "relu" and stage in ("relu1", "relu2", "relu5"):
            explicit.append(SourceLayer("pool", "pool", {"ceil": True}, []))
            if stage != "relu5":
                explicit.append(SourceLayer("norm", "lrn", dict(LRN), []))
    ref = framework_forward(explicit, bgr.transpose(2, 0, 1).astype(np.float64)
                            - np.array(CAFFE_MEAN_BGR).reshape(3, 1, 1))
    ours = _features(caffenet, tmp_path / "im227.png", ("conv5", "fc7"), tmp_path / "g.npz")
    assert _rel(ours["conv5"], ref["conv5_s0"]) < 1e-3 and _rel(ours["fc7"], ref["fc7_s0"]) < 1e-3


def test_caffe_hdf5_release_needs_and_uses_its_prototxt(tmp_path, capsys):
    from format_writers import write_caffe_h5
    layers = caffenet_layers(seed=9, lrn_before_pool=True)  # Larsson et al.: LRN before pooling
    write_caffe_h5(tmp_path / "net.caffemodel.h5", layers)
    write_prototxt(tmp_path / "deploy.prototxt", layers)
    out = tmp_path / "h5.pt"
    assert convert.main([str(tmp_path / "net.caffemodel.h5"), "--input", "caffe", "--out", str(out)]) == 2
    assert "prototxt" in _one_line_error(capsys)
    assert convert.main([str(tmp_path / "net.caffemodel.h5"), "--prototxt", str(tmp_path / "deploy.prototxt"),
                         "--input", "caffe", "--discard", "fc8", "--out", str(out), "--quiet"]) == 0
    bgr = _image(tmp_path / "im.png", 227, seed=10)
    assert features.main(["--ckpt", str(out), "--image", str(tmp_path / "im.png"), "--layers", "conv5",
                          "--no-resize", "--out", str(tmp_path / "f.npz")]) == 0
    mean = np.broadcast_to(np.array([104.0, 117.0, 123.0]).reshape(3, 1, 1), (3, 227, 227))
    assert _rel(np.load(tmp_path / "f.npz")["conv5"], caffe_forward(layers, bgr, mean)["conv5"]) < 1e-3


def _features(ckpt, image, layers, out):
    assert features.main(["--ckpt", str(ckpt), "--image", str(image), "--layers", ",".join(layers), "--no-resize",
                          "--out", str(out)]) == 0
    return np.load(out)


def test_bigan_style_leaky_relu_without_lrn_and_pm1_input(tmp_path, capsys):
    """Donahue et al.'s BiGAN encoder: no LRN, every rectifier leaky (slope 0.2), BGR scaled to
    [-1, 1], released with its train prototxt. A leaky ReLU read as a plain one would silently
    change every activation."""
    layers = caffenet_layers(seed=5, lrn_before_pool=False, lrn=False, slope=0.2)
    write_caffemodel(tmp_path / "bigan.caffemodel", layers)
    # the release ships a *train* prototxt: a Data layer per phase (one name), accuracy and loss
    data = [SourceLayer("data", "other", {"type": "Data"}, [], tops=["data", "label"], source_type="Data")] * 2
    sinks = [SourceLayer(name, "other", {"type": kind}, [], bottoms=["fc8", "label"], tops=[name], source_type=kind)
             for name, kind in (("accuracy", "Accuracy"), ("loss", "SoftmaxWithLoss"))]
    write_prototxt(tmp_path / "bigan.prototxt", data + layers + sinks)
    out = tmp_path / "bigan.pt"
    assert convert.main([str(tmp_path / "bigan.caffemodel"), "--prototxt", str(tmp_path / "bigan.prototxt"),
                         "--input", "bigan", "--discard", "fc8",
                         "--out", str(out), "--quiet"]) == 0
    from backbones.checkpoint import read_checkpoint
    arch = read_checkpoint(out).arch
    assert arch.relu_slope == pytest.approx(0.2) and arch.lrn is None
    bgr = _image(tmp_path / "im.png", 227, seed=6)
    ours = _features(out, tmp_path / "im.png", ("conv5", "fc7"), tmp_path / "f.npz")
    ref = caffe_forward(layers, bgr * (2.0 / 255.0), np.ones((3, 227, 227)))
    assert _rel(ours["conv5"], ref["conv5"]) < 1e-3 and _rel(ours["fc7"], ref["fc7"]) < 1e-3
    assert (ours["conv5"] < 0).any()  # leaky: negative responses survive
    mixed = [SourceLayer(l.name, l.kind, {"negative_slope": 0.1} if l.name == "relu3" else l.params, l.blobs,
                         bottoms=l.bottoms, tops=l.tops) for l in layers]
    write_prototxt(tmp_path / "mixed.prototxt", data + mixed + sinks)
    assert convert.main([str(tmp_path / "bigan.caffemodel"), "--prototxt", str(tmp_path / "mixed.prototxt"),
                         "--input", "bigan", "--discard", "fc8", "--out", str(tmp_path / "x.pt")]) == 2
    assert "relu3 0.1" in _one_line_error(capsys) and not (tmp_path / "x.pt").exists()


def test_colorization_lightness_transform_folds_into_the_input_spec(tmp_path):
    """Zhang et al.'s release: Lab input sliced to L, then a fixed 1x1 convolution ``data_l``
    (w L + b: L - 50 when trained, other values after rescaling) before a one-channel conv1. The
    transform becomes the input spec's mean and std; the Slice is stated by --input (channels=0)
    and discarded, the Silence of the unused a/b channels is ignored."""
    from skimage.color import rgb2lab
    net = caffenet_layers(seed=7, lrn_before_pool=False, lrn=False, cin=1, bottom="data_l")
    w, b = 0.8, -40.0
    prelude = [SourceLayer("img_slice", "other", {"type": "Slice"}, [], bottoms=["img_lab"],
                           tops=["img_l", "data_ab"], source_type="Slice"),
               SourceLayer("silence_ab", "other", {"type": "Silence"}, [], bottoms=["data_ab"], tops=[],
                           source_type="Silence"),
               SourceLayer("data_l", "conv", {"out": 1, "kernel": (1, 1), "stride": (1, 1), "pad": (0, 0),
                                              "groups": 1, "bias": True, "dilation": (1, 1)},
                           [np.full((1, 1, 1, 1), w, np.float32), np.full(1, b, np.float32)],
                           bottoms=["img_l"], tops=["data_l"])]
    layers = prelude + net
    write_caffemodel(tmp_path / "color.caffemodel", layers)
    write_prototxt(tmp_path / "color.prototxt", layers, input_dim=(1, 3, 227, 227))
    out = tmp_path / "color.pt"
    assert convert.main([str(tmp_path / "color.caffemodel"), "--prototxt", str(tmp_path / "color.prototxt"),
                         "--input", "colorspace=lab,scale=1,mean=none,std=none,channels=0",
                         "--discard", "img_slice", "--discard", "fc8",
                         "--out", str(out), "--quiet"]) == 0
    from backbones.checkpoint import read_checkpoint
    spec = read_checkpoint(out).arch.input
    assert spec.mean[0] == pytest.approx(-b / w) and spec.std[0] == pytest.approx(1 / w)
    bgr = _image(tmp_path / "im.png", 227, seed=8)
    lightness = rgb2lab(bgr[:, :, ::-1] / 255.0)[:, :, :1]
    ours = _features(out, tmp_path / "im.png", ("conv5", "fc7"), tmp_path / "f.npz")
    ref = caffe_forward(net, w * lightness + b, np.zeros((1, 227, 227)))
    assert _rel(ours["conv5"], ref["conv5"]) < 1e-3 and _rel(ours["fc7"], ref["fc7"]) < 1e-3
