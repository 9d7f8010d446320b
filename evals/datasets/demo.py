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
Output is a pure function of (seed, scale): same bytes on every run. These are the labelled
stills of the moving-objects world (``pretrain.world``), whose videos animate the same kinds: both
draw from :mod:`scenes` (shapes, textures, backgrounds, class signatures).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from scenes import IMAGENET_SIGNATURES, VOC_SIGNATURES, background, draw_classes, fill_texture, shape_mask

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
    classes = draw_classes(rng)
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


__all__ = ["MARKER", "SCALES", "Scale", "voc_scene", "imagenet_image", "render_scene", "make_demo"]
