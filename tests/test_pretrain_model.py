"""The pretraining networks (pretrain/model.py): AlexNet + sparse hypercolumn + MLP (P1, §4.1)."""
import pytest
import torch

from backbones.alexnet import AlexNet
from pretrain.model import HYPERCOLUMN_LAYERS, CPFSNet, DirectRegressionNet, build_model


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return CPFSNet()


def _inputs(batch=2, points=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 224, 224, generator=g), torch.randint(0, 224, (batch, points, 2), generator=g)


def test_embeddings_have_shape_b_n_16_and_unit_norm(net):
    images, positions = _inputs()
    emb = net.train()(images, positions)
    assert emb.shape == (2, 16, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2, 16), atol=1e-5)


def test_hypercolumn_concatenates_the_paper_layers(net):
    assert net.layers == HYPERCOLUMN_LAYERS == ("conv1", "pool1", "conv3", "pool5", "fc7")
    images, positions = _inputs()
    with torch.no_grad():
        columns = net.eval().hypercolumn(images, positions)
    assert columns.shape == (2, 16, 96 + 96 + 384 + 256 + 4096) and net.hypercolumn_channels == 4928
    assert net.head.fc1.in_features == 4928 and net.head.fc2.out_features == 16


@pytest.mark.parametrize("points", [16, 1024])  # 1024 > 27x27 pool1 units: more layers are projected first
def test_projecting_before_sampling_is_the_same_function(net, points):
    images, positions = _inputs(points=points)
    with torch.no_grad():
        net.eval()
        fast = net.pixel_outputs(images, positions)
        plain = net.head(net.hypercolumn(images, positions))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_backbone_layer_and_the_head(net):
    net.train().zero_grad(set_to_none=True)
    images, positions = _inputs()
    net(images, positions).square().sum().backward()  # any loss that depends on the embeddings
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"):
        grad = getattr(net.backbone, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert net.head.fc1.weight.grad.abs().sum() > 0
    assert getattr(net.backbone, "fc8") is None  # the hypercolumn stops at fc7


def test_batchnorm_is_parameter_free_and_uses_batch_statistics_in_train_mode(net):
    bns = [getattr(net.backbone, f"bn{i}") for i in range(1, 8)]
    assert all(not bn.affine for bn in bns)  # P1: parameter-free BN after every conv/fc
    net.train()
    assert all(bn.training for bn in bns)
    before = net.backbone.bn1.running_mean.clone()
    images, positions = _inputs()
    with torch.no_grad():
        alone = net(images[:1].repeat(2, 1, 1, 1), positions)[0]
        paired = net(images, positions)[0]
    assert not torch.equal(before, net.backbone.bn1.running_mean)  # running statistics are updated
    assert not torch.allclose(alone, paired)  # batch statistics: an image's output depends on its batch
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(images[:1].repeat(2, 1, 1, 1), positions)[0], net(images, positions)[0], atol=1e-5)


def test_backbone_is_an_exportable_caffenet_alexnet(net):
    assert isinstance(net.backbone, AlexNet) and net.backbone.arch.to_dict()["layout"] == "caffenet"
    assert net.backbone.has_batchnorm
    assert set(net.backbone.state_dict()) == set(AlexNet("caffenet", batchnorm=True).state_dict())


def test_direct_regression_net_has_two_16_way_heads():
    torch.manual_seed(0)
    direct = build_model("direct")
    assert isinstance(direct, DirectRegressionNet)
    images, positions = _inputs()
    logits_x, logits_y = direct.train()(images, positions)
    assert logits_x.shape == logits_y.shape == (2, 16, 16)
    assert not torch.allclose(logits_x, logits_y)
    with pytest.raises(ValueError, match="unknown method"):
        build_model("kta")
