"""Samples/s per loader worker of every training and test pipeline: ours beside the baseline.

For each pipeline, one worker's cost of a sample (``num_workers=0``: the dataset's ``__getitem__``
through the real transform, torch at one thread as in a DataLoader worker, and for the pipelines
of WORKER_BATCH the batch's collation into shared memory as a worker does it) for

* ours: the project's dataset + transform, exactly as the harness builds them (voc07_cls and
  in1k_linear hand uint8 views to the training step, which normalises the batch on its device);
* baseline: what a user would write: ImageFolder-style PIL decode (``Image.open(...).convert("RGB")``)
  and torchvision.transforms doing the same augmentation (same geometry draws).

Files are generated realistically: JPEGs of 500x375 or 375x500 (VOC's and ImageNet's typical
size) at quality 90 cut from scikit-image's bundled photographs, in the real folder layouts,
KITTI 16-bit flow PNGs beside the frames for pretraining. Ours and the baseline are timed
side by side in alternating chunks of a few samples, pass after pass, and the medians reported,
because a shared machine's speed drifts within seconds.

Usage: .venv/bin/python benchmarks/bench_loaders.py [--json] [--images 200] [--reps 5] [--size 500x375]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torchvision.transforms as T  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402

from backbones.alexnet import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from evals.common import (center_crop, collate_views, random_crop_mirror, random_scaled_view,  # noqa: E402
                          resize_shorter, stack_views)
from evals.datasets.imagenet import ImageNetDataset  # noqa: E402
from evals.datasets.voc import (VOC_CLASSES, VOCAnnotation, VOCClassificationDataset, VOCObject,  # noqa: E402
                                VOCSegmentationDataset, write_segmentation_mask)
from evals.detection.boxes import image_scale  # noqa: E402
from evals.detection.data import VOCDetectionDataset, training_item  # noqa: E402
from evals.voc12_seg import training_sample  # noqa: E402
from runtime.data import Augmented, sample_rng  # noqa: E402

CROP, SCALE_RANGE, TEST_VIEWS = 227, (0.5, 2.0), 10  # P2
RESIZE = 256  # in1k_linear
DET = dict(flip=True, scales=(480, 576, 688, 864, 1200), max_size=2000, rois_per_image=64, fg_fraction=0.25,
           fg_threshold=0.5, bg_range=(0.1, 0.5))  # P3
SEG_CROP, SEG_POINTS, SEG_BORDER = 448, 128, 32  # P4
NORMALISE = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


# ----------------------------------------------------------------------------- generated files


def photographs() -> list[np.ndarray]:
    import skimage.data as data

    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field(),
            data.immunohistochemistry(), data.retina()]


def photo(rng: np.random.Generator, sources: list[np.ndarray], size: tuple[int, int]) -> Image.Image:
    """A ``size`` crop of a random bundled photograph, rescaled, so the JPEG has real-image entropy."""
    source = Image.fromarray(sources[int(rng.integers(len(sources)))])
    if rng.random() < 0.5:
        source = source.transpose(Image.FLIP_LEFT_RIGHT)
    w, h = source.size
    f = rng.uniform(0.5, 1.0)
    cw, ch = min(w, int(h * f * size[0] / size[1])), int(h * f)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return source.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR)


def write_jpegs(folder: Path, names: list[str], rng, sources, size: tuple[int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        shape = size if i % 4 else size[::-1]  # a quarter portrait, as in VOC
        path = folder / name
        photo(rng, sources, shape).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def make_voc(root: Path, count: int, rng, sources, size) -> tuple[Path, list[str]]:
    voc = root / "VOCdevkit" / "VOC2007"
    ids = [f"{i:06d}" for i in range(count)]
    write_jpegs(voc / "JPEGImages", [f"{i}.jpg" for i in ids], rng, sources, size)
    main = voc / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "trainval.txt").write_text("".join(f"{i}\n" for i in ids))
    for c in VOC_CLASSES:
        (main / f"{c}_trainval.txt").write_text("".join(f"{i} {rng.choice(['1', '-1', '0'])}\n" for i in ids))
    return voc, ids


def make_imagenet(root: Path, count: int, rng, sources, size) -> Path:
    imagenet = root / "imagenet"
    for split in ("train", "val"):
        for c in range(4):
            write_jpegs(imagenet / split / f"n{c:08d}", [f"img_{k:05d}.JPEG" for k in range(count // 4)],
                        rng, sources, size)
    return imagenet


def make_segmentation(root: Path, voc: Path, ids: list[str], rng) -> list[tuple[Path, Path]]:
    masks = root / "SegmentationClass"
    masks.mkdir(parents=True)
    items = []
    for i in ids:
        image = voc / "JPEGImages" / f"{i}.jpg"
        w, h = Image.open(image).size
        mask = np.zeros((h, w), np.uint8)
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        mask[y0:y0 + h // 2, x0:x0 + w // 2] = int(rng.integers(1, 21))
        mask[y0:y0 + h // 2, x0:x0 + 3] = 255
        write_segmentation_mask(masks / f"{i}.png", mask)
        items.append((image, masks / f"{i}.png"))
    return items


def make_flow_pairs(root: Path, count: int, rng, sources, size) -> Path:
    from pretrain.flow import encode_flow_png

    pairs = root / "pairs"
    frames = write_jpegs(pairs / "frames", [f"f{i:05d}.jpg" for i in range(count)], rng, sources, size)
    (pairs / "flow").mkdir()
    lines = []
    for i, frame in enumerate(frames):
        w, h = Image.open(frame).size
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        flow = np.stack([8 * np.sin(xx / 40 + i), 6 * np.cos(yy / 30 - i)], -1).astype(np.float32)
        encode_flow_png(pairs / "flow" / f"f{i:05d}.png", flow)
        lines.append(json.dumps({"frame_path": f"frames/{frame.name}", "flow_path": f"flow/f{i:05d}.png",
                                 "split": "train"}))
    (pairs / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return pairs


# ----------------------------------------------------------------------------- baselines


def pil_loader(path) -> Image.Image:
    """torchvision.datasets.folder.pil_loader."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def baseline_scaled_view(image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
    """P2's view with torchvision: the same draws, TF.resized_crop, hflip, ToTensor, Normalize."""
    width, height = image.size
    side = min(CROP * rng.uniform(*SCALE_RANGE), width, height)
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    view = TF.resized_crop(image, round(y0), round(x0), round(side), round(side), [CROP, CROP],
                           T.InterpolationMode.BILINEAR)
    if rng.random() < 0.5:
        view = TF.hflip(view)
    return NORMALISE(TF.to_tensor(view))


IN1K_TRAIN = T.Compose([T.Resize(RESIZE), T.RandomCrop(CROP), T.RandomHorizontalFlip(), T.ToTensor(), NORMALISE])
IN1K_TEST = T.Compose([T.Resize(RESIZE), T.CenterCrop(CROP), T.ToTensor(), NORMALISE])


def baseline_detection(path, sample, rng) -> torch.Tensor:
    image = pil_loader(path)
    width, height = image.size
    if rng.random() < 0.5:
        image = TF.hflip(image)
    scale = image_scale(width, height, int(rng.choice(DET["scales"])), DET["max_size"])
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    return NORMALISE(TF.to_tensor(TF.resize(image, size, T.InterpolationMode.BILINEAR)))


def baseline_segmentation(item, rng) -> torch.Tensor:
    image, mask = pil_loader(item[0]), TF.pil_to_tensor(Image.open(item[1]))[0]
    tensor = NORMALISE(TF.to_tensor(image))
    height, width = mask.shape
    pad = [0, 0, max(0, SEG_CROP - width), max(0, SEG_CROP - height)]
    tensor, mask = TF.pad(tensor, pad), TF.pad(mask[None], pad, fill=255)[0]
    y0, x0 = int(rng.integers(0, mask.shape[0] - SEG_CROP + 1)), int(rng.integers(0, mask.shape[1] - SEG_CROP + 1))
    tensor, mask = tensor[:, y0:y0 + SEG_CROP, x0:x0 + SEG_CROP], mask[y0:y0 + SEG_CROP, x0:x0 + SEG_CROP]
    if rng.random() < 0.5:
        tensor, mask = TF.hflip(tensor), TF.hflip(mask)
    candidates = np.flatnonzero(mask.numpy() != 255)
    rng.choice(candidates, SEG_POINTS)
    return tensor.contiguous()


def baseline_flow_pair(root: Path, record: dict, rng) -> torch.Tensor:
    from pretrain.data import DEFAULT_SCALE_RANGE
    from pretrain.flow import decode_flow_png

    image = pil_loader(root / record["frame_path"])
    flow, valid = decode_flow_png(str(root / record["flow_path"]))
    scale = rng.uniform(*DEFAULT_SCALE_RANGE)
    size = [round(image.height * scale), round(image.width * scale)]
    image = TF.resize(image, size, T.InterpolationMode.BILINEAR)
    flow_t = TF.resize(torch.from_numpy(flow).permute(2, 0, 1) * scale, size, T.InterpolationMode.NEAREST)
    top, left = int(rng.integers(0, size[0] - 224 + 1)), int(rng.integers(0, size[1] - 224 + 1))
    image, flow_t = TF.crop(image, top, left, 224, 224), flow_t[:, top:top + 224, left:left + 224]
    if rng.random() < 0.5:
        image, flow_t = TF.hflip(image), TF.hflip(flow_t) * torch.tensor([-1.0, 1.0]).view(2, 1, 1)
    picks = rng.integers(0, 224 * 224, 512)
    flow_t.reshape(2, -1)[:, picks]
    return NORMALISE(TF.to_tensor(image))


# ----------------------------------------------------------------------------- pipelines


def pipelines(root: Path, count: int, size: tuple[int, int]) -> dict:
    """name -> (ours(i), baseline(i), number of items): two functions producing sample i."""
    from pretrain.data import FlowPairDataset, read_manifest

    rng, sources = np.random.default_rng(0), photographs()
    voc, ids = make_voc(root, count, rng, sources, size)
    imagenet = make_imagenet(root, count, rng, sources, size)
    seg_items = make_segmentation(root, voc, ids, rng)
    pairs = make_flow_pairs(root, max(16, count // 4), rng, sources, size)

    cls = VOCClassificationDataset(voc, "trainval")
    # as evals.voc07_cls: uint8 views, normalised per batch on the training step's device
    cls_train = Augmented(cls, lambda s, r: (random_scaled_view(s[0], r, CROP, SCALE_RANGE, normalise=False), s[1]), 0)

    def cls_test(i):
        image, _ = cls[i]
        return stack_views([random_scaled_view(image, sample_rng(1, v, i), CROP, SCALE_RANGE, normalise=False)
                            for v in range(TEST_VIEWS)])

    def cls_test_baseline(i):
        image = pil_loader(cls.paths[i])
        return torch.stack([baseline_scaled_view(image, sample_rng(1, v, i)) for v in range(TEST_VIEWS)])

    in1k_train = ImageNetDataset(imagenet, "train")
    in1k_test = ImageNetDataset(imagenet, "val")
    # as evals.in1k_linear: uint8 crops, normalised per batch on the device
    ours_in1k_train = Augmented(in1k_train, lambda s, r: (random_crop_mirror(resize_shorter(s[0], RESIZE), r, CROP,
                                                                             normalise=False), s[1]), 0)
    ours_in1k_test = Augmented(in1k_test, lambda s, r: (center_crop(resize_shorter(s[0], RESIZE), CROP, normalise=False),
                                                        s[1]), 0)

    annotations = {i: VOCAnnotation(i, 500, 375, [VOCObject("dog", (50, 40, 300, 260), False, False)]) for i in ids}
    boxes = {i: np.sort(np.random.default_rng(7).integers(1, 370, (300, 4)), axis=1)[:, [0, 1, 2, 3]] for i in ids}
    det = VOCDetectionDataset(voc, ids, annotations, boxes)
    det_train = Augmented(det, lambda s, r: training_item(s, r, **DET), 0)

    seg = VOCSegmentationDataset(seg_items)
    seg_train = Augmented(seg, lambda s, r: training_sample(s[0], s[1], r, SEG_CROP, SEG_POINTS, SEG_BORDER), 0)

    flow_pairs = FlowPairDataset(pairs, "train")
    records = read_manifest(pairs / "manifest.jsonl")

    return {
        "pretrain_pairs": (lambda i: flow_pairs[i], lambda i: baseline_flow_pair(pairs, records[i], sample_rng(0, 0, i)),
                           len(flow_pairs)),
        "voc07_cls_train": (lambda i: cls_train[i], lambda i: baseline_scaled_view(pil_loader(cls.paths[i]), sample_rng(0, 0, i)),
                            len(cls)),
        "voc07_cls_test": (cls_test, cls_test_baseline, len(cls)),
        "voc07_det_train": (lambda i: det_train[i], lambda i: baseline_detection(det.voc_root / "JPEGImages" / f"{ids[i]}.jpg",
                                                                               det[i], sample_rng(0, 0, i)), len(det)),
        "voc12_seg_train": (lambda i: seg_train[i], lambda i: baseline_segmentation(seg_items[i], sample_rng(0, 0, i)),
                            len(seg)),
        "in1k_linear_train": (lambda i: ours_in1k_train[i], lambda i: IN1K_TRAIN(pil_loader(in1k_train.samples[i][0])),
                              len(in1k_train)),
        "in1k_linear_test": (lambda i: ours_in1k_test[i], lambda i: IN1K_TEST(pil_loader(in1k_test.samples[i][0])),
                             len(in1k_test)),
    }


CHUNK = 4  # samples timed in a row before switching sides (unbatched pipelines)
# Pipelines whose harness loads batches in DataLoader workers: each side's batch is collated as a
# worker does it, into shared memory (part of a worker's cost): ours with the harness's collate
# (evals.common.collate_views), the baseline with torch's default collate.
WORKER_BATCH = {"voc07_cls_train": 16, "in1k_linear_train": 64, "in1k_linear_test": 64}  # P2, P5


def worker_collate(samples: list):
    """``default_collate`` as a DataLoader worker runs it: tensors are stacked straight into a
    new shared-memory block (what the worker sends to the main process)."""
    first = samples[0]
    if isinstance(first, (tuple, list)):
        return [worker_collate(list(items)) for items in zip(*samples)]
    if isinstance(first, torch.Tensor):
        storage = first._typed_storage()._new_shared(first.numel() * len(samples), device=first.device)
        return torch.stack(samples, 0, out=first.new(storage).resize_(len(samples), *first.shape))
    return default_collate(samples)


def paired_rates(ours, base, count: int, batch: int | None = None) -> tuple[float, float]:
    """Samples/s of ``ours`` and ``base`` over samples 0..count-1, timed in alternating chunks
    (``batch`` samples collated as in a worker, see WORKER_BATCH, else CHUNK samples; which side
    goes first alternates too), so that a shared machine's load, which drifts within seconds,
    falls on both sides alike."""
    seconds = {"ours": 0.0, "baseline": 0.0}
    collate = {"ours": lambda samples: collate_views(samples, shared=True), "baseline": worker_collate}
    step = batch or CHUNK
    for turn, start in enumerate(range(0, count, step)):
        indices = range(start, min(start + step, count))
        sides = (("ours", ours), ("baseline", base)) if turn % 2 == 0 else (("baseline", base), ("ours", ours))
        for key, fn in sides:
            tick = time.perf_counter()
            samples = [fn(i) for i in indices]
            if batch:
                collate[key](samples)
            seconds[key] += time.perf_counter() - tick
    return count / seconds["ours"], count / seconds["baseline"]


def measure(pipes: dict, reps: int, only: list[str] | None = None) -> dict:
    """Median samples/s of ours and the baseline per pipeline over ``reps`` passes, each pass
    timing the two side by side (:func:`paired_rates`); the ratio is the median of the passes'
    ratios."""
    rates = {name: {"ours": [], "baseline": [], "ratio": []} for name in pipes if not only or name in only}
    for name in rates:  # warm-up: imports, caches, allocator
        pipes[name][0](0), pipes[name][1](0)
    for _ in range(reps):
        for name in rates:
            ours, base, n = pipes[name]
            a, b = paired_rates(ours, base, n, WORKER_BATCH.get(name))
            rates[name]["ours"].append(a)
            rates[name]["baseline"].append(b)
            rates[name]["ratio"].append(a / b)
    return {name: {"ours": round(statistics.median(r["ours"]), 2), "baseline": round(statistics.median(r["baseline"]), 2),
                   "ratio": round(statistics.median(r["ratio"]), 3)} for name, r in rates.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    parser.add_argument("--images", type=int, default=120, help="images per dataset")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", default="500x375", help="generated JPEG size WxH (a quarter portrait)")
    parser.add_argument("--only", nargs="*", help="pipelines to time (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one DataLoader worker's view
    size = tuple(int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="bench_loaders_") as tmp:
        pipes = pipelines(Path(tmp), args.images, size)
        result = measure(pipes, args.reps, args.only)
    machine = f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})"
    command = "benchmarks/bench_loaders.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        print(json.dumps({"pipelines": result, "command": command.strip(), "machine": machine,
                          "image_size": args.size, "reps": args.reps}))
        return 0
    print(f"{'pipeline':20s} {'ours/s':>9s} {'baseline/s':>11s} {'ratio':>6s}   (per worker, medians of {args.reps})")
    for name, r in result.items():
        print(f"{name:20s} {r['ours']:9.1f} {r['baseline']:11.1f} {r['ratio']:6.2f}")
    print(f"machine: {machine}; JPEGs {args.size} q90, {args.images} per dataset")
    return 0


if __name__ == "__main__":
    sys.exit(main())
