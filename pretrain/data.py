"""(frame, flow) pairs for CPFS pretraining: dataset, joint augmentation, pixel sampling (protocols.md P1).

The pure parts (``augment_pair``, ``sample_pixels``) are functions of numpy
arrays and a ``numpy.random.Generator``; ``FlowPairDataset`` is the file edge
that reads a folder written by ``pretrain.prepare`` (``manifest.jsonl`` plus
the JPEG frames and KITTI flow PNGs it names, paths relative to the folder).

Augmentation (paper §4.3: "Scale, horizontal flip and crop augmentation";
P1: the geometry is applied to image and flow together):

* scale by ``s ~ U(scale_range)``: the image bilinearly; the flow field and its
  validity by nearest neighbour, so every output vector is a vector that was
  measured (bilinear would average across motion boundaries and blend invalid
  zeros into valid vectors); flow vectors are multiplied by the scale of their
  axis (``u * new_w / w``, ``v * new_h / h``, both ~ s up to rounding).
  If the scaled image would be smaller than the crop, ``s`` is raised so its
  shorter side equals the crop (scaling up instead of padding, so a crop never
  holds padded, invalid pixels).
* random crop ``crop x crop``;
* horizontal flip with probability 1/2: mirrors image, field and validity and
  negates ``u``.

The scale range is not published; the default ``(0.8, 1.25)`` (symmetric in
log-scale) is the project's choice. Evaluation (``train=False``) uses scale 1
(or the scale-up above), the centre crop and no flip.
"""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import torch

from backbones.alexnet import IMAGENET_MEAN, IMAGENET_STD  # the networks' input convention
from pretrain.flow import decode_flow_png, normalize_flow
from runtime.errors import DatasetError, MissingFileError
from runtime.images import check_flow_png_header, check_jpeg_complete, file_size, image_header
from runtime.paths import check_relative
from runtime.preflight import DEFAULT_MAX_HEADERS, DEFAULT_SAMPLE, FULL_CHECK_BELOW, PreflightReport, sample_indices

__all__ = [
    "DEFAULT_SCALE_RANGE",
    "read_manifest",
    "augment_pair",
    "sample_pixels",
    "FlowPairDataset",
    "preflight_flow_pairs",
]

DEFAULT_SCALE_RANGE = (0.8, 1.25)  # not published (P1 says "scale"); project choice
_PIXEL_SCALE = 1.0 / (255.0 * np.array(IMAGENET_STD, np.float32))
_PIXEL_OFFSET = np.array(IMAGENET_MEAN, np.float32) / np.array(IMAGENET_STD, np.float32)


PATH_FIELDS = ("frame_path", "flow_path")  # joined to the manifest's folder: must stay inside it


def _check_record(record, where: str) -> dict:
    """A manifest record: a JSON object whose file fields (``frame_path``, ``flow_path``, any
    other ``*_path``) are relative paths that stay inside the manifest's folder."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in PATH_FIELDS:
        if key not in record:
            raise DatasetError(f"{where}: record has no {key!r}")
    for key, value in record.items():
        if key.endswith("_path"):
            if not isinstance(value, str):
                raise DatasetError(f"{where}: {key} must be a string, got {value!r}")
            check_relative(value, f"{where}: {key}")
    return record


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """The records of a ``manifest.jsonl`` (blank lines skipped).

    Each line must be a JSON object with relative ``frame_path`` and ``flow_path`` (no absolute
    path, no ``..``: a manifest cannot make training read files outside its folder); otherwise a
    one-line DatasetError names the file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: manifest not found (run python -m pretrain.prepare first)")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not a JSON line: {e}") from None
            records.append(_check_record(record, f"{path}:{lineno}"))
    return records


# --------------------------------------------------------------------------- #
# Joint geometry (pure)
# --------------------------------------------------------------------------- #
def augment_pair(image: np.ndarray, flow: np.ndarray, valid: np.ndarray, rng: np.random.Generator | None,
                 crop: int = 224, scale_range: tuple[float, float] = DEFAULT_SCALE_RANGE,
                 flip: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale, crop and flip ``image`` (H, W, C), ``flow`` (H, W, 2) px and ``valid`` (H, W) bool together.

    ``rng=None`` is the deterministic evaluation view: scale 1, centre crop,
    no flip (``scale_range`` and ``flip`` are ignored). Returns arrays of size
    ``crop x crop``; the image keeps its dtype, the flow is float32.
    """
    h, w = image.shape[:2]
    if flow.shape[:2] != (h, w) or valid.shape != (h, w):
        raise ValueError(f"image {image.shape[:2]}, flow {flow.shape[:2]} and valid {valid.shape} must match")
    s = 1.0 if rng is None else float(rng.uniform(scale_range[0], scale_range[1]))
    s = max(s, crop / min(h, w))  # scale up rather than pad (module docstring)
    new_h, new_w = max(crop, round(h * s)), max(crop, round(w * s))
    if (new_h, new_w) != (h, w):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        # INTER_NEAREST_EXACT samples source pixel floor((x + 0.5) * w / new_w), pixel-centre aligned
        # like INTER_LINEAR (plain INTER_NEAREST is shifted by up to a pixel).
        flow = cv2.resize(flow, (new_w, new_h), interpolation=cv2.INTER_NEAREST_EXACT)
        valid = cv2.resize(np.asarray(valid, bool).view(np.uint8), (new_w, new_h),
                           interpolation=cv2.INTER_NEAREST_EXACT) > 0

    if rng is None:
        y0, x0, mirror = (new_h - crop) // 2, (new_w - crop) // 2, False
    else:
        y0 = int(rng.integers(0, new_h - crop + 1))
        x0 = int(rng.integers(0, new_w - crop + 1))
        mirror = bool(flip) and bool(rng.random() < 0.5)
    image = image[y0:y0 + crop, x0:x0 + crop]
    # A resize by s scales the vectors by s (applied after the crop: fewer pixels to touch).
    flow = (flow[y0:y0 + crop, x0:x0 + crop] * np.array([new_w / w, new_h / h], np.float32)).astype(np.float32)
    valid = valid[y0:y0 + crop, x0:x0 + crop]
    if mirror:
        image, flow, valid = image[:, ::-1], flow[:, ::-1], valid[:, ::-1]
        flow[..., 0] = -flow[..., 0]  # mirrored motion: u changes sign, v does not
    return np.ascontiguousarray(image), np.ascontiguousarray(flow), np.ascontiguousarray(valid)


def sample_pixels(valid: np.ndarray, num_pixels: int, rng: np.random.Generator) -> np.ndarray:
    """``num_pixels`` (y, x) positions, int64 (N, 2), uniform over the valid pixels (P1: "sampled uniformly").

    Without replacement when there are at least ``num_pixels`` valid pixels,
    with replacement otherwise; raises ValueError when none is valid.
    """
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        raise ValueError("no valid flow pixels to sample from")
    chosen = rng.choice(idx, size=num_pixels, replace=idx.size < num_pixels)
    return np.stack(np.unravel_index(chosen, valid.shape), axis=1).astype(np.int64)


# --------------------------------------------------------------------------- #
# Dataset (file edge)
# --------------------------------------------------------------------------- #
def _read_rgb(path: str) -> np.ndarray:
    """The frame as (H, W, 3) uint8 RGB. A missing, undecodable or truncated file raises a
    one-line DatasetError naming it (OpenCV decodes a JPEG cut short without failing, filling
    the rest grey, so its end marker is checked first)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: frame not found")
    check_jpeg_complete(path, "frame")
    try:
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    except cv2.error as err:
        raise DatasetError(f"{path}: frame is not a readable image ({' '.join(str(err).split())})") from None
    if bgr is None:
        raise DatasetError(f"{path}: frame is not a readable image (cv2.imread failed)")
    return bgr[..., ::-1]


class FlowPairDataset(torch.utils.data.Dataset):
    """(frame, flow) pairs of a ``pretrain.prepare`` folder, augmented, with sampled pixels (P1).

    Item ``i`` is a dict:

    * ``image``: float32 (3, crop, crop), RGB in [0, 1] minus ``IMAGENET_MEAN``
      over ``IMAGENET_STD``;
    * ``positions``: int64 (num_pixels, 2), (y, x) pixel coordinates in the crop,
      uniform over valid flow pixels (P1: 512 per image);
    * ``flow``: float32 (num_pixels, 2), the flow (u, v) at those pixels,
      normalised by eq. (6) with ``max_magnitude`` (P1: M = 56);
    * ``index``: ``i``;
    * with ``return_flow_map=True`` also ``flow_map`` float32 (2, crop, crop),
      the normalised field (0 at invalid pixels), and ``valid_map`` bool (crop, crop).

    Randomness: every draw of item ``i`` comes from a Generator seeded by
    ``(seed, epoch, i)`` (``(seed, i)`` when ``train=False``, so validation
    batches are the same every epoch); a sample does not depend on worker
    count or order. Call ``set_epoch(e)`` before iterating a DataLoader over
    epoch ``e``; DataLoader workers copy the dataset when an iterator is
    created, so do not use ``persistent_workers=True`` with ``set_epoch``.

    A crop with no valid flow pixel is drawn again (up to ``max_tries`` crops
    from the same Generator, so still deterministic); then a ValueError naming
    the files is raised. A missing or corrupt frame or flow file raises an
    error naming the file.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = "train", crop: int = 224,
                 scale_range: tuple[float, float] = DEFAULT_SCALE_RANGE, flip: bool = True,
                 num_pixels: int = 512, max_magnitude: float = 56.0, seed: int = 0, train: bool = True,
                 return_flow_map: bool = False, manifest: str | None = None, max_tries: int = 10):
        self.root = os.fspath(root)
        self.manifest_path = os.fspath(manifest or os.path.join(self.root, "manifest.jsonl"))
        records = read_manifest(self.manifest_path)
        self.records = [r for r in records if split is None or r.get("split") == split]
        self.split, self.crop, self.scale_range, self.flip = split, crop, tuple(scale_range), flip
        self.num_pixels, self.max_magnitude, self.seed, self.train = num_pixels, max_magnitude, seed, train
        self.return_flow_map, self.max_tries = return_flow_map, max_tries
        self.epoch = 0
        if not scale_range[0] <= scale_range[1] or scale_range[0] <= 0:
            raise ValueError(f"scale_range must be (s_min, s_max) with 0 < s_min <= s_max, got {scale_range}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def rng(self, index: int) -> np.random.Generator:
        key = [self.seed, self.epoch, index] if self.train else [self.seed, 2**32, index]
        return np.random.default_rng(key)

    def paths(self, index: int) -> tuple[str, str]:
        """The frame and flow files of item ``index`` (inside ``root``: checked by read_manifest)."""
        r = self.records[index]
        return os.path.join(self.root, r["frame_path"]), os.path.join(self.root, r["flow_path"])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored frame (H, W, 3) uint8 RGB, flow (H, W, 2) px and valid (H, W) of item ``index``."""
        frame_path, flow_path = self.paths(index)
        image = _read_rgb(frame_path)
        flow, valid = decode_flow_png(flow_path)
        if image.shape[:2] != flow.shape[:2]:
            raise DatasetError(f"{frame_path} is {image.shape[1]}x{image.shape[0]} but "
                             f"{flow_path} is {flow.shape[1]}x{flow.shape[0]}")
        return image, flow, valid

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        rng = self.rng(index)
        image, flow, valid = self.load(index)
        # The evaluation view is fixed, so only training draws another crop.
        for _ in range(self.max_tries if self.train else 1):
            img, fl, val = augment_pair(image, flow, valid, rng if self.train else None,
                                        self.crop, self.scale_range, self.flip)
            if val.any():
                break
        else:
            r = self.records[index]
            raise ValueError(f"item {index} ({r['frame_path']}, {r['flow_path']}): no valid flow pixel in the crop")
        positions = sample_pixels(val, self.num_pixels, rng)
        image_t = img.astype(np.float32) * _PIXEL_SCALE - _PIXEL_OFFSET  # (x / 255 - mean) / std
        sampled = fl[positions[:, 0], positions[:, 1]]
        out = {
            "image": torch.from_numpy(np.ascontiguousarray(image_t.transpose(2, 0, 1))),
            "positions": torch.from_numpy(positions),
            "flow": torch.from_numpy(normalize_flow(sampled, self.max_magnitude).astype(np.float32)),
            "index": index,
        }
        if self.return_flow_map:
            fmap = np.where(val[..., None], normalize_flow(fl, self.max_magnitude), 0.0).astype(np.float32)
            out["flow_map"] = torch.from_numpy(np.ascontiguousarray(fmap.transpose(2, 0, 1)))
            out["valid_map"] = torch.from_numpy(val)
        return out


# --------------------------------------------------------------------------- #
# Pre-flight: check the files before training
# --------------------------------------------------------------------------- #
def preflight_flow_pairs(dataset: FlowPairDataset, *, sample: int = DEFAULT_SAMPLE, seed: int = 0,
                         full_below: int = FULL_CHECK_BELOW, max_headers: int | None = DEFAULT_MAX_HEADERS,
                         allow_empty: bool = False, log=print) -> PreflightReport:
    """Check the pairs ``dataset`` will read before training starts; the first problem raises a
    one-line DatasetError naming the file.

    * the split has records (else "<manifest>: split is empty"), unless ``allow_empty``;
    * every frame and flow file exists and is not empty (stat);
    * every frame's header opens (PIL, no decoding) and every flow PNG's IHDR says 16-bit RGB
      (KITTI: u, v, valid) of the frame's size (and of the record's ``width``/``height``);
      above ``max_headers`` pairs, a seeded sample of that many is checked;
    * a seeded sample of ``sample`` pairs (all pairs when at most ``full_below``) is decoded in
      full as training reads it (``dataset.load``: JPEG end marker, decode, matching sizes).

    Paths were checked when the manifest was read (relative, no ``..``). ``log`` receives one
    summary line (None: quiet).
    """
    name = f"pretrain {dataset.split or 'all'}"
    report = PreflightReport(name, len(dataset))
    if not len(dataset) and not allow_empty:
        raise DatasetError(f"{dataset.manifest_path}: split is empty (no records with split {dataset.split!r})")
    pairs = [dataset.paths(i) for i in range(len(dataset))]
    for frame_path, flow_path in pairs:
        for path, what in ((frame_path, "frame"), (flow_path, "flow PNG")):
            if file_size(path, what) == 0:
                raise DatasetError(f"{path}: {what} is empty (0 bytes)")
            report.files_stated += 1
    headers = range(len(pairs)) if max_headers is None or len(pairs) <= max_headers else \
        sample_indices(len(pairs), max_headers, seed + 1, full_below=0)
    for index in headers:
        frame_path, flow_path = pairs[index]
        _, width, height, _ = image_header(frame_path, "frame")
        record = dataset.records[index]
        if record.get("width") is not None and (record.get("width"), record.get("height")) != (width, height):
            raise DatasetError(f"{frame_path}: frame is {width}x{height} but the manifest says "
                               f"{record.get('width')}x{record.get('height')}")
        check_flow_png_header(flow_path, (width, height))
        report.headers += 2
    for index in sample_indices(len(pairs), sample, seed, full_below):
        dataset.load(index)
        report.decoded += 1
    report.done()
    if log is not None:
        log(report.summary())
    return report
