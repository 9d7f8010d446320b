"""VOC07 detection speed: the metric at VOC07-test scale and the Fast R-CNN detector's training rate.

1. ``evals.metrics.voc_detection_map`` (VOC07 11-point, protocols.md P3) on 5,000 images x 20
   classes x 100 detections, with the seeded synthetic data of ``bench_detection_ap.py``;
   ``coco_style_ap`` (pycocotools) on a subset for comparison.
2. Training images/s of ``evals.voc07_det``'s Fast R-CNN on CPU (or ``--device``): full steps
   (forward, softmax + smooth-L1, backward, fused SGD) on 2 images x 128 RoIs at the given
   shorter sides (P3 trains at 480-1200 px; the demo preset at 160-224 px).

    python benchmarks/bench_detection.py [--images 5000] [--train-sides 224 600] [--steps 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_detection_ap import synthetic_class  # noqa: E402

from evals import engine, voc07_det  # noqa: E402
from evals.detection.model import detection_loss  # noqa: E402
from evals.metrics import coco_style_ap, voc_detection_map  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="images for the metric (VOC07 test has 4,952)")
    parser.add_argument("--classes", type=int, default=20, help="classes (VOC: 20)")
    parser.add_argument("--dets-per-image", type=int, default=100, help="detections per image and class")
    parser.add_argument("--coco-images", type=int, default=100, help="images for the pycocotools comparison (0: skip)")
    parser.add_argument("--train-sides", type=int, nargs="*", default=[224, 600],
                        help="shorter sides to time training at (4:3 images)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per side (after 2 warm-up steps)")
    parser.add_argument("--layout", default="caffenet", choices=("caffenet", "torchvision"), help="AlexNet layout")
    parser.add_argument("--device", default="cpu", help="device for the training benchmark")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def bench_metric(args) -> None:
    rng = np.random.default_rng(args.seed)
    classes = [synthetic_class(rng, args.images, args.dets_per_image) for _ in range(args.classes)]
    detections, annotations = [c[0] for c in classes], [c[1] for c in classes]
    total = args.images * args.classes * args.dets_per_image
    t0 = time.perf_counter()
    _, mean_ap = voc_detection_map(detections, annotations, use_07_metric=True)
    seconds = time.perf_counter() - t0
    print(f"metric: voc_detection_map (VOC07 11-point), {args.images} images x {args.classes} classes x "
          f"{args.dets_per_image} detections = {total:,}: {seconds:.2f} s (mAP {100 * mean_ap:.2f})")
    if args.coco_images:
        ids = list(detections[0])[:args.coco_images]
        sub_d = [{i: d[i] for i in ids} for d in detections]
        sub_a = [{i: a[i] for i in ids} for a in annotations]
        t0 = time.perf_counter()
        coco = coco_style_ap(sub_d, sub_a)
        seconds = time.perf_counter() - t0
        print(f"metric: coco_style_ap (pycocotools), {len(ids)} images x {args.classes} classes: {seconds:.2f} s "
              f"(AP {100 * coco['AP']:.2f}, AP50 {100 * coco['AP50']:.2f})")


def bench_training(args) -> None:
    device = torch.device(args.device)
    config = voc07_det.PRESETS["paper"]
    loaded = engine.load_for_eval("random", args.seed, num_classes=None, new_head=True, layout=args.layout)
    model = voc07_det.build_model(config, loaded).to(device).train()
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    optimizer = torch.optim.SGD([{"params": weights}, {"params": biases, "lr": 2 * config.lr}], lr=config.lr,
                                momentum=config.momentum, weight_decay=config.weight_decay,
                                fused=device.type in ("cpu", "cuda"))
    rng = np.random.default_rng(args.seed)
    per_image = config.rois_per_batch // config.ims_per_batch
    for side in args.train_sides:
        height, width = side, round(side * 4 / 3)
        images = torch.randn(config.ims_per_batch, 3, height, width, device=device)
        xy = rng.uniform(0, [width * 0.7, height * 0.7], size=(config.rois_per_batch, 2))
        wh = rng.uniform(16, [width * 0.3, height * 0.3], size=(config.rois_per_batch, 2))
        rois = torch.tensor(np.concatenate([np.repeat(np.arange(config.ims_per_batch), per_image)[:, None], xy,
                                            xy + wh], 1), dtype=torch.float32, device=device)
        labels = torch.from_numpy(rng.integers(0, 21, config.rois_per_batch)).to(device)
        labels[: config.rois_per_batch * 3 // 4] = 0  # 25% foreground
        targets = torch.randn(config.rois_per_batch, 4, device=device)

        def step():
            cls_logits, deltas = model(images, rois)
            loss = sum(detection_loss(cls_logits, deltas, labels, targets))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / args.steps
        print(f"training ({args.layout}, {device}, {torch.get_num_threads()} threads): {height}x{width} images, "
              f"{config.ims_per_batch} x {per_image} RoIs: {seconds:.2f} s/step, "
              f"{config.ims_per_batch / seconds:.2f} images/s")


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    bench_metric(args)
    bench_training(args)


if __name__ == "__main__":
    main()
