"""Selective Search region proposals for VOC07 detection (protocols.md P3).

Fast R-CNN trains and tests on Selective Search boxes. Two sources:

* computed here with OpenCV's implementation (``cv2.ximgproc.segmentation``), "fast" mode by
  default ("quality" selectable), optionally on a copy resized to ``max_side`` with the boxes
  scaled back; ranked as OpenCV returns them, duplicates and boxes under ``MIN_SIZE`` px removed;
* the precomputed ``.mat`` files Fast R-CNN ships (``voc_2007_trainval.mat``, ``voc_2007_test.mat``:
  ``images``, a cell of ids, and ``boxes``, a cell of (K, 4) arrays in 1-based **y1, x1, y2, x2**
  order), read with :func:`load_mat_proposals` and imported into the cache.

Cache layout (one file per image, written atomically, so an interrupted run resumes)::

    <cache>/<source>/<image_id>.npy      int32 (K, 4): x1, y1, x2, y2, 1-based inclusive (VOC)

``<source>`` is ``fast``, ``quality`` or ``mat``. The CLI computes the boxes of a split in
parallel (spawned processes, one image per task), skips images already cached and can be
sharded (``--shard-index/--num-shards``, or a SLURM array's ``SLURM_ARRAY_TASK_ID`` /
``SLURM_ARRAY_TASK_COUNT``)::

    python -m evals.detection.proposals --voc-root DIR/VOCdevkit/VOC2007 --split trainval --out DIR/proposals
    python -m evals.detection.proposals --voc-root ... --split test --out ... --from-mat voc_2007_test.mat
"""
from __future__ import annotations

import argparse
import ctypes
import io
import multiprocessing
import os
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from runtime.atomic import atomic_write
from runtime.lifetime import die_with_parent
from runtime.paths import check_relative, safe_join
from runtime.sharding import shard_from_env

MODES = ("fast", "quality")
SOURCES = MODES + ("mat",)
MIN_SIZE = 2  # px: smaller boxes are dropped (Detectron's filter_small_boxes default for SS)


# ----------------------------------------------------------------------------- box utilities


def unique_boxes(boxes: np.ndarray) -> np.ndarray:
    """``boxes`` without repeated rows, first occurrence kept, order preserved."""
    if len(boxes) == 0:
        return boxes
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]


def filter_small_boxes(boxes: np.ndarray, min_size: int = MIN_SIZE) -> np.ndarray:
    """Keep boxes (inclusive coordinates) at least ``min_size`` px wide and high."""
    width, height = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    return boxes[(width >= min_size) & (height >= min_size)]


def rects_to_voc(rects: np.ndarray, scale: float, width: int, height: int) -> np.ndarray:
    """OpenCV ``(x, y, w, h)`` rects (0-based, on an image resized by ``scale``) -> int32
    ``x1, y1, x2, y2`` VOC boxes (1-based inclusive) on the original ``width`` x ``height`` image.
    A rect covers pixels ``[x, x + w)``, i.e. ``[x / scale, (x + w) / scale)`` of the original."""
    rects = np.asarray(rects, np.float64).reshape(-1, 4)
    x0, y0 = rects[:, 0] / scale, rects[:, 1] / scale
    x1, y1 = (rects[:, 0] + rects[:, 2]) / scale, (rects[:, 1] + rects[:, 3]) / scale
    boxes = np.stack([np.floor(x0 + 1e-6) + 1, np.floor(y0 + 1e-6) + 1, np.ceil(x1 - 1e-6), np.ceil(y1 - 1e-6)], 1)
    boxes = np.clip(boxes, 1, [width, height, width, height])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
    return boxes.astype(np.int32)


def _seed_c_rand(seed: int) -> None:
    """OpenCV ranks Selective Search regions by ``level * rand()`` with C's ``rand()``
    (``cv2.setRNGSeed`` does not reach it): seeding it makes the box order reproducible."""
    try:
        ctypes.CDLL(None).srand(ctypes.c_uint(seed))
    except (OSError, AttributeError):  # no C runtime symbols to reach (e.g. Windows): order varies
        pass


def selective_search(image_rgb: np.ndarray, mode: str = "fast", max_side: int | None = None,
                     seed: int = 0) -> np.ndarray:
    """Selective Search boxes of an (H, W, 3) uint8 RGB image: int32 (K, 4) x1, y1, x2, y2,
    1-based inclusive, in OpenCV's rank order (reproducible given ``seed``), duplicates and
    tiny boxes removed."""
    import cv2

    if mode not in MODES:
        raise ValueError(f"unknown Selective Search mode {mode!r}; expected one of {MODES}")
    cv2.setNumThreads(1)  # parallelism comes from the process pool
    height, width = image_rgb.shape[:2]
    bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
    scale = 1.0
    if max_side and max(height, width) > max_side:
        scale = max_side / max(height, width)
        bgr = cv2.resize(bgr, (max(1, round(width * scale)), max(1, round(height * scale))),
                         interpolation=cv2.INTER_AREA)
        scale = bgr.shape[1] / width  # the exact factor after rounding (x; y is within a pixel)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(bgr)
    (search.switchToSelectiveSearchFast if mode == "fast" else search.switchToSelectiveSearchQuality)()
    _seed_c_rand(seed)
    boxes = rects_to_voc(search.process(), scale, width, height)
    return filter_small_boxes(unique_boxes(boxes))


# ----------------------------------------------------------------------------- the cache


def cache_path(cache_dir, source: str, image_id: str) -> Path:
    """``<cache>/<source>/<image_id>.npy``. Ids come from split files and ``.mat`` files, so an
    absolute id or one with ``..`` is refused (DatasetError): nothing is read or written outside
    the cache."""
    check_relative(source, f"{cache_dir}: proposal source")
    return safe_join(Path(cache_dir) / source, image_id, f"{Path(cache_dir) / source}: image id", ".npy")


def save_boxes(path, boxes: np.ndarray) -> Path:
    """Write int32 (K, 4) boxes to ``path`` atomically (:func:`runtime.atomic.atomic_write`; the
    bytes are ``np.save``'s ``.npy`` format)."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    if not np.issubdtype(boxes.dtype, np.integer):
        boxes = np.round(boxes)
    buffer = io.BytesIO()
    np.save(buffer, boxes.astype(np.int32))
    return atomic_write(path, buffer.getbuffer())


def load_boxes(cache_dir, source: str, image_id: str) -> np.ndarray:
    """The cached int32 (K, 4) VOC boxes of one image."""
    path = cache_path(cache_dir, source, image_id)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no cached proposals (run `python -m evals.detection.proposals`)")
    boxes = np.load(path, allow_pickle=False)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{path}: expected a (K, 4) array, got {boxes.shape}")
    return boxes.astype(np.int32)


def load_mat_proposals(mat_path) -> dict[str, np.ndarray]:
    """Fast R-CNN's precomputed Selective Search file -> ``{image_id: int32 (K, 4) x1, y1, x2, y2}``.

    The file holds ``images`` (cell of ids) and ``boxes`` (cell of (K, 4) arrays, 1-based
    **y1, x1, y2, x2**, as MATLAB's selective_search.m writes them); Fast R-CNN reads them with
    ``raw[:, (1, 0, 3, 2)] - 1``. Here the columns are reordered and the 1-based inclusive
    convention kept."""
    from scipy.io import loadmat

    raw = loadmat(str(mat_path))
    if "images" not in raw or "boxes" not in raw:
        raise ValueError(f"{mat_path}: expected variables 'images' and 'boxes', got {sorted(k for k in raw if not k.startswith('__'))}")
    images, boxes = np.asarray(raw["images"]).ravel(), np.asarray(raw["boxes"]).ravel()
    if len(images) != len(boxes):
        raise ValueError(f"{mat_path}: {len(images)} images but {len(boxes)} box arrays")
    out = {}
    for k, (image, box) in enumerate(zip(images, boxes)):
        image_id = str(np.asarray(image).ravel()[0]) if np.asarray(image).dtype == object else str(np.squeeze(image))
        check_relative(image_id, f"{mat_path}: images[{k}]")  # ids become cache file names
        box = np.asarray(box, dtype=np.float64).reshape(-1, 4)
        out[image_id] = np.round(box[:, (1, 0, 3, 2)]).astype(np.int32)
    return out


def import_mat(mat_path, cache_dir, ids: Sequence[str] | None = None) -> int:
    """Write the boxes of a Fast R-CNN ``.mat`` file into ``<cache>/mat/``; returns the count."""
    proposals = load_mat_proposals(mat_path)
    missing = [i for i in (ids or ()) if i not in proposals]
    if missing:
        raise ValueError(f"{mat_path}: no boxes for {len(missing)} ids of the split, e.g. {missing[:3]}")
    for image_id in (ids if ids is not None else proposals):
        save_boxes(cache_path(cache_dir, "mat", image_id), proposals[image_id])
    return len(ids if ids is not None else proposals)


# ----------------------------------------------------------------------------- computing a split


CLAIM_STALE_S = 900.0  # a claim from another host this old belongs to a process that died: taken over
CLAIM_POLL_S = 0.5


def _owner_is_gone(claim: Path) -> bool:
    """The claim was written by a process that no longer runs: on this host, its pid is not
    alive (a killed run, resumed at once); elsewhere, the claim is older than CLAIM_STALE_S."""
    try:
        host, pid = claim.read_text().split()
        if host == socket.gethostname():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False
    except (ValueError, OSError):
        pass  # being written, or not ours: judge by age
    try:
        return time.time() - claim.stat().st_mtime >= CLAIM_STALE_S
    except FileNotFoundError:
        return True


def _claim(out: Path) -> bool:
    """Claim ``out`` for this process (``<out>.claim``, created exclusively, so concurrent runs on
    one cache -- detection cells started together, array tasks on a shared file system -- split
    the images instead of each computing all of them). False while another live process holds it."""
    claim = out.with_name(out.name + ".claim")
    claim.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _owner_is_gone(claim):
                return False
            claim.unlink(missing_ok=True)  # its owner died: take over
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True
    return False


def _compute_one(image_path: str, out_path: str, mode: str, max_side: int | None) -> int | None:
    """Compute and cache one image's boxes; their count, or None when another process has
    written them or is computing them (see :func:`_claim`)."""
    from runtime.images import load_image

    out = Path(out_path)
    if out.is_file() or not _claim(out):
        return None
    try:
        if out.is_file():  # written between the check and the claim
            return None
        rgb = np.asarray(load_image(image_path, "RGB"))  # a bad image: one line naming it
        boxes = selective_search(rgb, mode, max_side)
        save_boxes(out, boxes)
        return len(boxes)
    finally:
        out.with_name(out.name + ".claim").unlink(missing_ok=True)


def compute_proposals(voc_root, split: str, cache_dir, mode: str = "fast", workers: int = 2,
                      shard_index: int = 0, num_shards: int = 1, max_side: int | None = None,
                      ids: Sequence[str] | None = None, progress: bool = True) -> dict:
    """Selective Search boxes of every image of ``ImageSets/Main/<split>.txt`` (this shard's
    share: every ``num_shards``-th id from ``shard_index``) into the cache; cached images are
    skipped, and images another process is computing at the same time are left to it and waited
    for (see :func:`_claim`). ``workers=0`` computes in this process."""
    from evals.datasets.voc import image_path, read_split

    if mode not in MODES:
        raise ValueError(f"unknown Selective Search mode {mode!r}; expected one of {MODES}")
    if ids is None:
        ids = read_split(Path(voc_root) / "ImageSets" / "Main" / f"{split}.txt")
    mine = list(ids)[shard_index::num_shards]
    todo = [i for i in mine if not cache_path(cache_dir, mode, i).is_file()]
    jobs = [(str(image_path(voc_root, i)), str(cache_path(cache_dir, mode, i)), mode, max_side) for i in todo]
    bar = tqdm(total=len(jobs), desc=f"selective search ({mode}, {split})", unit="img", disable=not progress,
               mininterval=1.0, dynamic_ncols=True)
    counts = []
    if workers and workers > 0 and len(jobs) > 1:
        # Workers die with this process (SIGKILL included) instead of finishing their images.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            for future in as_completed([pool.submit(_compute_one, *job) for job in jobs]):
                counts.append(future.result())
                bar.update(1)
    else:
        for job in jobs:
            counts.append(_compute_one(*job))
            bar.update(1)
    bar.close()
    elsewhere = [job for job in jobs if not Path(job[1]).is_file()]
    computed = [c for c in counts if c is not None]
    while elsewhere:  # left to another process: wait, or take over once its claim goes stale
        time.sleep(CLAIM_POLL_S)
        for job in list(elsewhere):
            count = _compute_one(*job)
            if count is not None:
                computed.append(count)
            if Path(job[1]).is_file():
                elsewhere.remove(job)
    return {"split": split, "mode": mode, "shard": f"{shard_index}/{num_shards}", "images": len(mine),
            "computed": len(computed), "computed_elsewhere": len(jobs) - len(computed),
            "skipped": len(mine) - len(jobs),
            "mean_boxes_computed": float(np.mean(computed)) if computed else None,
            "cache": str(Path(cache_dir) / mode)}


def load_split_proposals(cache_dir, source: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
    return {i: load_boxes(cache_dir, source, i) for i in ids}


def missing_ids(cache_dir, source: str, ids: Sequence[str]) -> list[str]:
    return [i for i in ids if not cache_path(cache_dir, source, i).is_file()]


# ----------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evals.detection.proposals", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc-root", required=True, help="VOC2007 folder (holding JPEGImages/, ImageSets/)")
    parser.add_argument("--split", default="trainval", help="ImageSets/Main split (default: trainval)")
    parser.add_argument("--out", required=True, help="cache folder; boxes go to OUT/<mode>/<image_id>.npy")
    parser.add_argument("--mode", default="fast", choices=MODES, help="OpenCV Selective Search mode (default: fast)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="worker processes (0: compute in this process)")
    parser.add_argument("--max-side", type=int, default=None,
                        help="resize so the longer side is at most this before Selective Search (boxes scaled back)")
    parser.add_argument("--shard-index", type=int, default=None, help="this shard (default: SLURM_ARRAY_TASK_ID or 0)")
    parser.add_argument("--num-shards", type=int, default=None, help="shard count (default: SLURM_ARRAY_TASK_COUNT or 1)")
    parser.add_argument("--from-mat", default=None,
                        help="import Fast R-CNN's precomputed voc_2007_<split>.mat into OUT/mat/ instead of computing")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.from_mat:
            from evals.datasets.voc import read_split
            ids = read_split(Path(args.voc_root) / "ImageSets" / "Main" / f"{args.split}.txt")
            count = import_mat(args.from_mat, args.out, ids)
            print(f"imported {count} images' boxes from {args.from_mat} into {Path(args.out) / 'mat'}")
            return 0
        index, count = shard_from_env(args.shard_index, args.num_shards)
        summary = compute_proposals(args.voc_root, args.split, args.out, args.mode, args.workers, index, count,
                                    args.max_side)
    except (ValueError, FileNotFoundError) as err:  # DatasetError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
