"""The detection dataset and what turns its items into Fast R-CNN minibatches (protocols.md P3).

With ``use_difficult`` (the ``paper`` preset) every annotated object is ground truth for training,
as Fast R-CNN's VOC reader (``datasets/pascal_voc.py``) keeps them all. Without it difficult
objects are left out of training altogether (py-faster-rcnn's ``use_diff=False``: they are
neither ground truth nor counted when labelling RoIs), and training images without a
non-difficult object are skipped (:func:`images_with_objects`). At test time the ground truth
comes from the annotations (:mod:`.devkit`), difficult included, and the metric ignores it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from evals.common import to_tensor
from evals.datasets.voc import VOC_CLASSES, image_path, load_rgb

from .boxes import TargetStats, flip_boxes, image_scale, sample_rois


class VOCDetectionDataset(Dataset):
    """VOC images with their ground truth and proposals: ``(PIL RGB image, gt boxes (G, 4) float32,
    gt labels (G,) int64 in 1..20, proposals (K, 4) float32)``, boxes 0-based inclusive.

    ``annotations`` maps id -> ``VOCAnnotation`` (``detection_annotations``) and ``proposals`` id ->
    1-based boxes (the proposal cache's). Difficult objects are dropped unless ``use_difficult``
    (P3 keeps them: Fast R-CNN trains on every object).
    ``voc_root`` and ``ids`` are what the pre-flight reads the images by."""

    def __init__(self, voc_root, ids: Sequence[str], annotations: Mapping, proposals: Mapping[str, np.ndarray],
                 use_difficult: bool = False):
        self.voc_root, self.ids = Path(voc_root), list(ids)
        self.gt_boxes, self.gt_labels, self.proposals = [], [], []
        for image_id in self.ids:
            objects = [o for o in annotations[image_id].objects if use_difficult or not o.difficult]
            self.gt_boxes.append(np.array([o.box for o in objects], np.float32).reshape(-1, 4) - 1.0)
            self.gt_labels.append(np.array([VOC_CLASSES.index(o.name) + 1 for o in objects], np.int64))
            self.proposals.append(np.asarray(proposals[image_id], np.float32).reshape(-1, 4) - 1.0)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image = load_rgb(image_path(self.voc_root, self.ids[index]))
        return image, self.gt_boxes[index], self.gt_labels[index], self.proposals[index]

    def regression_images(self):
        """``(proposals, gt boxes, gt labels)`` of every image, in order, without reading pixels:
        what the box-target statistics are computed from (``boxes.target_stats``)."""
        return zip(self.proposals, self.gt_boxes, self.gt_labels)


def images_with_objects(annotations: Mapping, ids: Sequence[str], use_difficult: bool) -> list[str]:
    """The ids with at least one object to train on (Fast R-CNN's ``filter_roidb``): an image of
    difficult objects only would give no foreground RoI."""
    return [i for i in ids if any(use_difficult or not o.difficult for o in annotations[i].objects)]


def resized_tensor(image: Image.Image, scale: float) -> torch.Tensor:
    """The normalised (3, H, W) tensor of ``image`` resized by ``scale`` (bilinear)."""
    width, height = image.size
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return to_tensor(image.resize(size, Image.BILINEAR))


def training_item(sample, rng: np.random.Generator, *, flip: bool, scales: Sequence[int], max_size: int,
                  rois_per_image: int, fg_fraction: float, fg_threshold: float,
                  bg_range: tuple[float, float], stats: TargetStats | None = None) -> dict:
    """One dataset item -> one image of a minibatch: a horizontal flip with probability 0.5 (when
    ``flip``), a shorter side drawn from ``scales``, and the RoIs sampled by :func:`sample_rois`
    (scaled with the image; targets normalised with ``stats``). Every random choice comes from
    ``rng``, in this order, so an item is the same whichever worker makes it."""
    image, gt_boxes, gt_labels, boxes = sample
    width, height = image.size
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        gt_boxes, boxes = flip_boxes(gt_boxes, width), flip_boxes(boxes, width)
    scale = image_scale(width, height, int(rng.choice(scales)), max_size)
    roi = sample_rois(boxes, gt_boxes, gt_labels, rois_per_image, fg_fraction, fg_threshold, bg_range, rng, stats)
    return {"image": resized_tensor(image, scale), "rois": torch.from_numpy(roi.rois * scale),
            "labels": torch.from_numpy(roi.labels), "targets": torch.from_numpy(roi.targets)}


def collate_images(batch: Sequence[dict]) -> dict:
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
