"""A synthetic data set in the exact on-disk layouts of VOC07, VOC12, SBD and ImageNet.

    python -m evals.data make-demo --out DIR [--seed 0] [--scale small|tiny]

Every file is in the real format (JPEG images, VOC XML with truncated/difficult flags,
ImageSets incl. per-class 1/-1/0 files, palette PNG masks with 255 on object borders and
on difficult objects, SBD ``.mat`` structs, ImageNet class folders + flat val with
``val_labels.txt``), so the readers and harnesses run unchanged on it; a ``DEMO_DATASET``
marker at the top says it is synthetic.

Scenes: a textured background (smooth colour noise, stripes, tinted brick/grass/gravel)
with 1-3 objects. Each VOC class has its own shape x fill signature (e.g. cat = disk cut
out of skimage's ``chelsea`` photo, car = red/white striped square, dog = orange star), so
a small AlexNet can tell them apart on CPU. Eight classes (``HEAVY_CLASSES``) make up
about 90% of the objects; the other twelve appear rarely. Objects overlap (later ones
occlude earlier ones) and may be cut by the image border (``truncated``). Boxes are tight
around the visible pixels (1-based inclusive); an object is ``difficult`` when fewer than
``DIFFICULT_AREA`` pixels or less than ``DIFFICULT_VISIBLE`` of its in-image area is visible.
Output is a pure function of (seed, scale): same bytes on every run.
"""
from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from .sbd import write_sbd_mat
from .voc import VOC_CLASSES, VOID_LABEL, write_segmentation_mask

MARKER = "DEMO_DATASET"
DIFFICULT_AREA = 250        # visible pixels below this -> difficult (a "small" object)
DIFFICULT_VISIBLE = 0.4     # visible / in-image area below this -> difficult ("heavily occluded")
MIN_VISIBLE = 40            # objects with fewer visible pixels are dropped from the scene
BORDER = 3                  # width of the window whose mixed labels become 255 in VOC masks
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Scale:
    voc07_trainval: int
    voc07_test: int
    voc12_seg_train: int
    voc12_seg_val: int
    voc12_main_only: int      # VOC12 Main images without a mask
    sbd_extra: int            # SBD images outside VOC12 seg (in train_aug)
    sbd_overlap: int          # VOC12 seg val ids in SBD train, and as many VOC12 seg train ids in SBD val
    imagenet_classes: int
    imagenet_train: int       # per class
    imagenet_val: int         # per class


SCALES = {
    "small": Scale(300, 200, 150, 80, 40, 100, 15, 10, 60, 20),
    "tiny": Scale(24, 16, 12, 8, 4, 10, 3, 4, 6, 3),
}

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


# ----------------------------------------------------------------------------- scenes


@dataclass
class DemoObject:
    name: str
    box: tuple[int, int, int, int]  # 1-based inclusive, tight around the visible pixels
    difficult: bool
    truncated: bool


@dataclass
class Scene:
    image: np.ndarray       # (H, W, 3) uint8 (before JPEG)
    objects: list[DemoObject]
    voc_mask: np.ndarray    # (H, W) uint8, 255 on borders and difficult objects (VOC)
    sbd_mask: np.ndarray    # (H, W) uint8, no 255 (SBD)


def _place(rng, height, width, size):
    """Top-left of a size x size canvas; the centre stays inside, so objects may be cut."""
    cy, cx = rng.uniform(0.2 * size, height - 0.2 * size), rng.uniform(0.2 * size, width - 0.2 * size)
    return int(round(cy - size / 2)), int(round(cx - size / 2))


def _clip(top, left, size, height, width):
    """(image slice, canvas slice) of the overlap of a canvas with the image."""
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + size, height), min(left + size, width)
    if y0 >= y1 or x0 >= x1:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))


def render_scene(rng: np.random.Generator, height: int, width: int, classes: list[str],
                 sizes: list[int]) -> Scene:
    """Draw ``classes`` (back to front) with canvas ``sizes`` on a background."""
    placed = []  # (name, full mask, top, left, angle)
    for name, size in zip(classes, sizes):
        shape = VOC_SIGNATURES[name][0]
        angle = rng.uniform(0, 2 * np.pi) if shape not in ("rect43", "ellipse") else rng.uniform(-0.3, 0.3)
        top, left = _place(rng, height, width, size)
        placed.append((name, shape_mask(shape, size, angle), top, left, angle))
    while True:  # drop objects that end up (almost) invisible, then re-layer
        instances = np.zeros((height, width), np.int32)
        for k, (_, full, top, left, _) in enumerate(placed):
            clip = _clip(top, left, full.shape[0], height, width)
            if clip is not None:
                instances[clip[0]][full[clip[1]]] = k + 1
        visible = np.bincount(instances.ravel(), minlength=len(placed) + 1)[1:]
        keep = [k for k in range(len(placed)) if visible[k] >= MIN_VISIBLE]
        if len(keep) == len(placed) or not keep:
            break
        placed = [placed[k] for k in keep]
    image = background(height, width, rng)
    voc_mask = np.zeros((height, width), np.uint8)
    sbd_mask = np.zeros((height, width), np.uint8)
    objects = []
    for k, (name, full, top, left, angle) in enumerate(placed):
        texture = fill_texture(VOC_SIGNATURES[name][1], full.shape[0], angle, rng)
        pixels = instances == k + 1
        ys, xs = np.nonzero(pixels)
        if len(ys) == 0:
            continue
        image[ys, xs] = texture[ys - top, xs - left]
        clip = _clip(top, left, full.shape[0], height, width)
        inside = int(full[clip[1]].sum())
        truncated = inside < int(full.sum())
        difficult = len(ys) < DIFFICULT_AREA or len(ys) < DIFFICULT_VISIBLE * inside
        label = VOC_CLASSES.index(name) + 1
        sbd_mask[pixels] = label
        voc_mask[pixels] = VOID_LABEL if difficult else label
        box = (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(DemoObject(name, box, bool(difficult), bool(truncated)))
    # VOC marks a band around every object outline as void (255).
    band = ndimage.maximum_filter(instances, BORDER) != ndimage.minimum_filter(instances, BORDER)
    voc_mask[band] = VOID_LABEL
    return Scene(np.clip(np.rint(image), 0, 255).astype(np.uint8), objects, voc_mask, sbd_mask)


STREAMS = {"VOC2007": 7, "VOC2012": 12, "imagenet-train": 100, "imagenet-val": 101}


def voc_scene(seed: int, year: int, index: int) -> Scene:
    """The scene of VOC image number ``index`` (its id's digits), a pure function of the seed."""
    rng = np.random.default_rng([seed, STREAMS[f"VOC{year}"], index])
    height, width = (int(v) for v in rng.integers(160, 257, 2))
    count = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    others = [c for c in VOC_CLASSES if c not in HEAVY_CLASSES]
    classes = [str(rng.choice(HEAVY_CLASSES if rng.random() < HEAVY_PROBABILITY else others)) for _ in range(count)]
    short = min(height, width)
    sizes = [int(rng.integers(10, 20)) if rng.random() < 0.12 else int(short * rng.uniform(0.3, 0.7)) for _ in classes]
    return render_scene(rng, height, width, classes, sizes)


def imagenet_image(seed: int, stream: str, index: int, class_index: int) -> np.ndarray:
    rng = np.random.default_rng([seed, STREAMS[stream], index])
    height, width = (int(v) for v in rng.integers(112, 161, 2))
    _, shape, fill = IMAGENET_SIGNATURES[class_index]
    size = int(min(height, width) * rng.uniform(0.5, 0.9))
    angle = rng.uniform(0, 2 * np.pi)
    image = background(height, width, rng)
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    full = shape_mask(shape, size, angle)
    region = image[top:top + size, left:left + size]
    region[full] = fill_texture(fill, size, angle, rng)[full]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- writers


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY)


def _annotation_xml(folder: str, image_id: str, scene: Scene, segmented: bool) -> str:
    height, width = scene.voc_mask.shape
    lines = ["<annotation>", f"\t<folder>{folder}</folder>", f"\t<filename>{image_id}.jpg</filename>",
             "\t<source>", "\t\t<database>cpfs-bench synthetic demo</database>",
             f"\t\t<annotation>PASCAL {folder} layout</annotation>", "\t\t<image>generated</image>", "\t</source>",
             "\t<size>", f"\t\t<width>{width}</width>", f"\t\t<height>{height}</height>", "\t\t<depth>3</depth>",
             "\t</size>", f"\t<segmented>{int(segmented)}</segmented>"]
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        lines += ["\t<object>", f"\t\t<name>{obj.name}</name>", "\t\t<pose>Unspecified</pose>",
                  f"\t\t<truncated>{int(obj.truncated)}</truncated>",
                  f"\t\t<difficult>{int(obj.difficult)}</difficult>",
                  "\t\t<bndbox>", f"\t\t\t<xmin>{x1}</xmin>", f"\t\t\t<ymin>{y1}</ymin>",
                  f"\t\t\t<xmax>{x2}</xmax>", f"\t\t\t<ymax>{y2}</ymax>", "\t\t</bndbox>", "\t</object>"]
    return "\n".join(lines + ["</annotation>"]) + "\n"


def _file_label(scene: Scene, name: str) -> int:
    """VOC's ImageSets/Main/<class>_<split>.txt value: 1 present, 0 only difficult, -1 absent."""
    flags = [o.difficult for o in scene.objects if o.name == name]
    return -1 if not flags else (1 if not all(flags) else 0)


def _write_split(path: Path, ids) -> None:
    path.write_text("".join(f"{i}\n" for i in sorted(ids)))


def _write_main(main: Path, splits: dict[str, list[str]], scenes: dict[str, Scene]) -> None:
    main.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        ids = sorted(ids)
        _write_split(main / f"{split}.txt", ids)
        for name in VOC_CLASSES:
            (main / f"{name}_{split}.txt").write_text("".join(f"{i} {_file_label(scenes[i], name):>2}\n" for i in ids))


def _halves(rng, ids: list[str]) -> tuple[list[str], list[str]]:
    order = rng.permutation(len(ids))
    cut = len(ids) // 2
    return sorted(ids[k] for k in order[:cut]), sorted(ids[k] for k in order[cut:])


def _voc_images(seed, year, voc_root: Path, ids: list[str], segmented: set[str], progress: bool) -> dict[str, Scene]:
    for sub in ("JPEGImages", "Annotations"):
        (voc_root / sub).mkdir(parents=True, exist_ok=True)
    if segmented:
        (voc_root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    scenes = {}
    for i in tqdm(ids, desc=f"VOC{year} images", disable=not progress, leave=False):
        scene = voc_scene(seed, year, int(i.split("_")[-1]))
        scenes[i] = scene
        _write_jpeg(voc_root / "JPEGImages" / f"{i}.jpg", scene.image)
        (voc_root / "Annotations" / f"{i}.xml").write_text(_annotation_xml(f"VOC{year}", i, scene, i in segmented))
        if i in segmented:
            write_segmentation_mask(voc_root / "SegmentationClass" / f"{i}.png", scene.voc_mask)
    return scenes


def make_demo(out, seed: int = 0, scale: str = "small", overwrite: bool = False, progress: bool = True) -> dict:
    """Write the demo data set under ``out``; returns ``{part: count}`` plus ``bytes``."""
    out, sizes = Path(out), SCALES[scale]
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(f"{out} is not empty and has no {MARKER} marker; refusing to write there")
        if not overwrite:
            raise FileExistsError(f"{out} already holds a demo data set (pass overwrite=True / --overwrite)")
        for name in ("VOCdevkit", "benchmark_RELEASE", "imagenet", MARKER):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0])  # split assignment only; images have their own streams
    counts: dict[str, int] = {}

    # VOC2007: trainval (= train + val) and test, classification + detection.
    voc07 = out / "VOCdevkit" / "VOC2007"
    n07 = sizes.voc07_trainval + sizes.voc07_test
    ids07 = [f"{k:06d}" for k in range(1, n07 + 1)]
    order = rng.permutation(n07)
    trainval07 = sorted(ids07[k] for k in order[:sizes.voc07_trainval])
    test07 = sorted(ids07[k] for k in order[sizes.voc07_trainval:])
    scenes07 = _voc_images(seed, 2007, voc07, ids07, set(), progress)
    train07, val07 = _halves(rng, trainval07)
    _write_main(voc07 / "ImageSets" / "Main", {"train": train07, "val": val07, "trainval": trainval07,
                                                "test": test07}, scenes07)
    counts.update({"VOC2007 trainval": len(trainval07), "VOC2007 test": len(test07)})

    # VOC2012: segmentation train/val, Main-only images, and the SBD-only images (which in the
    # real data are VOC2011 trainval images, so they are in VOC2012 Main and JPEGImages too).
    voc12 = out / "VOCdevkit" / "VOC2012"
    n_seg = sizes.voc12_seg_train + sizes.voc12_seg_val
    n12 = n_seg + sizes.voc12_main_only + sizes.sbd_extra
    ids12 = [f"2008_{k:06d}" for k in range(1, n12 + 1)]
    order = rng.permutation(n12)
    seg_train = sorted(ids12[k] for k in order[:sizes.voc12_seg_train])
    seg_val = sorted(ids12[k] for k in order[sizes.voc12_seg_train:n_seg])
    sbd_only = sorted(ids12[k] for k in order[n12 - sizes.sbd_extra:])
    scenes12 = _voc_images(seed, 2012, voc12, ids12, set(seg_train) | set(seg_val), progress)
    (voc12 / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    for split, ids in (("train", seg_train), ("val", seg_val), ("trainval", seg_train + seg_val)):
        _write_split(voc12 / "ImageSets" / "Segmentation" / f"{split}.txt", ids)
    train12, val12 = _halves(rng, ids12)
    _write_main(voc12 / "ImageSets" / "Main", {"train": train12, "val": val12, "trainval": ids12}, scenes12)
    counts.update({"VOC2012 seg train": len(seg_train), "VOC2012 seg val": len(seg_val), "VOC2012 Main trainval": n12})

    # SBD: its own images plus overlaps with VOC12 seg val (must leave train_aug) and seg train
    # (train_aug must keep the VOC PNG for those).
    sbd = out / "benchmark_RELEASE" / "dataset"
    (sbd / "img").mkdir(parents=True, exist_ok=True)
    (sbd / "cls").mkdir(parents=True, exist_ok=True)
    cut = int(round(0.7 * len(sbd_only)))
    overlap_val = [seg_val[k] for k in sorted(rng.choice(len(seg_val), sizes.sbd_overlap, replace=False))]
    overlap_train = [seg_train[k] for k in sorted(rng.choice(len(seg_train), sizes.sbd_overlap, replace=False))]
    sbd_train, sbd_val = sorted(sbd_only[:cut] + overlap_val), sorted(sbd_only[cut:] + overlap_train)
    for i in tqdm(sorted(sbd_train + sbd_val), desc="SBD masks", disable=not progress, leave=False):
        shutil.copyfile(voc12 / "JPEGImages" / f"{i}.jpg", sbd / "img" / f"{i}.jpg")
        write_sbd_mat(sbd / "cls" / f"{i}.mat", scenes12[i].sbd_mask)
    _write_split(sbd / "train.txt", sbd_train)
    _write_split(sbd / "val.txt", sbd_val)
    train_aug = (set(seg_train) | set(sbd_train) | set(sbd_val)) - set(seg_val)
    counts.update({"SBD train": len(sbd_train), "SBD val": len(sbd_val), "train_aug": len(train_aug)})

    # ImageNet: class folders for train, flat val + val_labels.txt.
    imagenet = out / "imagenet"
    classes = [wnid for wnid, _, _ in IMAGENET_SIGNATURES[:sizes.imagenet_classes]]
    for c, wnid in enumerate(tqdm(classes, desc="ImageNet train", disable=not progress, leave=False)):
        (imagenet / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for k in range(sizes.imagenet_train):
            index = c * sizes.imagenet_train + k
            _write_jpeg(imagenet / "train" / wnid / f"{wnid}_{k + 1}.JPEG",
                        imagenet_image(seed, "imagenet-train", index, c))
    (imagenet / "val").mkdir(parents=True, exist_ok=True)
    n_val = sizes.imagenet_val * len(classes)
    val_classes = rng.permutation(np.repeat(np.arange(len(classes)), sizes.imagenet_val))
    label_lines = []
    for n in tqdm(range(1, n_val + 1), desc="ImageNet val", disable=not progress, leave=False):
        name, c = f"ILSVRC2012_val_{n:08d}.JPEG", int(val_classes[n - 1])
        _write_jpeg(imagenet / "val" / name, imagenet_image(seed, "imagenet-val", n, c))
        label_lines.append(f"{name} {classes[c]}\n")
    (imagenet / "val_labels.txt").write_text("".join(label_lines))
    counts.update({"ImageNet classes": len(classes), "ImageNet train": len(classes) * sizes.imagenet_train,
                   "ImageNet val": n_val})

    (out / MARKER).write_text(
        "Synthetic demo data set written by `python -m evals.data make-demo` (evals/datasets/demo.py).\n"
        f"seed: {seed}\nscale: {scale}\nNot PASCAL VOC, SBD or ImageNet: only their file layouts.\n")
    counts["bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return counts


__all__ = ["MARKER", "SCALES", "Scale", "VOC_SIGNATURES", "HEAVY_CLASSES", "IMAGENET_SIGNATURES",
           "voc_scene", "imagenet_image", "render_scene", "make_demo"]
