"""VOC2007 detection: Fast R-CNN on the pretrained AlexNet (protocols.md P3; rbgirshick/fast-rcnn).

conv1..conv5 of the checkpoint -> RoI max pooling 6x6 on conv5 (spatial scale 1/16: conv5's
stride, ``layer_geometry``) -> fc6, fc7 of the checkpoint (ReLU + dropout 0.5) -> a new 21-way
``cls_score`` and an 84-way class-specific ``bbox_pred``. Trained on VOC07 trainval with
Selective Search proposals (``evals.proposals``) plus the ground-truth boxes, 2 images x 128
RoIs per step (25% foreground), softmax cross-entropy + smooth-L1; conv1 frozen. Tested on VOC07
test at one scale: softmax scores, class-specific box regression, per-class NMS 0.3, at most 100
detections per image. Reports the VOC07 11-point AP per class and mAP (the P3 number), COCO-style
AP@[.5:.95] / AP50 beside it, and the mAP of the same proposals with uniformly random scores.

Conventions: boxes are VOC's 1-based inclusive pixels on disk and in the metric; internally they
are 0-based inclusive, as Fast R-CNN's roidb (``x - 1``), so a box is ``x2 - x1 + 1`` wide.
Difficult objects are left out of training altogether (Fast R-CNN's ``use_diff=False``: they are
neither ground truth nor counted when labelling RoIs), and trainval images without a
non-difficult object are skipped, as its ``filter_roidb`` does.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from torchvision.ops import RoIPool, nms
from tqdm import tqdm

from backbones.alexnet import AlexNet, layer_geometry
from evals import engine, metrics, proposals
from evals.common import CommonConfig, to_tensor
from evals.datasets.preflight import preflight_voc_split
from evals.datasets.voc import VOC_CLASSES, detection_annotations, image_path, load_rgb
from runtime.atomic import atomic_write

TASK = "voc07_det"
NUM_CLASSES = len(VOC_CLASSES) + 1  # background + 20
BBOX_MEANS = (0.0, 0.0, 0.0, 0.0)   # Fast R-CNN's BBOX_NORMALIZE_MEANS
BBOX_STDS = (0.1, 0.1, 0.2, 0.2)    # Fast R-CNN's BBOX_NORMALIZE_STDS
BBOX_CLIP = math.log(1000.0 / 16)   # largest dw/dh decoded (Detectron's guard against exp overflow)

CHECKS = {"choices": {"proposals": proposals.SOURCES, "frozen_layers": ("conv1", "conv2", "conv3", "conv4", "conv5")},
          "minimum": {"test_scale": 64}}

@dataclass
class Config(CommonConfig):
    train_split: str = "trainval"                 # P3
    test_split: str = "test"                      # P3
    proposals: str = "fast"                       # P3: Selective Search; chosen: OpenCV "fast" mode (or quality | mat)
    proposals_dir: str | None = None              # cache (evals.proposals layout); default DATA_ROOT/proposals/VOC2007
    max_proposals: int = 2000                     # chosen: top-ranked boxes kept per image (SS gives ~2k on VOC)
    proposal_max_side: int | None = None          # resize before Selective Search (None: full resolution)
    train_scales: tuple[int, ...] = (480, 576, 688, 864, 1200)  # P3: shorter side, one drawn per image
    train_max_size: int = 2000                    # P3: longer side capped
    test_scale: int = 600                         # P3
    test_max_size: int = 1000                     # chosen: P3 says not published; Fast R-CNN's default
    flip: bool = True                             # P3: horizontal flips
    ims_per_batch: int = 2                        # P3
    rois_per_batch: int = 128                     # P3 (64 per image)
    fg_fraction: float = 0.25                     # P3
    fg_threshold: float = 0.5                     # P3: IoU >= 0.5 is foreground
    bg_range: tuple[float, float] = (0.1, 0.5)    # P3: background IoU in [0.1, 0.5)
    iterations: int = 150_000                     # P3
    lr: float = 0.002                             # P3
    lr_step: int = 50_000                         # P3: x0.1 every 50k
    lr_gamma: float = 0.1                         # P3
    momentum: float = 0.9                         # P3
    weight_decay: float = 5e-4                    # P3
    bias_lr_mult: float = 2.0                     # Fast R-CNN's prototxts: lr_mult 2 on every bias
    cls_init_std: float = 0.01                    # P3: cls_score N(0, 0.01), bias 0
    bbox_init_std: float = 0.001                  # P3: bbox_pred N(0, 0.001), bias 0
    dropout: float = 0.5                          # P3: fc6/fc7 dropout
    frozen_layers: tuple[str, ...] = ("conv1",)   # P3
    nms_threshold: float = 0.3                    # P3: per-class NMS
    max_per_image: int = 100                      # P3
    score_threshold: float = 1e-3                 # chosen: drop near-zero scores before NMS
    use_difficult: bool = False                   # Fast R-CNN: difficult objects excluded from training
    test_roi_chunk: int = 1024                    # RoIs per fc6/fc7 pass at test (memory only)
    checkpoint_every: int = 10_000


PRESETS = {
    "paper": Config(),
    # CPU-sized: the same pipeline on the generated data (images of 160-256 px) at small scales,
    # 50 proposals per image, 2 x 32 RoIs and 80 steps: about a minute on 2 free cores.
    "demo": Config(preset="demo", data_root="demo_output/data", max_proposals=50, train_scales=(160, 192, 224),
                   train_max_size=400, test_scale=192, test_max_size=400, rois_per_batch=64, iterations=80,
                   lr=0.005, lr_step=60, checkpoint_every=40, workers=1),
}
CHOSEN = ("proposals", "max_proposals", "test_max_size", "score_threshold")


# ----------------------------------------------------------------------------- box math


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of inclusive-pixel boxes (widths ``x2 - x1 + 1``, as the VOC metric)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def encode_boxes(rois, gt, means=BBOX_MEANS, stds=BBOX_STDS) -> np.ndarray:
    """Fast R-CNN's regression targets (dx, dy, dw, dh) of ``gt`` relative to ``rois``, normalised
    by ``(t - means) / stds``; inclusive boxes, centre at ``x1 + 0.5 * w``."""
    rois, gt = np.asarray(rois, np.float64).reshape(-1, 4), np.asarray(gt, np.float64).reshape(-1, 4)
    w, h = rois[:, 2] - rois[:, 0] + 1.0, rois[:, 3] - rois[:, 1] + 1.0
    cx, cy = rois[:, 0] + 0.5 * w, rois[:, 1] + 0.5 * h
    gw, gh = gt[:, 2] - gt[:, 0] + 1.0, gt[:, 3] - gt[:, 1] + 1.0
    gcx, gcy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    targets = np.stack([(gcx - cx) / w, (gcy - cy) / h, np.log(gw / w), np.log(gh / h)], 1)
    return ((targets - np.asarray(means)) / np.asarray(stds)).astype(np.float32)


def decode_boxes(rois: torch.Tensor, deltas: torch.Tensor, means=BBOX_MEANS, stds=BBOX_STDS) -> torch.Tensor:
    """Inverse of :func:`encode_boxes`: ``rois`` (R, 4), ``deltas`` (R, 4k) normalised -> (R, 4k) boxes.
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


def resized_tensor(image: Image.Image, scale: float) -> torch.Tensor:
    width, height = image.size
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return to_tensor(image.resize(size, Image.BILINEAR))


# ----------------------------------------------------------------------------- RoI sampling


@dataclass
class RoISample:
    rois: np.ndarray      # (R, 4) 0-based inclusive, image coordinates before scaling
    labels: np.ndarray    # (R,) int64, 0 = background
    targets: np.ndarray   # (R, 4) normalised regression targets (zero for background)


def sample_rois(proposal_boxes: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, rois_per_image: int,
                fg_fraction: float, fg_threshold: float, bg_range: tuple[float, float],
                rng: np.random.Generator) -> RoISample:
    """Fast R-CNN's minibatch sampling for one image: the candidates are the proposals plus the
    ground-truth boxes; up to ``round(fg_fraction * rois_per_image)`` foreground RoIs (IoU >=
    ``fg_threshold`` with some ground truth, labelled with its class) and background RoIs (max
    IoU in ``bg_range``) for the rest, each drawn without replacement. Fewer RoIs come back when
    there are too few candidates."""
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
        targets[:len(fg)] = encode_boxes(candidates[fg], gt_boxes[assigned[fg]])
    return RoISample(candidates[keep], labels, targets)


# ----------------------------------------------------------------------------- data


class DetectionImages(Dataset):
    """VOC images with their ground truth (0-based inclusive boxes, labels 1..20) and proposals."""

    def __init__(self, voc_root, ids: Sequence[str], annotations: Mapping, boxes: Mapping[str, np.ndarray],
                 use_difficult: bool):
        self.voc_root, self.ids = Path(voc_root), list(ids)
        self.gt_boxes, self.gt_labels, self.proposals = [], [], []
        for image_id in self.ids:
            objects = [o for o in annotations[image_id].objects if use_difficult or not o.difficult]
            self.gt_boxes.append(np.array([o.box for o in objects], np.float32).reshape(-1, 4) - 1.0)
            self.gt_labels.append(np.array([VOC_CLASSES.index(o.name) + 1 for o in objects], np.int64))
            self.proposals.append(np.asarray(boxes[image_id], np.float32).reshape(-1, 4) - 1.0)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image = load_rgb(image_path(self.voc_root, self.ids[index]))
        return image, self.gt_boxes[index], self.gt_labels[index], self.proposals[index]


def collate_images(batch):
    """Pad images to one size (zeros = the normalised mean, as Fast R-CNN's blob) and stack the
    RoIs as ``(batch index, x1, y1, x2, y2)`` rows."""
    height = max(item["image"].shape[1] for item in batch)
    width = max(item["image"].shape[2] for item in batch)
    images = torch.zeros(len(batch), 3, height, width)
    rois = []
    for i, item in enumerate(batch):
        images[i, :, :item["image"].shape[1], :item["image"].shape[2]] = item["image"]
        rois.append(torch.cat([torch.full((len(item["rois"]), 1), float(i)), item["rois"]], 1))
    return {"images": images, "rois": torch.cat(rois), "labels": torch.cat([b["labels"] for b in batch]),
            "targets": torch.cat([b["targets"] for b in batch])}


# ----------------------------------------------------------------------------- model


class FastRCNN(nn.Module):
    """AlexNet conv1..conv5 -> RoIPool 6x6 on conv5 -> fc6, fc7 -> cls_score (21), bbox_pred (84)."""

    def __init__(self, backbone: AlexNet, num_classes: int = NUM_CLASSES, cls_init_std: float = 0.01,
                 bbox_init_std: float = 0.001):
        super().__init__()
        stride = layer_geometry(backbone.layout)["conv5"][0]
        assert stride == 16, f"conv5 stride is {stride}, Fast R-CNN's spatial scale assumes 16"
        self.backbone = backbone
        self.roi_pool = RoIPool((6, 6), spatial_scale=1.0 / stride)  # P3
        self.cls_score = nn.Linear(backbone.fc7.out_features, num_classes)
        self.bbox_pred = nn.Linear(backbone.fc7.out_features, 4 * num_classes)
        nn.init.normal_(self.cls_score.weight, 0.0, cls_init_std)
        nn.init.normal_(self.bbox_pred.weight, 0.0, bbox_init_std)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.activations(images, ["conv5"])["conv5"]

    def head(self, conv5: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rois``: (R, 5) rows ``(batch index, x1, y1, x2, y2)`` in input pixels (0-based)."""
        x = torch.flatten(self.roi_pool(conv5, rois), 1)
        net, caffe = self.backbone, self.backbone.layout == "caffenet"
        for fc in (net.fc6, net.fc7):  # the layout's own order: Caffe drops after ReLU, torchvision before fc
            x = net.drop(F.relu(fc(x))) if caffe else F.relu(fc(net.drop(x)))
        return self.cls_score(x), self.bbox_pred(x)

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.features(images), rois)


def detection_loss(cls_logits: torch.Tensor, bbox_deltas: torch.Tensor, labels: torch.Tensor,
                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax cross-entropy over all RoIs, and smooth-L1 (beta 1) on the foreground RoIs' own-class
    deltas, summed and divided by the number of RoIs (Caffe's SmoothL1Loss normalisation)."""
    loss_cls = F.cross_entropy(cls_logits, labels)
    fg = torch.nonzero(labels > 0).squeeze(1)
    own = bbox_deltas.reshape(len(labels), -1, 4)[fg, labels[fg]]
    loss_bbox = F.smooth_l1_loss(own, targets[fg], beta=1.0, reduction="sum") / max(len(labels), 1)
    return loss_cls, loss_bbox


# ----------------------------------------------------------------------------- test


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
    all_scores = np.concatenate([d[:, 4] for d in per_class])
    if len(all_scores) > max_per_image:
        cut = np.sort(all_scores)[-max_per_image]
        per_class = [d[d[:, 4] >= cut] for d in per_class]
    return per_class


@torch.no_grad()
def detect(model: FastRCNN, image: Image.Image, proposal_boxes: np.ndarray, config: Config,
           device) -> list[np.ndarray]:
    """Detections of one image (list of 20 arrays (K, 5), 1-based) at the single test scale."""
    width, height = image.size
    scale = image_scale(width, height, config.test_scale, config.test_max_size)
    conv5 = model.features(resized_tensor(image, scale)[None].to(device))
    rois = torch.from_numpy(np.asarray(proposal_boxes, np.float32).reshape(-1, 4))
    scores, deltas = [], []
    for chunk in torch.split(rois, config.test_roi_chunk):
        batch_rois = torch.cat([torch.zeros(len(chunk), 1), chunk * scale], 1).to(device)
        logits, d = model.head(conv5, batch_rois)
        scores.append(F.softmax(logits, 1).cpu())
        deltas.append(d.cpu())
    scores = torch.cat(scores) if scores else torch.zeros(0, NUM_CLASSES)
    deltas = torch.cat(deltas) if deltas else torch.zeros(0, 4 * NUM_CLASSES)
    boxes = decode_boxes(rois, deltas)  # regression in original image coordinates
    limits = torch.tensor([width - 1, height - 1] * 2 * NUM_CLASSES, dtype=boxes.dtype)
    boxes = torch.minimum(boxes.clamp(min=0), limits)
    return postprocess(boxes, scores, config.nms_threshold, config.max_per_image, config.score_threshold)


def random_score_detections(proposal_boxes: np.ndarray, rng: np.random.Generator, config: Config) -> list[np.ndarray]:
    """The floor to beat: the same proposals with uniformly random class scores, the same NMS and cap."""
    boxes = torch.from_numpy(np.asarray(proposal_boxes, np.float32).reshape(-1, 4))
    scores = torch.from_numpy(rng.random((len(boxes), NUM_CLASSES)).astype(np.float32))
    return postprocess(boxes, scores, config.nms_threshold, config.max_per_image, config.score_threshold)


def class_annotations(annotations: Mapping, ids: Sequence[str]) -> list[dict]:
    """Per class: ``{image_id: (boxes (M, 4) 1-based, difficult (M,))}`` for every test image."""
    out = []
    for name in VOC_CLASSES:
        per_image = {}
        for image_id in ids:
            objects = [o for o in annotations[image_id].objects if o.name == name]
            per_image[image_id] = (np.array([o.box for o in objects], np.float64).reshape(-1, 4),
                                   np.array([o.difficult for o in objects], bool))
        out.append(per_image)
    return out


def write_devkit_results(detections_per_class: Sequence[Mapping], out_dir, prefix: str = "comp4_det_test_") -> list[Path]:
    """The VOC devkit's results files, one per class: ``<image_id> <score> <x1> <y1> <x2> <y2>``
    (1-based inclusive; score with 6 decimals, boxes with 1), each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, per_image in zip(VOC_CLASSES, detections_per_class):
        lines = [f"{image_id} {d[4]:.6f} {d[0]:.1f} {d[1]:.1f} {d[2]:.1f} {d[3]:.1f}\n"
                 for image_id, dets in per_image.items() for d in np.asarray(dets).reshape(-1, 5)]
        paths.append(atomic_write(out_dir / f"{prefix}{name}.txt", "".join(lines)))
    return paths


# ----------------------------------------------------------------------------- harness


def proposal_boxes(config: Config, voc_root: Path, split: str, ids: Sequence[str], info) -> dict[str, np.ndarray]:
    """The split's cached proposals (computed first where missing), at most ``max_proposals`` each."""
    cache = Path(config.proposals_dir) if config.proposals_dir else Path(config.data_root) / "proposals" / "VOC2007"
    missing = proposals.missing_ids(cache, config.proposals, ids)
    if missing:
        if config.proposals not in proposals.MODES:
            raise FileNotFoundError(f"{cache / config.proposals}: no proposals for {len(missing)} {split} images "
                                    f"(import them: python -m evals.proposals --from-mat FILE ...)")
        if info.is_main:
            proposals.compute_proposals(voc_root, split, cache, config.proposals, workers=max(config.workers, 1),
                                        max_side=config.proposal_max_side, ids=missing)
        if info.world_size > 1:
            torch.distributed.barrier()
    return {i: b[:config.max_proposals] for i, b in proposals.load_split_proposals(cache, config.proposals, ids).items()}


def build_model(config: Config, loaded) -> FastRCNN:
    model = FastRCNN(loaded.model, NUM_CLASSES, config.cls_init_std, config.bbox_init_std)
    for name, param in model.named_parameters():
        parts = name.split(".")
        param.requires_grad = not (parts[0] == "backbone" and parts[1] in config.frozen_layers)
    return model


def load_data(config: Config) -> tuple[dict, dict, dict]:
    """The train and test annotations and their id lists (the run's data identity)."""
    voc_root = Path(config.data_root) / "VOCdevkit" / "VOC2007"
    train_annotations = detection_annotations(voc_root, config.train_split)
    test_annotations = detection_annotations(voc_root, config.test_split)
    return train_annotations, test_annotations, {config.train_split: list(train_annotations),
                                                 config.test_split: list(test_annotations)}


def run(config: Config) -> dict:
    engine.validate_config(config, **CHECKS)
    voc_root = Path(config.data_root) / "VOCdevkit" / "VOC2007"
    train_annotations, test_annotations, splits = load_data(config)
    train_ids_all, test_ids = splits[config.train_split], splits[config.test_split]
    begun = engine.begin_run(TASK, config, splits=splits, num_classes=None, new_head=True, dropout=config.dropout)
    if begun.finished is not None:
        return begun.finished
    for split in (config.train_split, config.test_split):  # before hours of Selective Search
        preflight_voc_split(voc_root, split, log=begun.log)
    info, device, loaded = begun.info, begun.device, begun.loaded
    train_boxes = proposal_boxes(config, voc_root, config.train_split, train_ids_all, info)
    test_boxes = proposal_boxes(config, voc_root, config.test_split, test_ids, info)
    train_ids = [i for i in train_ids_all
                 if any(config.use_difficult or not o.difficult for o in train_annotations[i].objects)]
    train_set = DetectionImages(voc_root, train_ids, train_annotations, train_boxes, config.use_difficult)

    model = build_model(config, loaded).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    # fused: one kernel per step instead of several passes over fc6/fc7's 55M weights (same update)
    optimizer = torch.optim.SGD([{"params": weights}, {"params": biases, "lr": config.lr * config.bias_lr_mult}],
                                lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                                fused=device.type in ("cpu", "cuda"))
    scheduler = engine.step_lr(optimizer, config.lr_step, config.lr_gamma)
    net = DistributedDataParallel(model) if info.world_size > 1 else model
    work_dir = begun.work_dir
    trainer = engine.Trainer(model=net, optimizer=optimizer, scheduler=scheduler, total_steps=config.iterations,
                             work_dir=work_dir, checkpoint_every=config.checkpoint_every, info=info,
                             description=TASK, trainable=trainable, identity=begun.identity)
    if config.resume and trainer.resume():
        print(f"[{TASK}] resumed from {trainer.checkpoint_path} at step {trainer.state.step}")

    rois_per_image = config.rois_per_batch // config.ims_per_batch

    def transform(sample, rng):
        image, gt_boxes, gt_labels, boxes = sample
        width, height = image.size
        if config.flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            gt_boxes, boxes = flip_boxes(gt_boxes, width), flip_boxes(boxes, width)
        scale = image_scale(width, height, int(rng.choice(config.train_scales)), config.train_max_size)
        roi = sample_rois(boxes, gt_boxes, gt_labels, rois_per_image, config.fg_fraction, config.fg_threshold,
                          config.bg_range, rng)
        return {"image": resized_tensor(image, scale), "rois": torch.from_numpy(roi.rois * scale),
                "labels": torch.from_numpy(roi.labels), "targets": torch.from_numpy(roi.targets)}

    train_data = engine.Augmented(train_set, transform, config.seed)
    per_rank_batch = max(1, config.ims_per_batch // info.world_size)

    make_loader = engine.loader_factory(train_data, per_rank_batch, config, info, collate_fn=collate_images)

    def step_fn(batch):
        cls_logits, deltas = net(batch["images"].to(device), batch["rois"].to(device))
        loss_cls, loss_bbox = detection_loss(cls_logits, deltas, batch["labels"].to(device),
                                             batch["targets"].to(device))
        return loss_cls + loss_bbox, {"loss_cls": loss_cls.item(), "loss_bbox": loss_bbox.item()}

    t0, step0 = time.monotonic(), trainer.state.step
    trainer.run(make_loader, step_fn, per_rank_batch, len(train_set))
    train_seconds = time.monotonic() - t0
    if not info.is_main:
        return {}

    t0 = time.monotonic()
    model.eval()
    detections = [dict() for _ in VOC_CLASSES]
    baseline = [dict() for _ in VOC_CLASSES]
    for index, image_id in enumerate(tqdm(test_ids, desc=f"{TASK} test", unit="img", mininterval=1.0)):
        image = load_rgb(image_path(voc_root, image_id))
        boxes = np.asarray(test_boxes[image_id], np.float32).reshape(-1, 4) - 1.0
        for c, dets in enumerate(detect(model, image, boxes, config, device)):
            detections[c][image_id] = dets
        rng = engine.sample_rng(config.seed + 7_777_777, 0, index)  # fixed given the seed
        for c, dets in enumerate(random_score_detections(boxes, rng, config)):
            baseline[c][image_id] = dets
    test_seconds = time.monotonic() - t0
    devkit_dir = work_dir / "devkit"
    write_devkit_results(detections, devkit_dir)

    annotations = class_annotations(test_annotations, test_ids)
    per_class, mean_ap = metrics.voc_detection_map(detections, annotations, use_07_metric=True)
    _, random_map = metrics.voc_detection_map(baseline, annotations, use_07_metric=True)
    coco = metrics.coco_style_ap(detections, annotations)
    steps_done = trainer.state.step - step0

    def pct(value):
        return None if value is None or np.isnan(value) else 100.0 * float(value)

    result = {
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
    definitions = {"AP": metrics.DETECTION_AP_DEFINITIONS["voc07_11point"],
                   "mAP": "mean of per-class VOC07 11-point AP over classes with positives",
                   "coco_AP": "pycocotools AP@[.5:.95] (difficult boxes as iscrowd; see evals.metrics.coco_style_ap)",
                   "coco_AP50": "pycocotools AP at IoU 0.5 (101-point; difficult boxes as iscrowd)",
                   "random_score_mAP": "mAP of the same test proposals scored uniformly at random per class, "
                                       "same NMS and 100-per-image cap, no box regression"}
    path = engine.save_record(task=TASK, metrics=result, metric_definitions=definitions, begun=begun,
                              config=config, splits=splits)
    print(f"[{TASK}] mAP {result['mAP']:.1f} (random scores {result['random_score_mAP']:.1f}; "
          f"COCO AP {result['coco_AP'] or 0:.1f}; {loaded.source}); record: {path}")
    return result
