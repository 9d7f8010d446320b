"""ILSVRC-12 for linear probing (protocols.md P5).

Layout under ``root`` (``DIR/imagenet``)::

    train/<wnid>/*.JPEG                    classes = the sorted wnid folder names of train/
    val/<wnid>/*.JPEG                      either class folders ...
    val/*.JPEG + val_labels.txt            ... or flat files with a label file

``val_labels.txt``: one line per val image, ``<filename> <wnid>`` separated by whitespace,
``<filename>`` the bare file name inside ``val/`` (e.g. ``ILSVRC2012_val_00000001.JPEG``);
blank lines are skipped. Every flat val image needs exactly one line and every line an
existing file. Without ``val_labels.txt`` the devkit's files are accepted too:
``ILSVRC2012_validation_ground_truth.txt`` (line n = the 1-based ILSVRC2012_ID of
``ILSVRC2012_val_<n:08d>.JPEG``) and ``meta.mat`` (its ``synsets`` map ID -> wnid), looked
for in ``root`` and in ``root/ILSVRC2012_devkit_t12/data``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import scipy.io
from torch.utils.data import Dataset

from runtime.paths import check_relative

from runtime.errors import DatasetError
from .voc import open_lazy_rgb

OFFICIAL_COUNTS = {"classes": 1000, "train": 1281167, "val": 50000}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
VAL_LABELS = "val_labels.txt"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"


def _image_files(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))


def _subfolders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def imagenet_classes(root) -> list[str]:
    """The sorted wnids of ``train/``; class index = position in this list."""
    train = Path(root) / "train"
    if not train.is_dir():
        raise DatasetError(f"{train}: ImageNet train folder not found")
    classes = _subfolders(train)
    if not classes:
        raise DatasetError(f"{train}: no class folders")
    return classes


def _devkit_files(root: Path) -> tuple[Path, Path] | None:
    for folder in (root, root / "ILSVRC2012_devkit_t12" / "data"):
        if (folder / DEVKIT_GROUND_TRUTH).is_file() and (folder / "meta.mat").is_file():
            return folder / DEVKIT_GROUND_TRUTH, folder / "meta.mat"
    return None


def _devkit_id_to_wnid(meta_path: Path) -> dict[int, str]:
    try:
        synsets = scipy.io.loadmat(meta_path, struct_as_record=False, squeeze_me=True)["synsets"]
        return {int(s.ILSVRC2012_ID): str(s.WNID) for s in synsets.reshape(-1)}
    except Exception as err:
        raise DatasetError(f"{meta_path}: cannot read synsets (ILSVRC2012_ID, WNID): {err}") from None


def _flat_val_labels(root: Path, files: list[str]) -> dict[str, tuple[str, str]]:
    """filename -> (wnid, where: 'file:line') for flat val images."""
    label_path = root / VAL_LABELS
    lines: list[tuple[str, str, str]] = []  # (filename, wnid, where)
    source = label_path
    if label_path.is_file():
        for lineno, line in enumerate(label_path.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DatasetError(f"{label_path}:{lineno}: expected '<filename> <wnid>', got {line.strip()!r}")
            # The bare file name inside val/: no folders, so nothing outside val/ can be named.
            check_relative(fields[0], f"{label_path}:{lineno}")
            if "/" in fields[0] or "\\" in fields[0]:
                raise DatasetError(f"{label_path}:{lineno}: {fields[0]!r} must be a bare file name inside val/")
            lines.append((fields[0], fields[1], f"{label_path}:{lineno}"))
    elif (devkit := _devkit_files(root)) is not None:
        truth_path, meta_path = devkit
        source = truth_path
        id_to_wnid = _devkit_id_to_wnid(meta_path)
        for lineno, line in enumerate(truth_path.read_text().splitlines(), start=1):
            value = line.strip()
            if not value.isdigit() or int(value) not in id_to_wnid:
                raise DatasetError(f"{truth_path}:{lineno}: bad ILSVRC2012_ID {value!r} (not in {meta_path})")
            lines.append((f"ILSVRC2012_val_{lineno:08d}.JPEG", id_to_wnid[int(value)], f"{truth_path}:{lineno}"))
    else:
        raise DatasetError(f"{label_path}: label file not found (flat val/ needs '<filename> <wnid>' lines, "
                           f"or the devkit's {DEVKIT_GROUND_TRUTH} + meta.mat)")
    labels: dict[str, tuple[str, str]] = {}
    present = set(files)
    for filename, wnid, where in lines:
        if filename in labels:
            raise DatasetError(f"{where}: duplicate label for {filename!r}")
        if filename not in present:
            raise DatasetError(f"{where}: image file not found: {root / 'val' / filename}")
        labels[filename] = (wnid, where)
    unlabelled = sorted(present - set(labels))
    if unlabelled:
        raise DatasetError(f"{source}: no label for "
                           f"{len(unlabelled)} val images, e.g. {unlabelled[0]}")
    return labels


def imagenet_samples(root, split: str) -> list[tuple[Path, int]]:
    """``(image path, class index)`` for ``train`` or ``val``, sorted by class then file name
    (train, val folders) or by file name (flat val)."""
    root = Path(root)
    classes = imagenet_classes(root)
    index = {wnid: i for i, wnid in enumerate(classes)}
    folder = root / split
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not folder.is_dir():
        raise DatasetError(f"{folder}: ImageNet {split} folder not found")
    samples: list[tuple[Path, int]] = []
    subfolders = _subfolders(folder)
    if subfolders:
        for wnid in subfolders:
            if wnid not in index:
                raise DatasetError(f"{folder / wnid}: unknown class folder (wnid not in {root / 'train'})")
            samples += [(folder / wnid / name, index[wnid]) for name in _image_files(folder / wnid)]
        return samples
    files = _image_files(folder)
    labels = _flat_val_labels(root, files)
    for name in files:
        wnid, where = labels[name]
        if wnid not in index:
            raise DatasetError(f"{where}: unknown wnid {wnid!r} (no such class folder in {root / 'train'})")
        samples.append((folder / name, index[wnid]))
    return samples


class ImageNetDataset(Dataset):
    """``(PIL RGB image (or transform(image)), class index)``."""

    def __init__(self, root, split: str, transform: Callable | None = None):
        self.root = Path(root)
        self.split = split
        self.classes = imagenet_classes(root)
        self.samples = imagenet_samples(root, split)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = open_lazy_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def imagenet_dir(data_root) -> Path:
    return Path(data_root) / "imagenet"


__all__ = ["OFFICIAL_COUNTS", "VAL_LABELS", "imagenet_classes", "imagenet_samples", "ImageNetDataset", "imagenet_dir"]
