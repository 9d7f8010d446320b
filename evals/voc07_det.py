"""VOC2007 detection: Fast R-CNN on the pretrained AlexNet (protocols.md P3; rbgirshick/fast-rcnn).

This module is the protocol: the configuration, the data it reads and the run. The detector and
its pieces are in :mod:`evals.detection` (box maths, dataset, model, devkit files, proposals).

conv1..conv5 of the checkpoint -> RoI max pooling 6x6 on conv5 -> fc6, fc7 of the checkpoint (ReLU
+ dropout 0.5) -> a new 21-way ``cls_score`` and an 84-way class-specific ``bbox_pred``. Trained on
VOC07 trainval with Selective Search proposals (``evals.detection.proposals``) plus the
ground-truth boxes, 2 images x 128 RoIs per step (25% foreground), softmax cross-entropy +
smooth-L1 on box targets normalised per class with means and stds measured over the training
RoIs before training (folded back into ``bbox_pred`` for the test); conv1 frozen. Tested on VOC07
test at one scale: softmax scores, class-specific box regression, per class the boxes scoring
above 0.05 and NMS 0.3, at most 100 detections per image. Reports the VOC07 11-point AP per
class and mAP (the P3 number), COCO-style AP@[.5:.95] / AP50 beside it, and the mAP of the same
proposals with uniformly random scores.

Difficult objects are trained on, as Fast R-CNN's VOC reader keeps them (``use_difficult``;
``False`` is py-faster-rcnn's ``use_diff=False``, which also skips images without another object).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from evals import metrics
from evals.common import CommonConfig, Execution, weight_and_bias_groups
from evals.datasets.preflight import preflight_voc_split
from evals.datasets.voc import VOC_CLASSES, detection_annotations, official_main_sizes
from evals.detection import model as detector
from evals.detection import proposals
from evals.detection.boxes import TargetStats, fixed_target_stats, target_stats
from evals.detection.data import VOCDetectionDataset, collate_images, images_with_objects, training_item
from evals.detection.devkit import class_annotations, write_devkit_results
from evals.detection.model import FastRCNN, detection_loss
from evals.run import run_task
from runtime.config import chosen, operational, protocol
from runtime.data import Augmented, loader_factory
from runtime.loop import Trainer, step_lr

TASK = "voc07_det"

BBOX_NORMALIZATIONS = ("per_class", "fixed")
CHECKS = {"choices": {"proposals": proposals.SOURCES, "frozen_layers": ("conv1", "conv2", "conv3", "conv4", "conv5"),
                      "bbox_normalization": BBOX_NORMALIZATIONS},
          "minimum": {"test_scale": 64}}

@dataclass
class Config(CommonConfig):
    train_split: str = protocol("trainval", "P3")
    test_split: str = protocol("test", "P3")
    proposals: str = chosen("fast", "Selective Search (P3) from OpenCV, fast mode, since the reference's precomputed "
                                    "boxes are not packaged; quality and Fast R-CNN's .mat (mat) selectable")
    proposals_dir: str | None = operational(None, "cache (evals.detection.proposals layout); default "
                                                  "DATA_ROOT/proposals/VOC2007")
    max_proposals: int = chosen(2000, "the top-ranked boxes kept per image: about what Selective Search fast gives "
                                      "on VOC, where Fast R-CNN used all")
    proposal_max_side: int | None = protocol(None, "P3: Selective Search at full resolution (None)")
    train_scales: tuple[int, ...] = protocol((480, 576, 688, 864, 1200), "P3: shorter side, one drawn per image")
    train_max_size: int = protocol(2000, "P3: longer side capped")
    test_scale: int = protocol(600, "P3")
    test_max_size: int = chosen(1000, "P3: not published; Fast R-CNN's default")
    flip: bool = protocol(True, "P3: horizontal flips")
    ims_per_batch: int = protocol(2, "P3")
    rois_per_batch: int = protocol(128, "P3 (64 per image)")
    fg_fraction: float = protocol(0.25, "P3")
    fg_threshold: float = protocol(0.5, "P3: IoU >= 0.5 is foreground")
    bg_range: tuple[float, float] = protocol((0.1, 0.5), "P3: background IoU in [0.1, 0.5)")
    iterations: int = protocol(150_000, "P3")
    lr: float = protocol(0.002, "P3")
    lr_step: int = protocol(50_000, "P3: x0.1 every 50k")
    lr_gamma: float = protocol(0.1, "P3")
    momentum: float = protocol(0.9, "P3")
    weight_decay: float = protocol(5e-4, "P3")
    bias_lr_mult: float = protocol(2.0, "P3: Fast R-CNN's prototxts, lr_mult 2 on every bias")
    bias_decay_mult: float = protocol(0.0, "P3: Fast R-CNN's prototxts, decay_mult 0 on every bias "
                                           "(models/VGG_CNN_M_1024/coco/train.prototxt)")
    bbox_normalization: str = protocol("per_class", "P3: fast-rcnn roi_data_layer/roidb.py, per-class means/stds "
                                                    "of the training RoIs' targets (BBOX_THRESH 0.5, flips "
                                                    "included), folded into bbox_pred as its train.py snapshot "
                                                    "does; 'fixed' is py-faster-rcnn's stds (0.1, 0.1, 0.2, 0.2)")
    cls_init_std: float = protocol(0.01, "P3: cls_score N(0, 0.01), bias 0")
    bbox_init_std: float = protocol(0.001, "P3: bbox_pred N(0, 0.001), bias 0")
    dropout: float = protocol(0.5, "P3: fc6/fc7 dropout")
    frozen_layers: tuple[str, ...] = protocol(("conv1",), "P3")
    nms_threshold: float = protocol(0.3, "P3: per-class NMS")
    max_per_image: int = protocol(100, "P3")
    score_threshold: float = protocol(0.05, "P3: fast-rcnn test.py test_net(thresh=0.05), per class before NMS")
    use_difficult: bool = protocol(True, "P3: fast-rcnn datasets/pascal_voc.py trains on every object, difficult "
                                         "ones included; False is py-faster-rcnn's use_diff=False")
    test_roi_chunk: int = operational(1024, "RoIs per fc6/fc7 pass at test (memory only)")
    checkpoint_every: int = operational(10_000)


PRESETS = {
    "paper": Config(),
    # CPU-sized: the same pipeline on the generated data (images of 160-256 px) at small scales,
    # 50 proposals per image, 2 x 32 RoIs and 80 steps: about a minute on 2 free cores. So short a
    # schedule leaves the class scores near 1/21 < 0.05, so the test keeps scores above 0.001
    # (P3's 0.05 would leave the demo without detections).
    "demo": Config(preset="demo", data_root="demo_output/data", max_proposals=50, train_scales=(160, 192, 224),
                   train_max_size=400, test_scale=192, test_max_size=400, rois_per_batch=64, iterations=80,
                   lr=0.005, lr_step=60, checkpoint_every=40, workers=1, score_threshold=1e-3),
}


# ----------------------------------------------------------------------------- harness


def proposal_boxes(config: Config, voc_root: Path, split: str, ids: Sequence[str], info) -> dict[str, np.ndarray]:
    """The split's cached proposals (computed first where missing), at most ``max_proposals`` each."""
    cache = Path(config.proposals_dir) if config.proposals_dir else Path(config.data_root) / "proposals" / "VOC2007"
    missing = proposals.missing_ids(cache, config.proposals, ids)
    if missing:
        if config.proposals not in proposals.MODES:
            raise FileNotFoundError(f"{cache / config.proposals}: no proposals for {len(missing)} {split} images "
                                    f"(import them: python -m evals.detection.proposals --from-mat FILE ...)")
        if info.is_main:
            proposals.compute_proposals(voc_root, split, cache, config.proposals, workers=max(config.workers, 1),
                                        max_side=config.proposal_max_side, ids=missing)
        if info.world_size > 1:
            torch.distributed.barrier()
    return {i: b[:config.max_proposals] for i, b in proposals.load_split_proposals(cache, config.proposals, ids).items()}


def regression_stats(config: Config, train_set: VOCDetectionDataset) -> TargetStats:
    """The box-target normalisation of this run, from the training set alone and before any step
    (P3): per class as Fast R-CNN's roidb (examples: candidates with IoU >= ``fg_threshold``, Fast
    R-CNN's BBOX_THRESH = FG_THRESH = 0.5; mirrored copies when ``flip``), or the fixed stds.
    Deterministic, so a resumed run recomputes the same values (the trainer's identity holds them
    and refuses a checkpoint trained with others)."""
    if config.bbox_normalization == "fixed":
        return fixed_target_stats(detector.NUM_CLASSES)
    return target_stats(train_set.regression_images(), detector.NUM_CLASSES, config.fg_threshold, config.flip)


def build_model(config: Config, loaded) -> FastRCNN:
    """The detector on the loaded checkpoint's AlexNet, initialised and frozen as ``config`` says."""
    return detector.build_model(loaded.model, config.frozen_layers, config.cls_init_std, config.bbox_init_std)


class Data(NamedTuple):
    voc_root: Path
    train: dict  # image id -> VOCAnnotation
    test: dict
    splits: dict  # split name -> image ids: the run's data identity


def load_data(config: Config) -> Data:
    """The train and test annotations and their id lists."""
    voc_root = Path(config.data_root) / "VOCdevkit" / "VOC2007"
    train = detection_annotations(voc_root, config.train_split)
    test = detection_annotations(voc_root, config.test_split)
    return Data(voc_root, train, test, {config.train_split: list(train), config.test_split: list(test)})


def official_sizes(config: Config) -> dict[str, int]:
    """The image count of each split the ``paper`` preset must read: VOC2007 trainval 5,011 and test 4,952 (P3). ``evals.run`` compares
    them with the loaded split lists before training (``--allow-subset`` to run on others)."""
    return official_main_sizes(2007, (config.train_split, config.test_split))


def backbone_options(config: Config) -> dict:
    """The checkpoint's AlexNet; fc8 is replaced by the Fast R-CNN heads."""
    return {"num_classes": None, "new_head": True, "dropout": config.dropout}


def preflight(data: Data, config: Config, log) -> None:
    for split in (config.train_split, config.test_split):  # before hours of Selective Search
        preflight_voc_split(data.voc_root, split, log=log)


METRIC_DEFINITIONS = {"AP": metrics.DETECTION_AP_DEFINITIONS["voc07_11point"],
                      "mAP": "mean of per-class VOC07 11-point AP over classes with positives",
                      "coco_AP": "pycocotools AP@[.5:.95] (difficult boxes as iscrowd; see evals.metrics.coco_style_ap)",
                      "coco_AP50": "pycocotools AP at IoU 0.5 (101-point; difficult boxes as iscrowd)",
                      "random_score_mAP": "mAP of the same test proposals scored uniformly at random per class, "
                                          "same NMS and 100-per-image cap, no box regression"}


def train_and_evaluate(config: Config, data: Data, begun) -> dict:
    """Proposals, Fast R-CNN training (P3) and the test; the metrics (main rank)."""
    info, device, loaded = begun.info, begun.device, begun.loaded
    voc_root, train_annotations, test_annotations = data.voc_root, data.train, data.test
    train_ids_all, test_ids = data.splits[config.train_split], data.splits[config.test_split]
    train_boxes = proposal_boxes(config, voc_root, config.train_split, train_ids_all, info)
    test_boxes = proposal_boxes(config, voc_root, config.test_split, test_ids, info)
    train_ids = images_with_objects(train_annotations, train_ids_all, config.use_difficult)
    train_set = VOCDetectionDataset(voc_root, train_ids, train_annotations, train_boxes, config.use_difficult)

    stats = regression_stats(config, train_set)

    execution = Execution.of(config, device)
    model = execution.model(build_model(config, loaded))
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = weight_and_bias_groups(model, config.lr, config.weight_decay, config.bias_lr_mult,
                                    config.bias_decay_mult)
    # fused: one kernel per step instead of several passes over fc6/fc7's 55M weights (same update)
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                                fused=device.type in ("cpu", "cuda"))
    scheduler = step_lr(optimizer, config.lr_step, config.lr_gamma)
    net = DistributedDataParallel(model) if info.world_size > 1 else model
    identity = {**begun.identity, "bbox_target_stats": stats.as_dict()}  # in every training checkpoint
    trainer = Trainer(model=net, optimizer=optimizer, scheduler=scheduler, total_steps=config.iterations,
                             work_dir=begun.work_dir, checkpoint_every=config.checkpoint_every, info=info,
                             description=TASK, trainable=trainable, identity=identity,
                             amp_dtype=execution.amp_dtype, scaler=execution.scaler())
    if config.resume:
        trainer.resume()  # prints where it resumed

    transform = functools.partial(
        training_item, flip=config.flip, scales=config.train_scales, max_size=config.train_max_size,
        rois_per_image=config.rois_per_batch // config.ims_per_batch, fg_fraction=config.fg_fraction,
        fg_threshold=config.fg_threshold, bg_range=config.bg_range, stats=stats)
    train_data = Augmented(train_set, transform, config.seed)
    per_rank_batch = max(1, config.ims_per_batch // info.world_size)

    make_loader = loader_factory(train_data, per_rank_batch, config, info, collate_fn=collate_images)

    def step_fn(batch):
        cls_logits, deltas = net(execution.images(batch["images"]), batch["rois"].to(device))
        loss_cls, loss_bbox = detection_loss(cls_logits.float(), deltas.float(), batch["labels"].to(device),
                                             batch["targets"].to(device))
        return loss_cls + loss_bbox, {"loss_cls": loss_cls.item(), "loss_bbox": loss_bbox.item()}

    t0, step0 = time.monotonic(), trainer.state.step
    trainer.run(make_loader, step_fn, per_rank_batch, len(train_set))
    train_seconds = time.monotonic() - t0
    if not info.is_main:
        return {}

    detector.unnormalize_bbox_pred(model.bbox_pred, stats)  # once, after the last checkpoint: raw deltas
    t0 = time.monotonic()
    model.eval()
    with execution.autocast():  # detect() scores and decodes boxes in float32
        detections, baseline = detector.detect_images(model, voc_root, test_ids, test_boxes, config, device,
                                                      seed=config.seed, desc=f"{TASK} test")
    test_seconds = time.monotonic() - t0
    devkit_dir = begun.work_dir / "devkit"
    write_devkit_results(detections, devkit_dir)

    annotations = class_annotations(test_annotations, test_ids)
    per_class, mean_ap = metrics.voc_detection_map(detections, annotations, use_07_metric=True)
    _, random_map = metrics.voc_detection_map(baseline, annotations, use_07_metric=True)
    coco = metrics.coco_style_ap(detections, annotations)
    steps_done = trainer.state.step - step0

    def pct(value):
        return None if value is None or np.isnan(value) else 100.0 * float(value)

    return {
        "mAP": 100.0 * mean_ap,
        # None where a class has no non-difficult test object (AP undefined, left out of the mean)
        "per_class_AP": {c: pct(v) for c, v in zip(VOC_CLASSES, per_class)},
        "coco_AP": pct(coco["AP"]),
        "coco_AP50": pct(coco["AP50"]),
        "random_score_mAP": pct(random_map),
        "mean_proposals_per_image": float(np.mean([len(test_boxes[i]) for i in test_ids])),
        "train_images": len(train_set),
        "train_seconds": train_seconds,
        "train_images_per_second": steps_done * per_rank_batch * info.world_size / max(train_seconds, 1e-9),
        "test_seconds": test_seconds,
        "devkit_results": str(devkit_dir),
        "model_selection": "none: fixed schedule, last iterate evaluated once on the test split",
    }


def summary(result: dict) -> str:
    return (f"mAP {result['mAP']:.1f} (random scores {result['random_score_mAP']:.1f}; "
            f"COCO AP {result['coco_AP'] or 0:.1f})")


def run(config: Config) -> dict:
    """Evaluate ``config.ckpt`` on VOC07 detection and write its record (evals.run.run_task)."""
    return run_task(TASK, config)
