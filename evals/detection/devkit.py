"""The VOC devkit's side of detection: the ground truth per class as the metric reads it, and the
results files (``comp4_det_test_<class>.txt``) the official MATLAB devkit scores.

Detections are kept per class as ``{image_id: (K, 5) x1, y1, x2, y2, score}`` in VOC's 1-based
inclusive pixels, the layout of ``evals.metrics.voc_detection_map``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from evals.datasets.voc import VOC_CLASSES
from runtime.atomic import atomic_write

RESULTS_PREFIX = "comp4_det_test_"  # comp4: trained on data beyond VOC (the checkpoint's pretraining)


def class_annotations(annotations: Mapping, ids: Sequence[str]) -> list[dict]:
    """Per class: ``{image_id: (boxes (M, 4) 1-based, difficult (M,))}`` for every test image."""
    out = []
    for name in VOC_CLASSES:
        per_image = {}
        for image_id in ids:
            objects = [o for o in annotations[image_id].objects if o.name == name]
            per_image[image_id] = (np.array([o.box for o in objects], np.float64).reshape(-1, 4),
                                   np.array([o.difficult for o in objects], bool))
        out.append(per_image)
    return out


def write_devkit_results(detections_per_class: Sequence[Mapping], out_dir,
                         prefix: str = RESULTS_PREFIX) -> list[Path]:
    """The VOC devkit's results files, one per class: ``<image_id> <score> <x1> <y1> <x2> <y2>``
    (1-based inclusive; score with 6 decimals, boxes with 1), each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, per_image in zip(VOC_CLASSES, detections_per_class):
        lines = [f"{image_id} {d[4]:.6f} {d[0]:.1f} {d[1]:.1f} {d[2]:.1f} {d[3]:.1f}\n"
                 for image_id, dets in per_image.items() for d in np.asarray(dets).reshape(-1, 5)]
        paths.append(atomic_write(out_dir / f"{prefix}{name}.txt", "".join(lines)))
    return paths


def read_devkit_results(out_dir, prefix: str = RESULTS_PREFIX) -> list[dict]:
    """The files of :func:`write_devkit_results` read back into the per-class layout (images in
    file order; an image without detections of a class is absent from that class), so that
    results written by one run can be scored again or compared."""
    out = []
    for name in VOC_CLASSES:
        rows: dict[str, list] = {}
        path = Path(out_dir) / f"{prefix}{name}.txt"
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            fields = line.split()
            if len(fields) != 6:
                raise ValueError(f"{path}:{lineno}: expected '<id> <score> <x1> <y1> <x2> <y2>', got {line!r}")
            score, x1, y1, x2, y2 = map(float, fields[1:])
            rows.setdefault(fields[0], []).append((x1, y1, x2, y2, score))
        out.append({i: np.array(r, np.float64).reshape(-1, 5) for i, r in rows.items()})
    return out
