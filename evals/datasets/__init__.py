"""Readers for the transfer benchmarks' datasets, in their real on-disk layouts.

Everything is read under one data root::

    DIR/VOCdevkit/VOC2007/   classification (P2) and detection (P3)
    DIR/VOCdevkit/VOC2012/   segmentation train/val (P4)
    DIR/benchmark_RELEASE/   SBD, the extra segmentation masks of "train_aug" (P4)
    DIR/imagenet/            linear probing (P5)

``evals.datasets.demo`` writes a small synthetic data set in exactly these layouts, and
``python -m evals.data check --data-root DIR`` reports what is present. Malformed input
raises ``DatasetError`` naming the file (and the line where one applies); ids and file names
read from data files may not be absolute or contain ``..``. ``evals.datasets.preflight`` checks
the splits a run will read before it trains.
"""
from __future__ import annotations

from runtime.errors import DatasetError  # noqa: F401  (re-exported)

from .imagenet import ImageNetDataset, imagenet_classes, imagenet_samples
from .sbd import read_sbd_mask, train_aug_items, voc12_val_items, write_sbd_mat
from .voc import (
    VOC_CLASSES,
    VOC_PALETTE,
    VOCAnnotation,
    VOCClassificationDataset,
    VOCObject,
    VOCSegmentationDataset,
    classification_labels,
    detection_annotations,
    parse_annotation,
    read_segmentation_mask,
    read_split,
    write_segmentation_mask,
)

__all__ = [
    "DatasetError",
    "VOC_CLASSES", "VOC_PALETTE", "VOCAnnotation", "VOCObject",
    "read_split", "parse_annotation", "classification_labels", "detection_annotations",
    "read_segmentation_mask", "write_segmentation_mask",
    "VOCClassificationDataset", "VOCSegmentationDataset",
    "read_sbd_mask", "write_sbd_mat", "train_aug_items", "voc12_val_items",
    "imagenet_classes", "imagenet_samples", "ImageNetDataset",
]
