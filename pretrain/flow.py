"""Optical flow: 16-bit PNG codec, eq. (6) normalisation, colour coding.

Everything here is a pure function of arrays, except the two PNG functions,
which are the file edge (OpenCV is used for PNG I/O only).

* Codec: KITTI devkit format (protocols.md P6; paper §4.2 footnote 1, "fixed
  point 16bit representation of optical flow ... stored as PNG images").
* ``normalize_flow``: eq. (6), protocols.md P1.
* ``flow_to_color``: the Middlebury colour coding of Baker et al., "A Database
  and Evaluation Methodology for Optical Flow" (IJCV 2011), built from the
  definition of its 55-entry colour wheel.
"""

from __future__ import annotations

import math
import os
import sys

import cv2
import numpy as np

from runtime.atomic import atomic_write
from runtime.errors import DatasetError, MissingFileError

__all__ = [
    "FLOW_PNG_SCALE",
    "FLOW_PNG_OFFSET",
    "flow_to_png_array",
    "png_array_to_flow",
    "encode_flow_png",
    "decode_flow_png",
    "normalize_flow",
    "make_color_wheel",
    "flow_to_color",
    "color_wheel_image",
]

# P6: value = round(f * 64 + 2**15), so 1/64 px steps over about +-512 px.
FLOW_PNG_SCALE = 64.0
FLOW_PNG_OFFSET = 2.0**15


# --------------------------------------------------------------------------- #
# KITTI 16-bit PNG codec (P6)
# --------------------------------------------------------------------------- #
def _check_flow(flow: np.ndarray, what: str = "flow") -> np.ndarray:
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"{what} must have shape (H, W, 2), got {flow.shape}")
    if not np.issubdtype(flow.dtype, np.number) or np.issubdtype(flow.dtype, np.complexfloating):
        raise ValueError(f"{what} must be real-valued, got dtype {flow.dtype}")
    return flow


def flow_to_png_array(flow: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """The uint16 (H, W, 3) array, RGB order, that a KITTI flow PNG stores (P6).

    R = u, G = v, B = valid (1/0); flow channels hold ``round(f*64 + 2**15)``
    clipped to [0, 65535]; invalid pixels are zero in all three channels.
    ``valid`` defaults to the pixels whose two components are finite.
    """
    flow = _check_flow(flow).astype(np.float64)
    finite = np.isfinite(flow).all(axis=2)
    if valid is None:
        valid = finite
    else:
        valid = np.asarray(valid)
        if valid.shape != flow.shape[:2]:
            raise ValueError(f"valid must have shape {flow.shape[:2]} (H, W) like flow, got {valid.shape}")
        if valid.dtype != np.bool_:
            raise ValueError(f"valid must be a bool array, got dtype {valid.dtype}")
        if np.any(valid & ~finite):
            raise ValueError("flow has non-finite values at pixels marked valid")

    out = np.zeros(flow.shape[:2] + (3,), dtype=np.uint16)
    fixed = np.clip(np.rint(flow[valid] * FLOW_PNG_SCALE + FLOW_PNG_OFFSET), 0, 65535)
    out[valid, 0:2] = fixed.astype(np.uint16)
    out[valid, 2] = 1
    return out


def png_array_to_flow(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`flow_to_png_array`: uint16 (H, W, 3) RGB -> (flow, valid).

    Decodes ``(I - 2**15) / 64``; pixels whose third channel is 0 are invalid
    and get flow 0.
    """
    image = np.asarray(image)
    if image.dtype != np.uint16 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint16 (H, W, 3) array, got {image.dtype} {image.shape}")
    valid = image[..., 2] > 0
    flow = (image[..., :2].astype(np.float64) - FLOW_PNG_OFFSET) / FLOW_PNG_SCALE
    flow[~valid] = 0.0
    return flow.astype(np.float32), valid


def encode_flow_png(path: str | os.PathLike, flow: np.ndarray, valid: np.ndarray | None = None) -> None:
    """Write ``flow`` (H, W, 2) in pixels to ``path`` as a KITTI flow PNG (P6).

    The file is written atomically (:func:`runtime.atomic.atomic_write`), so a
    reader never sees a half-written PNG under ``path``.
    """
    # OpenCV's PNG writer keeps 16 bits; R = u, G = v, B = valid (KITTI's channel order).
    write_image_atomic(path, flow_to_png_array(flow, valid), what="flow PNG")


def write_image_atomic(path: str | os.PathLike, rgb: np.ndarray, params: tuple = (), what: str = "image") -> None:
    """Encode an RGB array (8 or 16 bit) in memory with ``cv2.imencode`` (the suffix of ``path``
    picks the encoder; the bytes are those ``cv2.imwrite`` writes) and write them with
    :func:`runtime.atomic.atomic_write`: a reader never sees a half-written file."""
    path = os.fspath(path)
    ok, encoded = cv2.imencode(os.path.splitext(path)[1], np.ascontiguousarray(rgb[..., ::-1]),  # OpenCV wants BGR
                               list(params))
    if not ok:
        raise OSError(f"{path}: cv2.imencode failed to encode the {what}")
    atomic_write(path, encoded.tobytes())


def decode_flow_png(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a KITTI flow PNG (P6): returns (flow float32 (H, W, 2) in px, valid bool (H, W)).

    A missing, undecodable, 8-bit or non-RGB file raises a one-line DatasetError naming it
    (a ValueError; MissingFileError, also a FileNotFoundError, when missing)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: flow PNG not found")
    try:
        bgr = cv2.imread(path, cv2.IMREAD_UNCHANGED)  # UNCHANGED keeps the 16 bits and channel count
    except cv2.error as err:
        raise DatasetError(f"{path}: not a readable image (cv2.imread: {' '.join(str(err).split())})") from None
    if bgr is None:
        raise DatasetError(f"{path}: not a readable image (cv2.imread failed: corrupt or truncated)")
    if bgr.dtype != np.uint16:
        raise DatasetError(f"{path}: flow PNG must be 16-bit, got {bgr.dtype} (an ordinary 8-bit image?)")
    channels = 1 if bgr.ndim == 2 else bgr.shape[2]
    if channels != 3:
        raise DatasetError(f"{path}: flow PNG must have 3 channels (u, v, valid), got {channels}")
    return png_array_to_flow(bgr[..., ::-1])


# --------------------------------------------------------------------------- #
# Eq. (6): logarithmic flow normalisation
# --------------------------------------------------------------------------- #
def _is_torch_tensor(x) -> bool:
    torch = sys.modules.get("torch")  # a tensor cannot exist unless torch is imported
    return torch is not None and isinstance(x, torch.Tensor)


def normalize_flow(flow, max_magnitude: float = 56.0):
    """Eq. (6): ``f' = sign(f) * min(1, log(|f|+1) / log(M+1))`` per component.

    ``M = 56.0`` in the paper (§4.2; P1). Works on numpy arrays and torch
    tensors (differentiable); the output has the input's type and shape and
    lies in [-1, 1].
    """
    if not max_magnitude > 0:
        raise ValueError(f"max_magnitude must be positive, got {max_magnitude}")
    denom = math.log(max_magnitude + 1.0)
    if _is_torch_tensor(flow):
        return flow.sign() * (flow.abs().log1p() / denom).clamp(max=1.0)
    flow = np.asarray(flow, dtype=np.result_type(flow, np.float32))
    return np.sign(flow) * np.minimum(1.0, np.log1p(np.abs(flow)) / denom)


# --------------------------------------------------------------------------- #
# Middlebury colour coding (Baker et al. 2011)
# --------------------------------------------------------------------------- #
# Hue segments of the wheel and their number of steps: red->yellow 15,
# yellow->green 6, green->cyan 4, cyan->blue 11, blue->magenta 13, magenta->red 6.
_WHEEL_SEGMENTS = (("RY", 15), ("YG", 6), ("GC", 4), ("CB", 11), ("BM", 13), ("MR", 6))


def make_color_wheel() -> np.ndarray:
    """The 55 x 3 Middlebury colour wheel (RGB, 0..255 as float).

    Within each segment of ``n`` steps one channel ramps as ``floor(255*i/n)``,
    i = 0..n-1, while the others are held at 255 or 0.
    """
    rows = []
    for name, n in _WHEEL_SEGMENTS:
        ramp = np.floor(255.0 * np.arange(n) / n)
        full, zero = np.full(n, 255.0), np.zeros(n)
        rows.append({
            "RY": (full, ramp, zero),          # R = 255, G rises
            "YG": (255.0 - ramp, full, zero),  # R falls, G = 255
            "GC": (zero, full, ramp),          # G = 255, B rises
            "CB": (zero, 255.0 - ramp, full),  # G falls, B = 255
            "BM": (ramp, zero, full),          # B = 255, R rises
            "MR": (full, zero, 255.0 - ramp),  # B falls, R = 255
        }[name])
    return np.concatenate([np.stack(r, axis=1) for r in rows], axis=0)


def flow_to_color(flow: np.ndarray, max_norm: float | None = None) -> np.ndarray:
    """Colour-code ``flow`` (H, W, 2) as uint8 RGB (H, W, 3), Middlebury style.

    Hue is the flow direction (right = red, down = yellow, left = cyan, up =
    blue/violet in image coordinates, v pointing down), saturation the magnitude
    relative to ``max_norm``: zero flow is white, flow of magnitude ``max_norm``
    is the fully saturated wheel colour, and larger flow is darkened to 75 %.
    ``max_norm`` defaults to the largest finite magnitude in ``flow``.
    Non-finite pixels are black.
    """
    flow = _check_flow(flow).astype(np.float64)
    finite = np.isfinite(flow).all(axis=2)
    u = np.where(finite, flow[..., 0], 0.0)
    v = np.where(finite, flow[..., 1], 0.0)
    rad = np.hypot(u, v)
    if max_norm is None:
        max_norm = float(rad.max()) if rad.size else 0.0
    elif not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    rad = rad / max(max_norm, np.finfo(np.float64).eps)

    wheel = make_color_wheel() / 255.0
    ncols = wheel.shape[0]
    angle = np.arctan2(-v, -u) / np.pi                # in [-1, 1]; 1 (or -1) is "right"
    fk = (angle + 1.0) / 2.0 * (ncols - 1)            # fractional wheel index in [0, ncols-1]
    k0 = np.floor(fk).astype(np.int64)
    k1 = (k0 + 1) % ncols
    frac = (fk - k0)[..., None]
    col = (1.0 - frac) * wheel[k0] + frac * wheel[k1]

    inside = (rad <= 1.0)[..., None]
    col = np.where(inside, 1.0 - rad[..., None] * (1.0 - col), col * 0.75)  # desaturate towards white
    col = np.where(finite[..., None], col, 0.0)
    return np.floor(255.0 * col + 0.5).clip(0, 255).astype(np.uint8)


def color_wheel_image(size: int = 256) -> np.ndarray:
    """A ``size`` x ``size`` uint8 RGB picture of the colour coding (the key).

    Pixel (row, col) shows the colour of flow ``(u, v)`` in [-1, 1]^2 with
    ``max_norm = 1`` (v points down, as in images); outside the unit disc the
    picture is black.
    """
    if size < 2:
        raise ValueError(f"size must be at least 2, got {size}")
    coords = np.linspace(-1.0, 1.0, size)
    u, v = np.meshgrid(coords, coords)  # u varies along columns, v along rows
    img = flow_to_color(np.stack([u, v], axis=2), max_norm=1.0)
    img[np.hypot(u, v) > 1.0] = 0
    return img
