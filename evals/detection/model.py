"""Fast R-CNN on the checkpoint's AlexNet, its loss and test-time detection (protocols.md P3;
rbgirshick/fast-rcnn).

conv1..conv5 of the checkpoint -> RoI max pooling 6x6 on conv5 (spatial scale 1/16: conv5's
stride, ``layer_geometry``) -> fc6, fc7 of the checkpoint (ReLU + dropout) -> a new 21-way
``cls_score`` and an 84-way class-specific ``bbox_pred``. At test: one scale, softmax scores,
class-specific box regression, per-class NMS and a cap per image (:func:`detect`). The box deltas
are trained normalised (``boxes.TargetStats``) and :func:`unnormalize_bbox_pred` maps the layer
back before the test, so :func:`detect` decodes raw deltas.

The test-time functions take the harness's config (``evals.voc07_det.Config``) and read only
``test_scale``, ``test_max_size``, ``test_roi_chunk``, ``nms_threshold``, ``max_per_image`` and
``score_threshold`` from it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import RoIPool
from tqdm import tqdm

from backbones.alexnet import AlexNet, layer_geometry
from evals.datasets.voc import VOC_CLASSES, image_path, load_rgb
from runtime.data import sample_rng

from .boxes import decode_boxes, image_scale, postprocess
from .data import resized_tensor

NUM_CLASSES = len(VOC_CLASSES) + 1  # background + 20
RANDOM_BASELINE_SEED_OFFSET = 7_777_777  # the random-score baseline's generators: seed + this, per image


class FastRCNN(nn.Module):
    """AlexNet conv1..conv5 -> RoIPool 6x6 on conv5 -> fc6, fc7 -> cls_score (21), bbox_pred (84)."""

    def __init__(self, backbone: AlexNet, num_classes: int = NUM_CLASSES, cls_init_std: float = 0.01,
                 bbox_init_std: float = 0.001):
        super().__init__()
        stride = layer_geometry(backbone.arch)["conv5"][0]
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
        x = torch.flatten(self.roi_pool(conv5.float(), rois), 1)  # float32 under autocast: RoIPool's CPU kernel
        net, before = self.backbone, self.backbone.arch.dropout_before_fc
        for fc in (net.fc6, net.fc7):  # the member's own order: Caffe drops after ReLU, torchvision before fc
            x = net.rectify(fc(net.drop(x))) if before else net.drop(net.rectify(fc(x)))
        return self.cls_score(x), self.bbox_pred(x)

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.features(images), rois)


def build_model(backbone: AlexNet, frozen_layers: Sequence[str], cls_init_std: float,
                bbox_init_std: float) -> FastRCNN:
    """The detector on ``backbone`` with the named backbone layers frozen (P3 freezes conv1)."""
    model = FastRCNN(backbone, NUM_CLASSES, cls_init_std, bbox_init_std)
    for name, param in model.named_parameters():
        parts = name.split(".")
        param.requires_grad = not (parts[0] == "backbone" and parts[1] in frozen_layers)
    return model


@torch.no_grad()
def unnormalize_bbox_pred(layer: nn.Linear, stats) -> None:
    """Fold the target normalisation into ``bbox_pred`` (in place), as Fast R-CNN's snapshot does
    (``fast_rcnn/train.py``): each output ``o = w.x + b`` was trained towards ``(t - mean) / std``,
    so ``w * std`` and ``b * std + mean`` give ``t`` itself, and the test path decodes raw deltas.
    ``stats``: ``boxes.TargetStats`` with (num_classes, 4) rows in the layer's output order. Call
    it once, after training: the training checkpoints keep the normalised layer."""
    std = torch.as_tensor(np.asarray(stats.stds).reshape(-1), dtype=layer.weight.dtype, device=layer.weight.device)
    mean = torch.as_tensor(np.asarray(stats.means).reshape(-1), dtype=layer.weight.dtype, device=layer.weight.device)
    layer.weight.mul_(std[:, None])
    layer.bias.mul_(std).add_(mean)


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


@torch.no_grad()
def detect(model: FastRCNN, image: Image.Image, proposal_boxes: np.ndarray, config, device) -> list[np.ndarray]:
    """Detections of one image (list of 20 arrays (K, 5), 1-based) at the single test scale.
    ``proposal_boxes``: (K, 4) 0-based inclusive in the original image; the regressed boxes are
    clipped to it."""
    width, height = image.size
    scale = image_scale(width, height, config.test_scale, config.test_max_size)
    conv5 = model.features(resized_tensor(image, scale)[None].to(device))
    rois = torch.from_numpy(np.asarray(proposal_boxes, np.float32).reshape(-1, 4))
    scores, deltas = [], []
    for chunk in torch.split(rois, config.test_roi_chunk):  # bounds fc6/fc7's memory, not the result
        batch_rois = torch.cat([torch.zeros(len(chunk), 1), chunk * scale], 1).to(device)
        logits, d = model.head(conv5, batch_rois)
        scores.append(F.softmax(logits.float(), 1).cpu())  # float32 under autocast too
        deltas.append(d.float().cpu())
    scores = torch.cat(scores) if scores else torch.zeros(0, NUM_CLASSES)
    deltas = torch.cat(deltas) if deltas else torch.zeros(0, 4 * NUM_CLASSES)
    boxes = decode_boxes(rois, deltas)  # raw deltas (normalisation folded into bbox_pred), original pixels
    limits = torch.tensor([width - 1, height - 1] * 2 * NUM_CLASSES, dtype=boxes.dtype)
    boxes = torch.minimum(boxes.clamp(min=0), limits)
    return postprocess(boxes, scores, config.nms_threshold, config.max_per_image, config.score_threshold)


def random_score_detections(proposal_boxes: np.ndarray, rng: np.random.Generator, config) -> list[np.ndarray]:
    """The floor to beat: the same proposals with uniformly random class scores, the same NMS and cap."""
    boxes = torch.from_numpy(np.asarray(proposal_boxes, np.float32).reshape(-1, 4))
    scores = torch.from_numpy(rng.random((len(boxes), NUM_CLASSES)).astype(np.float32))
    return postprocess(boxes, scores, config.nms_threshold, config.max_per_image, config.score_threshold)


def detect_images(model: FastRCNN, voc_root, ids: Sequence[str], proposals: Mapping[str, np.ndarray], config,
                  device, seed: int, desc: str = "detect") -> tuple[list[dict], list[dict]]:
    """:func:`detect` on every image of ``ids`` (``proposals``: id -> 1-based boxes, as cached) and
    the random-score baseline on the same boxes (fixed given ``seed``). Returns per class ``{image
    id: (K, 5) detections}``, for the model and for the baseline, in the metric's layout."""
    detections = [dict() for _ in VOC_CLASSES]
    baseline = [dict() for _ in VOC_CLASSES]
    for index, image_id in enumerate(tqdm(ids, desc=desc, unit="img", mininterval=1.0)):
        image = load_rgb(image_path(voc_root, image_id))
        boxes = np.asarray(proposals[image_id], np.float32).reshape(-1, 4) - 1.0
        for c, dets in enumerate(detect(model, image, boxes, config, device)):
            detections[c][image_id] = dets
        rng = sample_rng(seed + RANDOM_BASELINE_SEED_OFFSET, 0, index)
        for c, dets in enumerate(random_score_detections(boxes, rng, config)):
            baseline[c][image_id] = dets
    return detections, baseline
