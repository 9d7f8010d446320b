"""VOC07 detection (P3): proposals cache and .mat import, RoI sampling, box coding, end to end."""
import dataclasses
import re

import numpy as np
import pytest
import scipy.io
import torch

from evals import proposals, voc07_det
from evals.datasets.demo import make_demo
from evals.datasets.voc import VOC_CLASSES
from results import store


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("det_data")
    make_demo(root, seed=0, scale="tiny", progress=False)
    return root


# ----------------------------------------------------------------------------- proposals


def test_proposal_cache_round_trip_and_resume(data_root, tmp_path):
    voc_root = data_root / "VOCdevkit" / "VOC2007"
    ids = (voc_root / "ImageSets" / "Main" / "test.txt").read_text().split()[:3]
    summary = proposals.compute_proposals(voc_root, "test", tmp_path, "fast", workers=0, ids=ids, progress=False)
    assert summary["computed"] == 3 and summary["skipped"] == 0
    for image_id in ids:
        path = proposals.cache_path(tmp_path, "fast", image_id)
        assert path == tmp_path / "fast" / f"{image_id}.npy"
        boxes = proposals.load_boxes(tmp_path, "fast", image_id)
        assert boxes.dtype == np.int32 and boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 0
        assert (boxes[:, :2] >= 1).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    # cached images are skipped; reruns are reproducible (OpenCV's rand() is seeded)
    first = proposals.load_boxes(tmp_path, "fast", ids[0])
    assert proposals.compute_proposals(voc_root, "test", tmp_path, "fast", workers=0, ids=ids,
                                       progress=False)["skipped"] == 3
    proposals.cache_path(tmp_path, "fast", ids[0]).unlink()
    proposals.compute_proposals(voc_root, "test", tmp_path, "fast", workers=0, ids=ids, progress=False)
    assert np.array_equal(proposals.load_boxes(tmp_path, "fast", ids[0]), first)
    # saving is atomic and exact
    boxes = np.array([[1, 2, 30, 40], [5, 5, 6, 7]], np.int32)
    proposals.save_boxes(proposals.cache_path(tmp_path, "quality", "x"), boxes)
    assert np.array_equal(proposals.load_boxes(tmp_path, "quality", "x"), boxes)
    assert not list((tmp_path / "quality").glob(".tmp-*"))


def test_opencv_rects_become_voc_boxes_and_shards_split_the_ids(monkeypatch):
    # (x, y, w, h) 0-based covers pixels x..x+w-1 -> 1-based x+1..x+w
    assert proposals.rects_to_voc(np.array([[0, 0, 10, 5]]), 1.0, 20, 20).tolist() == [[1, 1, 10, 5]]
    # found on a half-size copy: scaled back to cover the same region, clipped to the image
    assert proposals.rects_to_voc(np.array([[2, 3, 4, 10]]), 0.5, 11, 20).tolist() == [[5, 7, 11, 20]]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert proposals.shard_from_env(None, None) == (3, 4)
    assert proposals.shard_from_env(1, 2) == (1, 2)


def test_fast_rcnn_mat_file_is_read_as_x1_y1_x2_y2(tmp_path):
    # Fast R-CNN's selective_search data: cells of ids and of (K, 4) boxes in y1, x1, y2, x2 order
    images = np.empty((2, 1), dtype=object)
    images[0, 0], images[1, 0] = "000005", "000007"
    boxes = np.empty((1, 2), dtype=object)
    boxes[0, 0] = np.array([[10, 20, 110, 220], [1, 1, 5, 9]], np.float64)   # y1 x1 y2 x2
    boxes[0, 1] = np.array([[3, 4, 30, 40]], np.float64)
    path = tmp_path / "voc_2007_trainval.mat"
    scipy.io.savemat(path, {"images": images, "boxes": boxes})
    loaded = proposals.load_mat_proposals(path)
    assert list(loaded) == ["000005", "000007"]
    assert loaded["000005"].tolist() == [[20, 10, 220, 110], [1, 1, 9, 5]]   # x1 y1 x2 y2
    assert loaded["000007"].tolist() == [[4, 3, 40, 30]] and loaded["000007"].dtype == np.int32
    assert proposals.import_mat(path, tmp_path / "cache", ["000007"]) == 1
    assert proposals.load_boxes(tmp_path / "cache", "mat", "000007").tolist() == [[4, 3, 40, 30]]
    with pytest.raises(ValueError, match="no boxes"):
        proposals.import_mat(path, tmp_path / "cache", ["000009"])


# ----------------------------------------------------------------------------- Fast R-CNN pieces


def test_roi_sampling_follows_fast_rcnn():
    rng = np.random.default_rng(0)
    gt = np.array([[10, 10, 49, 49], [100, 100, 139, 159]], np.float32)
    gt_labels = np.array([3, 15])
    # many foreground candidates (shifted copies of the boxes), backgrounds and far-away boxes
    shifts = rng.integers(-4, 5, size=(200, 2)).astype(np.float32)
    near = np.concatenate([np.tile(gt[0], (100, 1)), np.tile(gt[1], (100, 1))]) + np.tile(shifts, 2)
    mid = gt[0] + np.array([15, 15, 15, 15], np.float32) + rng.integers(-3, 4, size=(100, 4))
    far = np.tile(np.array([[300, 300, 340, 340]], np.float32), (50, 1))
    props = np.concatenate([near, mid, far])
    sample = voc07_det.sample_rois(props, gt, gt_labels, 64, 0.25, 0.5, (0.1, 0.5), rng)
    iou = voc07_det.box_iou(sample.rois, gt).max(1)
    fg = sample.labels > 0
    assert len(sample.rois) == 64 and fg.sum() == 16  # 25% foreground (enough candidates of each)
    assert (iou[fg] >= 0.5).all() and ((iou[~fg] >= 0.1) & (iou[~fg] < 0.5)).all()
    assert set(sample.labels[fg]) <= {3, 15} and (sample.targets[~fg] == 0).all()
    # with no proposals the ground-truth boxes themselves are the foreground RoIs
    only_gt = voc07_det.sample_rois(np.zeros((0, 4)), gt, gt_labels, 64, 0.25, 0.5, (0.1, 0.5), rng)
    assert np.array_equal(only_gt.rois, gt) and only_gt.labels.tolist() == [3, 15]
    assert np.allclose(only_gt.targets, 0)
    # few foreground candidates: never more than 25%, the rest background
    few = voc07_det.sample_rois(mid, gt, gt_labels, 64, 0.25, 0.5, (0.1, 0.5), rng)
    assert (few.labels > 0).sum() <= 16


def test_box_targets_round_trip_and_normalisation():
    rng = np.random.default_rng(1)
    rois = np.concatenate([rng.uniform(0, 200, (50, 2)), rng.uniform(210, 400, (50, 2))], 1)[:, [0, 1, 2, 3]]
    rois = np.stack([rois[:, 0], rois[:, 1], rois[:, 2], rois[:, 3]], 1)
    gt = rois + rng.normal(0, 15, rois.shape)
    gt[:, 2:] = np.maximum(gt[:, 2:], gt[:, :2] + 5)
    targets = voc07_det.encode_boxes(rois, gt)
    decoded = voc07_det.decode_boxes(torch.from_numpy(rois).double(), torch.from_numpy(targets).double())
    assert np.allclose(decoded.numpy(), gt, atol=1e-3)
    # a hand example: same centre, twice as wide -> dw = log 2, normalised by 0.2
    t = voc07_det.encode_boxes(np.array([[0, 0, 9, 9]]), np.array([[-5, 0, 14, 9]]))
    assert np.allclose(t, [[0, 0, np.log(2) / 0.2, 0]], atol=1e-6)
    # class-specific layout: (R, 84) decodes each class's 4 deltas
    deltas = torch.zeros(2, 84)
    assert torch.allclose(voc07_det.decode_boxes(torch.tensor([[0., 0, 9, 9], [5, 5, 20, 30]]), deltas),
                          torch.tensor([[0., 0, 9, 9], [5, 5, 20, 30]]).repeat(1, 21))


def test_detection_loss_uses_only_foreground_own_class_deltas():
    logits = torch.zeros(4, 21)
    deltas = torch.zeros(4, 84)
    deltas[0, 4 * 3:4 * 3 + 4] = 2.0     # RoI 0 is class 3: counts
    deltas[1, 4 * 5:4 * 5 + 4] = 2.0     # RoI 1 is class 7, this is class 5's slot: ignored
    deltas[2, :] = 9.0                   # background RoI: ignored
    labels = torch.tensor([3, 7, 0, 0])
    _, loss_bbox = voc07_det.detection_loss(logits, deltas, labels, torch.zeros(4, 4))
    assert loss_bbox.item() == pytest.approx(4 * 1.5 / 4)   # smooth-L1(2) = 1.5, / 4 RoIs


def test_postprocess_nms_and_per_image_cap():
    boxes = torch.tensor([[0., 0, 9, 9], [1, 0, 10, 9], [50, 50, 59, 59]])
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.1, 0.8, 0.0], [0.1, 0.7, 0.2]])
    per_class = voc07_det.postprocess(boxes, scores, 0.3, 100, 1e-3)
    assert len(per_class) == 2
    assert per_class[0][:, 4].tolist() == pytest.approx([0.9, 0.7])  # the overlapping 0.8 box is suppressed
    assert per_class[0][0, :4].tolist() == [1, 1, 10, 10]  # 1-based on the way out
    capped = voc07_det.postprocess(boxes, scores, 0.3, 2, 1e-3)
    assert sum(len(d) for d in capped) == 2


def test_model_pools_conv5_at_stride_16_and_freezes_conv1():
    config = voc07_det.PRESETS["demo"]
    for layout in ("caffenet", "torchvision"):
        loaded = voc07_det.engine.load_for_eval("random", 0, num_classes=None, new_head=True, layout=layout)
        model = voc07_det.build_model(config, loaded)
        assert model.roi_pool.spatial_scale == 1 / 16
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen == {"backbone.conv1.weight", "backbone.conv1.bias"}
        assert model.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert model.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.1)
        assert model.bbox_pred.bias.abs().sum() == 0
        cls_logits, deltas = model(torch.zeros(1, 3, 160, 192), torch.tensor([[0., 10, 10, 100, 120]]))
        assert cls_logits.shape == (1, 21) and deltas.shape == (1, 84)


def test_paper_preset_is_p3():
    paper = voc07_det.PRESETS["paper"]
    assert (paper.iterations, paper.lr, paper.lr_step, paper.lr_gamma) == (150_000, 0.002, 50_000, 0.1)
    assert (paper.momentum, paper.weight_decay, paper.ims_per_batch, paper.rois_per_batch) == (0.9, 5e-4, 2, 128)
    assert paper.train_scales == (480, 576, 688, 864, 1200) and paper.train_max_size == 2000
    assert (paper.test_scale, paper.nms_threshold, paper.max_per_image) == (600, 0.3, 100)
    assert "test_max_size" in voc07_det.CHOSEN


# ----------------------------------------------------------------------------- end to end


def test_detector_trains_end_to_end_and_writes_record_and_devkit_files(data_root, tmp_path):
    config = dataclasses.replace(
        voc07_det.PRESETS["demo"], data_root=str(data_root), work_dir=str(tmp_path / "work"),
        results_dir=str(tmp_path / "results"), proposals_dir=str(tmp_path / "proposals"), workers=0,
        iterations=3, checkpoint_every=2, max_proposals=30, train_scales=(128,), test_scale=128,
        rois_per_batch=32, proposal_max_side=96)
    result = voc07_det.run(config)
    (record,) = store.load_records(tmp_path / "results")
    assert record["task"] == "voc07_det" and record["preset"] == "demo"
    assert record["metrics"]["mAP"] == pytest.approx(result["mAP"]) and 0 <= result["mAP"] <= 100
    assert set(record["metrics"]["per_class_AP"]) == set(VOC_CLASSES)
    for key in ("coco_AP", "coco_AP50", "random_score_mAP"):
        assert key in record["metrics"]
    assert "11-point" in record["metric_definitions"]["AP"]
    devkit = sorted((tmp_path / "work" / "voc07_det" / "demo").glob("*/devkit/comp4_det_test_*.txt"))
    assert [p.name for p in devkit] == sorted(f"comp4_det_test_{c}.txt" for c in VOC_CLASSES)
    test_ids = set((data_root / "VOCdevkit/VOC2007/ImageSets/Main/test.txt").read_text().split())
    line = re.compile(r"^(\S+) (\d+\.\d{6}) (\d+\.\d) (\d+\.\d) (\d+\.\d) (\d+\.\d)$")
    lines = [raw for path in devkit for raw in path.read_text().splitlines()]
    assert lines
    for raw in lines:
        m = line.match(raw)
        assert m, raw
        x1, y1, x2, y2 = map(float, m.groups()[2:])
        assert m.group(1) in test_ids and 1 <= x1 <= x2 and 1 <= y1 <= y2
    # the training state was checkpointed; a rerun skips the finished record
    assert list((tmp_path / "work").rglob("checkpoint.pt"))
    assert voc07_det.run(config)["mAP"] == pytest.approx(result["mAP"])
