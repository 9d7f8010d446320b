"""VOC07 classification and ImageNet linear probing end to end on generated data (tiny schedules)."""
import dataclasses
import json

import pytest
import torch

from backbones import AlexNet
from backbones.checkpoint import save_backbone
from evals import engine, in1k_linear, voc07_cls
from evals.datasets.demo import make_demo
from evals.run import main as run_main
from results import store


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_data")
    make_demo(root, seed=0, scale="tiny", progress=False)
    return root


def _config(module, data_root, tmp_path, **changes):
    base = dataclasses.replace(module.PRESETS["demo"], data_root=str(data_root), work_dir=str(tmp_path / "work"),
                               results_dir=str(tmp_path / "results"), workers=0)
    return dataclasses.replace(base, **changes)


@pytest.mark.slow
def test_voc07_cls_end_to_end_writes_a_valid_record(data_root, tmp_path):
    model = AlexNet("caffenet")
    ckpt = tmp_path / "model.pt"
    fp = save_backbone(model, ckpt, meta={"label": "Ours", "supervision": "Optical-flow"})
    config = _config(voc07_cls, data_root, tmp_path, ckpt=str(ckpt), iterations=4, crop=64, test_views=2,
                     checkpoint_every=2)
    metrics = voc07_cls.run(config)
    records = store.load_records(tmp_path / "results")
    assert len(records) == 1
    record = records[0]
    assert record["task"] == "voc07_cls" and record["fingerprint"] == fp and record["preset"] == "demo"
    assert record["label"] == "Ours" and record["supervision"] == "Optical-flow"
    assert record["metrics"]["mAP"] == pytest.approx(metrics["mAP"])
    assert set(record["metrics"]["per_class_AP"]) == set(voc07_cls.VOC_CLASSES)
    assert "average_precision_score" in record["metric_definitions"]["AP"]
    assert record["config"]["iterations"] == 4 and record["provenance"]["split_hash"]
    assert (tmp_path / "work" / "voc07_cls" / "demo").is_dir()
    # a second run with the same (task, fingerprint, seed, preset) does not redo or clobber it
    record_file = store.record_path(tmp_path / "results", "voc07_cls", fp, 0, "demo", record["run_key"])
    before = record_file.read_bytes()
    assert voc07_cls.run(config)["mAP"] == pytest.approx(metrics["mAP"])
    assert record_file.read_bytes() == before


def test_voc07_cls_fc8_only_setting_freezes_the_rest(data_root, tmp_path):
    config = _config(voc07_cls, data_root, tmp_path, train_layers="fc8")
    model = voc07_cls.build_model(config, engine.load_for_eval("random", 0, num_classes=20, new_head=True))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc8"}
    assert torch.allclose(model.fc8.bias, torch.full((20,), 0.1))
    assert model.fc8.weight.std().item() == pytest.approx(0.01, rel=0.1)


@pytest.mark.slow
def test_in1k_linear_end_to_end_through_the_cli(data_root, tmp_path, capsys):
    args = ["--task", "in1k_linear", "--preset", "demo", "--ckpt", "random", "--seed", "2",
            "--data-root", str(data_root), "--work-dir", str(tmp_path / "work"),
            "--results-dir", str(tmp_path / "results"), "--workers", "0", "--set", "iterations=3"]
    assert run_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["top1"]) == set(in1k_linear.LAYERS)
    (record,) = store.load_records(tmp_path / "results")
    assert record["preset"] == "demo+custom" and record["label"] == "Random" and record["seed"] == 2
    assert record["metrics"]["backbone_frozen_check"] == "passed"
    assert all(0.0 <= v <= 100.0 for v in record["metrics"]["top1"].values())


def test_bad_checkpoint_is_a_one_line_error(data_root, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    args = ["--task", "voc07_cls", "--preset", "demo", "--ckpt", str(bad), "--data-root", str(data_root),
            "--results-dir", str(tmp_path / "results")]
    assert run_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(bad) in err and "\n" not in err
    assert store.load_records(tmp_path / "results") == []


def test_voc07_cls_biases_train_at_twice_the_lr_with_the_weights_decay(data_root, tmp_path):
    """P2: voc-cls's train_cls.py sets ``setLR(t, 1, 2)`` and ``setDecay(t, 1, 1)``: biases at 2x the
    learning rate and the same weight-decay multiplier (1) as the weights."""
    paper = voc07_cls.PRESETS["paper"]
    assert (paper.bias_lr_mult, paper.bias_decay_mult) == (2.0, 1.0)
    config = _config(voc07_cls, data_root, tmp_path, train_layers="fc6-8", momentum=0.0)
    model = voc07_cls.build_model(config, engine.load_for_eval("random", 0, num_classes=20, new_head=True))
    weights_group, biases_group = voc07_cls.make_optimizer(model, config).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in weights_group["params"]) == ["fc6.weight", "fc7.weight", "fc8.weight"]
    assert sorted(names[id(p)] for p in biases_group["params"]) == ["fc6.bias", "fc7.bias", "fc8.bias"]
    assert (weights_group["lr"], weights_group["weight_decay"]) == (config.lr, config.weight_decay)
    assert (biases_group["lr"], biases_group["weight_decay"]) == (2 * config.lr, config.weight_decay)
    # one plain SGD step: each parameter moves by its group's lr * (grad + decay * value)
    config = dataclasses.replace(config, weight_decay=0.5)
    optimizer = voc07_cls.make_optimizer(model, config)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    optimizer.step()
    for name in ("fc8.weight", "fc8.bias"):
        lr = config.lr * (2.0 if name.endswith("bias") else 1.0)
        expected = before[name] - lr * (1.0 + 0.5 * before[name])
        assert torch.allclose(dict(model.named_parameters())[name], expected, atol=1e-7), name


@pytest.mark.slow
def test_voc07_cls_two_steps_in_bf16_channels_last_on_cpu_stay_close_to_fp32(data_root, tmp_path, monkeypatch):
    """amp and channels_last are operational (same run key); under bf16 + channels_last on CPU the
    harness trains and tests with float32 logits into the loss and the metric, finite, and the first
    step's loss (same weights, same batch) is close to fp32's."""
    seen = {}
    real_loss = voc07_cls.multilabel_loss

    def loss_spy(logits, labels):
        loss = real_loss(logits, labels)
        seen.setdefault("dtypes", set()).add((logits.dtype, loss.dtype))
        seen.setdefault("losses", []).append(float(loss.detach()))
        return loss

    monkeypatch.setattr(voc07_cls, "multilabel_loss", loss_spy)
    real_ap = voc07_cls.metrics.voc_classification_ap
    monkeypatch.setattr(voc07_cls.metrics, "voc_classification_ap",
                        lambda scores, labels: seen.setdefault("scores", scores) is not None and real_ap(scores, labels))
    runs = {}
    for amp, layout in (("off", False), ("bf16", True)):
        seen.clear()
        config = _config(voc07_cls, data_root, tmp_path / amp, iterations=2, crop=64, test_views=1,
                         amp=amp, channels_last=layout)
        metrics = voc07_cls.run(config)
        (record,) = store.load_records(tmp_path / amp / "results")
        runs[amp] = (seen["losses"], record["run_key"], metrics, seen["dtypes"], seen["scores"])
    losses, key, metrics, dtypes, scores = runs["bf16"]
    assert key == runs["off"][1]  # operational: the same run
    assert dtypes == {(torch.float32, torch.float32)} and scores.dtype.name == "float64"
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[0] == pytest.approx(runs["off"][0][0], rel=0.05)
    assert 0.0 <= metrics["mAP"] <= 100.0
