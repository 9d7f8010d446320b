"""Check a data root against the official layouts, or write the synthetic demo data set.

    python -m evals.data check --data-root DIR [--sample N]
    python -m evals.data make-demo --out DIR [--seed 0] [--scale small|tiny] [--overwrite]

``check`` parses everything that is present (split files, per-class label files, XML
annotations, masks, SBD .mat files, ImageNet label files; images only for existence and
size) and prints one row per dataset split: OK, MISSING, COUNT MISMATCH (found n, official
m) or MALFORMED with the file (and line) at fault. A root with a ``DEMO_DATASET`` marker
reports DEMO-SIZED instead of COUNT MISMATCH. Exit status 1 if anything present is
malformed, else 0.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from evals.datasets import DatasetError, imagenet, sbd, voc
from evals.datasets.demo import MARKER, SCALES, make_demo


@dataclass
class CheckRow:
    dataset: str
    split: str
    status: str                  # OK | MISSING | COUNT MISMATCH | DEMO-SIZED | MALFORMED
    found: int | None = None
    official: int | None = None
    notes: str = ""

    def status_text(self) -> str:
        if self.status in ("COUNT MISMATCH", "DEMO-SIZED"):
            return f"{self.status} (found {self.found}, official {self.official})"
        if self.status == "OK" and self.found is not None:
            return f"OK ({self.found})"
        return self.status


@dataclass
class CheckReport:
    data_root: Path
    demo: bool
    rows: list[CheckRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when everything present parsed (missing datasets are not failures)."""
        return not any(r.status == "MALFORMED" for r in self.rows)

    def table(self) -> str:
        header = ("dataset", "split", "status", "notes")
        body = [(r.dataset, r.split, r.status_text(), r.notes) for r in self.rows]
        widths = [max(len(str(line[k])) for line in [header] + body) for k in range(3)]
        fmt = lambda line: "  ".join(str(v).ljust(w) for v, w in zip(line, widths)) + "  " + line[3]  # noqa: E731
        title = f"data root: {self.data_root}" + ("" if self.data_root.is_dir() else " (does not exist)")
        title += (f"  ({MARKER} marker: synthetic, demo-sized counts)" if self.demo else "")
        lines = [title, fmt(header), fmt(tuple("-" * w for w in widths) + ("-----",))] + [fmt(b).rstrip() for b in body]
        lines.append("all present data parsed" if self.ok else "MALFORMED data found (see notes)")
        return "\n".join(lines)


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as err:
        raise DatasetError(f"{path}: cannot open image ({err})") from None


def _limit(items: list, sample: int | None) -> list:
    return items if sample is None or len(items) <= sample else items[:: max(len(items) // sample, 1)][:sample]


# Each checker returns (found count, notes) or raises DatasetError.

def _check_voc_main(voc_root: Path, split: str, sample, progress) -> tuple[int, str]:
    ids, labels = voc.classification_labels(voc_root, split)
    disagree, objects, difficult, parsed = [], 0, 0, 0
    for k, i in enumerate(tqdm(ids, desc=f"{voc_root.name} {split}", disable=not progress, leave=False)):
        path = voc.image_path(voc_root, i)
        if sample is not None and k % max(len(ids) // sample, 1):
            continue
        annotation = voc.parse_annotation(voc_root / "Annotations" / f"{i}.xml")
        parsed += 1
        if _image_size(path) != (annotation.width, annotation.height):
            raise DatasetError(f"{path}: image is {_image_size(path)}, annotation says "
                               f"{(annotation.width, annotation.height)}")
        objects += len(annotation.objects)
        difficult += sum(o.difficult for o in annotation.objects)
        if not np.array_equal(voc.labels_from_annotation(annotation), labels[k]):
            disagree.append(i)
    notes = f"{objects} objects ({difficult} difficult)"
    if sample is not None:
        notes += f" in a sample of {parsed} annotations"
    if disagree:
        notes += f"; class files disagree with the XML for {len(disagree)} images, e.g. {disagree[0]}"
    return len(ids), notes


def _check_masks(items: list[tuple[str, Path, Path]], what: str, sample, progress) -> tuple[int, str]:
    histogram = np.zeros(256, np.int64)
    for _, image, mask_path in tqdm(_limit(items, sample), desc=what, disable=not progress, leave=False):
        mask = voc.read_mask(mask_path)
        size = _image_size(image)
        if mask.shape != (size[1], size[0]):
            raise DatasetError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, "
                               f"image {image} is {size[0]}x{size[1]}")
        histogram += np.bincount(mask.ravel(), minlength=256)
    classes = int((histogram[1:len(voc.VOC_CLASSES) + 1] > 0).sum())
    notes = f"{classes}/20 classes in the masks read"
    return len(items), notes + ("" if sample is None else f" (sample of {min(sample, len(items))})")


def check(data_root, sample: int | None = None, progress: bool = False) -> CheckReport:
    """Parse what is present under ``data_root`` and compare counts with the official splits.

    ``sample``: parse at most about this many annotation / mask files per split (all by default).
    """
    data_root = Path(data_root)
    report = CheckReport(data_root, (data_root / MARKER).is_file())

    def add(dataset: str, split: str, needs: Path, official: int | None, run: Callable[[], tuple[int, str]]):
        if not needs.exists():
            report.rows.append(CheckRow(dataset, split, "MISSING", notes=f"no {needs}"))
            return
        try:
            found, notes = run()
        except DatasetError as err:
            report.rows.append(CheckRow(dataset, split, "MALFORMED", notes=str(err)))
            return
        if official is None or found == official:
            status = "OK"
        else:
            status = "DEMO-SIZED" if report.demo else "COUNT MISMATCH"
        report.rows.append(CheckRow(dataset, split, status, found, official, notes))

    for year, splits in ((2007, ("trainval", "test")), (2012, ("trainval",))):
        root = voc.voc_dir(data_root, year)
        for split in splits:
            add(f"VOC{year}", f"Main {split}", root / "ImageSets" / "Main" / f"{split}.txt",
                voc.OFFICIAL_COUNTS[(f"VOC{year}", "Main", split)],
                lambda root=root, split=split: _check_voc_main(root, split, sample, progress))
    voc12 = voc.voc_dir(data_root, 2012)
    for split in ("train", "val"):
        add("VOC2012", f"Segmentation {split}", voc12 / "ImageSets" / "Segmentation" / f"{split}.txt",
            voc.OFFICIAL_COUNTS[("VOC2012", "Segmentation", split)],
            lambda split=split: _check_masks(voc.segmentation_items(voc12, split), f"VOC2012 seg {split}",
                                             sample, progress))

    sbd_root = sbd.sbd_dir(data_root)

    def sbd_split(split: str) -> tuple[int, str]:
        ids = voc.read_split(sbd_root / f"{split}.txt")
        items = []
        for i in ids:
            image = sbd_root / "img" / f"{i}.jpg"
            if not image.is_file():
                raise DatasetError(f"{image}: image file not found")
            items.append((i, image, sbd_root / "cls" / f"{i}.mat"))
        return _check_masks(items, f"SBD {split}", sample, progress)

    for split in ("train", "val"):
        add("SBD", split, sbd_root / f"{split}.txt", sbd.OFFICIAL_COUNTS[split], lambda split=split: sbd_split(split))
    add("SBD+VOC2012", "train_aug", sbd_root, sbd.OFFICIAL_COUNTS["train_aug"],
        lambda: (len(sbd.train_aug_items(data_root)), "(VOC12 seg train | SBD train | SBD val) - VOC12 seg val"))

    inet = imagenet.imagenet_dir(data_root)
    add("ImageNet", "classes", inet / "train", imagenet.OFFICIAL_COUNTS["classes"],
        lambda: (len(imagenet.imagenet_classes(inet)), ""))
    add("ImageNet", "train", inet / "train", imagenet.OFFICIAL_COUNTS["train"],
        lambda: (len(imagenet.imagenet_samples(inet, "train")), ""))
    add("ImageNet", "val", inet / "val", imagenet.OFFICIAL_COUNTS["val"],
        lambda: (len(imagenet.imagenet_samples(inet, "val")),
                 "class folders" if any(p.is_dir() for p in (inet / "val").iterdir()) else "flat + labels"))
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evals.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("check", help="report which datasets are present and whether they parse")
    p.add_argument("--data-root", type=Path, required=True,
                   help="folder holding VOCdevkit/, benchmark_RELEASE/, imagenet/")
    p.add_argument("--sample", type=int, default=None,
                   help="parse at most about N annotation/mask files per split (default: all)")
    p = commands.add_parser("make-demo", help="write the synthetic demo data set in the real layouts")
    p.add_argument("--out", type=Path, required=True, help="folder to write (created; must be empty or a demo set)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default: 0)")
    p.add_argument("--scale", choices=sorted(SCALES), default="small",
                   help="small: the demo's size; tiny: a few dozen images, for tests (default: small)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo data set in --out")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.command == "check":
        report = check(args.data_root, sample=args.sample, progress=sys.stderr.isatty())
        print(report.table())
        return 0 if report.ok else 1
    start = time.monotonic()
    try:
        counts = make_demo(args.out, seed=args.seed, scale=args.scale, overwrite=args.overwrite)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = counts.pop("bytes")
    print(f"wrote a {args.scale} demo data set (seed {args.seed}) to {args.out} "
          f"in {time.monotonic() - start:.1f} s, {size / 2**20:.1f} MiB:")
    for name, count in counts.items():
        print(f"  {name:<22} {count}")
    folders = ("VOCdevkit/VOC2007", "VOCdevkit/VOC2012", "benchmark_RELEASE/dataset", "imagenet", MARKER)
    print("  written: " + ", ".join(str(args.out / f) for f in folders))
    print(f"check it with: python -m evals.data check --data-root {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
