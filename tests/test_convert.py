"""backbones.convert on PyTorch releases (DeepCluster, RotNet, VISSL layouts), the input spec, and
the refusals. Each source model is an independent ``nn.Module`` written the way its authors'
code is (BatchNorm kept, Sobel stage, pretext head), saved the way they saved it; the converted,
plain, BN-folded checkpoint must give the same activations."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from backbones import convert
from backbones.alexnet import AlexNet, AlexNetArch, InputSpec, convert_input, IMAGENET_MEAN, IMAGENET_STD
from backbones.checkpoint import load_backbone, read_checkpoint

WIDTHS = (8, 12, 16, 16, 8)  # small members of the family: fast, and widths no named layout has
FC = 24


def _conv_bn(cin, cout, k, s, p, bias=True):
    return [nn.Conv2d(cin, cout, k, s, p, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DeepClusterLike(nn.Module):
    """DeepCluster's AlexNet: Sobel front-end (grey 1x1 + Sobel 3x3, fixed), conv-BN-ReLU with
    pools after conv1/2/5, classifier Dropout-Linear-ReLU x2, a ``top_layer`` head."""

    def __init__(self, sobel=True):
        super().__init__()
        w = WIDTHS
        cin = 2 if sobel else 3
        self.features = nn.Sequential(
            *_conv_bn(cin, w[0], 11, 4, 2), nn.MaxPool2d(3, 2), *_conv_bn(w[0], w[1], 5, 1, 2), nn.MaxPool2d(3, 2),
            *_conv_bn(w[1], w[2], 3, 1, 1), *_conv_bn(w[2], w[3], 3, 1, 1), *_conv_bn(w[3], w[4], 3, 1, 1),
            nn.MaxPool2d(3, 2))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(w[4] * 36, FC), nn.ReLU(inplace=True),
                                        nn.Dropout(0.5), nn.Linear(FC, FC), nn.ReLU(inplace=True))
        self.top_layer = nn.Linear(FC, 10)
        grey = nn.Conv2d(3, 1, 1)
        grey.weight.data.fill_(1.0 / 3.0)
        grey.bias.data.zero_()
        sob = nn.Conv2d(1, 2, 3, padding=1)
        sob.weight.data[0, 0] = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
        sob.weight.data[1, 0] = torch.tensor([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])
        sob.bias.data.zero_()
        self.sobel = nn.Sequential(grey, sob) if sobel else None

    def forward_to(self, x, upto):
        if self.sobel is not None:
            x = self.sobel(x)
        x = self.features(x)
        if upto == "pool5":
            return x
        x = self.classifier(torch.flatten(x, 1))
        return x


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _images(n=2, size=224, seed=1):
    g = torch.Generator().manual_seed(seed)
    rgb01 = torch.rand(n, 3, size, size, generator=g)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (rgb01 - mean) / std  # the canonical input


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _convert(argv):
    return convert.main([str(a) for a in argv] + ["--quiet"])


def test_deepcluster_checkpoint_converts_exactly(tmp_path):
    torch.manual_seed(0)
    ref = _randomise_bn(DeepClusterLike())
    state = {("features.module." + k[len("features."):] if k.startswith("features.") else k): v
             for k, v in ref.state_dict().items()}  # DeepCluster wraps features in DataParallel
    src = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 200, "arch": "alexnet", "state_dict": state, "optimizer": {"param_groups": []}}, src,
               _use_new_zipfile_serialization=False)  # the pre-1.6 file format DeepCluster released
    out = tmp_path / "dc.pt"
    assert _convert([src, "--discard", "top_layer", "--out", out]) == 0
    loaded = load_backbone(out)
    loaded.model.eval()
    assert loaded.model.arch.frontend == "sobel" and loaded.model.arch.convs[0][:2] == (WIDTHS[0], 11)
    assert not loaded.model.has_batchnorm  # folded
    x = _images()
    with torch.no_grad():
        ours = loaded.model.activations(x, ["pool5", "fc7"])
        assert _rel(ours["pool5"], ref.forward_to(x, "pool5")) < 1e-5
        assert _rel(ours["fc7"], ref.forward_to(x, "fc7")) < 1e-5
    meta = read_checkpoint(out).meta
    assert meta["source_format"] == "pytorch" and meta["conversion"]["discarded"]
    report = meta["conversion"]["load_report"]
    assert {r["target"] for r in report} == set(loaded.model.state_dict())
    assert any(r["how"].startswith("folded") for r in report if r["target"] == "conv1.weight")


def test_a_head_must_be_declared(tmp_path, capsys):
    torch.manual_seed(0)
    src = tmp_path / "dc.pth"
    torch.save({"state_dict": _randomise_bn(DeepClusterLike()).state_dict()}, src)
    assert _convert([src, "--out", tmp_path / "x.pt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "top_layer" in err[0] and "--keep-head" in err[0] and str(src) in err[0]
    assert not (tmp_path / "x.pt").exists()
    assert _convert([src, "--keep-head", "--out", tmp_path / "head.pt"]) == 0
    assert read_checkpoint(tmp_path / "head.pt").arch.num_classes == 10


class RotNetLike(nn.Module):
    """Gidaris et al.'s AlexNet: 64-filter conv1, BN everywhere, bias-free fc layers followed by
    BatchNorm1d, a 4-way rotation classifier; saved under a ``network`` key."""

    def __init__(self):
        super().__init__()
        w = (16, 12, 16, 8, 8)
        self._feature_blocks = nn.ModuleList([
            nn.Sequential(*_conv_bn(3, w[0], 11, 4, 2)), nn.MaxPool2d(3, 2),
            nn.Sequential(*_conv_bn(w[0], w[1], 5, 1, 2)), nn.MaxPool2d(3, 2),
            nn.Sequential(*_conv_bn(w[1], w[2], 3, 1, 1)), nn.Sequential(*_conv_bn(w[2], w[3], 3, 1, 1)),
            nn.Sequential(*_conv_bn(w[3], w[4], 3, 1, 1)), nn.MaxPool2d(3, 2), nn.Flatten(),
            nn.Sequential(nn.Linear(w[4] * 36, FC, bias=False), nn.BatchNorm1d(FC), nn.ReLU(inplace=True)),
            nn.Sequential(nn.Linear(FC, FC, bias=False), nn.BatchNorm1d(FC), nn.ReLU(inplace=True)),
            nn.Linear(FC, 4)])

    def forward(self, x, blocks):
        for block in self._feature_blocks[:blocks]:
            x = block(x)
        return x


def test_rotnet_checkpoint_with_bias_free_fc_and_bn1d(tmp_path):
    torch.manual_seed(2)
    ref = _randomise_bn(RotNetLike(), seed=3)
    src = tmp_path / "model_net_epoch50"
    torch.save({"epoch": 50, "network": ref.state_dict()}, src)
    out = tmp_path / "rot.pt"
    assert _convert([src, "--discard", "_feature_blocks.11", "--out", out]) == 0
    model = load_backbone(out).model.eval()
    assert model.arch.convs[0][0] == 16 and model.arch.frontend == "none"
    x = _images(seed=4)
    with torch.no_grad():
        assert _rel(model.activations(x, ["pool5"])["pool5"], ref(x, 8)) < 1e-5
        assert _rel(model.activations(x, ["fc7"])["fc7"], ref(x, 11)) < 1e-5


def test_vissl_checkpoint_nested_trunk_and_heads(tmp_path):
    torch.manual_seed(5)
    ref = _randomise_bn(DeepClusterLike(sobel=False), seed=6)
    trunk = {f"_feature_blocks.{k}": v for k, v in ref.state_dict().items() if not k.startswith("top_layer")}
    heads = {"0.weight": ref.top_layer.weight.data, "0.bias": ref.top_layer.bias.data}
    src = tmp_path / "model_final_checkpoint_phase0.torch"
    torch.save({"phase_idx": 0, "classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}}}},
               src)
    out = tmp_path / "vissl.pt"
    assert _convert([src, "--format", "vissl", "--discard", "heads.0", "--out", out]) == 0
    _assert_fc7_matches(out, ref, seed=7)


def _assert_fc7_matches(converted, ref, seed):
    """The converted checkpoint's fc7 equals the source module's on canonical input."""
    model = load_backbone(converted).model.eval()
    with torch.no_grad():
        x = _images(seed=seed)
        assert _rel(model.activations(x, ["fc7"])["fc7"], ref.forward_to(x, "fc7")) < 1e-5


def test_vissl_deepcluster_without_its_sobel_weights_needs_frontend_sobel(tmp_path, capsys):
    """VISSL's DeepCluster AlexNet stores the 2-channel conv1 but not the fixed Sobel stage (its
    trunk rebuilds it): refused as it is, exact with --frontend sobel."""
    torch.manual_seed(8)
    ref = _randomise_bn(DeepClusterLike(sobel=True), seed=9)
    trunk = {f"_feature_blocks.{k}": v for k, v in ref.state_dict().items()
             if not k.startswith(("top_layer", "sobel"))}
    src = tmp_path / "deepcluster_alexnet_checkpoint.torch"
    torch.save({"model_state_dict": trunk}, src)
    assert _convert([src, "--format", "vissl", "--out", tmp_path / "x.pt"]) == 2
    assert "reads 2 channel(s)" in capsys.readouterr().err
    out = tmp_path / "dc.pt"
    assert _convert([src, "--format", "vissl", "--frontend", "sobel", "--out", out]) == 0
    _assert_fc7_matches(out, ref, seed=10)


def test_shape_mismatch_and_truncation_are_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    state = _randomise_bn(DeepClusterLike(sobel=False)).state_dict()
    state["classifier.1.weight"] = torch.zeros(FC, 7)  # fc6 does not fit pool5
    src = tmp_path / "bad.pth"
    torch.save({"state_dict": state}, src)
    assert _convert([src, "--discard", "top_layer", "--out", tmp_path / "x.pt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "classifier.1" in err[0] and "fc6" in err[0]
    good = tmp_path / "good.pth"
    torch.save({"state_dict": _randomise_bn(DeepClusterLike(sobel=False)).state_dict()}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert _convert([cut, "--discard", "top_layer", "--out", tmp_path / "x.pt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(cut) in err[0] and "Traceback" not in err[0]


def test_parse_input_spec_presets_and_items():
    spec = convert.parse_input_spec("caffe,mean=none,per_image_mean=1")
    assert spec.channel_order == "BGR" and spec.scale == 1.0 and spec.mean is None and spec.per_image_mean
    assert convert.parse_input_spec("scale=1/255,order=rgb,std=none").scale == pytest.approx(1 / 255)
    with pytest.raises(convert.UsageError, match="unknown key"):
        convert.parse_input_spec("colour=lab")
    with pytest.raises(convert.UsageError, match="unknown preset"):
        convert.parse_input_spec("nonsense")


def test_convert_input_follows_the_spec():
    x = _images(1, 8, seed=9)
    rgb = (x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) * 255
    caffe = InputSpec(channel_order="BGR", scale=1.0, mean=(104.0, 117.0, 123.0), std=None)
    expected = rgb.flip(1) - torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)
    assert torch.allclose(convert_input(x, caffe), expected, atol=1e-3)
    centred = convert_input(x, InputSpec(channel_order="BGR", scale=1.0, mean=None, std=None, per_image_mean=True))
    assert centred.mean(dim=(2, 3)).abs().max() < 1e-3
    image = torch.arange(3 * 10 * 10, dtype=torch.float32).view(3, 10, 10)
    per_pixel = convert_input(x, InputSpec(channel_order="BGR", scale=1.0, mean=None, std=None, mean_image=image))
    assert torch.allclose(per_pixel, rgb.flip(1) - image[:, 1:9, 1:9], atol=1e-3)  # centre crop of the mean
    from skimage.color import rgb2lab
    lab = convert_input(x, InputSpec(colorspace="lab", scale=1.0, mean=None, std=None))
    reference = rgb2lab((rgb[0] / 255).clamp(0, 1).permute(1, 2, 0).double().numpy())
    assert np.abs(lab[0].permute(1, 2, 0).numpy() - reference).max() < 0.05
    assert convert_input(x, InputSpec()) is x  # the canonical input is passed through untouched


def test_arch_with_an_input_spec_changes_the_fingerprint(tmp_path):
    from backbones.checkpoint import fingerprint
    model = AlexNet("caffenet")
    state = model.state_dict()
    assert fingerprint(state, model.arch) == fingerprint(state)  # our own checkpoints: as before
    bgr = AlexNetArch("caffenet", input=InputSpec(channel_order="BGR", scale=1.0, mean=(1, 2, 3), std=None))
    assert fingerprint(state, bgr) != fingerprint(state)


def test_zoo_grid_convert_section(tmp_path, capsys):
    from slurm import jobs
    from slurm.grid import load_grid

    zoo = load_grid("slurm/zoo.yaml")  # the shipped zoo: valid, and every entry writes a checkpoint row
    assert set(zoo.sections["convert"]) <= set(zoo.checkpoints)
    parser = convert.get_args_parser()
    for name, entry in zoo.sections["convert"].items():  # every entry's arguments parse, its --input too
        args = parser.parse_args([str(entry["src"]), *map(str, entry.get("args") or []), "--out", "x.pt"])
        if args.input:
            convert.parse_input_spec(args.input)
        shipped = Path(str(entry.get("prototxt", "")))
        if shipped.parts[:2] == ("slurm", "zoo"):  # a prototxt the repository ships (Larsson et al.)
            from backbones.formats.caffe import net_layers, parse_prototxt
            layers = [layer for layer, _ in net_layers(parse_prototxt(shipped), shipped)]
            kinds = [layer.kind for layer in layers if layer.kind in ("conv", "lrn", "pool")]
            assert kinds[:6] == ["conv", "lrn", "pool", "conv", "lrn", "pool"], name  # LRN before pooling
            assert [layer.params["groups"] for layer in layers if layer.kind == "conv"] == [1, 2, 1, 2, 2]
    torch.manual_seed(0)
    (tmp_path / "zoo").mkdir()
    torch.save({"state_dict": _randomise_bn(DeepClusterLike()).state_dict()}, tmp_path / "zoo" / "dc.pth.tar")
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""
base: {tmp_path}
results_dir: results
log_dir: logs
checkpoints:
  dc: {{path: converted/dc.pt, label: DeepCluster, supervision: Clustering}}
  gone: {{path: converted/gone.pt, label: Gone}}
convert:
  dc: {{src: zoo/dc.pth.tar, args: [--discard, top_layer]}}
  gone: {{src: zoo/gone.caffemodel, prototxt: zoo/gone.prototxt, note: not downloaded}}
tasks:
  voc07_cls: {{}}
""")
    assert jobs.main(["convert", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "1 converted" in out and "1 missing" in out and "gone.caffemodel" in out
    meta = read_checkpoint(tmp_path / "converted" / "dc.pt").meta
    assert meta["label"] == "DeepCluster" and meta["supervision"] == "Clustering"
    assert jobs.main(["convert", str(grid)]) == 0  # converted already: kept
    assert "1 already converted" in capsys.readouterr().out


def test_a_conv1_that_reads_fewer_channels_than_the_input_spec_feeds_is_refused(tmp_path, capsys):
    """A grey or L-channel network converted with a 3-channel --input must not become a
    grouped conv1 (PyTorch files store no groups): it is refused, naming conv1."""
    model = DeepClusterLike(sobel=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("top_layer")}
    state["features.0.weight"] = state["features.0.weight"][:, :1].clone()  # one input channel
    src = tmp_path / "grey.pth"
    torch.save({"state_dict": state}, src)
    assert _convert([src, "--out", tmp_path / "x.pt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "features.0" in err[0] and "reads 1 channel" in err[0]
    assert _convert([src, "--input", "colorspace=gray,scale=1/255,mean=0.45,std=0.225", "--out",
                     tmp_path / "grey.pt"]) == 0
    assert read_checkpoint(tmp_path / "grey.pt").arch.convs[0][4] == 1
