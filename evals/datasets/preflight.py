"""Pre-flight: check the data a benchmark run will read, before it trains.

A corrupt JPEG, a split file that lost its lines or an empty ImageNet class folder otherwise
surfaces hours into a run, inside a DataLoader worker (or never: an empty class folder silently
turns the probe into a classifier over fewer real classes). The pre-flight stops the run at the
start with one line naming the file.

Cost (measured on 5,000 small JPEGs: about a second): every file is stat'ed and its header
opened (PIL reads the header only), and a seeded sample of images is decoded in full
(``sample`` per split, default 32; a split of at most ``full_below`` = 500 items is decoded
entirely, so the demo and toy sets are checked completely). Splits larger than
``max_headers`` (ImageNet train) have a seeded sample of that many headers opened; their files
were found by listing their folders, so they exist.

Entry points::

    preflight_datasets({"trainval": train_set, "test": test_set})   # the harnesses
    preflight_voc_split(voc_root, "test")                          # a split read by ids only
    preflight(dataset, "trainval")                                 # one dataset

Datasets understood: ``VOCClassificationDataset``, ``VOCSegmentationDataset``,
``ImageNetDataset``, anything with ``paths`` (image files) or with ``voc_root`` and ``ids`` (e.g.
``evals.detection.data.VOCDetectionDataset``), and wrappers
holding one of those as ``base`` or ``dataset`` (e.g. ``engine.Augmented``).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from runtime.images import file_size, image_header
from runtime.preflight import (
    DEFAULT_MAX_HEADERS,
    DEFAULT_SAMPLE,
    FULL_CHECK_BELOW,
    PreflightReport,
    sample_indices,
)

from runtime.errors import DatasetError
from .imagenet import ImageNetDataset
from .sbd import read_sbd_mask
from .voc import (
    VOCSegmentationDataset,
    image_path,
    load_rgb,
    read_mask,
    read_split,
)


def _unwrap(dataset):
    """The innermost dataset of wrappers that keep it as ``base`` or ``dataset``."""
    for _ in range(8):
        inner = getattr(dataset, "base", None)
        if inner is None:
            inner = getattr(dataset, "dataset", None)
        if inner is None or not hasattr(inner, "__getitem__"):
            return dataset
        dataset = inner
    return dataset


def _require_items(count: int, where: Sequence | str | Path | None, name: str) -> None:
    """An empty split stops the run, naming the split file(s) it came from."""
    if count:
        return
    if isinstance(where, (list, tuple)):
        where = ", ".join(str(w) for w in where) if where else None
    raise DatasetError(f"{where or name}: split is empty")


def _header_indices(count: int, max_headers: int | None, seed: int) -> list[int]:
    if max_headers is None or count <= max_headers:
        return list(range(count))
    return sample_indices(count, max_headers, seed + 1, full_below=0)


def check_files_exist(paths: Iterable, report: PreflightReport, what: str = "image") -> None:
    """``os.stat`` every path: a missing one raises a one-line error naming it; an empty one too
    (a zero-byte file is an interrupted copy)."""
    for path in paths:
        if file_size(path, f"{what} file") == 0:
            raise DatasetError(f"{path}: {what} file is empty (0 bytes)")
        report.files_stated += 1


def check_headers(paths: Sequence, report: PreflightReport, max_headers: int | None, seed: int,
                  what: str = "image") -> dict[int, tuple[int, int]]:
    """Open the header of every image (or of a seeded ``max_headers`` sample): an unknown
    format or garbage bytes fail here. Returns index -> (width, height)."""
    sizes = {}
    for index in _header_indices(len(paths), max_headers, seed):
        _, width, height, _ = image_header(paths[index], what)
        sizes[index] = (width, height)
        report.headers += 1
    return sizes


def preflight_images(paths: Sequence, name: str, split_file=None, *, sample: int = DEFAULT_SAMPLE,
                     seed: int = 0, full_below: int = FULL_CHECK_BELOW,
                     max_headers: int | None = DEFAULT_MAX_HEADERS,
                     decode: Callable = load_rgb, stat: bool = True) -> PreflightReport:
    """Check a list of image files: non-empty (else "<split_file>: split is empty"), every file
    exists and is not empty, every header opens, and the sampled images decode in full with
    ``decode`` (default: ``load_rgb``, what the datasets use)."""
    report = PreflightReport(name, len(paths))
    _require_items(len(paths), split_file, name)
    if stat:
        check_files_exist(paths, report)
    check_headers(paths, report, max_headers, seed)
    for index in sample_indices(len(paths), sample, seed, full_below):
        decode(paths[index])
        report.decoded += 1
    return report.done()


def preflight_voc_split(voc_root, split: str, kind: str = "Main", name: str | None = None, *,
                        log: Callable[[str], None] | None = None, **options) -> PreflightReport:
    """A VOC split read by ids (``ImageSets/<kind>/<split>.txt``): the split file parses (ids
    relative, no ``..``, no duplicates) and is non-empty, and its ``JPEGImages`` are checked as
    in :func:`preflight_images`. Labels and annotations are parsed by the datasets themselves."""
    split_file = Path(voc_root) / "ImageSets" / kind / f"{split}.txt"
    ids = read_split(split_file)
    _require_items(len(ids), split_file, split)
    paths = [image_path(voc_root, i) for i in ids]
    report = preflight_images(paths, name or split, split_file, **options)
    if log is not None:
        log(report.summary())
    return report


def _check_segmentation(dataset: VOCSegmentationDataset, name: str, sample: int, seed: int,
                        full_below: int, max_headers: int | None) -> PreflightReport:
    """Images as in :func:`preflight_images`; PNG masks: every header opens as a palette ('P')
    image of the image's size; SBD ``.mat`` masks: every file exists, a sample is read in full;
    the sampled items are decoded in full (image, mask, matching sizes)."""
    report = PreflightReport(name, len(dataset))
    _require_items(len(dataset), dataset.split_files, name)
    images = [path for path, _ in dataset.items]
    masks = [source for _, source in dataset.items]
    files = [m for m in masks if not callable(m)]
    check_files_exist(images, report)
    check_files_exist(files, report, "mask")
    sizes = check_headers(images, report, max_headers, seed)
    for index, size in sizes.items():
        source = masks[index]
        if callable(source) or Path(source).suffix.lower() == ".mat":
            continue
        _, width, height, mode = image_header(source, "mask")
        report.headers += 1
        if mode != "P":
            raise DatasetError(f"{source}: mask must be a palette ('P') PNG, got mode {mode!r}")
        if (width, height) != size:
            raise DatasetError(f"{source}: mask is {width}x{height} but image {images[index]} "
                               f"is {size[0]}x{size[1]}")
    mats = [i for i, m in enumerate(masks) if not callable(m) and Path(m).suffix.lower() == ".mat"]
    for k in sample_indices(len(mats), sample, seed, full_below):
        read_sbd_mask(masks[mats[k]])
    for index in sample_indices(len(dataset), sample, seed, full_below):
        image, mask = load_rgb(images[index]), read_mask(masks[index])
        if mask.shape != (image.height, image.width):
            raise DatasetError(f"{masks[index]}: mask is {mask.shape[1]}x{mask.shape[0]} but image "
                               f"{images[index]} is {image.width}x{image.height}")
        report.decoded += 1
    return report.done()


def check_imagenet_classes(dataset: ImageNetDataset) -> None:
    """Every class folder of the split holds at least one image.

    Classes are the folder names of ``train/``: an empty one still counts as a class (the probe
    gets an output that never sees an example), so it is an error naming the folder. A ``val/``
    in class folders must have images in each folder it has; a flat ``val/`` is checked by its
    label file."""
    counts = Counter(label for _, label in dataset.samples)
    folder = dataset.root / dataset.split
    for index, wnid in enumerate(dataset.classes):
        if counts[index]:
            continue
        if dataset.split == "train" or (folder / wnid).is_dir():
            raise DatasetError(f"{folder / wnid}: class folder is empty (no .JPEG/.jpg/.png images); "
                               f"{len(dataset.classes)} classes are read from {dataset.root / 'train'}, "
                               f"so the probe would have a class without examples")


def _check_imagenet(dataset: ImageNetDataset, name: str, **options) -> PreflightReport:
    """Class folders non-empty (:func:`check_imagenet_classes`), then the images as in
    :func:`preflight_images` (files listed from their folders, so not stat'ed again)."""
    check_imagenet_classes(dataset)
    paths = [path for path, _ in dataset.samples]
    report = preflight_images(paths, name, dataset.root / dataset.split, stat=len(paths) <= 200_000, **options)
    report.notes.append(f"{len(dataset.classes)} classes non-empty")
    return report


def _image_paths(dataset) -> list | None:
    paths = getattr(dataset, "paths", None)
    if paths is not None:
        return list(paths)
    if hasattr(dataset, "voc_root") and hasattr(dataset, "ids"):
        return [image_path(dataset.voc_root, i) for i in dataset.ids]
    return None


def preflight(dataset, name: str, *, sample: int = DEFAULT_SAMPLE, seed: int = 0,
              full_below: int = FULL_CHECK_BELOW, max_headers: int | None = DEFAULT_MAX_HEADERS) -> PreflightReport:
    """Check the split ``dataset`` will read (see the module doc for what each kind gets).

    Raises DatasetError (one line naming the file) on the first problem; returns a report of
    what was checked otherwise."""
    options = dict(sample=sample, seed=seed, full_below=full_below, max_headers=max_headers)
    dataset = _unwrap(dataset)
    if isinstance(dataset, VOCSegmentationDataset):
        return _check_segmentation(dataset, name, **options)
    if isinstance(dataset, ImageNetDataset):
        return _check_imagenet(dataset, name, **options)
    paths = _image_paths(dataset)
    if paths is None:
        raise TypeError(f"preflight does not know how to check a {type(dataset).__name__} "
                        f"(no paths, items, samples or voc_root/ids)")
    split_file = getattr(dataset, "split_file", None)
    return preflight_images(paths, name, split_file, **options)


def preflight_datasets(datasets: Mapping[str, object], *, log: Callable[[str], None] | None = print,
                       **options) -> dict[str, PreflightReport]:
    """:func:`preflight` each ``{name: dataset}`` in order (e.g. ``{"trainval": ..., "test":
    ...}``), printing one summary line each through ``log`` (None: quiet). The first problem
    raises DatasetError naming the file; options as for :func:`preflight`."""
    reports = {}
    for name, dataset in datasets.items():
        reports[name] = preflight(dataset, name, **options)
        if log is not None:
            log(reports[name].summary())
    return reports


__all__ = ["preflight", "preflight_datasets", "preflight_images", "preflight_voc_split",
           "check_files_exist", "check_headers", "check_imagenet_classes"]
