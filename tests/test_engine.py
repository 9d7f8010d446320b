"""The shared harness machinery: data order, exact resume, protocol pieces, the entry point."""
import itertools
import json
import re

import pytest
import torch
from torch import nn

from evals.in1k_linear import FrozenWeightsChanged, LinearProbes, assert_frozen
from evals.run import main as run_main
from evals.voc07_cls import multilabel_loss
from backbones import AlexNet
from backbones.checkpoint import fingerprint
from runtime.loop import NonFiniteLossError
from runtime import loop
from runtime import data as rdata
from runtime import distributed


def test_epoch_sampler_is_seeded_and_restartable():
    full = list(itertools.islice(iter(rdata.EpochSampler(7, seed=3)), 20))
    assert full == list(itertools.islice(iter(rdata.EpochSampler(7, seed=3)), 20))
    assert sorted(i for e, i in full[:7]) == list(range(7)) and {e for e, _ in full[:7]} == {0}
    assert [i for _, i in full[:7]] != [i for _, i in full[7:14]]  # a new permutation per epoch
    restarted = list(itertools.islice(iter(rdata.EpochSampler(7, seed=3, start_epoch=1, start_offset=3)), 10))
    assert restarted == full[10:20]
    ranks = [list(itertools.islice(iter(rdata.EpochSampler(8, 0, info=distributed.DistInfo(r, 2))), 4)) for r in (0, 1)]
    assert sorted(i for part in ranks for _, i in part) == list(range(8))


class _Noisy(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(13, 4, generator=g), torch.randint(0, 3, (13,), generator=g)

    def __len__(self):
        return 13

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _train(work_dir, total, stop_at=None, workers=0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = loop.Trainer(model=model, optimizer=opt, scheduler=loop.step_lr(opt, 4, 0.5),
                             total_steps=stop_at or total, work_dir=work_dir, checkpoint_every=3, grad_clip=1.0)
    trainer.resume()
    trainer.total_steps = stop_at or total
    data = rdata.Augmented(_Noisy(), lambda s, rng: (s[0] + torch.from_numpy(rng.normal(size=4)).float(), s[1]), 5)
    trainer.run(lambda e, o: rdata.training_loader(data, 5, 5, workers, e, o),
                lambda b: (nn.functional.cross_entropy(model(b[0]), b[1]), {}), 5, len(data))
    return model


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_training_matches_uninterrupted_bit_for_bit(tmp_path, workers):
    straight = _train(tmp_path / "a", 11, workers=workers)
    _train(tmp_path / "b", 11, stop_at=7, workers=workers)  # "killed" after step 7 (checkpoint at 7)
    resumed = _train(tmp_path / "b", 11, workers=workers)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    fresh = _train(tmp_path / "c", 11, stop_at=7, workers=workers)
    assert not torch.equal(fresh[0].weight, straight[0].weight)


def _linear_trainer(work_dir, **options):
    """A seeded linear classifier on _Noisy and its Trainer (10 steps, no TensorBoard or bar)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    options = {"checkpoint_every": 100, "total_steps": 10, **options}
    trainer = loop.Trainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=None,
                             work_dir=work_dir, tensorboard=False, progress=False, **options)
    return model, trainer


def _run_linear(model, trainer, nan_at_call=None):
    """Train on _Noisy; the loss of the ``nan_at_call``-th batch is multiplied by NaN."""
    calls = itertools.count(1)

    def step_fn(batch):
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        return loss * (float("nan") if next(calls) == nan_at_call else 1.0), {}

    data = rdata.Augmented(_Noisy(), lambda sample, rng: sample, 5)  # (epoch, index) keys -> samples
    return trainer.run(lambda e, o: rdata.training_loader(data, 5, 5, 0, e, o), step_fn, 5, len(data))


def test_after_step_hook_stops_at_its_step_with_that_step_saved(tmp_path, capsys):
    seen = []

    def stop_at_4(state):
        seen.append(state.step)
        return state.step == 4

    model, trainer = _linear_trainer(tmp_path / "a", scaler=torch.amp.GradScaler("cpu", enabled=False),
                                     after_step=stop_at_4)
    assert _run_linear(model, trainer).step == 4 and seen == [1, 2, 3, 4] and trainer.saved_step == 4
    ckpt = torch.load(trainer.checkpoint_path, map_location="cpu", weights_only=True)
    assert ckpt["state"]["step"] == 4 and ckpt["scaler"] is None  # a disabled scaler has no state to keep
    assert torch.equal(ckpt["model"]["weight"], model.weight)
    # a disabled GradScaler changes nothing: the same 4 steps without one give the same weights
    plain, trainer = _linear_trainer(tmp_path / "b", total_steps=4)
    _run_linear(plain, trainer)
    assert torch.equal(plain.weight, model.weight) and torch.equal(plain.bias, model.bias)
    resumed_model, again = _linear_trainer(tmp_path / "a", scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert again.resume() and again.state.step == 4 and torch.equal(resumed_model.weight, model.weight)
    assert f"[train] resumed from {tmp_path / 'a' / 'checkpoint.pt'} at step 4" in capsys.readouterr().out


def test_nan_loss_names_the_last_checkpoint_only_once_one_was_written(tmp_path):
    model, trainer = _linear_trainer(tmp_path / "first", checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=r"at step 1\b.*no checkpoint"):
        _run_linear(model, trainer, nan_at_call=1)
    assert not trainer.checkpoint_path.exists()
    model, trainer = _linear_trainer(tmp_path / "later", checkpoint_every=2)
    path = trainer.checkpoint_path
    with pytest.raises(NonFiniteLossError, match=rf"at step 3\b.*last good checkpoint is {re.escape(str(path))} "
                                                 rf"\(step 2\)"):
        _run_linear(model, trainer, nan_at_call=3)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["state"]["step"] == 2  # and the NaN step changed no weight:
    assert torch.equal(ckpt["model"]["weight"], model.weight) and torch.equal(ckpt["model"]["bias"], model.bias)
    assert not loop.TRAINING.is_set()


def test_multilabel_loss_ignores_difficult():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    with_difficult = multilabel_loss(logits, torch.tensor([[1, 0, -1]]))
    expected = nn.functional.softplus(-logits[0, 0]) + nn.functional.softplus(logits[0, 1])
    torch.testing.assert_close(with_difficult, expected)
    assert multilabel_loss(logits, torch.tensor([[1, 0, 1]])) > with_difficult


def test_frozen_check_fires_when_a_weight_changes():
    model = AlexNet("caffenet").eval()
    before = fingerprint(model.state_dict())
    assert_frozen(model, before)
    with torch.no_grad():
        model.conv4.weight[0, 0, 0, 0] += 1e-6
    with pytest.raises(FrozenWeightsChanged, match="changed during linear probing"):
        assert_frozen(model, before)


def test_linear_probe_feature_sizes_follow_p5():
    model = AlexNet("caffenet").eval()
    sizes = dict(zip(("conv1", "conv2", "conv3", "conv4", "conv5"), (10, 6, 5, 5, 6)))
    probes = LinearProbes({k: getattr(model, k).out_channels for k in sizes}, sizes, 1000)
    dims = {k: probes.heads[k].in_features for k in sizes}
    assert dims == {"conv1": 9600, "conv2": 9216, "conv3": 9600, "conv4": 9600, "conv5": 9216}
    assert not any(norm.affine for norm in probes.norms.values())
    logits = probes(model.activations(torch.randn(2, 3, 227, 227), sizes))
    assert {k: tuple(v.shape) for k, v in logits.items()} == {k: (2, 1000) for k in sizes}


def test_paper_presets_print_the_protocol_values(capsys):
    assert run_main(["--task", "voc07_cls", "--print-config"]) == 0
    cls = json.loads(capsys.readouterr().out)["config"]
    assert (cls["iterations"], cls["batch_size"], cls["lr"], cls["lr_step"], cls["lr_gamma"]) == \
        (80_000, 16, 1e-3, 10_000, 0.5)
    assert (cls["momentum"], cls["weight_decay"], cls["grad_clip"], cls["crop"], cls["test_views"]) == \
        (0.9, 1e-6, 10.0, 227, 10)
    assert cls["scale_range"] == [0.5, 2.0] and cls["train_layers"] == "all" and cls["preset"] == "paper"
    assert run_main(["--task", "in1k_linear", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    lin = out["config"]
    assert lin["pool_sizes"] == [10, 6, 5, 5, 6] and lin["batch_size"] == 64 and lin["iterations"] == 140_000
    assert lin["crop"] == 227 and {"lr", "lr_milestones", "weight_decay"} <= set(out["chosen"])


def test_changing_a_protocol_value_renames_the_preset(capsys):
    assert run_main(["--task", "voc07_cls", "--print-config", "--set", "iterations=10", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    config = json.loads(captured.out)["config"]
    assert config["preset"] == "paper+custom" and config["iterations"] == 10 and config["seed"] == 3
    assert "iterations" in captured.err
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        run_main(["--task", "voc07_cls", "--print-config", "--set", "no_such_field=1"])
