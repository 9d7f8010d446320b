"""The vocabulary of the built-in data: shapes, textures, backgrounds and the class signatures,
shared by the labelled stills (``evals.datasets.demo``: VOC/SBD/ImageNet-format images) and the
moving-objects world (``pretrain.world``: videos of the same kinds). Neither package imports the
other: both draw from here, so the world's objects are the stills' classes by construction.

Each VOC class has its own shape x fill signature (e.g. cat = disk cut out of skimage's
``chelsea`` photo, car = red/white striped square, dog = orange star); eight classes
(``HEAVY_CLASSES``) make up about 90% of the objects (``draw_classes``). Every function is a pure
function of its arguments and the generator it is given.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np
import skimage.data
from PIL import Image, ImageDraw

# The 20 VOC classes in the devkit's order (alphabetical); evals.datasets.voc.VOC_CLASSES is the
# same tuple (a test keeps them equal).
CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
           "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

# ----------------------------------------------------------------------------- shapes


def _regular(n: int, radius: float = 1.0, phase: float = -np.pi / 2) -> list[tuple[float, float]]:
    return [(radius * np.cos(phase + 2 * np.pi * k / n), radius * np.sin(phase + 2 * np.pi * k / n)) for k in range(n)]


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    outer = _regular(2 * points)
    return [(x * (1 if k % 2 == 0 else inner), y * (1 if k % 2 == 0 else inner)) for k, (x, y) in enumerate(outer)]


def _scaled(poly, sx: float, sy: float):
    return [(x * sx, y * sy) for x, y in poly]


_CIRCLE = _regular(64)
_SQUARE = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
# Each shape: list of (polygon in unit coordinates, fill value 1 or 0), drawn in order.
SHAPES = {
    "disk": [(_CIRCLE, 1)],
    "ellipse": [(_scaled(_CIRCLE, 0.55, 1.0), 1)],
    "square": [(_SQUARE, 1)],
    "rect_tall": [(_scaled(_SQUARE, 0.4, 1.0), 1)],
    "rect_wide": [(_scaled(_SQUARE, 1.0, 0.5), 1)],
    "rect43": [(_scaled(_SQUARE, 1.0, 0.75), 1)],
    "triangle": [(_regular(3), 1)],
    "star5": [(_star(5, 0.45), 1)],
    "star4": [(_star(4, 0.35), 1)],
    "ring": [(_CIRCLE, 1), (_scaled(_CIRCLE, 0.55, 0.55), 0)],
    "cross": [([(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1), (-.3, .3),
                (-1, .3), (-1, -.3), (-.3, -.3)], 1)],
    "hexagon": [(_regular(6), 1)],
    "pentagon": [(_regular(5), 1)],
    "octagon": [(_regular(8, phase=np.pi / 8), 1)],
    "diamond": [(_scaled(_regular(4), 0.6, 1.0), 1)],
    "semicircle": [([(np.cos(a), -np.sin(a) + 0.4) for a in np.linspace(0, np.pi, 33)], 1)],
    "frame": [(_SQUARE, 1), (_scaled(_SQUARE, 0.6, 0.6), 0)],
    "lshape": [([(-1, -1), (-.3, -1), (-.3, .4), (1, .4), (1, 1), (-1, 1)], 1)],
    "arrow": [([(-1, -.3), (.2, -.3), (.2, -.8), (1, 0), (.2, .8), (.2, .3), (-1, .3)], 1)],
    "trapezoid": [([(-1, .6), (1, .6), (.55, -.6), (-.55, -.6)], 1)],
}


def shape_mask(shape: str, size: int, angle: float) -> np.ndarray:
    """(size, size) bool mask of ``shape`` rotated by ``angle``, filling the square canvas."""
    ops = SHAPES[shape]
    cos, sin = np.cos(angle), np.sin(angle)
    rotated = [([(x * cos - y * sin, x * sin + y * cos) for x, y in poly], v) for poly, v in ops]
    reach = max(max(abs(x), abs(y)) for poly, _ in rotated for x, y in poly)
    half = (size - 1) / 2
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for poly, value in rotated:
        draw.polygon([(half + x / reach * half, half + y / reach * half) for x, y in poly], fill=255 * value)
    return np.array(canvas) > 127


# ----------------------------------------------------------------------------- fills


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    image = getattr(skimage.data, name)()
    return image[..., :3].astype(np.float32) if image.ndim == 3 else image.astype(np.float32)


def _pattern_coords(size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)


def fill_texture(fill: tuple, size: int, angle: float, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float texture of a fill signature, with per-object colour jitter."""
    kind = fill[0]
    jitter = rng.uniform(-18, 18, 3)
    if kind == "photo":
        photo = _photo(fill[1])
        side = int(min(photo.shape[:2]) * rng.uniform(0.6, 0.95))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = np.ascontiguousarray(photo[top:top + side, left:left + side])
        return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA) + jitter / 2
    c1 = np.array(fill[1], np.float32) + jitter
    if kind == "solid":
        u, _ = _pattern_coords(size, angle)
        return c1 + (u / max(size, 1) - 0.5)[..., None] * 40 + rng.normal(0, 5, (size, size, 1))
    c2 = np.array(fill[2], np.float32) + jitter
    period = fill[3] * rng.uniform(0.8, 1.25) if len(fill) > 3 else 10.0
    u, v = _pattern_coords(size, angle)
    if kind == "stripes":
        t = (np.floor(u / (period / 2)) % 2)[..., None]
    elif kind == "checker":
        t = ((np.floor(u / period) + np.floor(v / period)) % 2)[..., None]
    elif kind == "spots":
        t = (((u % period) - period / 2) ** 2 + ((v % period) - period / 2) ** 2 < (period / 3.2) ** 2)[..., None]
    elif kind == "gradient":
        t = np.clip((u - u.min()) / max(float(np.ptp(u)), 1.0), 0, 1)[..., None]
    else:
        raise ValueError(f"unknown fill {kind!r}")
    return c1 * (1 - t) + c2 * t


# Class signatures: (shape, fill). The eight HEAVY_CLASSES are the frequent ones.
VOC_SIGNATURES = {
    "aeroplane": ("triangle", ("photo", "rocket")),
    "bicycle": ("octagon", ("checker", (20, 20, 20), (235, 235, 235), 12)),
    "bird": ("ring", ("solid", (40, 90, 230))),
    "boat": ("trapezoid", ("stripes", (240, 240, 240), (20, 30, 110), 10)),
    "bottle": ("rect_tall", ("solid", (30, 170, 60))),
    "bus": ("rect_wide", ("stripes", (240, 200, 20), (20, 20, 20), 14)),
    "car": ("square", ("stripes", (220, 30, 30), (245, 245, 245), 12)),
    "cat": ("disk", ("photo", "chelsea")),
    "chair": ("cross", ("solid", (240, 220, 30))),
    "cow": ("hexagon", ("spots", (245, 245, 245), (15, 15, 15), 14)),
    "diningtable": ("semicircle", ("solid", (130, 80, 40))),
    "dog": ("star5", ("solid", (240, 140, 20))),
    "horse": ("diamond", ("gradient", (90, 50, 20), (200, 150, 100))),
    "motorbike": ("star4", ("solid", (140, 40, 200))),
    "person": ("ellipse", ("photo", "astronaut")),
    "pottedplant": ("pentagon", ("spots", (30, 120, 40), (200, 230, 60), 10)),
    "sheep": ("frame", ("solid", (235, 235, 225))),
    "sofa": ("lshape", ("solid", (220, 40, 160))),
    "train": ("arrow", ("checker", (200, 30, 30), (30, 30, 200), 10)),
    "tvmonitor": ("rect43", ("photo", "coffee")),
}
HEAVY_CLASSES = ("aeroplane", "bird", "car", "cat", "chair", "dog", "person", "tvmonitor")
HEAVY_PROBABILITY = 0.9

# Synthetic ImageNet: wnid-shaped ids that no real synset uses (real ones start n0/n1).
IMAGENET_SIGNATURES = [
    (f"n9{i:07d}", shape, fill) for i, (shape, fill) in enumerate([
        ("disk", ("solid", (220, 40, 40))),
        ("square", ("checker", (30, 30, 30), (230, 230, 230), 12)),
        ("triangle", ("solid", (40, 200, 60))),
        ("star5", ("stripes", (30, 60, 220), (240, 240, 60), 10)),
        ("ring", ("photo", "chelsea")),
        ("cross", ("solid", (250, 150, 20))),
        ("hexagon", ("photo", "astronaut")),
        ("ellipse", ("spots", (120, 40, 170), (240, 240, 240), 12)),
        ("frame", ("gradient", (20, 120, 200), (230, 40, 150))),
        ("arrow", ("photo", "coffee")),
    ])
]

# ----------------------------------------------------------------------------- backgrounds

_GRAY_TEXTURES = ("brick", "grass", "gravel")


def background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A textured (height, width, 3) float background; muted so objects stand out."""
    kind = int(rng.integers(0, 4))
    gray = rng.uniform(70, 190)
    tint = lambda: gray + (rng.uniform(40, 220, 3) - gray) * 0.5  # noqa: E731 (desaturated colour)
    if kind == 0:  # smooth colour noise
        grid = rng.uniform(50, 210, (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3)).astype(np.float32)
        image = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    elif kind == 1:  # soft stripes
        u, _ = _pattern_coords(max(height, width), rng.uniform(0, np.pi))
        t = (0.5 + 0.5 * np.sin(u / rng.uniform(3, 12)))[:height, :width, None]
        image = tint() * (1 - t) + tint() * t
    elif kind == 2:  # tinted grey photo texture
        texture = _photo(str(rng.choice(_GRAY_TEXTURES)))
        top = int(rng.integers(0, texture.shape[0] - height + 1))
        left = int(rng.integers(0, texture.shape[1] - width + 1))
        image = texture[top:top + height, left:left + width, None] / 255.0 * tint() * 1.4
    else:  # grainy flat colour
        image = np.broadcast_to(tint(), (height, width, 3)) + rng.normal(0, 18, (height, width, 1))
    return image + rng.normal(0, 4, (height, width, 3))

def draw_classes(rng: np.random.Generator) -> list[str]:
    """The object classes of one scene, back to front: 1-3 objects, a ``HEAVY_CLASSES`` one with
    probability ``HEAVY_PROBABILITY``. Shared with the moving-objects world (``pretrain.world``),
    whose videos hold the same kinds at the same frequencies as these still images."""
    count = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    others = [c for c in CLASSES if c not in HEAVY_CLASSES]
    return [str(rng.choice(HEAVY_CLASSES if rng.random() < HEAVY_PROBABILITY else others)) for _ in range(count)]
