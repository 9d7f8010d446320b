"""Evaluation metrics of the transfer benchmarks, as pure functions of arrays.

* ``voc_classification_ap``: VOC07 classification, protocols.md P2.
* ``confusion_matrix`` / ``mean_iou``: VOC12 segmentation, protocols.md P4.
* ``topk_accuracy``: ImageNet linear probing, protocols.md P5.
* ``voc_detection_ap`` / ``voc_detection_map``: VOC07 detection, protocols.md P3.
* ``coco_style_ap``: COCO AP@[.5:.95] and AP50 via pycocotools, reported beside
  the VOC number for comparison only (not part of the paper's protocol).

Inputs are numpy arrays; torch tensors are accepted and converted (no torch import
here). Nothing reads or writes files.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "CLASSIFICATION_AP_DEFINITION",
    "DETECTION_AP_DEFINITIONS",
    "detection_ap_definition_key",
    "voc_file_labels_to_targets",
    "voc_classification_ap",
    "confusion_matrix",
    "mean_iou",
    "topk_accuracy",
    "voc_detection_ap",
    "voc_detection_map",
    "coco_style_ap",
]

# Stored in result records next to the number, so a reader knows which AP it is (P2).
CLASSIFICATION_AP_DEFINITION = (
    "sklearn average_precision_score per class over non-difficult images "
    "(step-wise sum over distinct score thresholds of (R_n - R_{n-1}) * P_n, tied scores "
    "form one threshold); mAP = nan-mean over classes with at least one positive"
)

# Keyed by the name a record stores; ``detection_ap_definition_key`` picks one (P3).
DETECTION_AP_DEFINITIONS = {
    "voc07_11point": (
        "PASCAL VOC2007 11-point AP: mean over t in {0, 0.1, ..., 1} of the max precision "
        "at recall >= t (0 if none); IoU > 0.5 with inclusive '+1' pixel boxes; each GT "
        "matched once; difficult GT neither TP nor FP and not counted in positives"
    ),
    "voc10_continuous": (
        "PASCAL VOC2010+ AP: area under the monotone precision envelope, summed at the "
        "recall change points; matching rules as voc07_11point"
    ),
}


def detection_ap_definition_key(use_07_metric: bool) -> str:
    """Key of ``DETECTION_AP_DEFINITIONS`` matching ``voc_detection_ap(use_07_metric=...)``."""
    return "voc07_11point" if use_07_metric else "voc10_continuous"


def _to_numpy(x) -> np.ndarray:
    """numpy view of an array-like; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _nanmean(values: np.ndarray) -> float:
    """Mean over the finite entries; nan (without a RuntimeWarning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(values)
    return float(values[keep].mean()) if keep.any() else float("nan")


# --------------------------------------------------------------------------------------
# VOC07 classification (P2)
# --------------------------------------------------------------------------------------


def voc_file_labels_to_targets(file_labels) -> np.ndarray:
    """Map VOC ``ImageSets/Main/<class>_<set>.txt`` values to ``voc_classification_ap`` targets.

    The files use 1 = positive, -1 = negative, 0 = difficult (protocols.md P2); the
    metric takes 1 = positive, 0 = negative, -1 = difficult/ignored.
    """
    file_labels = _to_numpy(file_labels)
    if not np.isin(file_labels, (-1, 0, 1)).all():
        raise ValueError("VOC file labels must be in {1, -1, 0}")
    file_labels = file_labels.astype(np.int64)
    return np.where(file_labels == 1, 1, np.where(file_labels == -1, 0, -1)).astype(np.int64)


def voc_classification_ap(scores, labels) -> tuple[np.ndarray, float]:
    """Per-class average precision and its mean, VOC07 classification (protocols.md P2).

    The definition is scikit-learn's ``average_precision_score`` applied per class to
    the images whose label is not -1: AP = sum_n (R_n - R_{n-1}) P_n over the distinct
    score thresholds n in descending order (images with tied scores enter together,
    at one threshold), R_0 = 0. It is not the devkit's 11-point AP.

    Args:
        scores: (N, C) real scores, higher = more confident.
        labels: (N, C) integers: 1 positive, 0 negative, -1 difficult (ignored). VOC's
            files use another coding; see ``voc_file_labels_to_targets``.

    Returns:
        ``(per_class_ap (C,), mean_ap)``. A class without any (non-difficult) positive
        has AP nan and is left out of the nan-mean; the mean is nan if every class is.
    """
    scores = _to_numpy(scores).astype(np.float64)
    labels = _to_numpy(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores and labels must both be (N, C); got {scores.shape}, {labels.shape}")
    if not np.isin(labels, (-1, 0, 1)).all():
        raise ValueError("labels must be in {1, 0, -1}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    n = scores.shape[0]
    if n == 0:
        per_class = np.full(scores.shape[1], np.nan)
        return per_class, float("nan")

    # Sort each class column by descending score. Difficult images stay in the
    # ranking but count as neither positive nor negative, which is the same as
    # removing them: they only add zero-width recall steps.
    order = np.argsort(-scores, axis=0, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=0)
    sorted_labels = np.take_along_axis(labels, order, axis=0)
    positive = sorted_labels == 1
    tp = np.cumsum(positive, axis=0)
    fp = np.cumsum(sorted_labels == 0, axis=0)

    # A threshold is the last position of a run of equal scores; every image is
    # credited with the precision at the end of its run (sklearn's tie grouping).
    run_end = np.ones_like(positive)
    run_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    end_index = np.where(run_end, np.arange(n)[:, None], n)
    end_index = np.minimum.accumulate(end_index[::-1], axis=0)[::-1]
    tp_end = np.take_along_axis(tp, end_index, axis=0)
    fp_end = np.take_along_axis(fp, end_index, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision_end = tp_end / (tp_end + fp_end)  # > 0 denominators wherever positive
        # Each positive raises recall by 1/npos at its run's threshold.
        npos = positive.sum(axis=0)
        per_class = np.where(positive, precision_end, 0.0).sum(axis=0) / npos
    per_class = np.where(npos > 0, per_class, np.nan)
    return per_class, _nanmean(per_class)


# --------------------------------------------------------------------------------------
# VOC12 segmentation (P4)
# --------------------------------------------------------------------------------------


def confusion_matrix(pred, target, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Pixel confusion matrix for segmentation (protocols.md P4).

    Args:
        pred: integer class predictions, any shape.
        target: integer labels, same shape as ``pred``.
        num_classes: C.
        ignore_index: label not counted (255 in VOC). Any other target outside
            [0, C) is skipped as well.

    Returns:
        (C, C) int64 matrix, rows = target class, columns = predicted class. Sum the
        matrices of all images and call ``mean_iou`` once (P4: one matrix over the set).

    Raises:
        ValueError: on a shape mismatch, non-integer input, or any ``pred`` outside
            [0, C), checked on every pixel including ignored ones: a prediction out of
            range is a bug upstream, never a label to skip.
    """
    pred = _to_numpy(pred)
    target = _to_numpy(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    if pred.dtype.kind not in "iu" or target.dtype.kind not in "iu":
        raise ValueError("pred and target must be integer arrays")
    pred = pred.reshape(-1).astype(np.int64)
    target = target.reshape(-1).astype(np.int64)
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"pred holds values outside [0, {num_classes})")
    counted = (target >= 0) & (target < num_classes) & (target != ignore_index)
    flat = target[counted] * num_classes + pred[counted]
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(confusion) -> tuple[np.ndarray, float]:
    """Per-class IoU and mIoU from a confusion matrix (protocols.md P4).

    IoU_c = TP / (TP + FP + FN) with rows = target, columns = prediction. A class
    with TP + FP + FN = 0 (absent from both) has IoU nan and is left out of the
    nan-mean.
    """
    confusion = _to_numpy(confusion).astype(np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be square; got {confusion.shape}")
    tp = np.diag(confusion)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    denominator = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denominator > 0, tp / denominator, np.nan)
    return iou, _nanmean(iou)


# --------------------------------------------------------------------------------------
# ImageNet linear probing (P5)
# --------------------------------------------------------------------------------------


def topk_accuracy(logits, targets, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of samples whose target is among the k highest logits (protocols.md P5).

    Ties are broken as a stable descending sort would: among equal logits the lower
    class index ranks first. The target's rank is counted directly (O(N C), no sort).

    Args:
        logits: (N, C) scores.
        targets: (N,) integer classes in [0, C).
        ks: the k values, each in [1, C].

    Returns:
        ``{k: accuracy}``; nan for every k when N = 0.
    """
    logits = _to_numpy(logits).astype(np.float64)
    targets = _to_numpy(targets)
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (N, C) and targets (N,); got {logits.shape}, {targets.shape}")
    n, c = logits.shape
    if targets.size and (targets.min() < 0 or targets.max() >= c):
        raise ValueError(f"targets hold values outside [0, {c})")
    for k in ks:
        if not 1 <= k <= c:
            raise ValueError(f"k={k} outside [1, {c}]")
    if n == 0:
        return {int(k): float("nan") for k in ks}
    targets = targets.astype(np.int64)
    target_logit = logits[np.arange(n), targets][:, None]
    lower_index = np.arange(c)[None, :] < targets[:, None]
    rank = (logits > target_logit).sum(axis=1) + ((logits == target_logit) & lower_index).sum(axis=1)
    return {int(k): float((rank < k).mean()) for k in ks}


# --------------------------------------------------------------------------------------
# VOC07 detection (P3)
# --------------------------------------------------------------------------------------


def _voc_iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a[:, i] with box b[:, i]; (4, P) arrays of x1, y1, x2, y2 rows (inclusive pixels).

    Coordinate-major so that each coordinate is one contiguous row (faster than (P, 4)).
    """
    iw = np.maximum(np.minimum(a[2], b[2]) - np.maximum(a[0], b[0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(a[3], b[3]) - np.maximum(a[1], b[1]) + 1.0, 0.0)
    inter = iw * ih
    area_a = (a[2] - a[0] + 1.0) * (a[3] - a[1] + 1.0)
    area_b = (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / (area_a + area_b - inter)


def _ap_11_point(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC07: mean over t in {0, 0.1, ..., 1} of max precision at recall >= t (0 if none)."""
    # Thresholds as np.arange(0, 1.1, 0.1), the float values Fast R-CNN's voc_eval.py
    # uses (e.g. 3 * 0.1 = 0.30000000000000004, so a recall of exactly 0.3 misses t=0.3).
    thresholds = np.arange(0.0, 1.1, 0.1)
    best_after = np.maximum.accumulate(precision[::-1])[::-1]  # max precision from i on
    first = np.searchsorted(recall, thresholds, side="left")  # recall is non-decreasing
    reached = first < recall.size
    return float(np.where(reached, best_after[np.minimum(first, recall.size - 1)], 0.0).sum() / 11.0)


def _ap_continuous(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+: area under the precision envelope, summed where recall changes."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    change = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(((mrec[change + 1] - mrec[change]) * mpre[change + 1]).sum())


def voc_detection_ap(
    detections: Mapping,
    annotations: Mapping,
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
) -> float:
    """Average precision of ONE class, PASCAL VOC rules (protocols.md P3).

    Args:
        detections: image id -> (K, 5) array ``x1, y1, x2, y2, score`` (K may be 0).
        annotations: image id -> ``(boxes (M, 4), difficult (M,) bool)``, the class's
            ground truth. Every evaluated image should have an entry (M may be 0).
        iou_threshold: a match needs IoU strictly greater than this.
        use_07_metric: True for the VOC07 11-point AP (P3), False for the VOC2010+
            continuous AP; see ``DETECTION_AP_DEFINITIONS``.

    Boxes are in VOC inclusive pixel coordinates: width = x2 - x1 + 1, and the
    intersection's sides get the same "+1".

    Matching, as Fast R-CNN's ``voc_eval.py``: all detections of all images are
    sorted by descending score with a stable sort, so tied scores keep input order
    (images in the mapping's iteration order, rows in array order). Walking that
    list, each detection takes its best-IoU ground truth among all of its image's
    boxes, difficult ones included (the first such box on an IoU tie). If that IoU
    is > ``iou_threshold``: a difficult box makes the detection ignored (neither TP
    nor FP); otherwise it is a TP if the box is still unmatched (and the box becomes
    matched), else an FP (duplicate). If the IoU is <= the threshold, or the image
    has no boxes or no ``annotations`` entry, it is an FP. The positives are the
    non-difficult boxes of all annotated images.

    Note: the MATLAB devkit's ``VOCevaldet.m`` tests ``ovmax >= minoverlap``; the
    two differ only for an IoU of exactly 0.5, which inclusive integer boxes can hit.
    This function follows P3 (strict).

    Because each detection's best box does not depend on earlier matches, the walk
    reduces to: among the detections whose best box is a non-difficult match, the
    first (in sorted order) per box is the TP. That is computed without a Python
    loop over detections.

    Returns:
        The AP; nan when there are no positives; 0.0 when there are positives but no
        detections.
    """
    # Ground truth of all annotated images, flattened with a start offset per image.
    image_index: dict = {}
    gt_boxes_list, gt_difficult_list, gt_counts = [], [], []
    for image_id, (boxes, difficult) in annotations.items():
        boxes = _to_numpy(boxes).astype(np.float64).reshape(-1, 4)
        difficult = _to_numpy(difficult).astype(bool).reshape(-1)
        if difficult.shape[0] != boxes.shape[0]:
            raise ValueError(f"image {image_id!r}: {boxes.shape[0]} boxes but {difficult.shape[0]} difficult flags")
        image_index[image_id] = len(gt_counts)
        gt_boxes_list.append(boxes)
        gt_difficult_list.append(difficult)
        gt_counts.append(boxes.shape[0])
    gt_boxes = np.concatenate(gt_boxes_list) if gt_boxes_list else np.zeros((0, 4))
    gt_difficult = np.concatenate(gt_difficult_list) if gt_difficult_list else np.zeros(0, bool)
    # One extra slot with zero boxes stands for "no annotations entry".
    gt_count = np.array(gt_counts + [0], dtype=np.int64)
    gt_start = np.concatenate(([0], np.cumsum(gt_count)[:-1]))
    missing = len(gt_counts)

    npos = int((~gt_difficult).sum())
    if npos == 0:
        return float("nan")

    det_list, det_image_list = [], []
    for image_id, dets in detections.items():
        dets = _to_numpy(dets).astype(np.float64)
        if dets.size == 0:
            continue
        if dets.ndim != 2 or dets.shape[1] != 5:
            raise ValueError(f"image {image_id!r}: detections must be (K, 5); got {dets.shape}")
        det_list.append(dets)
        det_image_list.append(np.full(dets.shape[0], image_index.get(image_id, missing), dtype=np.int64))
    if not det_list:
        return 0.0
    dets = np.concatenate(det_list)
    det_image = np.concatenate(det_image_list)
    num_dets = dets.shape[0]

    # Best box of every detection, from all (detection, box of its image) pairs,
    # grouped by detection. match_gt: that box's index if its IoU > threshold, else -1.
    match_gt = np.full(num_dets, -1, dtype=np.int64)
    pairs_per_det = gt_count[det_image]
    with_gt = np.flatnonzero(pairs_per_det > 0)
    if with_gt.size:
        seg_len = pairs_per_det[with_gt]
        seg_start = np.cumsum(seg_len) - seg_len
        first_gt = gt_start[det_image[with_gt]]
        within = np.arange(seg_len.sum()) - np.repeat(seg_start, seg_len)
        det_boxes = np.ascontiguousarray(dets[:, :4].T)[:, np.repeat(with_gt, seg_len)]
        iou = _voc_iou_pairs(det_boxes, np.ascontiguousarray(gt_boxes.T)[:, np.repeat(first_gt, seg_len) + within])
        best_iou = np.fmax.reduceat(iou, seg_start)
        # First box reaching the best IoU (np.argmax semantics, per segment).
        at_best = np.where(iou == np.repeat(best_iou, seg_len), within, np.iinfo(np.int64).max)
        best_gt = first_gt + np.minimum.reduceat(at_best, seg_start)
        hit = best_iou > iou_threshold  # nan IoU (degenerate boxes) is no hit
        match_gt[with_gt[hit]] = best_gt[hit]

    # Walk in descending score order (stable: ties keep input order).
    order = np.argsort(-dets[:, 4], kind="stable")
    match_gt = match_gt[order]
    hit = match_gt >= 0
    ignored = np.zeros(num_dets, dtype=bool)
    ignored[hit] = gt_difficult[match_gt[hit]]
    claim_det = np.flatnonzero(hit & ~ignored)  # increasing = score order
    _, first_claim = np.unique(match_gt[claim_det], return_index=True)
    tp = np.zeros(num_dets, dtype=bool)
    tp[claim_det[first_claim]] = True
    fp = ~tp & ~ignored

    # Ignored detections stay in the curve with zero increments, as in voc_eval.py.
    tp_cum = np.cumsum(tp).astype(np.float64)
    fp_cum = np.cumsum(fp).astype(np.float64)
    recall = tp_cum / npos
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    return _ap_11_point(recall, precision) if use_07_metric else _ap_continuous(recall, precision)


def voc_detection_map(
    detections_per_class: Sequence[Mapping],
    annotations_per_class: Sequence[Mapping],
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
) -> tuple[np.ndarray, float]:
    """``voc_detection_ap`` for each class and their nan-mean (protocols.md P3).

    Args:
        detections_per_class: one ``voc_detection_ap`` detections mapping per class.
        annotations_per_class: one annotations mapping per class, same length.

    Returns:
        ``(per_class_ap (C,), mAP)``; classes without positives (nan) are left out
        of the mean.
    """
    if len(detections_per_class) != len(annotations_per_class):
        raise ValueError("detections_per_class and annotations_per_class differ in length")
    per_class = np.array(
        [
            voc_detection_ap(dets, annots, iou_threshold=iou_threshold, use_07_metric=use_07_metric)
            for dets, annots in zip(detections_per_class, annotations_per_class)
        ],
        dtype=np.float64,
    )
    return per_class, _nanmean(per_class)


def coco_style_ap(
    detections_per_class: Sequence[Mapping],
    annotations_per_class: Sequence[Mapping],
) -> dict[str, float]:
    """COCO AP@[.5:.95] and AP50 of VOC-style inputs, computed with pycocotools.

    Same inputs as ``voc_detection_map``. For comparison beside the P3 number only;
    the COCO rules differ from VOC's:

    * boxes become COCO ``[x, y, w, h]`` with w = x2 - x1 + 1, h = y2 - y1 + 1, so
      pycocotools' IoU equals the inclusive-pixel VOC IoU;
    * difficult boxes are passed as ``iscrowd=1``. pycocotools overwrites any
      ``"ignore"`` field with ``iscrowd``, so that is the only way to ignore a box.
      Consequences: a crowd box is not a positive; a detection matched to it is
      ignored, and several detections may match it; its overlap with a detection is
      intersection / detection area; a detection is matched to a non-crowd box first
      and only falls back to a crowd box, whereas VOC takes the best box of all;
    * a match needs IoU >= t (VOC: > 0.5); precision is sampled at 101 recall points;
      at most 100 detections per image and class count;
    * image ids (any hashable) are mapped to 1, 2, ... in order of first appearance,
      classes to category ids 1..C.

    Returns:
        ``{"AP": AP@[.5:.95], "AP50": AP at IoU 0.5}``, means over classes with
        positives; nan when no class has positives, 0.0 when there are positives
        but no detections.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(detections_per_class) != len(annotations_per_class):
        raise ValueError("detections_per_class and annotations_per_class differ in length")
    image_ids: dict = {}
    for per_class in (*annotations_per_class, *detections_per_class):
        for image_id in per_class:
            image_ids.setdefault(image_id, len(image_ids) + 1)

    def xywh(boxes: np.ndarray) -> np.ndarray:
        return np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0] + 1.0, boxes[:, 3] - boxes[:, 1] + 1.0], 1)

    gt_annotations, results = [], []
    for category, (dets_of_class, annots_of_class) in enumerate(zip(detections_per_class, annotations_per_class), 1):
        for image_id, (boxes, difficult) in annots_of_class.items():
            boxes = _to_numpy(boxes).astype(np.float64).reshape(-1, 4)
            difficult = _to_numpy(difficult).astype(bool).reshape(-1)
            for box, is_difficult in zip(xywh(boxes).tolist(), difficult.tolist()):
                gt_annotations.append(
                    {
                        "id": len(gt_annotations) + 1,
                        "image_id": image_ids[image_id],
                        "category_id": category,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": int(is_difficult),
                    }
                )
        for image_id, dets in dets_of_class.items():
            dets = _to_numpy(dets).astype(np.float64).reshape(-1, 5)
            for box, score in zip(xywh(dets[:, :4]).tolist(), dets[:, 4].tolist()):
                results.append({"image_id": image_ids[image_id], "category_id": category, "bbox": box, "score": score})

    if not any(a["iscrowd"] == 0 for a in gt_annotations):
        return {"AP": float("nan"), "AP50": float("nan")}
    if not results:  # pycocotools' loadRes cannot take an empty list
        return {"AP": 0.0, "AP50": 0.0}

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": [{"id": i} for i in image_ids.values()],
            "annotations": gt_annotations,
            "categories": [{"id": c} for c in range(1, len(annotations_per_class) + 1)],
        }
        ground_truth.createIndex()
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # stats[0] = AP@[.5:.95], stats[1] = AP@.5 (area "all", 100 dets); -1 means undefined.
    ap, ap50 = (float(v) if v >= 0 else float("nan") for v in evaluation.stats[:2])
    return {"AP": ap, "AP50": ap50}
