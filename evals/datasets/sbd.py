"""SBD (Hariharan et al., "Semantic contours from inverse detectors") and VOC12 "train_aug" (P4).

Layout under ``DIR/benchmark_RELEASE/dataset``::

    img/<id>.jpg
    cls/<id>.mat       MATLAB struct GTcls: Segmentation (uint8 H x W, 0..20),
                       Boundaries (20 x 1 cell of sparse H x W), CategoriesPresent
    train.txt, val.txt one id per line

train_aug (10,582 images) = (VOC12 seg train | SBD train | SBD val) - VOC12 seg val.
Mask rule: an id whose ``VOC2012/SegmentationClass/<id>.png`` exists uses that PNG (the
finer VOC annotation, with 255 borders); every other id uses SBD's ``cls/<id>.mat``. The
image is ``VOC2012/JPEGImages/<id>.jpg`` when present, else SBD's ``img/<id>.jpg``.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse

from runtime.errors import DatasetError
from runtime.errors import MissingFileError

from .voc import MASK_READERS, VOC_CLASSES, SplitItems, read_split, segmentation_items, voc_dir

OFFICIAL_COUNTS = {"train": 8498, "val": 2857, "train_aug": 10582}


def sbd_dir(data_root) -> Path:
    return Path(data_root) / "benchmark_RELEASE" / "dataset"


def _field(obj, name: str):
    """A struct field for either loadmat style: mat_struct objects or record arrays."""
    if isinstance(obj, dict):
        return obj.get(name)
    if isinstance(obj, np.ndarray) and obj.dtype.names is not None:
        if name not in obj.dtype.names:
            return None
        value = obj[name]
        while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
            value = value.reshape(-1)[0]
        return value
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.size == 1:
        return _field(obj.reshape(-1)[0], name)
    return getattr(obj, name, None)


def read_sbd_mask(mat_path) -> np.ndarray:
    """``cls/<id>.mat`` -> (H, W) uint8 labels 0..20 from ``GTcls.Segmentation``.

    Any failure (missing, truncated or foreign file, unexpected struct) is a one-line
    DatasetError naming the file, never a scipy traceback."""
    path = Path(mat_path)
    if not path.is_file():
        raise MissingFileError(f"{path}: SBD .mat file not found")
    try:
        return _sbd_mask(path)
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 -- scipy/numpy raise several types for a corrupt file
        raise DatasetError(f"{path}: cannot read MATLAB file ({type(err).__name__}: "
                           f"{' '.join(str(err).split()) or 'no detail'})") from None


def _sbd_mask(path: Path) -> np.ndarray:
    try:
        contents = scipy.io.loadmat(path, struct_as_record=False, squeeze_me=True)
    except Exception as err:  # scipy raises several types for a corrupt file
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DatasetError(f"{path}: cannot read MATLAB file ({reason})") from None
    gtcls = contents.get("GTcls")
    segmentation = None if gtcls is None else _field(gtcls, "Segmentation")
    if segmentation is None:
        variables = sorted(k for k in contents if not k.startswith("__"))
        raise DatasetError(f"{path}: no GTcls.Segmentation (variables: {variables})")
    mask = np.asarray(segmentation)
    if mask.ndim != 2 or not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise DatasetError(f"{path}: GTcls.Segmentation must be a 2-D numeric array, got {mask.dtype} {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > len(VOC_CLASSES) or not np.all(mask == np.round(mask))):
        bad = np.argwhere((mask < 0) | (mask > len(VOC_CLASSES)) | (mask != np.round(mask)))[0]
        raise DatasetError(f"{path}: GTcls.Segmentation value {mask[tuple(bad)]} at (row {bad[0]}, col {bad[1]}) "
                           f"is outside 0..{len(VOC_CLASSES)}")
    return mask.astype(np.uint8)


def _class_boundaries(mask: np.ndarray) -> np.ndarray:
    """(20, 1) object array of sparse boundary maps: pixels of class k with a 4-neighbour of
    another label (SBD's Boundaries cell, approximated)."""
    edge = np.zeros(mask.shape, dtype=bool)
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[1:, :] |= mask[1:, :] != mask[:-1, :]
    edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
    cells = np.empty((len(VOC_CLASSES), 1), dtype=object)
    for k in range(len(VOC_CLASSES)):
        cells[k, 0] = scipy.sparse.csc_matrix(edge & (mask == k + 1))
    return cells


_MAT_HEADER = b"MATLAB 5.0 MAT-file, written by cpfs-bench evals.datasets.sbd"


def write_sbd_mat(path, mask) -> None:
    """Write labels as an SBD ``cls/<id>.mat`` (GTcls with Segmentation, Boundaries,
    CategoriesPresent). The header's creation date is replaced by a fixed text, so equal
    masks give equal bytes."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.min(initial=0) < 0 or mask.max(initial=0) > len(VOC_CLASSES):
        raise ValueError(f"SBD masks are 2-D with labels 0..{len(VOC_CLASSES)} (no 255)")
    mask = mask.astype(np.uint8)
    present = np.array([k for k in np.unique(mask) if k > 0], dtype=np.uint8).reshape(-1, 1)
    gtcls = {"Segmentation": mask, "Boundaries": _class_boundaries(mask), "CategoriesPresent": present}
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"GTcls": gtcls}, do_compression=True)
    data = bytearray(buffer.getvalue())
    data[:116] = _MAT_HEADER.ljust(116, b" ")  # bytes 0..115 are descriptive text (MAT v5 format)
    Path(path).write_bytes(bytes(data))


def voc12_val_items(data_root) -> list[tuple[str, Path, Path]]:
    """``(id, image path, mask .png path)`` for VOC12 segmentation val (1,449 images), P4."""
    return segmentation_items(voc_dir(data_root, 2012), "val")


def train_aug_items(data_root) -> list[tuple[str, Path, Path]]:
    """``(id, image path, mask source)`` for train_aug, sorted by id (rule in the module doc)."""
    voc12, sbd = voc_dir(data_root, 2012), sbd_dir(data_root)
    if not sbd.is_dir():
        raise DatasetError(f"{sbd}: SBD folder not found (train_aug needs benchmark_RELEASE)")
    seg = voc12 / "ImageSets" / "Segmentation"
    voc_train, voc_val = read_split(seg / "train.txt"), set(read_split(seg / "val.txt"))
    ids = (set(voc_train) | set(read_split(sbd / "train.txt")) | set(read_split(sbd / "val.txt"))) - voc_val
    items = SplitItems(split_files=[seg / "train.txt", sbd / "train.txt", sbd / "val.txt"])
    for i in sorted(ids):
        png, mat = voc12 / "SegmentationClass" / f"{i}.png", sbd / "cls" / f"{i}.mat"
        if png.is_file():
            mask = png
        elif mat.is_file():
            mask = mat
        else:
            raise DatasetError(f"{mat}: mask file not found (nor {png})")
        image = voc12 / "JPEGImages" / f"{i}.jpg"
        if not image.is_file():
            image = sbd / "img" / f"{i}.jpg"
            if not image.is_file():
                raise DatasetError(f"{image}: image file not found (nor in {voc12 / 'JPEGImages'})")
        items.append((i, image, mask))
    return items


MASK_READERS[".mat"] = read_sbd_mask  # train_aug mixes VOC PNGs and SBD .mat masks in one dataset

__all__ = ["OFFICIAL_COUNTS", "sbd_dir", "read_sbd_mask", "write_sbd_mat", "train_aug_items", "voc12_val_items"]
