"""VOC12 segmentation (P4): data split, sparse vs dense head, two-stage fine-tuning, exact resume
across the stage boundary, and the harness end to end on generated data (tiny schedules)."""
import dataclasses
import json

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbones import AlexNet
from backbones.checkpoint import random_backbone, save_backbone
from backbones.hypercolumn import sparse_hypercolumn
from evals import engine, voc12_seg
from evals.datasets.demo import make_demo
from evals.datasets.sbd import train_aug_items, voc12_val_items
from evals.datasets.voc import VOID_LABEL
from evals.run import main as run_main
from results import store
from runtime import loop
from runtime.config import chosen_values


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_data")
    make_demo(root, seed=0, scale="tiny", progress=False)
    return root


def _config(data_root, tmp_path, **changes):
    # crop 227: the smallest window with a non-empty fc6; a few points and steps keep it fast
    base = dataclasses.replace(voc12_seg.PRESETS["demo"], data_root=str(data_root), work_dir=str(tmp_path / "work"),
                               results_dir=str(tmp_path / "results"), workers=0, batch_size=2, points_per_image=16,
                               hidden=64, stage1_iterations=2, stage2_iterations=3, lr_milestones=(1,),
                               checkpoint_every=1, example_images=2)
    return dataclasses.replace(base, **changes)


def test_train_aug_excludes_every_val_id(data_root):
    train_ids = [i for i, _, _ in train_aug_items(data_root)]
    val_ids = {i for i, _, _ in voc12_val_items(data_root)}
    assert train_ids and val_ids and not val_ids & set(train_ids)
    # the generated SBD train split holds VOC12 val ids on purpose: they must have been removed
    sbd_train = (data_root / "benchmark_RELEASE" / "dataset" / "train.txt").read_text().split()
    assert val_ids & set(sbd_train)


def test_training_sample_crops_image_and_mask_together():
    rng = np.random.default_rng(0)
    mask = np.full((60, 50), VOID_LABEL, np.uint8)
    mask[20:40, 10:30] = 7  # the only labelled pixels
    array = np.zeros((60, 50, 3), np.uint8)
    array[mask == 7] = 255
    image, positions, labels = voc12_seg.training_sample(Image.fromarray(array), mask, rng, crop=96, points=32,
                                                          border=8)
    assert image.shape == (3, 96, 96) and positions.shape == (32, 2) and labels.shape == (32,)
    assert (labels == 7).all()  # padding and void pixels are never sampled
    ys, xs = positions.long().T
    assert (image[0, ys, xs] == image[0].max()).all()  # sampled pixels are the white (labelled) ones
    assert ((positions >= 8) & (positions < 88)).all()
    # P4 does not say whether void pixels may be drawn: labelled only is a declared choice ...
    assert voc12_seg.PRESETS["paper"].sample_labelled_only is True
    assert "sample_labelled_only" in {c["field"] for c in chosen_values(voc12_seg.PRESETS["paper"])}
    # ... and the other reading draws anywhere inside the border (void pixels then count for nothing)
    _, positions, labels = voc12_seg.training_sample(Image.fromarray(array), mask, rng, crop=96, points=256,
                                                     border=8, labelled_only=False)
    assert (labels == VOID_LABEL).any() and (labels == 7).any()
    assert ((positions >= 8) & (positions < 88)).all()


def test_sparse_head_at_grid_points_equals_dense_prediction():
    torch.manual_seed(0)
    loaded = random_backbone(0)
    config = dataclasses.replace(voc12_seg.PRESETS["demo"], hidden=64, test_chunk=500)  # chunks not dividing the grid
    model = voc12_seg.build_model(config, loaded).eval()
    with torch.no_grad():
        model.head.fc1.weight.normal_(0, 0.05)
        model.head.fc1.bias.normal_(0, 0.5)  # so that the ReLU is not all-zero or all-linear
    image = torch.randn(3, 150, 181)  # smaller than min_input: padded for the backbone only
    grid = voc12_seg.dense_grid_logits(model, image, 4, config.test_chunk, config.min_input)
    assert grid.shape == (voc12_seg.NUM_CLASSES, 38, 46)
    with torch.no_grad():
        acts = model.features(voc12_seg.pad_to(image[None], 227, 227))
        positions = voc12_seg.grid_positions(150, 181, 4)[None]
        columns = sparse_hypercolumn(acts, positions, model.geometry, voc12_seg.LAYERS)
        assert columns.shape[-1] == 96 + 256 + 384 + 384 + 256 + 4096 + 4096
        sparse = model.head(columns)[0]  # the textbook head on explicit hypercolumns
        # and the training path (projection chosen per layer) gives the same logits
        train_path = model(voc12_seg.pad_to(image[None], 227, 227), positions)[0]
    torch.testing.assert_close(grid.reshape(voc12_seg.NUM_CLASSES, -1).T, sparse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(train_path, sparse, rtol=1e-4, atol=1e-4)
    # upsampling keeps the grid values at the grid pixels
    full = voc12_seg.upsample_logits(grid, 150, 181, 4)
    torch.testing.assert_close(full[:, ::4, ::4], grid)


def _work_dir(config, fp):
    """The run's work folder: <work_dir>/voc12_seg/<preset>/<fp16>-<run key>-seed<N>."""
    (work,) = (Path(config.work_dir) / voc12_seg.TASK / config.preset).glob(f"{fp[:16]}-*-seed{config.seed}")
    return work


def _tensors(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.fixture(scope="module")
def reference_run(data_root, tmp_path_factory):
    """One uninterrupted run (random backbone): its config, metrics and stage checkpoints."""
    config = _config(data_root, tmp_path_factory.mktemp("reference"))
    metrics = voc12_seg.run(config)
    fp = engine.load_for_eval("random", 0, num_classes=None, new_head=True).fingerprint
    work = _work_dir(config, fp)
    return config, metrics, work


@pytest.mark.slow
def test_stage1_freezes_backbone_and_stage2_changes_it(reference_run):
    config, _, work = reference_run
    torch.manual_seed(config.seed)  # as run() does before building the head
    loaded = engine.load_for_eval("random", 0, num_classes=None, new_head=True)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    head_before = voc12_seg.build_model(config, loaded).head.state_dict()
    stage1, stage2 = _tensors(work / "stage1" / "checkpoint.pt"), _tensors(work / "stage2" / "checkpoint.pt")
    for name, value in before.items():
        assert torch.equal(stage1[f"backbone.{name}"], value), name
    assert not torch.equal(stage1["head.fc1.weight"], head_before["fc1.weight"])
    changed = [n for n in before if not torch.equal(stage2[f"backbone.{n}"], stage1[f"backbone.{n}"])]
    assert {n.split(".")[0] for n in changed} == {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"}


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_exact_resume_across_the_stage_boundary(reference_run, data_root, tmp_path, monkeypatch):
    reference, reference_metrics, reference_work = reference_run
    expected = _tensors(reference_work / "stage2" / "checkpoint.pt")
    config = _config(data_root, tmp_path)
    original_save, saves = loop.Trainer.save, []
    crash_after = {2, 3}  # stage 1's last checkpoint (the boundary), then stage 2's first

    def crashing_save(self):
        original_save(self)
        saves.append(self.state.step)
        if len(saves) in crash_after:
            raise Interrupted

    monkeypatch.setattr(loop.Trainer, "save", crashing_save)
    for _ in crash_after:
        with pytest.raises(Interrupted):
            voc12_seg.run(config)
        torch.manual_seed(1234)  # the restarted process's RNG must not matter
    metrics = voc12_seg.run(config)
    assert saves == [1, 2, 1, 2, 3]  # 2 stage-1 saves, then stage 2 resumed from its step 1
    resumed = _tensors(_work_dir(config, fingerprint_of_random())
                       / "stage2" / "checkpoint.pt")
    assert resumed.keys() == expected.keys()
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name
    assert metrics["mIoU"] == reference_metrics["mIoU"]


def fingerprint_of_random():
    return engine.load_for_eval("random", 0, num_classes=None, new_head=True).fingerprint


@pytest.mark.slow
def test_end_to_end_writes_a_valid_record_and_pictures(data_root, tmp_path):
    model = AlexNet("caffenet")
    ckpt = tmp_path / "model.pt"
    fp = save_backbone(model, ckpt, meta={"label": "Ours", "supervision": "Optical-flow"})
    config = _config(data_root, tmp_path, ckpt=str(ckpt))
    metrics = voc12_seg.run(config)
    (record,) = store.load_records(tmp_path / "results")
    store.validate_record(record)
    assert record["task"] == "voc12_seg" and record["fingerprint"] == fp and record["label"] == "Ours"
    assert record["metrics"]["mIoU"] == pytest.approx(metrics["mIoU"])
    assert 0.0 <= metrics["mIoU"] <= 100.0 and 0.0 < metrics["all_background_mIoU"] < 100.0
    assert set(record["metrics"]["per_class_IoU"]) == set(voc12_seg.CLASS_NAMES)
    assert record["metrics"]["stage1_backbone_frozen_check"] == "passed"
    record_file = store.record_path(tmp_path / "results", "voc12_seg", fp, 0, "demo", record["run_key"])
    pictures = record_file.with_name(record["metrics"]["pictures"])
    assert pictures == record_file.with_name(record_file.stem + "_examples.png")
    with Image.open(pictures) as picture:
        assert picture.format == "PNG" and picture.width > 3 * 50 and picture.height > 2 * 100
    assert not [p for p in record_file.parent.iterdir() if p.name.startswith(store.TMP_PREFIX)]
    # finished: a second run neither redoes nor rewrites it
    before = record_file.read_bytes()
    assert voc12_seg.run(config)["mIoU"] == pytest.approx(metrics["mIoU"])
    assert record_file.read_bytes() == before


def test_print_config_shows_protocol_and_marks_chosen_values(capsys):
    assert run_main(["--task", "voc12_seg", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    config = printed["config"]
    assert config["layers"] == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]
    assert (config["crop"], config["points_per_image"], config["sample_border"]) == (448, 128, 32)
    assert (config["hidden"], config["head_dropout"], config["batch_size"]) == (1024, 0.5, 10)
    assert (config["lr"], config["momentum"], config["weight_decay"]) == (1e-3, 0.9, 5e-4)
    assert config["lr_milestones"] == [22_500, 30_000] and config["stage2_iterations"] == 40_000
    assert config["test_stride"] == 4
    assert {"stage1_iterations", "stage1_lr"} <= set(printed["chosen"])
    assert set(printed["chosen"]) <= set(config)
