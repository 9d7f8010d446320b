"""Build the (frame, optical flow) training pairs from videos (paper §4.2; protocols.md P1, P6).

Per video: decode with PyAV, pick ``--frames-per-video`` (8, P1) random frames
``t`` with ``t + --frame-gap`` (5, P1) inside the video, compute the flow from
frame ``t`` to frame ``t + 5`` with a hand-crafted method (OpenCV DIS by
default) and store the frame as JPEG and the flow as a KITTI 16-bit PNG (P6).

On-disk layout under ``--out DIR``::

    DIR/frames/<video_key>_<t:06d>.jpg   RGB frame t, JPEG quality 95
    DIR/flow/<video_key>_<t:06d>.png     flow t -> t+gap in pixels of the stored
                                         frame, KITTI PNG (pretrain.flow.encode_flow_png)
    DIR/done/<video_key>.json            per-video done marker: the video's manifest
                                         records, written atomically after all its files
    DIR/errors/<video_key>.json          per-video failure (path, reason)
    DIR/manifest.jsonl                   one JSON line per pair, merged from done/
    DIR/errors.jsonl                     one JSON line per failed video, merged from errors/

A manifest line holds ``video`` (absolute path), ``video_key``, ``frame`` (t),
``frame_gap``, ``video_frames`` (frames decoded), ``height``, ``width`` (of the
stored frame and flow), ``split`` ("train"/"val"), ``frame_path``,
``flow_path`` (relative to the manifest's folder) and ``flow_method``.

Design notes

* ``video_key`` = the video's path relative to the input root (a folder given
  to ``--videos``; for a list file, the path as written in the list), made
  filesystem-safe, plus 8 hex digits of its SHA-1 so that ``a/x.mp4`` and
  ``a_x.mp4`` do not collide.
* Frame counts in containers can be wrong (an MKV often says 0), so frames are
  counted by decoding. One decoding pass suffices: the frames ``t`` are drawn
  by reservoir sampling over the candidates ``t`` (those with ``t + gap``
  decoded), keeping only the last ``gap + 1`` decoded frames and the chosen
  pairs in memory. The draw is uniform without replacement and its random
  generator is seeded by ``(--seed, video_key)``, so the frames chosen do not
  depend on sharding, worker count or order. A video with fewer candidates
  than ``--frames-per-video`` contributes all of them.
* ``--short-side S`` downsizes (never upsizes) a video so that its shorter side
  is S before computing flow; the default keeps the decoded size.
* The flow is computed on grayscale frames and every pixel is marked valid
  (the hand-crafted methods give a dense field); non-finite vectors, if any,
  are stored as invalid.
* Split: a whole video goes to "val" when a hash of its key, read as a number
  in [0, 1), is below ``--val-fraction``; frames of one video never straddle
  the split. The split is a pure function of (video_key, val_fraction) and is
  applied when the manifest is merged.
* Resuming: every file is written under a temporary name (``.tmp-<name>.*``,
  ``runtime.atomic``) and renamed into place, so a file under its final name is complete. A video
  is skipped when its done marker exists, was made with the same settings,
  and all its files exist; otherwise it is decoded again and only missing
  files are written (all of them if the settings changed). The manifest is
  rebuilt from the done markers only, so a crash mid-video never puts a
  partial video in the manifest. Temporary files left by a killed process
  start with a dot and can be deleted when no run is active.
* Sharding: ``--shard-index i --num-shards n`` (or the SLURM array variables)
  takes the videos whose position in the sorted list is ``i`` mod ``n``. Every
  run merges the manifest at its end; when shards run concurrently, run
  ``--merge`` once after all of them finish to be sure the manifest has every
  shard's markers.

``--pairs DIR`` indexes pairs computed elsewhere (e.g. the paper's validation
set): ``DIR/flow/<name>.png`` (KITTI flow PNG) with ``DIR/frames/<name>.jpg``
(or ``.jpeg``/``.png``). Each flow PNG is decoded and each frame read to check
that their sizes match; the good pairs go to ``<out or DIR>/manifest.jsonl``
(split ``--pairs-split``, default "val"), the bad ones to ``errors.jsonl``.
``--pairs`` never replaces a manifest it did not write: an ``--out`` that holds a
preparation from videos (``done/`` markers, or a manifest with any record from a
video) is refused in one line (exit status 2) and nothing is written, since
that manifest is a training set (and its next ``--merge`` would replace the
pairs' one). Index such pairs into their own folder (the default ``--out``) and
validate on them with ``pretrain.train --val-data DIR``.

Usage::

    python -m pretrain.prepare --videos /data/yfcc_videos --out /data/cpfs_pairs --workers 8
    python -m pretrain.prepare --videos list.txt --out DIR --shard-index 3 --num-shards 64
    python -m pretrain.prepare --out DIR --merge
    python -m pretrain.prepare --pairs /data/youtube_objects_val
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import sys

import av
import cv2
import numpy as np

from pretrain.flow import decode_flow_png, encode_flow_png, write_image_atomic
from runtime.atomic import atomic_write
from runtime.config import chosen, operational, protocol
from runtime.lifetime import die_with_parent
from runtime.sharding import shard_from_env

__all__ = [
    "VIDEO_EXTENSIONS",
    "PrepareConfig",
    "list_videos",
    "video_key",
    "split_of",
    "sample_frame_pairs",
    "compute_flow",
    "process_video",
    "merge",
    "index_pairs",
    "refuse_training_manifest",
    "ManifestExistsError",
    "prepare",
    "get_args_parser",
    "main",
]

VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ts", ".ogv",
)
FLOW_METHODS = ("dis", "tvl1", "farneback")
JPEG_QUALITY = 95


@dataclasses.dataclass
class PrepareConfig:
    out: str | None = operational(None)
    videos: str | None = operational(None)
    pairs: str | None = operational(None)
    frames_per_video: int = protocol(8, "P1: 8 random frames per video (paper §4.2)")
    frame_gap: int = protocol(5, "P1: flow between frames t and t+5 (paper §4.2)")
    method: str = chosen("dis", "OpenCV DIS: the paper's EpicFlow + DeepMatching is not packaged; TV-L1 and "
                                "Farneback selectable")
    short_side: int | None = chosen(None, "frames kept at their decoded size (None); the paper does not give a "
                                          "resolution")
    max_frames: int | None = protocol(None, "P1: every frame of the video is a candidate (None)")
    val_fraction: float = chosen(0.05, "a 5 % hash split of the training videos validates early stopping; the "
                                       "paper validates on YouTube Objects")
    seed: int = operational(0)
    workers: int = dataclasses.field(default_factory=lambda: min(4, os.cpu_count() or 1),
                                     metadata={"source": "operational", "why": ""})
    shard_index: int = operational(0)
    num_shards: int = operational(1)
    merge_only: bool = operational(False)
    pairs_split: str = operational("val", "split of pairs imported with --pairs")
    pairs_method: str = operational("external", "flow method recorded for imported pairs")
    progress: bool = operational(True)

    def settings(self) -> dict:
        """The settings that determine a video's pairs (a done marker records them)."""
        return {
            "frames_per_video": self.frames_per_video,
            "frame_gap": self.frame_gap,
            "method": self.method,
            "short_side": self.short_side,
            "max_frames": self.max_frames,
            "seed": self.seed,
        }


class VideoError(Exception):
    """A video that cannot give pairs (unreadable, no video stream, too short)."""


class ManifestExistsError(ValueError):
    """``--pairs`` would replace a manifest it did not write (a training manifest from videos)."""


# --------------------------------------------------------------------------- #
# Small file helpers: atomic writes
# --------------------------------------------------------------------------- #
def _write_jsonl(path: str, records: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def _listdir_names(directory: str) -> set[str]:
    """Final (non-temporary) file names in ``directory``."""
    try:
        return {e.name for e in os.scandir(directory) if not e.name.startswith(".")}
    except FileNotFoundError:
        return set()


# --------------------------------------------------------------------------- #
# Video list, keys, split
# --------------------------------------------------------------------------- #
def video_key(rel_path: str) -> str:
    """Stable filesystem-safe name for a video: sanitised relative path + 8 hex of its SHA-1."""
    rel = rel_path.replace(os.sep, "/")
    stem = os.path.splitext(rel)[0]
    safe = re.sub(r"[^A-Za-z0-9.-]+", "_", stem).strip("._-")[-64:] or "video"
    return f"{safe}-{hashlib.sha1(rel.encode('utf-8')).hexdigest()[:8]}"


def split_of(key: str, val_fraction: float) -> str:
    """'val' for a deterministic ``val_fraction`` of video keys, else 'train'."""
    u = int(hashlib.sha256(("split:" + key).encode("utf-8")).hexdigest()[:16], 16) / 2.0**64
    return "val" if u < val_fraction else "train"


def list_videos(source: str) -> list[tuple[str, str]]:
    """``(path, rel)`` for every video, sorted by ``rel`` (the name that keys and shards use).

    ``source`` is a folder (searched recursively for ``VIDEO_EXTENSIONS``, any
    case; hidden files skipped) or a text file with one path per line (blank
    lines and ``#`` comments skipped; relative paths are relative to the list
    file's folder; ``rel`` is the line as written).
    """
    found: dict[str, str] = {}
    if os.path.isdir(source):
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith(".") or not name.lower().endswith(VIDEO_EXTENSIONS):
                    continue
                path = os.path.join(dirpath, name)
                found[os.path.relpath(path, source).replace(os.sep, "/")] = path
    elif os.path.isfile(source):
        base = os.path.dirname(os.path.abspath(source))
        with open(source, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                found[os.path.normpath(line).replace(os.sep, "/")] = os.path.join(base, line)
    else:
        raise FileNotFoundError(f"{source}: --videos must be a folder or a text file listing videos")
    return [(found[rel], rel) for rel in sorted(found)]


# --------------------------------------------------------------------------- #
# Decoding and frame sampling
# --------------------------------------------------------------------------- #
def _to_rgb(frame: av.VideoFrame, short_side: int | None) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")
    h, w = rgb.shape[:2]
    if short_side is not None and min(h, w) > short_side:
        s = short_side / min(h, w)
        size = (max(1, round(w * s)), max(1, round(h * s)))  # cv2 wants (width, height)
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return rgb


def sample_frame_pairs(path: str, k: int, gap: int, rng: np.random.Generator,
                       short_side: int | None = None, max_frames: int | None = None):
    """Decode ``path`` once; return ``(pairs, num_frames)``.

    ``pairs`` is a list of ``(t, rgb_t, rgb_t_plus_gap)`` sorted by t: ``k``
    frames t drawn uniformly without replacement among those with ``t + gap``
    decoded (reservoir sampling, Algorithm R), or all of them when fewer.
    Raises VideoError when the file cannot be decoded or is too short.
    """
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot open as a video: {e}") from e
    reservoir: list[tuple] = []
    n = 0
    try:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        recent: collections.deque = collections.deque(maxlen=gap + 1)
        for frame in container.decode(stream):
            recent.append(frame)
            n += 1
            if len(recent) == gap + 1:
                c = n - 1 - gap  # candidate t; recent[0] is frame t, recent[-1] frame t+gap
                slot = c if c < k else int(rng.integers(0, c + 1))
                if slot < k:
                    pair = (c, _to_rgb(recent[0], short_side), _to_rgb(recent[-1], short_side))
                    if c < k:
                        reservoir.append(pair)
                    else:
                        reservoir[slot] = pair
            if max_frames is not None and n >= max_frames:
                break
    except av.error.FFmpegError as e:
        raise VideoError(f"decoding failed after {n} frames: {e}") from e
    finally:
        container.close()
    if n == 0:
        raise VideoError("no decodable video frames")
    if not reservoir:
        raise VideoError(f"too short: {n} frames decoded, need more than frame gap {gap}")
    return sorted(reservoir, key=lambda p: p[0]), n


# --------------------------------------------------------------------------- #
# Optical flow (hand-crafted, OpenCV)
# --------------------------------------------------------------------------- #
def compute_flow(rgb0: np.ndarray, rgb1: np.ndarray, method: str = "dis") -> np.ndarray:
    """Flow (H, W, 2) float32 in pixels from ``rgb0`` to ``rgb1``: pixel p of frame 0 is at p + f in frame 1.

    ``dis``: DIS (Kroeger et al. 2016), preset MEDIUM. ``tvl1``: Dual TV-L1
    (opencv-contrib ``cv2.optflow``), default parameters. ``farneback``:
    Farneback with OpenCV's documented example parameters. All on grayscale.
    """
    if rgb0.shape != rgb1.shape:
        raise ValueError(f"frames differ in size: {rgb0.shape} vs {rgb1.shape}")
    g0 = cv2.cvtColor(rgb0, cv2.COLOR_RGB2GRAY)
    g1 = cv2.cvtColor(rgb1, cv2.COLOR_RGB2GRAY)
    if method == "dis":
        flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(g0, g1, None)
    elif method == "tvl1":
        flow = cv2.optflow.DualTVL1OpticalFlow_create().calc(g0, g1, None)
    elif method == "farneback":
        flow = cv2.calcOpticalFlowFarneback(g0, g1, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    else:
        raise ValueError(f"unknown flow method {method!r}; expected one of {FLOW_METHODS}")
    return flow.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- #
# One video (runs in a worker process)
# --------------------------------------------------------------------------- #
def _video_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16)])


def process_video(path: str, key: str, out: str, settings: dict, force: bool = False) -> dict:
    """Write the pairs of one video and its done marker (or its error marker).

    Files that already exist under their final names are kept unless ``force``.
    Returns ``{"key", "status": "done"|"error", "written", "reused", "reason"?}``.
    """
    frames_dir, flow_dir = os.path.join(out, "frames"), os.path.join(out, "flow")
    done_path = os.path.join(out, "done", key + ".json")
    error_path = os.path.join(out, "errors", key + ".json")
    try:
        pairs, n = sample_frame_pairs(
            path, settings["frames_per_video"], settings["frame_gap"], _video_rng(settings["seed"], key),
            settings["short_side"], settings["max_frames"])
        records, written, reused = [], 0, 0
        for t, rgb0, rgb1 in pairs:
            name = f"{key}_{t:06d}"
            frame_rel, flow_rel = f"frames/{name}.jpg", f"flow/{name}.png"
            frame_path, flow_path = os.path.join(frames_dir, name + ".jpg"), os.path.join(flow_dir, name + ".png")
            did = False
            if force or not os.path.exists(flow_path):
                encode_flow_png(flow_path, compute_flow(rgb0, rgb1, settings["method"]))
                did = True
            if force or not os.path.exists(frame_path):
                write_image_atomic(frame_path, rgb0, (cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY), what="JPEG")
                did = True
            written += did
            reused += not did
            records.append({
                "video": os.path.abspath(path), "video_key": key, "frame": t,
                "frame_gap": settings["frame_gap"], "video_frames": n,
                "height": int(rgb0.shape[0]), "width": int(rgb0.shape[1]),
                "frame_path": frame_rel, "flow_path": flow_rel, "flow_method": settings["method"],
            })
        # The marker goes last: its existence certifies every file above.
        atomic_write(done_path, json.dumps({"video": os.path.abspath(path), "video_key": key,
                                                  "settings": settings, "records": records}, sort_keys=True))
        if os.path.exists(error_path):
            os.remove(error_path)
        return {"key": key, "status": "done", "written": written, "reused": reused}
    except VideoError as e:
        reason = str(e)
    except Exception as e:  # noqa: BLE001 -- any per-video failure is reported, not fatal
        reason = f"{type(e).__name__}: {e}"
    atomic_write(error_path, json.dumps({"video": os.path.abspath(path), "video_key": key, "reason": reason}))
    return {"key": key, "status": "error", "written": 0, "reused": 0, "reason": reason, "video": path}


def _worker_init(parent_pid: int | None = None) -> None:
    """Pool initializer: one OpenCV thread (the pool already uses every core), and the worker
    ends with the parent (even on SIGKILL) instead of finishing its video for minutes."""
    cv2.setNumThreads(1)
    if parent_pid is not None:
        die_with_parent(parent_pid)


def _process_video_task(args: tuple) -> dict:
    return process_video(*args)


# --------------------------------------------------------------------------- #
# Manifest
# --------------------------------------------------------------------------- #
def _load_marker(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def merge(out: str, val_fraction: float = 0.05) -> dict:
    """Rebuild ``out/manifest.jsonl`` and ``out/errors.jsonl`` from the per-video markers.

    Records are sorted by (video_key, frame) so the manifest does not depend on
    shards or processing order; ``split`` is assigned here (``split_of``).
    """
    records, errors = [], []
    done_dir, err_dir = os.path.join(out, "done"), os.path.join(out, "errors")
    done_keys = set()
    for name in sorted(_listdir_names(done_dir)):
        if not name.endswith(".json"):
            continue
        marker = _load_marker(os.path.join(done_dir, name))
        if marker is None:
            errors.append({"video": None, "video_key": name[:-5], "reason": f"unreadable done marker {name}"})
            continue
        done_keys.add(marker["video_key"])
        for r in marker["records"]:
            records.append(dict(r, split=split_of(r["video_key"], val_fraction)))
    for name in sorted(_listdir_names(err_dir)):
        marker = _load_marker(os.path.join(err_dir, name)) if name.endswith(".json") else None
        if marker is not None and marker.get("video_key") not in done_keys:
            errors.append(marker)
    records.sort(key=lambda r: (r["video_key"], r["frame"]))
    _write_jsonl(os.path.join(out, "manifest.jsonl"), records)
    _write_jsonl(os.path.join(out, "errors.jsonl"), errors)
    return {
        "manifest_pairs": len(records),
        "train_pairs": sum(r["split"] == "train" for r in records),
        "val_pairs": sum(r["split"] == "val" for r in records),
        "manifest_videos": len(done_keys),
        "errors": len(errors),
    }


# --------------------------------------------------------------------------- #
# --pairs: index an existing folder of (frame, flow PNG) pairs
# --------------------------------------------------------------------------- #
def refuse_training_manifest(out: str) -> None:
    """Raise ManifestExistsError when ``out`` holds a preparation from videos: ``--pairs`` writes
    ``out/manifest.jsonl`` and would replace a training set's manifest (and that folder's next
    ``--merge`` would replace the pairs' one). A manifest ``--pairs`` wrote (every record without
    a video) may be rewritten: indexing the same folder again refreshes it."""
    manifest = os.path.join(out, "manifest.jsonl")
    if os.path.isdir(os.path.join(out, "done")):
        raise ManifestExistsError(f"{out} holds frames and flow prepared from videos (done/): --pairs will not "
                                  f"write its manifest.jsonl; index the pairs into their own folder (the default "
                                  f"--out) and validate with pretrain.train --val-data")
    if not os.path.isfile(manifest):
        return
    try:
        with open(manifest, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        records = [None]
    if any(not isinstance(r, dict) or r.get("video") is not None for r in records):
        raise ManifestExistsError(f"{manifest} is a manifest --pairs did not write (a training manifest from "
                                  f"videos): --pairs will not overwrite it; index the pairs into their own folder "
                                  f"(the default --out)")


def index_pairs(pairs_dir: str, out: str | None = None, split: str = "val", method: str = "external") -> dict:
    """Validate ``pairs_dir/flow/*.png`` against ``pairs_dir/frames/<name>.(jpg|jpeg|png)``; write the manifest.

    Paths in the manifest are relative to the manifest's folder (``out``,
    default ``pairs_dir``). A manifest in ``out`` that ``--pairs`` did not write is never
    replaced (:func:`refuse_training_manifest`).
    """
    out = out or pairs_dir
    if os.path.relpath(os.path.abspath(pairs_dir), os.path.abspath(out)).split(os.sep)[0] == "..":
        # Manifest paths are relative to its folder and may not climb out of it (pretrain.data).
        raise ValueError(f"--out {out} must be the pairs folder {pairs_dir} or a folder above it")
    refuse_training_manifest(out)
    os.makedirs(out, exist_ok=True)
    frames_dir, flow_dir = os.path.join(pairs_dir, "frames"), os.path.join(pairs_dir, "flow")
    if not os.path.isdir(flow_dir):
        raise FileNotFoundError(f"{flow_dir}: --pairs needs a flow/ folder of KITTI flow PNGs")
    frame_names = _listdir_names(frames_dir)
    records, errors = [], []
    for name in sorted(n for n in _listdir_names(flow_dir) if n.lower().endswith(".png")):
        stem = name[:-4]
        flow_path = os.path.join(flow_dir, name)
        frame_name = next((stem + e for e in (".jpg", ".jpeg", ".png") if stem + e in frame_names), None)
        if frame_name is None:
            errors.append({"video": None, "video_key": stem, "flow_path": flow_path,
                           "reason": "no frame frames/<name>.jpg|.jpeg|.png for this flow PNG"})
            continue
        frame_path = os.path.join(frames_dir, frame_name)
        try:
            flow, _ = decode_flow_png(flow_path)
            image = cv2.imread(frame_path, cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError(f"{frame_path}: not a readable image")
            if image.shape[:2] != flow.shape[:2]:
                raise ValueError(f"size mismatch: frame {image.shape[1]}x{image.shape[0]}, "
                                 f"flow {flow.shape[1]}x{flow.shape[0]}")
        except (OSError, ValueError) as e:
            errors.append({"video": None, "video_key": stem, "flow_path": flow_path, "reason": str(e)})
            continue
        m = re.search(r"_(\d+)$", stem)
        records.append({
            "video": None, "video_key": stem[:m.start()] if m else stem, "frame": int(m.group(1)) if m else None,
            "frame_gap": None, "video_frames": None,
            "height": int(flow.shape[0]), "width": int(flow.shape[1]), "split": split,
            "frame_path": os.path.relpath(frame_path, out).replace(os.sep, "/"),
            "flow_path": os.path.relpath(flow_path, out).replace(os.sep, "/"),
            "flow_method": method,
        })
    _write_jsonl(os.path.join(out, "manifest.jsonl"), records)
    _write_jsonl(os.path.join(out, "errors.jsonl"), errors)
    return {"manifest_pairs": len(records), "errors": len(errors), "error_list": errors}


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #
def _is_done(out: str, key: str, settings: dict, frame_names: set[str], flow_names: set[str]) -> bool | None:
    """True: finished with these settings. False: redo missing files. None: redo everything (settings changed)."""
    marker = _load_marker(os.path.join(out, "done", key + ".json"))
    if marker is None:
        return False
    if marker.get("settings") != settings:
        return None
    return all(os.path.basename(r["frame_path"]) in frame_names and os.path.basename(r["flow_path"]) in flow_names
               for r in marker["records"])


def prepare(config: PrepareConfig) -> dict:
    """Run one preparation (or ``--merge``, or ``--pairs``); return a summary dict."""
    if config.pairs:
        return index_pairs(config.pairs, config.out, config.pairs_split, config.pairs_method)
    if not config.out:
        raise ValueError("--out is required")
    if config.merge_only:
        return merge(config.out, config.val_fraction)
    if not config.videos:
        raise ValueError("one of --videos, --pairs or --merge is required")
    if config.method not in FLOW_METHODS:
        raise ValueError(f"unknown flow method {config.method!r}; expected one of {FLOW_METHODS}")
    if not 0 <= config.shard_index < config.num_shards:
        raise ValueError(f"need 0 <= shard index < num shards, got {config.shard_index}, {config.num_shards}")
    for flag, value in (("--frames-per-video", config.frames_per_video), ("--frame-gap", config.frame_gap),
                        ("--short-side", config.short_side), ("--max-frames", config.max_frames)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")

    out = config.out
    for sub in ("frames", "flow", "done", "errors"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    videos = list_videos(config.videos)[config.shard_index::config.num_shards]
    settings = config.settings()
    frame_names, flow_names = _listdir_names(os.path.join(out, "frames")), _listdir_names(os.path.join(out, "flow"))

    tasks, skipped = [], 0
    for path, rel in videos:
        key = video_key(rel)
        state = _is_done(out, key, settings, frame_names, flow_names)
        if state:
            skipped += 1
        else:
            tasks.append((path, key, out, settings, state is None))

    from tqdm import tqdm  # progress bar over videos

    results = []
    bar = tqdm(total=len(tasks), desc="videos", unit="video", disable=not config.progress)
    if config.workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            results.append(_process_video_task(task))
            bar.update()
    else:
        # spawn: forking a process that has initialised OpenCV/FFmpeg threads can deadlock.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(config.workers, mp_context=ctx, initializer=_worker_init,
                                                    initargs=(os.getpid(),)) as ex:
            for fut in concurrent.futures.as_completed([ex.submit(_process_video_task, t) for t in tasks]):
                results.append(fut.result())
                bar.update()
    bar.close()

    failed = [r for r in results if r["status"] == "error"]
    summary = {
        "videos": len(videos),
        "skipped": skipped,
        "processed": len(results) - len(failed),
        "failed": len(failed),
        "pairs_written": sum(r["written"] for r in results),
        "pairs_reused": sum(r["reused"] for r in results),
        "failures": [{"video": r["video"], "reason": r["reason"]} for r in failed],
    }
    summary.update(merge(out, config.val_fraction))
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Extract (frame t, flow t->t+gap) pairs from videos for CPFS pretraining (paper §4.2).")
    p.add_argument("--videos", help="folder searched recursively for videos, or a text file with one video path "
                                    "per line (relative paths are relative to the list file)")
    p.add_argument("--pairs", metavar="DIR", help="index an existing folder DIR/frames/<name>.jpg|png + "
                                                  "DIR/flow/<name>.png instead of extracting from videos")
    p.add_argument("--out", help="output folder (for --pairs: where manifest.jsonl goes, default DIR; a folder "
                                 "holding a preparation from videos is refused, never overwritten)")
    p.add_argument("--merge", action="store_true", help="only rebuild OUT/manifest.jsonl and OUT/errors.jsonl "
                                                        "from the done markers (e.g. after sharded runs)")
    p.add_argument("--frames-per-video", type=int, default=8,
                   help="random frames t per video (default %(default)s, P1)")
    p.add_argument("--frame-gap", type=int, default=5,
                   help="flow from frame t to t+gap (default %(default)s, P1)")
    p.add_argument("--method", choices=FLOW_METHODS, default="dis",
                   help="hand-crafted flow: OpenCV DIS (preset MEDIUM), Dual TV-L1, or Farneback "
                        "(default %(default)s)")
    p.add_argument("--short-side", type=int, default=None,
                   help="downsize frames so the shorter side is this many pixels (default: keep size)")
    p.add_argument("--max-frames", type=int, default=None,
                   help="decode at most this many frames per video (default: all)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of videos (by hash of the video key) put in the 'val' split "
                        "(default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the frame choice, combined with the video key (default %(default)s)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes; 1 runs in this process (default min(4, CPUs) = %(default)s)")
    p.add_argument("--shard-index", type=int, default=None,
                   help="take videos whose sorted position mod num-shards equals this "
                        "(default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, else 0)")
    p.add_argument("--num-shards", type=int, default=None,
                   help="number of shards (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    p.add_argument("--pairs-split", default="val",
                   help="split written for every pair in --pairs mode (default %(default)s)")
    p.add_argument("--pairs-method", default="external",
                   help="flow_method written for every pair in --pairs mode (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    shard_index, num_shards = shard_from_env(args.shard_index, args.num_shards)
    config = PrepareConfig(
        out=args.out, videos=args.videos, pairs=args.pairs, frames_per_video=args.frames_per_video,
        frame_gap=args.frame_gap, method=args.method, short_side=args.short_side, max_frames=args.max_frames,
        val_fraction=args.val_fraction, seed=args.seed, workers=args.workers, shard_index=shard_index,
        num_shards=num_shards, merge_only=args.merge, pairs_split=args.pairs_split,
        pairs_method=args.pairs_method, progress=not args.no_progress)
    try:
        summary = prepare(config)
    except ManifestExistsError as e:  # a refusal, not a usage mistake: one line, nothing written
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, FileNotFoundError) as e:  # bad arguments (per-video failures never raise)
        parser.error(str(e))
    printable = {k: v for k, v in summary.items() if k not in ("failures", "error_list")}
    print(json.dumps(printable, indent=1))
    for f in summary.get("failures", []) + summary.get("error_list", []):
        print(f"skipped {f.get('video') or f.get('flow_path')}: {f['reason']}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
