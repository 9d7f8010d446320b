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
