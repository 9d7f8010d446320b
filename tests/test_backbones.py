"""AlexNet layouts, BN folding, hypercolumn geometry and strict weight loading."""
import pytest
import torch
import torchvision

from backbones.alexnet import ACTIVATIONS, AlexNet, layer_geometry
from backbones.checkpoint import (CheckpointError, fingerprint, load_backbone, load_state_dict_strict,
                                  read_checkpoint, random_backbone, save_backbone)
from backbones.hypercolumn import sample_layer, sparse_hypercolumn
from pretrain.export import export, fold_batchnorm


def _with_bn_statistics(model: AlexNet, seed: int = 0) -> AlexNet:
    """Give every BN layer non-trivial running statistics by running a few training batches."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.activations(torch.randn(4, 3, 227, 227) * 2 + 0.5, ["fc7"])
    return model.eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("layout", ["caffenet", "torchvision"])
def test_caffenet_and_torchvision_shapes(layout):
    model = AlexNet(layout, num_classes=20).eval()
    acts = model.activations(torch.randn(2, 3, 227, 227), ACTIVATIONS)
    assert acts["pool5"].shape[-2:] == (6, 6)
    assert acts["fc7"].shape == (2, 4096) and acts["fc8"].shape == (2, 20)
    widths = [acts[f"conv{i}"].shape[1] for i in range(1, 6)]
    assert widths == ([96, 256, 384, 384, 256] if layout == "caffenet" else [64, 192, 384, 256, 256])
    if layout == "caffenet":
        assert [model.conv2.groups, model.conv4.groups, model.conv5.groups] == [2, 2, 2]
    dense = model.activations(torch.randn(1, 3, 291, 291), ["fc6", "fc7"], dense=True)
    assert dense["fc7"].shape[:2] == (1, 4096) and dense["fc7"].shape[-1] == 3  # a 3x3 map of fc7 vectors


def test_dense_fc_equals_flat_fc_on_a_single_window():
    model = AlexNet("caffenet").eval()
    x = torch.randn(2, 3, 227, 227)
    flat = model.activations(x, ["fc7"])["fc7"]
    dense = model.activations(x, ["fc7"], dense=True)["fc7"]
    assert dense.shape == (2, 4096, 1, 1)
    torch.testing.assert_close(dense[:, :, 0, 0], flat, rtol=1e-4, atol=1e-5)


def test_activations_stop_early_and_reject_unknown_names():
    model = AlexNet("caffenet")
    assert set(model.activations(torch.randn(1, 3, 224, 224), ["conv1", "pool1"])) == {"conv1", "pool1"}
    with pytest.raises(KeyError, match="conv9"):
        model.activations(torch.randn(1, 3, 224, 224), ["conv9"])
    with pytest.raises(KeyError, match="no classifier head"):
        model.activations(torch.randn(1, 3, 224, 224), ["fc8"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["caffenet", "torchvision"])
def test_fold_batchnorm_matches_bn_network_in_eval_mode(layout):
    bn_model = _with_bn_statistics(AlexNet(layout, batchnorm=True))
    plain = fold_batchnorm(bn_model).eval()
    assert not plain.has_batchnorm and not any(k.startswith("bn") for k in plain.state_dict())
    x = torch.randn(3, 3, 227, 227)
    names = ["conv1", "conv3", "conv5", "fc6", "fc7"]
    with torch.no_grad():
        want, got = bn_model.activations(x, names), plain.activations(x, names)
        want_dense = bn_model.activations(x, ["fc7"], dense=True)["fc7"]
        got_dense = plain.activations(x, ["fc7"], dense=True)["fc7"]
    for name in names:
        assert _rel_err(got[name], want[name]) < 1e-4, name
    assert _rel_err(got_dense, want_dense) < 1e-4
    # the BN statistics really mattered: without folding the plain weights give other outputs
    unfolded = AlexNet(layout).eval()
    unfolded.load_state_dict({k: v for k, v in bn_model.state_dict().items() if not k.startswith("bn")})
    with torch.no_grad():
        assert _rel_err(unfolded.activations(x, ["fc7"])["fc7"], want["fc7"]) > 1e-2


def test_layer_geometry_caffenet_by_hand():
    g = layer_geometry("caffenet")
    # conv1 k11 s4 p5: unit i spans pixels 4i-5 .. 4i+5, centred on 4i
    assert g["conv1"] == (4.0, 0.0)
    # pool1 k3 s2 over conv1: units 2j..2j+2 -> centre conv1 unit 2j+1 -> pixel 8j+4
    assert g["pool1"] == (8.0, 4.0)
    assert g["conv3"] == (16.0, 12.0) and g["pool5"] == (32.0, 28.0)
    # fc6 is a 6x6 window over pool5: centre pool5 unit 2.5 -> 28 + 32*2.5
    assert g["fc7"] == (32.0, 108.0)


def test_sampling_at_unit_centres_returns_the_unit():
    torch.manual_seed(0)
    fmap = torch.randn(2, 5, 7, 9)
    stride, offset = 8.0, 4.0
    ys, xs = torch.tensor([0, 3, 6, 2]), torch.tensor([0, 8, 4, 1])
    pos = torch.stack([offset + stride * ys, offset + stride * xs], dim=-1).float().expand(2, -1, -1)
    got = sample_layer(fmap, pos, stride, offset)
    want = fmap[:, :, ys, xs].transpose(1, 2)
    torch.testing.assert_close(got, want)
    # halfway between two units is their mean (bilinear)
    mid = torch.tensor([[[offset + stride * 2, offset + stride * 3.5]]]).expand(2, -1, -1)
    torch.testing.assert_close(sample_layer(fmap, mid, stride, offset)[:, 0],
                               (fmap[:, :, 2, 3] + fmap[:, :, 2, 4]) / 2)


def test_sparse_hypercolumn_on_the_network_matches_each_layer():
    model = AlexNet("caffenet").eval()
    geometry = layer_geometry("caffenet")
    layers = ["conv1", "pool1", "conv3", "pool5", "fc7"]
    with torch.no_grad():
        acts = model.activations(torch.randn(1, 3, 224, 224), layers, dense=True)
    # pixel (12 + 16*3, 12 + 16*5) is the centre of conv3 unit (3, 5)
    pos = torch.tensor([[[12.0 + 16 * 3, 12.0 + 16 * 5]]])
    column = sparse_hypercolumn(acts, pos, geometry, layers)
    assert column.shape == (1, 1, 96 + 96 + 384 + 256 + 4096)
    torch.testing.assert_close(column[0, 0, 192:576], acts["conv3"][0, :, 3, 5])
    torch.testing.assert_close(column[0, 0, -4096:], acts["fc7"][0, :, 0, 0])


# --- loading -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchvision_weights_give_torchvision_logits(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.alexnet(weights=None).eval()
    path = tmp_path / "alexnet_tv.pth"
    torch.save(reference.state_dict(), path)
    loaded = load_backbone(path, num_classes=1000)
    assert loaded.source_format == "torchvision-state-dict" and loaded.model.layout == "torchvision"
    model = loaded.model.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    # also through a DDP-style wrapper
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "w.pth")
    assert load_backbone(tmp_path / "w.pth", num_classes=1000).fingerprint == loaded.fingerprint


@pytest.mark.slow
def test_new_head_must_be_declared(tmp_path):
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), tmp_path / "tv.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch.*fc8\.weight"):
        load_backbone(tmp_path / "tv.pth", num_classes=20)
    loaded = load_backbone(tmp_path / "tv.pth", num_classes=20, allow_missing=("fc8.*",), discard=("fc8.*",))
    assert loaded.report["discarded"] == ["fc8.bias", "fc8.weight"]
    assert loaded.report["missing"] == ["fc8.bias", "fc8.weight"]


@pytest.mark.slow
def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = AlexNet("caffenet").state_dict()
    del state["conv3.bias"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing.pt: wrong architecture: missing keys \['conv3.bias'\]"):
        load_backbone(tmp_path / "missing.pt")
    state = AlexNet("caffenet").state_dict()
    state["conv6.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \['conv6.weight'\]"):
        load_backbone(tmp_path / "extra.pt")


def test_shape_mismatch_is_named():
    model = AlexNet("caffenet")
    state = AlexNet("caffenet").state_dict()
    state["fc7.weight"] = torch.zeros(4096, 100)
    with pytest.raises(CheckpointError, match=r"fc7\.weight \(4096, 100\) vs model \(4096, 4096\)"):
        load_state_dict_strict(model, state, source="x.pt")


@pytest.mark.slow
def test_bad_files_give_one_line_errors(tmp_path):
    good = tmp_path / "good.pt"
    save_backbone(AlexNet("caffenet"), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    resnet = tmp_path / "resnet.pt"
    torch.save({"layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3)}, resnet)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    wide = tmp_path / "wide.pt"
    state = AlexNet("caffenet").state_dict()
    state["conv1.weight"] = torch.zeros(128, 3, 11, 11)
    torch.save(state, wide)
    cases = {truncated: "truncated or corrupt", text: "not a PyTorch checkpoint", resnet: "not an AlexNet",
             listing: "not a checkpoint", wide: "wrong architecture", tmp_path / "absent.pt": "no such file"}
    for path, problem in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_backbone(path)
        message = str(info.value)
        assert message.startswith(str(path)) and problem in message and "\n" not in message, message


@pytest.mark.slow
def test_fingerprint_identifies_content(tmp_path):
    model = AlexNet("caffenet")
    fp = save_backbone(model, tmp_path / "a.pt")
    assert read_checkpoint(tmp_path / "a.pt").fingerprint == fp == fingerprint(model.state_dict())
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] += 1e-3
    assert fingerprint(model.state_dict()) != fp
    # a file whose tensors were edited after export is caught
    obj = torch.load(tmp_path / "a.pt", weights_only=True)
    obj["state_dict"]["fc6.bias"][0] += 1
    torch.save(obj, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="do not match the fingerprint"):
        read_checkpoint(tmp_path / "edited.pt")


@pytest.mark.slow
def test_export_folds_a_pretraining_checkpoint(tmp_path):
    bn_model = _with_bn_statistics(AlexNet("caffenet", batchnorm=True), seed=3)
    train_ckpt = tmp_path / "pretrain.pt"
    torch.save({"format": "cpfs-bench/pretrain", "arch": bn_model.arch.to_dict(),
                "state_dict": bn_model.state_dict(), "step": 10}, train_ckpt)
    fp = export(str(train_ckpt), str(tmp_path / "plain.pt"))
    loaded = load_backbone(tmp_path / "plain.pt")
    assert loaded.fingerprint == fp and not loaded.model.has_batchnorm
    assert loaded.meta["source_fingerprint"] == read_checkpoint(train_ckpt).fingerprint
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert _rel_err(loaded.model.eval()(x), bn_model(x)) < 1e-4
    # loading the BN checkpoint directly folds it the same way
    direct = load_backbone(train_ckpt)
    assert direct.report["folded_batchnorm"]
    with torch.no_grad():
        torch.testing.assert_close(direct.model.eval()(x), loaded.model(x))


@pytest.mark.slow
def test_random_backbone_is_seeded():
    a, b, c = random_backbone(0, num_classes=20), random_backbone(0, num_classes=20), random_backbone(1)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    torch.testing.assert_close(a.model.conv1.weight, b.model.conv1.weight)


# --- python -m backbones.features / backbones.info ----------------------------------------------------

def _write_image(path, size=(240, 200)):
    from PIL import Image
    pixels = (torch.rand(size[1], size[0], 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    Image.fromarray(pixels).save(path)
    return path


def test_features_cli_gives_one_line_errors(tmp_path, capsys):
    from backbones import features
    image = _write_image(tmp_path / "img.png")
    cases = [
        (["--ckpt", "random", "--image", str(image), "--layers", "conv1,conv9"], "conv9"),
        (["--ckpt", "random", "--image", str(tmp_path / "none.jpg"), "--layers", "conv1"], "none.jpg"),
        (["--ckpt", str(tmp_path / "none.pt"), "--image", str(image), "--layers", "conv1"], "none.pt"),
    ]
    for argv, named in cases:
        assert features.main(argv + ["--out", str(tmp_path / "f.npz")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and named in err
    assert not (tmp_path / "f.npz").exists()


@pytest.mark.slow
def test_features_cli_saves_rectified_activations(tmp_path, capsys):
    import json

    import numpy as np

    from backbones import features
    from backbones.inputs import load_input
    image = _write_image(tmp_path / "img.png", (300, 260))
    out = tmp_path / "f.npz"
    assert features.main(["--ckpt", "random", "--image", str(image), "--layers", "conv1,pool5,fc7",
                          "--out", str(out)]) == 0
    saved = np.load(out)
    assert saved["conv1"].shape == (96, 57, 57) and saved["pool5"].shape == (256, 6, 6)
    assert saved["fc7"].shape == (4096,) and saved["conv1"].min() >= 0  # after the ReLU
    model = random_backbone(0).model.eval()
    with torch.no_grad():
        expected = model.activations(load_input(image, 227).unsqueeze(0), ["fc7"])["fc7"][0]
    np.testing.assert_allclose(saved["fc7"], expected.numpy(), rtol=1e-5, atol=1e-6)
    meta = json.loads(str(saved["meta"]))
    assert meta["fingerprint"] == random_backbone(0).fingerprint and meta["resized"] and not meta["dense_fc"]
    # --no-resize: the image's own size; fc layers as dense maps
    assert features.main(["--ckpt", "random", "--image", str(image), "--layers", "conv1,fc6", "--no-resize",
                          "--out", str(out)]) == 0
    saved = np.load(out)  # 300x260 px: conv1 65x75, pool5 7x8, so fc6 is a 2x3 map
    assert saved["conv1"].shape == (96, 65, 75) and saved["fc6"].shape == (4096, 2, 3)
    small = _write_image(tmp_path / "small.png", (120, 120))
    assert features.main(["--ckpt", "random", "--image", str(small), "--layers", "fc7", "--no-resize",
                          "--out", str(out)]) == 2
    assert "smaller than fc6's 6x6 window" in capsys.readouterr().err


def test_info_cli_describes_a_checkpoint_on_one_screen(tmp_path, capsys):
    from backbones import info
    state = {"conv1.weight": torch.zeros(96, 3, 11, 11), "conv1.bias": torch.zeros(96),
             "bn1.running_mean": torch.zeros(96), "bn1.running_var": torch.ones(96),
             "bn1.num_batches_tracked": torch.tensor(3), "fc8.weight": torch.zeros(20, 4096),
             "fc8.bias": torch.zeros(20)}
    path = tmp_path / "c.pt"
    torch.save({"format": "cpfs-bench/alexnet", "arch": {"layout": "caffenet", "batchnorm": True, "num_classes": 20},
                "state_dict": state, "meta": {"method": "cpfs", "preset": "paper", "rescale": {"seed": 3},
                                              "image_ids": [f"{i:06d}" for i in range(200)]}}, path)
    assert info.main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    text = "\n".join(lines)
    assert len(lines) <= 40 and all(len(line) <= info.WIDTH for line in lines[1:])  # [0]: the path
    assert "layout caffenet" in text and "batchnorm    yes" in text and "fc8 with 20 classes" in text
    assert f"parameters   {96 * 3 * 121 + 96 + 20 * 4096 + 20:,}" in text  # BN statistics are not parameters
    assert fingerprint(state) in text and "conv1 96x3x11x11" in text
    assert 'method = "cpfs"' in text and "seed = 3" in text and "chars)" in text  # long values shortened
    assert info.main([str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.pt" in err
