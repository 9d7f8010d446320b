"""Tests of evals.metrics against scikit-learn, pycocotools, hand-worked cases, and a
loop-by-loop transcription of the VOC evaluation (protocols.md P2-P5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from evals import metrics
from evals.metrics import (
    coco_style_ap,
    confusion_matrix,
    mean_iou,
    topk_accuracy,
    voc_classification_ap,
    voc_detection_ap,
    voc_detection_map,
    voc_file_labels_to_targets,
)

# ----------------------------------------------------------------------------- P2


def _sklearn_per_class(scores, labels):
    out = []
    for c in range(scores.shape[1]):
        keep = labels[:, c] != -1
        y = labels[keep, c] == 1
        out.append(average_precision_score(y, scores[keep, c]) if y.any() else np.nan)
    return np.array(out)


@pytest.mark.parametrize("tied", [False, True])
def test_classification_ap_matches_sklearn(tied):
    rng = np.random.default_rng(0 if tied else 1)
    n, c = 300, 20
    labels = rng.choice([1, 0, -1], size=(n, c), p=[0.15, 0.75, 0.10])
    labels[:, 3] = np.where(labels[:, 3] == 1, 0, labels[:, 3])  # no positives
    labels[0, 5] = 1  # a class with exactly one positive
    labels[1:, 5] = np.where(labels[1:, 5] == 1, 0, labels[1:, 5])
    scores = rng.normal(size=(n, c)) + 1.5 * (labels == 1)
    if tied:  # few distinct values: many ties, across positives, negatives and difficult
        scores = np.round(scores * 2) / 2
    per_class, mean_ap = voc_classification_ap(scores, labels)
    expected = _sklearn_per_class(scores, labels)
    assert per_class.shape == (c,)
    assert math.isnan(per_class[3])
    np.testing.assert_allclose(per_class, expected, rtol=0, atol=1e-12, equal_nan=True)
    assert mean_ap == pytest.approx(np.nanmean(expected), abs=1e-12)


def test_classification_ap_difficult_is_removed_and_torch_input():
    scores = np.array([[0.9], [0.8], [0.7], [0.6]])
    labels = np.array([[1], [-1], [0], [1]])
    # Without the difficult row: ranking 1, 0, 1 -> AP = 1/2 * 1 + 1/2 * 2/3.
    per_class, mean_ap = voc_classification_ap(torch.tensor(scores), torch.tensor(labels))
    assert per_class[0] == pytest.approx(0.5 + 1 / 3)
    assert mean_ap == pytest.approx(0.5 + 1 / 3)
    per_class, mean_ap = voc_classification_ap(scores, np.zeros_like(labels))
    assert math.isnan(per_class[0]) and math.isnan(mean_ap)


def test_voc_file_labels_to_targets():
    np.testing.assert_array_equal(voc_file_labels_to_targets([1, -1, 0, 1]), [1, 0, -1, 1])
    with pytest.raises(ValueError):
        voc_file_labels_to_targets([2])
    assert "average_precision_score" in metrics.CLASSIFICATION_AP_DEFINITION


# ----------------------------------------------------------------------------- P4


def test_confusion_matrix_and_mean_iou_hand_example():
    target = np.array([[0, 0, 1, 1], [255, 0, 2, 7]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 3]])
    # Counted (target, pred) pairs: (0,0) (0,1) (1,1) (1,1) (0,0) (2,0); the 255 and
    # the out-of-range 7 are skipped. Class 3 only appears as a prediction on a skipped pixel.
    expected = np.array(
        [
            [2, 1, 0, 0],
            [0, 2, 0, 0],
            [1, 0, 0, 0],
            [0, 0, 0, 0],
        ]
    )
    conf = confusion_matrix(pred, target, num_classes=4)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, expected)
    iou, miou = mean_iou(conf)
    # class 0: 2 / (2 + 1 + 1); class 1: 2 / (2 + 1 + 0); class 2: 0 / (0 + 0 + 1); class 3: nan.
    np.testing.assert_allclose(iou[:3], [0.5, 2 / 3, 0.0])
    assert math.isnan(iou[3])
    assert miou == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    # Torch input and summing matrices over images gives the same as one big call.
    halves = confusion_matrix(torch.tensor(pred[:1]), torch.tensor(target[:1]), 4) + confusion_matrix(
        pred[1:], target[1:], 4
    )
    np.testing.assert_array_equal(halves, expected)
    # An in-range ignore_index is skipped too: without target 2 the row of class 2 is empty.
    expected_no_2 = expected.copy()
    expected_no_2[2] = 0
    np.testing.assert_array_equal(confusion_matrix(pred, target, 4, ignore_index=2), expected_no_2)


def test_confusion_matrix_rejects_bad_predictions():
    target = np.array([0, 1, 255])
    for bad in ([0, 4, 0], [0, -1, 0], [0, 1, 255]):
        with pytest.raises(ValueError):
            confusion_matrix(np.array(bad), target, num_classes=4)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0.0, 1.0, 1.0]), target, num_classes=4)


def test_mean_iou_all_absent_is_nan():
    iou, miou = mean_iou(np.zeros((3, 3), dtype=np.int64))
    assert np.isnan(iou).all() and math.isnan(miou)


# ----------------------------------------------------------------------------- P5


def test_topk_accuracy_hand_example():
    logits = np.array(
        [
            [0.1, 0.5, 0.2, 0.9],  # target 3: rank 0
            [0.8, 0.1, 0.3, 0.2],  # target 2: rank 1
            [0.4, 0.4, 0.1, 0.0],  # target 1: tied with class 0, lower index first -> rank 1
            [0.9, 0.8, 0.1, 0.7],  # target 2: rank 3
        ]
    )
    targets = np.array([3, 2, 1, 2])
    acc = topk_accuracy(logits, targets, ks=(1, 2, 4))
    assert acc == {1: 0.25, 2: 0.75, 4: 1.0}
    with pytest.raises(ValueError):
        topk_accuracy(logits, targets, ks=(5,))


def test_topk_accuracy_matches_torch_topk():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 50, generator=gen)
    targets = torch.randint(0, 50, (500,), generator=gen)
    acc = topk_accuracy(logits, targets, ks=(1, 5))
    for k in (1, 5):
        top = logits.topk(k, dim=1).indices
        assert acc[k] == pytest.approx((top == targets[:, None]).any(dim=1).float().mean().item())


# ----------------------------------------------------------------------------- P3


def _gt(*boxes, difficult=None):
    boxes = np.array(boxes, dtype=float).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.array(difficult, bool)
    return boxes, difficult


def _dets(*rows):
    return np.array(rows, dtype=float).reshape(-1, 5)


BOX = [0, 0, 9, 9]  # 10 x 10 pixels inclusive


def _both(dets, annots):
    return (
        voc_detection_ap(dets, annots, use_07_metric=True),
        voc_detection_ap(dets, annots, use_07_metric=False),
    )


def test_detection_perfect():
    annots = {"a": _gt(BOX), "b": _gt([20, 20, 49, 39], [0, 0, 4, 4])}
    dets = {"a": _dets(BOX + [0.9]), "b": _dets([20, 20, 49, 39, 0.3], [0, 0, 4, 4, 0.8])}
    assert _both(dets, annots) == (1.0, 1.0)


def test_detection_duplicate_is_false_positive_and_07_vs_continuous():
    # Sorted: a/0.9 TP, a/0.8 duplicate of the same GT -> FP, b/0.7 TP; npos = 2.
    # recall 0.5, 0.5, 1.0; precision 1, 1/2, 2/3.
    # 11-point: t = 0 .. 0.5 (6 points) -> max precision 1; t = 0.6 .. 1 (5 points) -> 2/3.
    #   AP07 = (6 + 5 * 2/3) / 11 = 28/33.
    # Continuous: envelope 1 on (0, 0.5], 2/3 on (0.5, 1] -> 0.5 + 0.5 * 2/3 = 5/6.
    # Were the duplicate a TP, recall would pass 1 at the second detection.
    annots = {"a": _gt(BOX), "b": _gt(BOX)}
    dets = {"a": _dets(BOX + [0.9], BOX + [0.8]), "b": _dets(BOX + [0.7])}
    ap07, ap10 = _both(dets, annots)
    assert ap07 == pytest.approx(28 / 33)
    assert ap10 == pytest.approx(5 / 6)


def test_detection_best_gt_already_matched_is_false_positive():
    # Both detections' best GT is the first box (IoU 1 vs 0.9 with the second); the
    # second detection is an FP although it overlaps the unmatched box by 0.9 (VOC rule).
    # recall 0.5, 0.5; precision 1, 1/2 -> AP07 = 6/11, continuous 0.5.
    annots = {"a": _gt(BOX, [0, 0, 9, 8])}
    dets = {"a": _dets(BOX + [0.9], BOX + [0.8])}
    ap07, ap10 = _both(dets, annots)
    assert ap07 == pytest.approx(6 / 11)
    assert ap10 == pytest.approx(0.5)


def test_detection_difficult_ignored_and_not_in_npos():
    annots = {"a": _gt(BOX, [50, 50, 59, 59], difficult=[False, True])}
    # The higher-scored detection hits the difficult box: neither TP nor FP, and the
    # difficult box is no positive, so the one TP reaches recall 1 at precision 1.
    dets = {"a": _dets([50, 50, 59, 59, 0.9], BOX + [0.8])}
    assert _both(dets, annots) == (1.0, 1.0)
    # A second hit on the difficult box is ignored too (no "already matched" FP).
    dets = {"a": _dets([50, 50, 59, 59, 0.9], [50, 50, 59, 59, 0.85], BOX + [0.8])}
    assert _both(dets, annots) == (1.0, 1.0)
    # A miss near the difficult box (IoU <= 0.5) is an FP: FP then TP -> precision 1/2.
    dets = {"a": _dets([50, 50, 59, 54, 0.9], BOX + [0.8])}
    assert _both(dets, annots) == (0.5, 0.5)


def test_detection_iou_exactly_half_is_not_a_match():
    gt = [0, 0, 99, 0]  # 100 x 1 pixels
    at_half = [0, 0, 49, 0]  # 50 x 1: intersection 50, union 100
    above = [0, 0, 50, 0]  # 51 x 1: IoU 0.51
    iou = metrics._voc_iou_pairs(np.array([at_half, above], float).T, np.array([gt, gt], float).T)
    assert iou[0] == 0.5 and iou[1] == pytest.approx(0.51)
    annots = {"a": _gt(gt)}
    assert _both({"a": _dets(at_half + [0.9])}, annots) == (0.0, 0.0)
    assert _both({"a": _dets(above + [0.9])}, annots) == (1.0, 1.0)
    # The "+1" matters: without it [0,0,9,4] vs [0,0,9,9] would be IoU 36/81, not 0.5.
    assert _both({"a": _dets([0, 0, 9, 4, 0.9])}, {"a": _gt(BOX)}) == (0.0, 0.0)
    assert _both({"a": _dets([0, 0, 9, 5, 0.9])}, {"a": _gt(BOX)}) == (1.0, 1.0)


def test_detection_tied_scores_keep_input_order():
    # Same score for an FP (image "x") and a TP (image "a"); the stable sort keeps the
    # mapping's order. FP first: precision 1/2 at recall 1 -> 0.5; TP first: 1.0.
    annots = {"a": _gt(BOX), "x": _gt()}
    fp_first = {"x": _dets(BOX + [0.5]), "a": _dets(BOX + [0.5])}
    tp_first = {"a": _dets(BOX + [0.5]), "x": _dets(BOX + [0.5])}
    assert _both(fp_first, annots) == (0.5, 0.5)
    assert _both(tp_first, annots) == (1.0, 1.0)


def test_detection_images_without_gt_are_false_positives():
    annots = {"a": _gt(BOX), "empty": _gt()}
    # FP at 0.9 then TP at 0.5, whether the image is annotated with no box or unannotated.
    for image in ("empty", "unannotated"):
        dets = {image: _dets(BOX + [0.9]), "a": _dets(BOX + [0.5])}
        assert _both(dets, annots) == (0.5, 0.5)


def test_detection_no_detections_and_no_positives():
    annots = {"a": _gt(BOX)}
    assert _both({}, annots) == (0.0, 0.0)
    assert _both({"a": np.zeros((0, 5))}, annots) == (0.0, 0.0)
    only_difficult = {"a": _gt(BOX, difficult=[True])}
    for dets in ({}, {"a": _dets(BOX + [0.9])}):
        assert all(math.isnan(v) for v in _both(dets, only_difficult))
    assert math.isnan(voc_detection_ap({"a": _dets(BOX + [0.9])}, {}))


def _voc_eval_loop(detections, annotations, iou_threshold=0.5, use_07_metric=True):
    """Independent, deliberately plain transcription of the VOC evaluation loop."""
    npos = sum(int((~d).sum()) for _, d in annotations.values())
    if npos == 0:
        return float("nan")
    image_ids, rows = [], []
    for image_id, dets in detections.items():
        for row in np.asarray(dets, float).reshape(-1, 5):
            image_ids.append(image_id)
            rows.append(row)
    if not rows:
        return 0.0
    rows = np.array(rows)
    order = np.argsort(-rows[:, 4], kind="stable")
    matched = {k: [False] * len(v[0]) for k, v in annotations.items()}
    tp, fp = [], []
    for d in order:
        image_id, box = image_ids[d], rows[d, :4]
        ovmax, jmax = -math.inf, -1
        if image_id in annotations:
            for j, g in enumerate(annotations[image_id][0]):
                iw = min(box[2], g[2]) - max(box[0], g[0]) + 1
                ih = min(box[3], g[3]) - max(box[1], g[1]) + 1
                if iw > 0 and ih > 0:
                    inter = iw * ih
                    area_det = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
                    area_gt = (g[2] - g[0] + 1) * (g[3] - g[1] + 1)
                    union = area_det + area_gt - inter
                    ov = inter / union
                else:
                    ov = 0.0
                if ov > ovmax:
                    ovmax, jmax = ov, j
        t = f = 0
        if ovmax > iou_threshold:
            if not annotations[image_id][1][jmax]:
                if not matched[image_id][jmax]:
                    t = 1
                    matched[image_id][jmax] = True
                else:
                    f = 1
        else:
            f = 1
        tp.append(t)
        fp.append(f)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = prec[rec >= t].max() if (rec >= t).any() else 0.0
            ap += p / 11.0
        return ap
    mrec = [0.0] + list(rec) + [1.0]
    mpre = [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])


def _random_detection_problem(rng, num_images=40):
    annots, dets = {}, {}
    for i in range(num_images):
        m = int(rng.integers(0, 5))
        xy = rng.integers(0, 200, size=(m, 2))
        wh = rng.integers(5, 60, size=(m, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(float)
        annots[f"im{i}"] = (boxes, rng.random(m) < 0.2)
        near = boxes[rng.integers(0, m, size=int(rng.integers(0, 8)))] if m else np.zeros((0, 4))
        near = near + rng.integers(-8, 9, size=near.shape)
        far_xy = rng.integers(0, 200, size=(int(rng.integers(0, 4)), 2))
        far = np.concatenate([far_xy, far_xy + rng.integers(5, 60, size=far_xy.shape)], 1)
        boxes_d = np.concatenate([near, far]).astype(float)
        scores = np.round(rng.random(len(boxes_d)), 1)  # coarse: many ties across images
        dets[f"im{i}"] = np.concatenate([boxes_d, scores[:, None]], 1)
    dets["not_annotated"] = np.array([[0, 0, 30, 30, 0.55], [10, 10, 40, 40, 0.3]])
    return dets, annots


@pytest.mark.parametrize("seed", range(8))
def test_detection_ap_matches_loop_transcription(seed):
    rng = np.random.default_rng(seed)
    dets, annots = _random_detection_problem(rng)
    for use_07 in (True, False):
        for threshold in (0.5, 0.3):
            got = voc_detection_ap(dets, annots, iou_threshold=threshold, use_07_metric=use_07)
            want = _voc_eval_loop(dets, annots, iou_threshold=threshold, use_07_metric=use_07)
            assert got == pytest.approx(want, abs=1e-12)


def test_detection_map_and_definitions():
    rng = np.random.default_rng(42)
    problems = [_random_detection_problem(rng, 10) for _ in range(3)]
    problems.append(({}, {"a": _gt(BOX, difficult=[True])}))  # no positives -> nan
    per_class, mean_ap = voc_detection_map([p[0] for p in problems], [p[1] for p in problems])
    expected = [_voc_eval_loop(d, a) for d, a in problems]
    np.testing.assert_allclose(per_class, expected, atol=1e-12, equal_nan=True)
    assert mean_ap == pytest.approx(np.nanmean(expected))
    assert set(metrics.DETECTION_AP_DEFINITIONS) == {"voc07_11point", "voc10_continuous"}
    assert metrics.detection_ap_definition_key(True) == "voc07_11point"


# ----------------------------------------------------------------------------- COCO


def test_coco_style_ap(capsys):
    annots = [
        {"a": _gt(BOX, [30, 30, 69, 59]), "b": _gt([5, 5, 24, 44], difficult=[False])},
        {"a": _gt(), "b": _gt([0, 0, 49, 49], [60, 60, 79, 79], difficult=[False, True])},
    ]
    perfect = [
        {"a": _dets(BOX + [0.9], [30, 30, 69, 59, 0.8]), "b": _dets([5, 5, 24, 44, 0.7])},
        {"b": _dets([0, 0, 49, 49, 0.6], [60, 60, 79, 79, 0.95])},  # hit on a difficult box
    ]
    result = coco_style_ap(perfect, annots)
    assert result["AP"] == pytest.approx(1.0) and result["AP50"] == pytest.approx(1.0)
    assert capsys.readouterr().out == ""  # pycocotools' prints are swallowed

    # [0,0,9,15] vs [0,0,9,9]: IoU 100/160 = 0.625 -> a match at t = 0.5, 0.55, 0.6 only.
    shifted = [{"a": _dets([0, 0, 9, 15, 0.9])}]
    result = coco_style_ap(shifted, [{"a": _gt(BOX)}])
    assert result["AP50"] == pytest.approx(1.0)
    assert result["AP"] == pytest.approx(0.3)
    assert coco_style_ap([{}], [{"a": _gt(BOX)}]) == {"AP": 0.0, "AP50": 0.0}
