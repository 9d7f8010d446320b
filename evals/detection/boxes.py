"""Box maths of Fast R-CNN (protocols.md P3): IoU, flips, image scaling, regression targets, RoI
sampling and the per-class NMS with the per-image cap.

Boxes are 0-based inclusive pixels (``x2 - x1 + 1`` wide), as Fast R-CNN's roidb; only
:func:`postprocess` hands back VOC's 1-based boxes, for the metric and the devkit files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import nms

FIXED_MEANS = (0.0, 0.0, 0.0, 0.0)  # py-faster-rcnn's BBOX_NORMALIZE_MEANS (the "fixed" normalisation)
FIXED_STDS = (0.1, 0.1, 0.2, 0.2)   # py-faster-rcnn's BBOX_NORMALIZE_STDS
RAW = ((0.0, 0.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0))  # means, stds that leave deltas as they are
MIN_STD = 1e-6                      # a class's std below this (one example, or none) is taken as 1
BBOX_CLIP = math.log(1000.0 / 16)   # largest dw/dh decoded (Detectron's guard against exp overflow)


# ----------------------------------------------------------------------------- geometry


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of inclusive-pixel boxes (widths ``x2 - x1 + 1``, as the VOC metric)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror 0-based inclusive boxes in an image ``width`` px wide."""
    out = np.array(boxes, dtype=np.float32, copy=True).reshape(-1, 4)
    out[:, 0], out[:, 2] = width - 1 - boxes[:, 2], width - 1 - boxes[:, 0]
    return out


def image_scale(width: int, height: int, shorter: int, max_size: int) -> float:
    """Fast R-CNN's ``prep_im_for_blob``: shorter side to ``shorter``, longer side at most ``max_size``."""
    scale = shorter / min(width, height)
    if round(scale * max(width, height)) > max_size:
        scale = max_size / max(width, height)
    return scale


# ----------------------------------------------------------------------------- regression targets


def encode_boxes(rois, gt, means=RAW[0], stds=RAW[1]) -> np.ndarray:
    """Fast R-CNN's regression targets (dx, dy, dw, dh) of ``gt`` relative to ``rois``, normalised
    by ``(t - means) / stds``; inclusive boxes, centre at ``x1 + 0.5 * w``. ``means``/``stds`` are
    (4,) or one row per box ((N, 4): each box's class row of :class:`TargetStats`)."""
    rois, gt = np.asarray(rois, np.float64).reshape(-1, 4), np.asarray(gt, np.float64).reshape(-1, 4)
    w, h = rois[:, 2] - rois[:, 0] + 1.0, rois[:, 3] - rois[:, 1] + 1.0
    cx, cy = rois[:, 0] + 0.5 * w, rois[:, 1] + 0.5 * h
    gw, gh = gt[:, 2] - gt[:, 0] + 1.0, gt[:, 3] - gt[:, 1] + 1.0
    gcx, gcy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    targets = np.stack([(gcx - cx) / w, (gcy - cy) / h, np.log(gw / w), np.log(gh / h)], 1)
    return ((targets - np.asarray(means)) / np.asarray(stds)).astype(np.float32)


def decode_boxes(rois: torch.Tensor, deltas: torch.Tensor, means=RAW[0], stds=RAW[1]) -> torch.Tensor:
    """Inverse of :func:`encode_boxes`: ``rois`` (R, 4), ``deltas`` (R, 4k) -> (R, 4k) boxes;
    ``means``/``stds`` (4,) or (k, 4) per class. The test path decodes raw deltas (the default):
    the statistics are folded into ``bbox_pred`` after training (``model.unnormalize_bbox_pred``).
    ``x2 = cx + 0.5 * w - 1`` makes it the exact inverse (Detectron's correction of Fast R-CNN's
    ``bbox_transform_inv``, which is one pixel wider)."""
    rois = rois.to(deltas.dtype)
    k = deltas.shape[1] // 4
    d = deltas.reshape(-1, k, 4) * deltas.new_tensor(stds) + deltas.new_tensor(means)
    w = (rois[:, 2] - rois[:, 0] + 1.0)[:, None]
    h = (rois[:, 3] - rois[:, 1] + 1.0)[:, None]
    cx, cy = rois[:, 0, None] + 0.5 * w, rois[:, 1, None] + 0.5 * h
    pcx, pcy = d[..., 0] * w + cx, d[..., 1] * h + cy
    pw, ph = torch.exp(d[..., 2].clamp(max=BBOX_CLIP)) * w, torch.exp(d[..., 3].clamp(max=BBOX_CLIP)) * h
    boxes = torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw - 1.0, pcy + 0.5 * ph - 1.0], -1)
    return boxes.reshape(-1, 4 * k)


# ----------------------------------------------------------------------------- target statistics


@dataclass(frozen=True)
class TargetStats:
    """Per-class means and standard deviations of the regression targets, each (num_classes, 4) in
    ``bbox_pred``'s layout (class c's deltas at outputs 4c..4c+3); the background row is unused
    (mean 0, std 1). Training targets are ``(t - mean) / std`` of their class; the learnt layer
    is mapped back with the same rows (P3)."""
    means: np.ndarray
    stds: np.ndarray

    def as_dict(self) -> dict:
        """Plain lists, for the training checkpoint's run identity (a resume with other statistics
        is refused)."""
        return {"means": self.means.tolist(), "stds": self.stds.tolist()}


def fixed_target_stats(num_classes: int) -> TargetStats:
    """py-faster-rcnn's precomputed normalisation: means 0 and stds (0.1, 0.1, 0.2, 0.2) for every
    class (``bbox_normalization="fixed"``)."""
    means = np.tile(np.asarray(FIXED_MEANS, np.float64), (num_classes, 1))
    stds = np.tile(np.asarray(FIXED_STDS, np.float64), (num_classes, 1))
    means[0], stds[0] = RAW
    return TargetStats(means, stds)


def regression_examples(proposal_boxes: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray,
                        threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One image's box-regression examples as Fast R-CNN's roidb holds them: among the candidates
    (ground-truth boxes, then proposals) every box whose best IoU with a ground-truth box is at
    least ``threshold`` (its BBOX_THRESH), with its raw targets towards that box and its class.
    Returns targets (N, 4) float64 and labels (N,)."""
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    if len(gt_boxes) == 0:
        return np.zeros((0, 4)), np.zeros(0, np.int64)
    candidates = np.concatenate([gt_boxes, np.asarray(proposal_boxes, np.float64).reshape(-1, 4)])
    iou = box_iou(candidates, gt_boxes)
    keep = np.flatnonzero(iou.max(1) >= threshold)
    assigned = iou[keep].argmax(1)
    targets = encode_boxes(candidates[keep], gt_boxes[assigned]).astype(np.float64)
    return targets, np.asarray(gt_labels, np.int64)[assigned]


def target_stats(images, num_classes: int, threshold: float, flip: bool) -> TargetStats:
    """Fast R-CNN's ``add_bbox_regression_targets`` (``roi_data_layer/roidb.py``): the mean and
    standard deviation of each class's raw targets over all regression examples of the training
    set (:func:`regression_examples` of each ``(proposals, gt boxes, gt labels)`` in ``images``).
    With ``flip`` the roidb also holds every image mirrored; a mirrored example has the same
    targets with dx negated (centres mirror exactly with inclusive widths), so they are added
    without redoing the IoUs. Sums run in float64 in the images' order: the same training set
    gives the same statistics, bit for bit. A class with no example, or a zero spread, gets std 1
    (Fast R-CNN would divide by zero; VOC never has such a class, small demo sets can)."""
    counts = np.zeros(num_classes)
    sums, squares = np.zeros((num_classes, 4)), np.zeros((num_classes, 4))
    mirror = np.array([-1.0, 1.0, 1.0, 1.0])
    for proposal_boxes, gt_boxes, gt_labels in images:
        targets, labels = regression_examples(proposal_boxes, gt_boxes, gt_labels, threshold)
        if flip:
            targets, labels = np.concatenate([targets, targets * mirror]), np.concatenate([labels, labels])
        np.add.at(counts, labels, 1.0)
        np.add.at(sums, labels, targets)
        np.add.at(squares, labels, targets ** 2)
    seen = counts[:, None] > 0
    means = np.where(seen, sums / np.maximum(counts, 1.0)[:, None], 0.0)
    variances = np.where(seen, squares / np.maximum(counts, 1.0)[:, None] - means ** 2, 1.0)
    stds = np.sqrt(np.clip(variances, 0.0, None))
    stds = np.where(stds < MIN_STD, 1.0, stds)
    means[0], stds[0] = RAW
    return TargetStats(means, stds)


# ----------------------------------------------------------------------------- RoI sampling


@dataclass
class RoISample:
    rois: np.ndarray      # (R, 4) 0-based inclusive, image coordinates before scaling
    labels: np.ndarray    # (R,) int64, 0 = background
    targets: np.ndarray   # (R, 4) normalised regression targets (zero for background)


def sample_rois(proposal_boxes: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, rois_per_image: int,
                fg_fraction: float, fg_threshold: float, bg_range: tuple[float, float],
                rng: np.random.Generator, stats: TargetStats | None = None) -> RoISample:
    """Fast R-CNN's minibatch sampling for one image: the candidates are the proposals plus the
    ground-truth boxes; up to ``round(fg_fraction * rois_per_image)`` foreground RoIs (IoU >=
    ``fg_threshold`` with some ground truth, labelled with its class) and background RoIs (max
    IoU in ``bg_range``) for the rest, each drawn without replacement. Fewer RoIs come back when
    there are too few candidates. Foreground targets are normalised with their class's row of
    ``stats`` (default: :func:`fixed_target_stats`)."""
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    candidates = np.concatenate([gt_boxes, np.asarray(proposal_boxes, np.float32).reshape(-1, 4)])
    if len(gt_boxes):
        iou = box_iou(candidates, gt_boxes)
        best, assigned = iou.max(1), iou.argmax(1)
    else:
        best, assigned = np.zeros(len(candidates)), np.zeros(len(candidates), np.int64)
    fg = np.flatnonzero(best >= fg_threshold)
    bg = np.flatnonzero((best >= bg_range[0]) & (best < bg_range[1]))
    fg_count = min(int(round(fg_fraction * rois_per_image)), len(fg))
    fg = rng.choice(fg, fg_count, replace=False) if fg_count < len(fg) else fg
    bg_count = min(rois_per_image - len(fg), len(bg))
    bg = rng.choice(bg, bg_count, replace=False) if bg_count < len(bg) else bg
    keep = np.concatenate([fg, bg]).astype(np.int64)
    labels = np.zeros(len(keep), np.int64)
    labels[:len(fg)] = np.asarray(gt_labels, np.int64)[assigned[fg]] if len(fg) else []
    targets = np.zeros((len(keep), 4), np.float32)
    if len(fg):
        stats = stats if stats is not None else fixed_target_stats(int(labels.max()) + 1)
        targets[:len(fg)] = encode_boxes(candidates[fg], gt_boxes[assigned[fg]], stats.means[labels[:len(fg)]],
                                         stats.stds[labels[:len(fg)]])
    return RoISample(candidates[keep], labels, targets)


# ----------------------------------------------------------------------------- NMS


def postprocess(boxes: torch.Tensor, scores: torch.Tensor, nms_threshold: float, max_per_image: int,
                score_threshold: float) -> list[np.ndarray]:
    """Per-class NMS and the per-image cap. ``boxes``: (R, 4 * C) or (R, 4) 0-based inclusive;
    ``scores``: (R, C) with column 0 the background. Returns C - 1 arrays (K, 5) ``x1, y1, x2, y2,
    score`` in 1-based VOC coordinates."""
    num_classes = scores.shape[1]
    per_class = []
    for c in range(1, num_classes):
        class_boxes = boxes if boxes.shape[1] == 4 else boxes[:, 4 * c:4 * c + 4]
        keep = torch.nonzero(scores[:, c] > score_threshold).squeeze(1)
        b, s = class_boxes[keep].float(), scores[keep, c].float()
        # torchvision's NMS measures area as (x2 - x1) * (y2 - y1); +1 on x2/y2 gives the inclusive IoU
        kept = nms(torch.cat([b[:, :2], b[:, 2:] + 1.0], 1), s, nms_threshold)
        per_class.append(torch.cat([b[kept] + 1.0, s[kept, None]], 1).double().numpy())
    return cap_per_image(per_class, max_per_image)


def cap_per_image(per_class: list[np.ndarray], max_per_image: int) -> list[np.ndarray]:
    """Keep the image's ``max_per_image`` best detections over all classes (ties at the cut are
    all kept, as Fast R-CNN's ``>= image_thresh``)."""
    all_scores = np.concatenate([d[:, 4] for d in per_class])
    if len(all_scores) > max_per_image:
        cut = np.sort(all_scores)[-max_per_image]
        per_class = [d[d[:, 4] >= cut] for d in per_class]
    return per_class
