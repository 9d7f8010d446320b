"""PASCAL VOC 2007 / 2012: split files, XML annotations, palette masks (protocols.md P2-P4).

Layout under ``voc_root`` (e.g. ``DIR/VOCdevkit/VOC2007``)::

    JPEGImages/<id>.jpg
    Annotations/<id>.xml                       boxes: 1-based inclusive pixel coordinates
    ImageSets/Main/<split>.txt                 one id per line
    ImageSets/Main/<class>_<split>.txt         "<id> <label>", label 1 / -1 / 0 (0 = difficult)
    ImageSets/Segmentation/<split>.txt
    SegmentationClass/<id>.png                 8-bit palette PNG, 0..20 and 255 (void)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence
from xml.parsers import expat

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from runtime.images import image_error, load_image, open_rgb
from runtime.paths import check_relative

from runtime.errors import DatasetError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
NUM_SEG_CLASSES = len(VOC_CLASSES) + 1  # background + 20 (P4)
VOID_LABEL = 255

# Official split sizes, for `check` (VOC07 devkit, VOC12 devkit).
OFFICIAL_COUNTS = {
    ("VOC2007", "Main", "trainval"): 5011,
    ("VOC2007", "Main", "test"): 4952,
    ("VOC2012", "Main", "trainval"): 11540,
    ("VOC2012", "Segmentation", "train"): 1464,
    ("VOC2012", "Segmentation", "val"): 1449,
}


def official_main_sizes(year: int, splits: Sequence[str]) -> dict[str, int]:
    """``{split: official image count}`` of the ``ImageSets/Main`` splits among ``splits`` whose
    count is known (the ``paper`` preset's data check, ``evals.run.check_official_sizes``)."""
    return {s: OFFICIAL_COUNTS[(f"VOC{year}", "Main", s)] for s in splits if (f"VOC{year}", "Main", s) in OFFICIAL_COUNTS}


def _voc_palette() -> np.ndarray:
    """The VOC colour map: bits 0/1/2 of the index go to the top bits of R/G/B, 3 bits per round."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[index] = (r, g, b)
    return palette


VOC_PALETTE: np.ndarray = _voc_palette()  # (256, 3) uint8; index 255 = (224, 224, 192)
VOC_PALETTE.flags.writeable = False


# ----------------------------------------------------------------------------- split files


class SplitItems(list):
    """A list of dataset items that remembers the split files it came from (``split_files``), so
    that a pre-flight can name them (e.g. "<file>: split is empty")."""

    def __init__(self, items=(), split_files: Sequence = ()):
        super().__init__(items)
        self.split_files = [Path(p) for p in split_files]


def read_split(path) -> list[str]:
    """Ids of an ``ImageSets/*/<split>.txt`` file: one id per line, blank lines skipped.

    Ids are joined into paths (``JPEGImages/<id>.jpg``, caches), so an absolute id or one with
    ``..`` is refused with the file and line: a split file cannot reach outside its data root."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: split file not found")
    ids, seen = [], set()
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1:
            raise DatasetError(f"{path}:{lineno}: expected one image id, got {line.strip()!r}")
        check_relative(fields[0], f"{path}:{lineno}")
        if fields[0] in seen:
            raise DatasetError(f"{path}:{lineno}: duplicate id {fields[0]!r}")
        seen.add(fields[0])
        ids.append(fields[0])
    return ids


def read_class_file(path) -> dict[str, int]:
    """``<class>_<split>.txt``: id -> file label in {1, -1, 0}, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: class label file not found")
    labels: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DatasetError(f"{path}:{lineno}: expected '<id> <label>', got {line.strip()!r}")
        image_id, value = fields
        check_relative(image_id, f"{path}:{lineno}")
        if value not in ("1", "-1", "0"):
            raise DatasetError(f"{path}:{lineno}: bad label {value!r} for {image_id!r} (expected 1, -1 or 0)")
        if image_id in labels:
            raise DatasetError(f"{path}:{lineno}: duplicate id {image_id!r}")
        labels[image_id] = int(value)
    return labels


def classification_labels(voc_root, split: str) -> tuple[list[str], np.ndarray]:
    """Image ids of ``Main/<split>.txt`` and their (N, 20) int64 labels (P2).

    Labels use the metric's coding: 1 positive, 0 negative, -1 difficult (files: 1 / -1 / 0).
    Every ``<class>_<split>.txt`` must list exactly the ids of ``<split>.txt``, and no other
    ``*_<split>.txt`` file may name an unknown class.
    """
    main = Path(voc_root) / "ImageSets" / "Main"
    ids = read_split(main / f"{split}.txt")
    for path in sorted(main.glob(f"*_{split}.txt")):
        name = path.name[: -len(f"_{split}.txt")]
        if name not in VOC_CLASSES:
            raise DatasetError(f"{path}: unknown class name {name!r} (not one of the 20 VOC classes)")
    labels = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.int64)
    id_set = set(ids)
    for c, name in enumerate(VOC_CLASSES):
        path = main / f"{name}_{split}.txt"
        file_labels = read_class_file(path)
        if set(file_labels) != id_set:
            extra = sorted(set(file_labels) - id_set)[:3]
            missing = sorted(id_set - set(file_labels))[:3]
            raise DatasetError(f"{path}: ids differ from {main / f'{split}.txt'} "
                               f"(extra e.g. {extra}, missing e.g. {missing})")
        column = np.array([file_labels[i] for i in ids], dtype=np.int64)
        labels[:, c] = np.where(column == 1, 1, np.where(column == -1, 0, -1))
    return ids, labels


def labels_from_annotation(annotation: "VOCAnnotation") -> np.ndarray:
    """The (20,) labels VOC derives from an image's objects: 1 if a non-difficult object of the
    class is present, -1 (difficult) if only difficult ones are, 0 otherwise."""
    labels = np.zeros(len(VOC_CLASSES), dtype=np.int64)
    for obj in annotation.objects:
        c = VOC_CLASSES.index(obj.name)
        if not obj.difficult:
            labels[c] = 1
        elif labels[c] == 0:
            labels[c] = -1
    return labels


# ----------------------------------------------------------------------------- XML annotations


class VOCObject(NamedTuple):
    name: str
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2), 1-based inclusive (VOC convention)
    difficult: bool
    truncated: bool


class VOCAnnotation(NamedTuple):
    image_id: str
    width: int
    height: int
    objects: list[VOCObject]


@dataclass
class _Element:
    tag: str
    line: int
    children: list["_Element"] = field(default_factory=list)
    text: str = ""

    def find(self, tag: str) -> "_Element | None":
        return next((c for c in self.children if c.tag == tag), None)

    def findall(self, tag: str) -> list["_Element"]:
        return [c for c in self.children if c.tag == tag]


def _parse_xml(path: Path) -> _Element:
    """A minimal element tree that remembers each element's line (for error messages)."""
    parser = expat.ParserCreate()
    stack: list[_Element] = []
    root: list[_Element] = []

    def start(tag, _attrs):
        element = _Element(tag, parser.CurrentLineNumber)
        (stack[-1].children if stack else root).append(element)
        stack.append(element)

    def end(_tag):
        stack.pop()

    def text(data):
        if stack:
            stack[-1].text += data

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, text
    try:
        parser.Parse(path.read_bytes(), True)
    except expat.ExpatError as err:
        raise DatasetError(f"{path}:{err.lineno}: malformed XML ({expat.ErrorString(err.code)}, "
                           f"column {err.offset + 1})") from None
    return root[0]


def _int_field(path: Path, parent: _Element, tag: str) -> int:
    element = parent.find(tag)
    if element is None:
        raise DatasetError(f"{path}:{parent.line}: <{parent.tag}> has no <{tag}>")
    try:
        # A few VOC2012 files write coordinates as decimals ("273.5"); round them.
        return int(round(float(element.text.strip())))
    except ValueError:
        raise DatasetError(f"{path}:{element.line}: <{tag}> is not a number: {element.text.strip()!r}") from None


def _flag(path: Path, parent: _Element, tag: str) -> bool:
    element = parent.find(tag)
    if element is None or not element.text.strip():  # absent in some VOC2012 files: means 0
        return False
    if element.text.strip() not in ("0", "1"):
        raise DatasetError(f"{path}:{element.line}: <{tag}> must be 0 or 1, got {element.text.strip()!r}")
    return element.text.strip() == "1"


def parse_annotation(xml_path) -> VOCAnnotation:
    """Parse ``Annotations/<id>.xml``; the id is the file's stem."""
    path = Path(xml_path)
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    root = _parse_xml(path)
    if root.tag != "annotation":
        raise DatasetError(f"{path}:{root.line}: root element is <{root.tag}>, expected <annotation>")
    size = root.find("size")
    if size is None:
        raise DatasetError(f"{path}:{root.line}: no <size> element")
    width, height = _int_field(path, size, "width"), _int_field(path, size, "height")
    if width <= 0 or height <= 0:
        raise DatasetError(f"{path}:{size.line}: bad image size {width}x{height}")
    objects = []
    for obj in root.findall("object"):
        name_el = obj.find("name")
        if name_el is None:
            raise DatasetError(f"{path}:{obj.line}: <object> has no <name>")
        name = name_el.text.strip()
        if name not in VOC_CLASSES:
            raise DatasetError(f"{path}:{name_el.line}: unknown class name {name!r}")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DatasetError(f"{path}:{obj.line}: <object> has no <bndbox>")
        box = tuple(_int_field(path, bndbox, k) for k in ("xmin", "ymin", "xmax", "ymax"))
        x1, y1, x2, y2 = box
        if not (1 <= x1 <= x2 <= width and 1 <= y1 <= y2 <= height):
            raise DatasetError(f"{path}:{bndbox.line}: box {box} is empty or outside the {width}x{height} image")
        objects.append(VOCObject(name, box, _flag(path, obj, "difficult"), _flag(path, obj, "truncated")))
    return VOCAnnotation(path.stem, width, height, objects)


def detection_annotations(voc_root, split: str) -> dict[str, VOCAnnotation]:
    """id -> annotation for every id of ``Main/<split>.txt`` (P3)."""
    voc_root = Path(voc_root)
    ids = read_split(voc_root / "ImageSets" / "Main" / f"{split}.txt")
    return {i: parse_annotation(voc_root / "Annotations" / f"{i}.xml") for i in ids}


def image_path(voc_root, image_id: str) -> Path:
    """``JPEGImages/<id>.jpg``, which must exist (the id may not leave ``JPEGImages``)."""
    check_relative(image_id, f"{Path(voc_root) / 'JPEGImages'}: image id")
    path = Path(voc_root) / "JPEGImages" / f"{image_id}.jpg"
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    return path


def load_rgb(path) -> Image.Image:
    """The fully decoded RGB image; missing, truncated or undecodable files raise a one-line
    DatasetError naming the file (also inside DataLoader workers)."""
    return load_image(path, "RGB", "image")


def open_lazy_rgb(path) -> Image.Image:
    """The RGB image for a training transform: a JPEG stays encoded until the transform asks for
    its pixels, possibly at a DCT-domain reduction (``runtime.images.open_rgb``); the geometry
    (``size``) is known at once and missing or truncated files fail here, as with
    :func:`load_rgb`. Use :func:`load_rgb` where the pixels are needed in full."""
    return open_rgb(path, "image")


# ----------------------------------------------------------------------------- segmentation masks


def _check_mask_values(path, mask: np.ndarray) -> None:
    bad = (mask > len(VOC_CLASSES)) & (mask != VOID_LABEL)
    if bad.any():
        y, x = np.argwhere(bad)[0]
        raise DatasetError(f"{path}: mask value {int(mask[y, x])} at (row {y}, col {x}) "
                           f"is outside 0..{len(VOC_CLASSES)} and not {VOID_LABEL}")


def read_segmentation_mask(png_path) -> np.ndarray:
    """``SegmentationClass/<id>.png`` -> (H, W) uint8 labels (0 background, 1..20, 255 void).

    The PNG must be 8-bit palette ('P') and its palette must equal VOC_PALETTE at every
    index used, so that an RGB-rendered or re-coloured mask cannot slip through as labels.
    """
    path = Path(png_path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode != "P":
                raise DatasetError(f"{path}: mask must be a palette ('P') PNG, got mode {image.mode!r}")
            mask = np.array(image, dtype=np.uint8)
            palette = np.array(image.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 -- PIL raises many types for a corrupt file
        raise image_error(path, err, "mask") from None
    _check_mask_values(path, mask)
    for value in np.unique(mask):
        if value >= len(palette) or not np.array_equal(palette[value], VOC_PALETTE[value]):
            got = tuple(int(v) for v in palette[value]) if value < len(palette) else "none"
            raise DatasetError(f"{path}: palette entry {value} is {got}, not the VOC colour "
                               f"{tuple(int(v) for v in VOC_PALETTE[value])}")
    return mask


def write_segmentation_mask(path, mask) -> None:
    """Write (H, W) labels as a VOC palette PNG (the full 256-entry VOC_PALETTE)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer) or mask.min(initial=0) < 0:
        raise ValueError(f"mask must be a 2-D array of non-negative integers, got {mask.dtype} {mask.shape}")
    mask = mask.astype(np.uint8)
    _check_mask_values(path, mask)
    image = Image.fromarray(mask, mode="P")
    image.putpalette(VOC_PALETTE.tobytes())
    image.save(path, format="PNG")


# Mask file formats by suffix. This module knows VOC's palette PNGs; other formats plug their
# reader in where they are defined (evals.datasets.sbd adds SBD's ".mat"), so that a split mixing
# both (train_aug) is read by one dataset without the VOC reader knowing SBD.
MASK_READERS: dict[str, Callable[[Path], np.ndarray]] = {".png": read_segmentation_mask}


def read_mask(source) -> np.ndarray:
    """A mask from a file of a registered format (:data:`MASK_READERS`) or a zero-argument callable."""
    if callable(source):
        return np.asarray(source(), dtype=np.uint8)
    reader = MASK_READERS.get(Path(source).suffix.lower())
    if reader is None:
        raise DatasetError(f"{source}: no reader for {Path(source).suffix!r} masks (known: {sorted(MASK_READERS)})")
    return reader(source)


def segmentation_items(voc_root, split: str) -> list[tuple[str, Path, Path]]:
    """``(id, image path, mask path)`` for ``ImageSets/Segmentation/<split>.txt``."""
    voc_root = Path(voc_root)
    split_file = voc_root / "ImageSets" / "Segmentation" / f"{split}.txt"
    items = SplitItems(split_files=[split_file])
    for i in read_split(split_file):
        mask = voc_root / "SegmentationClass" / f"{i}.png"
        if not mask.is_file():
            raise DatasetError(f"{mask}: mask file not found")
        items.append((i, image_path(voc_root, i), mask))
    return items


# ----------------------------------------------------------------------------- torch datasets


class VOCClassificationDataset(Dataset):
    """``(PIL RGB image, labels int64 (20,))`` with labels 1 / 0 / -1 (difficult), P2."""

    def __init__(self, voc_root, split: str, transform: Callable | None = None):
        self.voc_root = Path(voc_root)
        self.split_file = self.voc_root / "ImageSets" / "Main" / f"{split}.txt"
        self.ids, self.labels = classification_labels(voc_root, split)
        self.paths = [image_path(voc_root, i) for i in self.ids]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image = open_lazy_rgb(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.from_numpy(self.labels[index].copy())


class VOCSegmentationDataset(Dataset):
    """``(PIL RGB image, mask uint8 (H, W))`` for a list of items (P4).

    Each item is ``(image_path, mask_source)`` or ``(id, image_path, mask_source)`` (the
    form ``train_aug_items`` / ``voc12_val_items`` return); a mask source is a ``.png`` path,
    an SBD ``.mat`` path or a zero-argument callable. ``transform(image, mask)`` is applied
    to both together (geometry must match) and its result returned as is.
    """

    def __init__(self, items: Sequence, transform: Callable | None = None):
        self.items = [tuple(item)[-2:] for item in items]
        self.split_files = list(getattr(items, "split_files", []))  # for the pre-flight's messages
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, source = self.items[index]
        image, mask = load_rgb(path), read_mask(source)
        if mask.shape != (image.height, image.width):
            raise DatasetError(f"{source}: mask is {mask.shape[1]}x{mask.shape[0]} but image {path} "
                               f"is {image.width}x{image.height}")
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask


def voc_dir(data_root, year: int) -> Path:
    return Path(data_root) / "VOCdevkit" / f"VOC{year}"


__all__ = [
    "VOC_CLASSES", "VOC_PALETTE", "NUM_SEG_CLASSES", "VOID_LABEL", "OFFICIAL_COUNTS", "official_main_sizes",
    "read_split", "read_class_file", "classification_labels", "labels_from_annotation",
    "VOCObject", "VOCAnnotation", "parse_annotation", "detection_annotations", "image_path",
    "load_rgb", "open_lazy_rgb", "read_segmentation_mask", "write_segmentation_mask", "read_mask",
    "segmentation_items", "SplitItems", "VOCClassificationDataset", "VOCSegmentationDataset",
    "voc_dir",
]
