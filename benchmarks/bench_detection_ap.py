"""Time ``evals.metrics.voc_detection_map`` (VOC07 11-point, protocols.md P3) at VOC07-test scale.

Synthetic, seeded data: 5,000 images x 20 classes, 0-3 ground-truth boxes per image and
class (20% difficult), 100 detections per image and class, most jittered around a
ground-truth box of the image and the rest random. For comparison, a per-detection
Python loop in the style of Fast R-CNN's ``voc_eval.py`` runs on the first class over
the first ``--naive-images`` images; its time is scaled linearly to all images and
classes, and its AP on that subset is checked against the vectorised one.

    python benchmarks/bench_detection_ap.py
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from evals.metrics import voc_detection_ap, voc_detection_map  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="number of images (VOC07 test has 4,952)")
    parser.add_argument("--classes", type=int, default=20, help="number of classes (VOC: 20)")
    parser.add_argument("--dets-per-image", type=int, default=100, help="detections per image and class")
    parser.add_argument("--naive-images", type=int, default=500, help="images the naive loop runs on (first class)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def synthetic_class(rng: np.random.Generator, images: int, dets_per_image: int) -> tuple[dict, dict]:
    """One class: annotations {id: (boxes, difficult)} and detections {id: (K, 5)}."""
    gt_count = rng.integers(0, 4, size=images)
    total_gt = int(gt_count.sum())
    xy = rng.integers(0, 400, size=(total_gt, 2))
    gt_boxes = np.concatenate([xy, xy + rng.integers(10, 200, size=(total_gt, 2))], 1).astype(np.float64)
    difficult = rng.random(total_gt) < 0.2
    gt_start = np.cumsum(gt_count) - gt_count

    k = dets_per_image
    det_image = np.repeat(np.arange(images), k)
    # 70% of the detections of an image with boxes sit near one of them.
    near = (rng.random(images * k) < 0.7) & (gt_count[det_image] > 0)
    pick = gt_start[det_image] + (rng.random(images * k) * np.maximum(gt_count[det_image], 1)).astype(np.int64)
    pick = np.minimum(pick, max(total_gt - 1, 0))
    xy = rng.integers(0, 400, size=(images * k, 2))
    boxes = np.concatenate([xy, xy + rng.integers(10, 200, size=(images * k, 2))], 1).astype(np.float64)
    if total_gt:
        jitter = rng.normal(scale=8.0, size=(images * k, 4))
        boxes[near] = np.round(gt_boxes[pick[near]] + jitter[near])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])  # keep x2 >= x1, y2 >= y1
    scores = rng.random(images * k) + 0.5 * near
    dets = np.concatenate([boxes, scores[:, None]], 1)

    ids = [f"{i:06d}" for i in range(images)]
    annotations = {
        image_id: (b, d)
        for image_id, b, d in zip(ids, np.split(gt_boxes, gt_start[1:]), np.split(difficult, gt_start[1:]))
    }
    detections = dict(zip(ids, np.split(dets, np.arange(k, images * k, k))))
    return detections, annotations


def naive_voc07_ap(detections: dict, annotations: dict, iou_threshold: float = 0.5) -> float:
    """Per-detection Python loop, one numpy IoU row per detection (voc_eval.py style)."""
    npos = sum(int((~d).sum()) for _, d in annotations.values())
    image_ids = [i for i, d in detections.items() for _ in range(len(d))]
    dets = np.concatenate(list(detections.values()))
    order = np.argsort(-dets[:, 4], kind="stable")
    matched = {i: np.zeros(len(b), bool) for i, (b, _) in annotations.items()}
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, d in enumerate(order):
        gt, difficult = annotations[image_ids[d]]
        bb = dets[d, :4]
        ovmax = -math.inf
        if len(gt):
            iw = np.maximum(np.minimum(gt[:, 2], bb[2]) - np.maximum(gt[:, 0], bb[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(gt[:, 3], bb[3]) - np.maximum(gt[:, 1], bb[1]) + 1.0, 0.0)
            inter = iw * ih
            union = (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0) + (gt[:, 2] - gt[:, 0] + 1.0) * (
                gt[:, 3] - gt[:, 1] + 1.0
            ) - inter
            overlaps = inter / union
            jmax = int(np.argmax(overlaps))
            ovmax = overlaps[jmax]
        if ovmax > iou_threshold:
            if not difficult[jmax]:
                if not matched[image_ids[d]][jmax]:
                    tp[rank] = 1.0
                    matched[image_ids[d]][jmax] = True
                else:
                    fp[rank] = 1.0
        else:
            fp[rank] = 1.0
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        ap += (prec[rec >= t].max() if (rec >= t).any() else 0.0) / 11.0
    return ap


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    classes = [synthetic_class(rng, args.images, args.dets_per_image) for _ in range(args.classes)]
    detections_per_class = [c[0] for c in classes]
    annotations_per_class = [c[1] for c in classes]
    total = args.images * args.classes * args.dets_per_image
    print(f"data: {args.images} images x {args.classes} classes x {args.dets_per_image} detections "
          f"= {total:,} detections (generated in {time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    per_class, mean_ap = voc_detection_map(detections_per_class, annotations_per_class, use_07_metric=True)
    vectorised_s = time.perf_counter() - t0
    print(f"voc_detection_map (07 11-point), all {args.classes} classes: {vectorised_s:.2f} s "
          f"({vectorised_s / args.classes * 1e3:.0f} ms per class), mAP = {mean_ap:.4f}")

    subset = [f"{i:06d}" for i in range(min(args.naive_images, args.images))]
    sub_dets = {i: detections_per_class[0][i] for i in subset}
    sub_annots = {i: annotations_per_class[0][i] for i in subset}
    t0 = time.perf_counter()
    naive_ap = naive_voc07_ap(sub_dets, sub_annots)
    naive_s = time.perf_counter() - t0
    fast_ap = voc_detection_ap(sub_dets, sub_annots, use_07_metric=True)
    if not math.isclose(naive_ap, fast_ap, abs_tol=1e-12):
        raise SystemExit(f"naive AP {naive_ap} != vectorised AP {fast_ap} on the subset")
    scaled_s = naive_s * (args.images / len(subset)) * args.classes
    print(f"naive loop, class 0, {len(subset)} images: {naive_s:.2f} s (AP {naive_ap:.4f}, equal to the "
          f"vectorised AP); scaled to {args.images} images x {args.classes} classes: {scaled_s:.1f} s")
    print(f"speed-up (scaled naive / vectorised): {scaled_s / vectorised_s:.0f}x")


if __name__ == "__main__":
    main()
