"""VOC07 detection (P3): proposals cache and .mat import, RoI sampling, box coding, collate, test-time
detection, devkit files, end to end."""
import dataclasses
import re

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from evals import engine, metrics, voc07_det
from evals.detection import boxes as box_ops
from evals.detection import data, devkit, model, proposals
from evals.datasets.demo import make_demo
from evals.datasets.voc import VOC_CLASSES, VOCAnnotation, VOCObject, detection_annotations
from results import store
from runtime.config import sources
from runtime.errors import ConfigError
from runtime.sharding import shard_from_env


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("det_data")
    make_demo(root, seed=0, scale="tiny", progress=False)
    return root


# ----------------------------------------------------------------------------- proposals


@pytest.mark.slow
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


@pytest.mark.slow
def test_concurrent_runs_split_the_images_and_wait_for_each_other(data_root, tmp_path, monkeypatch):
    """Detection cells started together on one cache (the demo's two, a cluster's dozen) must not
    each compute every image: an image another process claimed is left to it and waited for; a
    claim whose owner died is taken over: at once when its pid on this host is gone, after
    CLAIM_STALE_S for another host's."""
    import os
    import socket
    import subprocess
    import sys
    import threading
    import time
    voc_root = data_root / "VOCdevkit" / "VOC2007"
    ids = (voc_root / "ImageSets" / "Main" / "test.txt").read_text().split()[:3]
    busy, dead = (proposals.cache_path(tmp_path, "fast", i) for i in ids[:2])
    busy.parent.mkdir(parents=True)
    busy.with_name(busy.name + ".claim").write_text(f"{socket.gethostname()} {os.getpid()}\n")  # alive
    dead.with_name(dead.name + ".claim").write_text("another-host 12345\n")
    old = time.time() - proposals.CLAIM_STALE_S - 5
    os.utime(dead.with_name(dead.name + ".claim"), (old, old))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid on this host that no longer runs: its claim is void at once
    spare = proposals.cache_path(tmp_path, "fast", "spare")
    spare.with_name(spare.name + ".claim").write_text(f"{socket.gethostname()} {gone.pid}\n")
    assert proposals._claim(spare) and spare.with_name(spare.name + ".claim").read_text().split()[1] == str(os.getpid())
    spare.with_name(spare.name + ".claim").unlink()
    theirs = np.array([[1, 1, 5, 5]], np.int32)

    def other_process():  # finishes its image a moment later, then releases the claim
        time.sleep(1.0)
        proposals.save_boxes(busy, theirs)
        busy.with_name(busy.name + ".claim").unlink()

    monkeypatch.setattr(proposals, "CLAIM_POLL_S", 0.1)
    thread = threading.Thread(target=other_process)
    thread.start()
    summary = proposals.compute_proposals(voc_root, "test", tmp_path, "fast", workers=0, ids=ids, progress=False)
    thread.join()
    assert summary["computed"] == 2 and summary["computed_elsewhere"] == 1  # the stale one and the free one
    assert np.array_equal(proposals.load_boxes(tmp_path, "fast", ids[0]), theirs)
    assert all(proposals.cache_path(tmp_path, "fast", i).is_file() for i in ids)
    assert not list(busy.parent.glob("*.claim"))


def test_opencv_rects_become_voc_boxes_and_shards_split_the_ids(monkeypatch):
    # (x, y, w, h) 0-based covers pixels x..x+w-1 -> 1-based x+1..x+w
    assert proposals.rects_to_voc(np.array([[0, 0, 10, 5]]), 1.0, 20, 20).tolist() == [[1, 1, 10, 5]]
    # found on a half-size copy: scaled back to cover the same region, clipped to the image
    assert proposals.rects_to_voc(np.array([[2, 3, 4, 10]]), 0.5, 11, 20).tolist() == [[5, 7, 11, 20]]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert shard_from_env(None, None) == (3, 4)
    assert shard_from_env(1, 2) == (1, 2)
    with pytest.raises(ConfigError, match="outside"):
        shard_from_env(4, 4)


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
    sample = box_ops.sample_rois(props, gt, gt_labels, 64, 0.25, 0.5, (0.1, 0.5), rng)
    iou = box_ops.box_iou(sample.rois, gt).max(1)
    fg = sample.labels > 0
    assert len(sample.rois) == 64 and fg.sum() == 16  # 25% foreground (enough candidates of each)
    assert (iou[fg] >= 0.5).all() and ((iou[~fg] >= 0.1) & (iou[~fg] < 0.5)).all()
    assert set(sample.labels[fg]) <= {3, 15} and (sample.targets[~fg] == 0).all()
    # with no proposals the ground-truth boxes themselves are the foreground RoIs
    only_gt = box_ops.sample_rois(np.zeros((0, 4)), gt, gt_labels, 64, 0.25, 0.5, (0.1, 0.5), rng)
    assert np.array_equal(only_gt.rois, gt) and only_gt.labels.tolist() == [3, 15]
    assert np.allclose(only_gt.targets, 0)
    # few foreground candidates: never more than 25%, the rest background
    few = box_ops.sample_rois(mid, gt, gt_labels, 64, 0.25, 0.5, (0.1, 0.5), rng)
    assert (few.labels > 0).sum() <= 16


def test_box_targets_round_trip_and_normalisation():
    rng = np.random.default_rng(1)
    rois = np.concatenate([rng.uniform(0, 200, (50, 2)), rng.uniform(210, 400, (50, 2))], 1)[:, [0, 1, 2, 3]]
    rois = np.stack([rois[:, 0], rois[:, 1], rois[:, 2], rois[:, 3]], 1)
    gt = rois + rng.normal(0, 15, rois.shape)
    gt[:, 2:] = np.maximum(gt[:, 2:], gt[:, :2] + 5)
    targets = box_ops.encode_boxes(rois, gt)
    decoded = box_ops.decode_boxes(torch.from_numpy(rois).double(), torch.from_numpy(targets).double())
    assert np.allclose(decoded.numpy(), gt, atol=1e-3)
    # a hand example: same centre, twice as wide -> dw = log 2, normalised by py-faster-rcnn's 0.2
    t = box_ops.encode_boxes(np.array([[0, 0, 9, 9]]), np.array([[-5, 0, 14, 9]]), box_ops.FIXED_MEANS,
                             box_ops.FIXED_STDS)
    assert np.allclose(t, [[0, 0, np.log(2) / 0.2, 0]], atol=1e-6)
    # class-specific layout: (R, 84) decodes each class's 4 deltas
    deltas = torch.zeros(2, 84)
    assert torch.allclose(box_ops.decode_boxes(torch.tensor([[0., 0, 9, 9], [5, 5, 20, 30]]), deltas),
                          torch.tensor([[0., 0, 9, 9], [5, 5, 20, 30]]).repeat(1, 21))


def _training_images(rng, count=6):
    """Synthetic (proposals, gt boxes, gt labels) per image: 1-3 objects of classes 1-4, proposals
    jittered around them (many regression examples) plus random boxes."""
    images = []
    for _ in range(count):
        n = int(rng.integers(1, 4))
        xy = rng.uniform(0, 300, (n, 2))
        gt = np.concatenate([xy, xy + rng.uniform(30, 150, (n, 2))], 1).astype(np.float32)
        labels = rng.integers(1, 5, n)
        jitter = np.repeat(gt, 20, 0) + rng.normal(0, 6, (20 * n, 4))
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 4)
        xy = rng.uniform(0, 400, (30, 2))
        noise = np.concatenate([xy, xy + rng.uniform(5, 100, (30, 2))], 1)
        images.append((np.concatenate([jitter, noise]).astype(np.float32), gt, labels))
    return images


def test_target_stats_are_fast_rcnn_roidb_statistics():
    rng = np.random.default_rng(4)
    images = _training_images(rng)
    stats = box_ops.target_stats(images, model.NUM_CLASSES, 0.5, flip=False)
    # by hand: every candidate (gt first, then proposals) with IoU >= 0.5, targets to its best gt
    examples = {c: [] for c in range(model.NUM_CLASSES)}
    for props, gt, labels in images:
        candidates = np.concatenate([gt, props]).astype(np.float64)
        iou = box_ops.box_iou(candidates, gt)
        for k in np.flatnonzero(iou.max(1) >= 0.5):
            j = iou[k].argmax()
            examples[labels[j]].append(box_ops.encode_boxes(candidates[k:k + 1], gt[j:j + 1].astype(np.float64))[0])
    for c in range(1, 5):
        if examples[c]:
            t = np.asarray(examples[c], np.float64)
            assert np.allclose(stats.means[c], t.mean(0), atol=1e-6) and np.allclose(stats.stds[c], t.std(0), rtol=1e-4)
    # background and classes without examples: mean 0, std 1 (no division by zero)
    assert np.array_equal(stats.means[0], np.zeros(4)) and np.array_equal(stats.stds[0], np.ones(4))
    assert np.array_equal(stats.means[20], np.zeros(4)) and np.array_equal(stats.stds[20], np.ones(4))
    # mirrored copies (flips in the roidb): dx averages to 0, the rest is unchanged
    flipped = box_ops.target_stats(images, model.NUM_CLASSES, 0.5, flip=True)
    seen = [c for c in range(1, 5) if examples[c]]
    assert np.allclose(flipped.means[seen, 0], 0, atol=1e-12)
    assert np.allclose(flipped.means[seen, 1:], stats.means[seen, 1:])
    # deterministic: the same training set gives the same numbers, bit for bit
    again = box_ops.target_stats(_training_images(np.random.default_rng(4)), model.NUM_CLASSES, 0.5, flip=True)
    assert again.as_dict() == flipped.as_dict()
    fixed = box_ops.fixed_target_stats(model.NUM_CLASSES)
    assert fixed.stds[5].tolist() == [0.1, 0.1, 0.2, 0.2] and fixed.means[5].tolist() == [0, 0, 0, 0]


def test_normalised_targets_round_trip_through_the_unnormalised_bbox_pred():
    """gt boxes encoded against the proposals and normalised with the per-class statistics are the
    training targets; a bbox_pred that outputs exactly them, un-normalised as after training,
    decodes back to the gt boxes."""
    rng = np.random.default_rng(7)
    images = _training_images(rng)
    for stats in (box_ops.target_stats(images, model.NUM_CLASSES, 0.5, flip=True),
                  box_ops.fixed_target_stats(model.NUM_CLASSES)):
        rois, gts, labels, targets = [], [], [], []
        for props, gt, gt_labels in images:
            sample = box_ops.sample_rois(props, gt, gt_labels, 64, 0.5, 0.5, (0.1, 0.5), rng, stats)
            fg = sample.labels > 0
            assigned = box_ops.box_iou(sample.rois[fg], gt).argmax(1)
            rois.append(sample.rois[fg]), gts.append(gt[assigned]), labels.append(sample.labels[fg])
            targets.append(sample.targets[fg])
        rois, gts, labels, targets = (np.concatenate(a) for a in (rois, gts, labels, targets))
        # the training targets: gt encoded against the RoIs, normalised with the RoI's class row
        normalised = box_ops.encode_boxes(rois, gts, stats.means[labels], stats.stds[labels]).astype(np.float64)
        assert np.allclose(targets, normalised, atol=1e-5)
        assert not np.allclose(targets, box_ops.encode_boxes(rois, gts))  # really normalised
        # a bbox_pred whose outputs on one-hot features are those targets (with some bias)
        layer = torch.nn.Linear(len(rois), 4 * model.NUM_CLASSES).double()
        with torch.no_grad():
            layer.bias.normal_()
            layer.weight.zero_()
            for r, (c, t) in enumerate(zip(labels, normalised)):
                layer.weight[4 * c:4 * c + 4, r] = torch.from_numpy(t) - layer.bias[4 * c:4 * c + 4]
        model.unnormalize_bbox_pred(layer, stats)  # as after training: the layer now gives raw deltas
        with torch.no_grad():
            deltas = layer(torch.eye(len(rois), dtype=torch.float64))
        boxes = box_ops.decode_boxes(torch.from_numpy(rois).double(), deltas).reshape(len(rois), -1, 4)
        own = boxes[torch.arange(len(rois)), torch.from_numpy(labels)]
        assert np.abs(own.numpy() - gts).max() < 1e-5


def test_difficult_objects_are_training_ground_truth_when_use_difficult(data_root):
    voc_root = data_root / "VOCdevkit" / "VOC2007"
    annotations = {
        "a": VOCAnnotation("a", 100, 80, [VOCObject("cat", (11, 11, 50, 40), False, False),
                                          VOCObject("dog", (51, 21, 90, 70), True, False)]),
        "b": VOCAnnotation("b", 100, 80, [VOCObject("car", (1, 1, 30, 30), True, False)]),  # difficult only
    }
    props = {i: np.zeros((0, 4), np.int32) for i in annotations}
    kept = data.VOCDetectionDataset(voc_root, ["a", "b"], annotations, props, use_difficult=True)
    assert kept.gt_labels[0].tolist() == [VOC_CLASSES.index("cat") + 1, VOC_CLASSES.index("dog") + 1]
    assert kept.gt_boxes[0].tolist() == [[10, 10, 49, 39], [50, 20, 89, 69]]  # 0-based
    assert kept.gt_labels[1].tolist() == [VOC_CLASSES.index("car") + 1]
    assert data.images_with_objects(annotations, ["a", "b"], True) == ["a", "b"]
    # the difficult object yields foreground RoIs of its class
    sample = box_ops.sample_rois(np.zeros((0, 4)), kept.gt_boxes[0], kept.gt_labels[0], 8, 0.5, 0.5, (0.1, 0.5),
                                 np.random.default_rng(0))
    assert VOC_CLASSES.index("dog") + 1 in sample.labels.tolist()
    # py-faster-rcnn's use_diff=False: dropped, and the image of difficult objects only is skipped
    dropped = data.VOCDetectionDataset(voc_root, ["a"], annotations, props, use_difficult=False)
    assert dropped.gt_labels[0].tolist() == [VOC_CLASSES.index("cat") + 1]
    assert data.images_with_objects(annotations, ["a", "b"], False) == ["a"]
    paper = voc07_det.PRESETS["paper"]
    assert paper.use_difficult is True and sources(paper)["use_difficult"].startswith("P3")


class FixedScoreModel(torch.nn.Module):
    """Class 1's softmax score of RoI r is ``scores[r]`` (background takes the rest), no box regression."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores, dtype=torch.float64)

    def features(self, images):
        return images

    def head(self, conv5, rois):
        probs = torch.full((len(rois), model.NUM_CLASSES), 1e-9, dtype=torch.float64)
        probs[:, 1] = self.scores[:len(rois)]
        probs[:, 0] = 1.0 - probs[:, 1:].sum(1)
        return torch.log(probs).float(), torch.zeros(len(rois), 4 * model.NUM_CLASSES)


def test_test_path_keeps_scores_above_0_05_before_nms():
    image = Image.new("RGB", (200, 60))
    props = np.array([[10. * k * 2, 5, 10. * k * 2 + 15, 50] for k in range(6)], np.float32)  # disjoint boxes
    scores = [0.01, 0.049, 0.05, 0.051, 0.3, 0.9]
    config = dataclasses.replace(voc07_det.PRESETS["paper"], test_scale=64)
    assert config.score_threshold == 0.05 and sources(config)["score_threshold"].startswith("P3")
    per_class = model.detect(FixedScoreModel(scores), image, props, config, "cpu")
    assert per_class[0][:, 4].tolist() == pytest.approx([0.9, 0.3, 0.051], rel=1e-5)  # strictly above 0.05
    assert all(len(d) == 0 for d in per_class[1:])


def test_detection_loss_uses_only_foreground_own_class_deltas():
    logits = torch.zeros(4, 21)
    deltas = torch.zeros(4, 84)
    deltas[0, 4 * 3:4 * 3 + 4] = 2.0     # RoI 0 is class 3: counts
    deltas[1, 4 * 5:4 * 5 + 4] = 2.0     # RoI 1 is class 7, this is class 5's slot: ignored
    deltas[2, :] = 9.0                   # background RoI: ignored
    labels = torch.tensor([3, 7, 0, 0])
    _, loss_bbox = model.detection_loss(logits, deltas, labels, torch.zeros(4, 4))
    assert loss_bbox.item() == pytest.approx(4 * 1.5 / 4)   # smooth-L1(2) = 1.5, / 4 RoIs


def test_postprocess_nms_and_per_image_cap():
    boxes = torch.tensor([[0., 0, 9, 9], [1, 0, 10, 9], [50, 50, 59, 59]])
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.1, 0.8, 0.0], [0.1, 0.7, 0.2]])
    per_class = box_ops.postprocess(boxes, scores, 0.3, 100, 1e-3)
    assert len(per_class) == 2
    assert per_class[0][:, 4].tolist() == pytest.approx([0.9, 0.7])  # the overlapping 0.8 box is suppressed
    assert per_class[0][0, :4].tolist() == [1, 1, 10, 10]  # 1-based on the way out
    capped = box_ops.postprocess(boxes, scores, 0.3, 2, 1e-3)
    assert sum(len(d) for d in capped) == 2


def test_model_pools_conv5_at_stride_16_and_freezes_conv1():
    config = voc07_det.PRESETS["demo"]
    for layout in ("caffenet", "torchvision"):
        loaded = engine.load_for_eval("random", 0, num_classes=None, new_head=True, layout=layout)
        detector = voc07_det.build_model(config, loaded)
        assert detector.roi_pool.spatial_scale == 1 / 16
        frozen = {n for n, p in detector.named_parameters() if not p.requires_grad}
        assert frozen == {"backbone.conv1.weight", "backbone.conv1.bias"}
        assert detector.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert detector.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.1)
        assert detector.bbox_pred.bias.abs().sum() == 0
        cls_logits, deltas = detector(torch.zeros(1, 3, 160, 192), torch.tensor([[0., 10, 10, 100, 120]]))
        assert cls_logits.shape == (1, 21) and deltas.shape == (1, 84)


def test_paper_preset_is_p3():
    paper = voc07_det.PRESETS["paper"]
    assert (paper.iterations, paper.lr, paper.lr_step, paper.lr_gamma) == (150_000, 0.002, 50_000, 0.1)
    assert (paper.momentum, paper.weight_decay, paper.ims_per_batch, paper.rois_per_batch) == (0.9, 5e-4, 2, 128)
    assert paper.train_scales == (480, 576, 688, 864, 1200) and paper.train_max_size == 2000
    assert (paper.test_scale, paper.nms_threshold, paper.max_per_image) == (600, 0.3, 100)
    assert (paper.score_threshold, paper.use_difficult, paper.bbox_normalization) == (0.05, True, "per_class")
    assert (paper.bias_lr_mult, paper.bias_decay_mult) == (2.0, 0.0)
    assert sources(paper)["test_max_size"] == "chosen"  # P3: not published
    for name in ("score_threshold", "use_difficult", "bbox_normalization", "bias_decay_mult"):
        assert sources(paper)[name].startswith("P3"), name


def test_collate_pads_images_and_numbers_the_rois_by_image():
    items = [{"image": torch.rand(3, 10, 12), "rois": torch.tensor([[0., 0, 5, 5], [2, 2, 9, 7]]),
              "labels": torch.tensor([3, 0]), "targets": torch.rand(2, 4)},
             {"image": torch.rand(3, 14, 8), "rois": torch.tensor([[1., 1, 4, 6]]),
              "labels": torch.tensor([7]), "targets": torch.rand(1, 4)}]
    batch = data.collate_images(items)
    assert batch["images"].shape == (2, 3, 14, 12)
    assert torch.equal(batch["images"][0, :, :10, :12], items[0]["image"])
    assert torch.equal(batch["images"][1, :, :14, :8], items[1]["image"])
    # the padding is zero: the normalised mean, as Fast R-CNN's blob
    assert batch["images"][0, :, 10:].abs().sum() == 0 and batch["images"][1, :, :, 8:].abs().sum() == 0
    assert batch["rois"].tolist() == [[0, 0, 0, 5, 5], [0, 2, 2, 9, 7], [1, 1, 1, 4, 6]]
    assert batch["labels"].tolist() == [3, 0, 7]
    assert torch.equal(batch["targets"], torch.cat([items[0]["targets"], items[1]["targets"]]))


class ShapeScoredModel(torch.nn.Module):
    """A stand-in detector for the test path: scores from each RoI's aspect ratio (the same under
    flips and scales), class-specific width/height regression (dx = dy = 0, so flips mirror it).
    It records what :func:`detect` gives it: the resized image and the RoIs of each chunk."""

    def __init__(self):
        super().__init__()
        self.images, self.chunks = [], []
        self.weights = torch.linspace(-2.0, 2.0, model.NUM_CLASSES)
        self.deltas = torch.zeros(model.NUM_CLASSES, 4)
        self.deltas[:, 2] = torch.linspace(-1.0, 1.0, model.NUM_CLASSES)   # dw
        self.deltas[:, 3] = torch.linspace(0.5, -0.5, model.NUM_CLASSES)   # dh

    def features(self, images):
        self.images.append(images)
        return images

    def head(self, conv5, rois):
        self.chunks.append(rois)
        aspect = (rois[:, 3] - rois[:, 1]) / (rois[:, 4] - rois[:, 2])  # no +1: scale-free
        return torch.log(aspect)[:, None] * self.weights, self.deltas.reshape(1, -1).repeat(len(rois), 1)


def _sorted_rows(per_class):
    return [d[np.lexsort(d.T[::-1])] for d in per_class]


def test_detect_scales_the_image_and_rois_alike_and_mirrors_under_flips():
    rng = np.random.default_rng(3)
    width, height = 90, 60
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    xy = rng.uniform(0, [width - 20, height - 20], (40, 2))
    wh = rng.uniform(5, 40, (40, 2))
    props = np.floor(np.concatenate([xy, np.minimum(xy + wh, [width - 1, height - 1])], 1)).astype(np.float32)
    base = dataclasses.replace(voc07_det.PRESETS["demo"], test_roi_chunk=16, max_per_image=1000)
    results = []
    for test_scale, max_size in ((60, 1000), (120, 1000), (240, 200)):  # the last one is capped by max_size
        config = dataclasses.replace(base, test_scale=test_scale, test_max_size=max_size)
        stub = ShapeScoredModel()
        per_class = model.detect(stub, image, props, config, "cpu")
        scale = box_ops.image_scale(width, height, test_scale, max_size)
        (fed,) = stub.images
        assert fed.shape == (1, 3, round(height * scale), round(width * scale))
        assert max(fed.shape[2:]) <= max_size and [len(c) for c in stub.chunks] == [16, 16, 8]
        rois = torch.cat(stub.chunks)
        assert (rois[:, 0] == 0).all() and torch.allclose(rois[:, 1:], torch.from_numpy(props) * scale)
        assert len(per_class) == 20 and all(d.shape[1] == 5 for d in per_class)
        for d in per_class:  # 1-based, inside the image
            assert (d[:, :2] >= 1).all() and (d[:, 2] <= width).all() and (d[:, 3] <= height).all()
        results.append(_sorted_rows(per_class))
    # boxes come back in the original image's pixels whatever the test scale
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.shape == b.shape and np.allclose(a, b, atol=1e-5)
    # the mirrored image with mirrored proposals gives the mirrored detections
    config = dataclasses.replace(base, test_scale=120)
    flipped = model.detect(ShapeScoredModel(), image.transpose(Image.FLIP_LEFT_RIGHT),
                           box_ops.flip_boxes(props, width), config, "cpu")
    assert sum(len(d) for d in flipped) > 20
    for a, b in zip(results[1], flipped):
        mirrored = b.copy()
        mirrored[:, 0], mirrored[:, 2] = width + 1 - b[:, 2], width + 1 - b[:, 0]  # 1-based inclusive
        assert np.allclose(a, _sorted_rows([mirrored])[0], atol=1e-4)


class OneHotModel(torch.nn.Module):
    """Scores one-hot on each proposal's true class, zero box regression: given the ground-truth
    boxes as the proposals, a perfect detector. ``labels`` holds each image's classes (1..20) in
    proposal order, images in the order :func:`detect_images` visits them."""

    def __init__(self, labels: list[np.ndarray]):
        super().__init__()
        self.labels, self.image, self.offset = labels, -1, 0

    def features(self, images):
        self.image, self.offset = self.image + 1, 0
        return images

    def head(self, conv5, rois):
        labels = torch.from_numpy(self.labels[self.image][self.offset:self.offset + len(rois)])
        self.offset += len(rois)
        logits = torch.zeros(len(rois), model.NUM_CLASSES)
        logits[torch.arange(len(rois)), labels] = 100.0   # softmax: 1 on the class, ~0 elsewhere
        return logits, torch.zeros(len(rois), 4 * model.NUM_CLASSES)


def test_ground_truth_proposals_with_one_hot_scores_give_map_100(data_root, tmp_path):
    voc_root = data_root / "VOCdevkit" / "VOC2007"
    annotations = detection_annotations(voc_root, "test")
    ids = list(annotations)
    # the proposals as the cache holds them: 1-based VOC boxes, difficult objects included
    gt_proposals = {i: np.array([o.box for o in annotations[i].objects], np.int32).reshape(-1, 4) for i in ids}
    labels = [np.array([VOC_CLASSES.index(o.name) + 1 for o in annotations[i].objects], np.int64) for i in ids]
    config = dataclasses.replace(voc07_det.PRESETS["demo"], test_roi_chunk=2)  # several chunks per image
    detections, baseline = model.detect_images(OneHotModel(labels), voc_root, ids, gt_proposals, config, "cpu",
                                               seed=0)
    truth = devkit.class_annotations(annotations, ids)
    per_class, mean_ap = metrics.voc_detection_map(detections, truth, use_07_metric=True)
    assert mean_ap == 1.0 and all(ap == 1.0 for ap in per_class if not np.isnan(ap))
    assert sum(len(d) for dets in detections for d in dets.values()) == sum(len(b) for b in gt_proposals.values())
    # the same score from the devkit files, read back
    devkit.write_devkit_results(detections, tmp_path / "devkit")
    _, mean_ap_files = metrics.voc_detection_map(devkit.read_devkit_results(tmp_path / "devkit"), truth,
                                                 use_07_metric=True)
    assert mean_ap_files == 1.0
    # the random-score floor on the same boxes is below it
    assert metrics.voc_detection_map(baseline, truth, use_07_metric=True)[1] < 1.0


def test_devkit_files_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    detections = [dict() for _ in VOC_CLASSES]
    for c in (0, 7, 19):
        for image_id in ("000001", "000004"):
            xy = rng.integers(1, 100, (3, 2)).astype(np.float64)
            detections[c][image_id] = np.concatenate([xy, xy + rng.integers(0, 50, (3, 2)),
                                                      np.round(rng.random((3, 1)), 6)], 1)
    paths = devkit.write_devkit_results(detections, tmp_path)
    assert [p.name for p in paths] == [f"comp4_det_test_{c}.txt" for c in VOC_CLASSES]
    assert paths[1].read_text() == ""  # a class without detections still gets its (empty) file
    back = devkit.read_devkit_results(tmp_path)
    for written, read in zip(detections, back):
        assert list(read) == list(written)
        for image_id in written:
            assert np.allclose(read[image_id], written[image_id], atol=5e-7)
    (tmp_path / "comp4_det_test_cat.txt").write_text("000001 0.5 1.0 2.0\n")
    with pytest.raises(ValueError, match="comp4_det_test_cat.txt:1"):
        devkit.read_devkit_results(tmp_path)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
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
    devkit_files = sorted((tmp_path / "work" / "voc07_det" / "demo").glob("*/devkit/comp4_det_test_*.txt"))
    assert [p.name for p in devkit_files] == sorted(f"comp4_det_test_{c}.txt" for c in VOC_CLASSES)
    test_ids = set((data_root / "VOCdevkit/VOC2007/ImageSets/Main/test.txt").read_text().split())
    line = re.compile(r"^(\S+) (\d+\.\d{6}) (\d+\.\d) (\d+\.\d) (\d+\.\d) (\d+\.\d)$")
    lines = [raw for path in devkit_files for raw in path.read_text().splitlines()]
    assert lines
    for raw in lines:
        m = line.match(raw)
        assert m, raw
        x1, y1, x2, y2 = map(float, m.groups()[2:])
        assert m.group(1) in test_ids and 1 <= x1 <= x2 and 1 <= y1 <= y2
    # the training state was checkpointed; a rerun skips the finished record
    assert list((tmp_path / "work").rglob("checkpoint.pt"))
    assert voc07_det.run(config)["mAP"] == pytest.approx(result["mAP"])
