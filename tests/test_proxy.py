"""The proxy-task skill (pretrain/proxy.py): its two anchors on real flows, the oracle as a bound
on a network's loss, the CLI, and (slow) its report during pretraining leaving the weights alone."""
import json
import math

import pytest
import torch

from pretrain import proxy
from pretrain import train as pretrain_train
from pretrain.data import FlowPairDataset
from pretrain.loss import cpfs_loss, flow_kernel
from test_train import tiny, write_flow_folder
from tests.helpers import pretrain_tensors

SIGMA2 = 0.01
PIXELS = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_flow_folder(tmp_path_factory.mktemp("proxydata"), train_pairs=4, val_pairs=2)


@pytest.fixture(scope="module")
def batch(data):
    """The two validation pairs as the trainer's validation sees them (centre crop, fixed pixels)."""
    dataset = FlowPairDataset(data, "val", train=False, num_pixels=PIXELS)
    return next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))


def test_constant_embedding_scores_0_and_the_oracle_1(batch):
    flows = batch["flow"]
    uniform = proxy.uniform_loss(flows, SIGMA2)
    # any constant vector is the same constant embedding (eq. 2 normalises it)
    constant = torch.tensor([0.3, -2.0, 1.0]).expand(flows.shape[0], PIXELS, 3)
    assert float(cpfs_loss(constant, flows, SIGMA2)) == pytest.approx(uniform, abs=1e-6)
    # the code's definition: log(N - 1 + e^-1) + S_f(p, p) per pixel (not log N: eq. 5's diagonal)
    k = flow_kernel(flows, SIGMA2)
    off_diagonal = k.exp().sum(-1) - k.diagonal(dim1=-2, dim2=-1).exp()
    s_ff = 1.0 / (1.0 + off_diagonal)  # eq. (4): S_f(p, p), softmax of K_f with logit 0 on the diagonal
    assert uniform == pytest.approx(math.log(PIXELS - 1 + math.exp(-1)) + float(s_ff.mean()), abs=1e-5)

    emb = proxy.oracle_embeddings(flows, SIGMA2, dim=16)
    oracle = float(cpfs_loss(emb, flows, SIGMA2))  # what oracle_loss returns
    assert oracle < uniform - 1e-3  # the flows have structure to learn
    scored = lambda embeddings: proxy.ProxyScore(float(cpfs_loss(embeddings, flows, SIGMA2)), uniform, oracle, 2)
    assert scored(constant).skill == pytest.approx(0.0, abs=1e-4)
    assert scored(emb).skill == pytest.approx(1.0, abs=1e-4)
    assert math.isnan(proxy.skill(1.0, 2.0, 2.0))  # no structure: no score


def test_the_oracle_bounds_a_random_network(batch):
    net, sigma2, _ = proxy.load_network("random", seed=0, device=torch.device("cpu"))
    rng_before = torch.get_rng_state()
    score = proxy.score_split(net, [batch], sigma2, net.embedding_dim)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the oracle draws from its own generator
    assert score.pairs == 2 and score.loss_oracle <= score.loss <= score.loss_uniform + 0.05
    assert score.loss_oracle < score.loss_uniform


def test_cli_json_names_the_fields(data, capsys):
    assert proxy.main(["--ckpt", "random", "--data", str(data), "--pairs", "1", "--num-pixels", "16",
                       "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert {"skill", "loss", "loss_uniform", "loss_oracle", "pairs", "sigma2", "split", "ckpt"} <= set(result)
    assert result["pairs"] == 1 and result["split"] == "val" and result["ckpt"] == "random"
    assert result["sigma2"] == pretrain_train.Config().sigma2_init
    assert result["skill"] == pytest.approx(proxy.skill(result["loss"], result["loss_uniform"], result["loss_oracle"]))


def test_cli_errors_are_one_line(data, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    for argv in (["--ckpt", "random", "--data", str(tmp_path / "missing")],
                 ["--ckpt", str(bad), "--data", str(data)],
                 ["--ckpt", str(tmp_path / "none.pt"), "--data", str(data)],
                 ["--ckpt", "random", "--data", str(data), "--pairs", "0"]):
        assert proxy.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err

    class Direct:  # what load_pretrain_checkpoint returns for a direct-regression run
        method = "direct"
    monkeypatch.setattr("pretrain.model.load_pretrain_checkpoint", lambda *a, **k: (Direct(), None, {}))
    assert proxy.main(["--ckpt", str(bad), "--data", str(data)]) == 2
    assert "CPFS checkpoints only" in capsys.readouterr().err


def _weights(path):
    ckpt, flat = pretrain_tensors(path)
    flat["torch_rng"] = ckpt["torch_rng"]
    return flat


@pytest.mark.slow
def test_training_logs_the_skill_and_keeps_the_weights_bit_identical(data, tmp_path, capsys):
    with_skill = pretrain_train.train(tiny(data, tmp_path / "on"))
    without = pretrain_train.train(tiny(data, tmp_path / "off", val_skill=False))
    a, b = _weights(tmp_path / "on" / "last.pt"), _weights(tmp_path / "off" / "last.pt")
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    assert with_skill["best_val_loss"] == without["best_val_loss"]

    vals = [json.loads(line) for line in (tmp_path / "on" / "log.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "val"]
    assert [v["step"] for v in vals] == [2, 4]
    for v in vals:
        assert v["loss_oracle"] < v["loss_uniform"]
        assert v["skill"] == pytest.approx(proxy.skill(v["loss"], v["loss_uniform"], v["loss_oracle"]))
    assert with_skill["best_val_skill"] == next(v["skill"] for v in vals if v["step"] == with_skill["best_step"])
    assert without["best_val_skill"] is None

    # the CLI on the run's best.pt at the run's own pixels and sigma reproduces the logged numbers
    capsys.readouterr()
    assert proxy.main(["--ckpt", str(tmp_path / "on" / "best.pt"), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    best = next(v for v in vals if v["step"] == with_skill["best_step"])
    assert result["pairs"] == 2 and result["num_pixels"] == 16
    assert result["loss"] == pytest.approx(best["loss"], abs=1e-4)
    assert result["loss_oracle"] == pytest.approx(best["loss_oracle"], abs=1e-4)
    assert result["skill"] == pytest.approx(best["skill"], abs=1e-2)
