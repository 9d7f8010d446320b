"""Motion grouping: do a network's features tell pixels that move together from pixels that don't?

    python -m pretrain.grouping --ckpt cpfs_alexnet.pt --data FLOWDIR            # val split of DIR
    python -m pretrain.grouping --ckpt random --data FLOWDIR --seed 0 --json
    python -m pretrain.grouping --ckpt random-rescaled --data FLOWDIR --data-root DEMO_DATA --json

The proxy-task skill (``pretrain.proxy``) needs a CPFS head; this score needs only an AlexNet, so it
compares any checkpoint: our exports (``alexnet_plain.pt``, or a pretraining ``best.pt``: its
backbone), the direct-regression baseline, ``random``, ``random-rescaled`` and imported networks.

Per held-out pair (``--split``, the evaluation view of ``pretrain.data``: centre 224 crop), the
backbone's hypercolumn (``--layers``, by default P1's conv1, pool1, conv3, pool5, fc7; fc6/fc7 run
densely) is sampled at ``--pixels`` seeded random pixels (``backbones.hypercolumn``), each layer's
vector L2-normalised, and every pixel pair (i < j) gets the similarity

    s(i, j) = mean over layers of cos(h_l(i), h_l(j))

(so no layer dominates by its scale or width; a layer that is constant over the image, like fc7 on
a 224 crop, adds the same amount to every pair and changes no ranking). Pairs are labelled

* ``ids`` (pairs from ``pretrain.world`` videos): same motion = the same ground-truth object
  (``pretrain.world.object_ids``; the background, moved by the camera, is one group);
* ``flow`` (any footage): among pixels that move (``|f| > MOVING`` px in the crop), same motion =
  flow vectors within ``NEAR`` px of each other, different = at least ``FAR`` px apart; pairs in
  between are left out.

The score is the ROC AUC of s over an image's labelled pairs (the probability that a random
same-motion pair is more similar than a random different-motion pair; ties count 1/2), averaged
over the split's images: 0.5 = features blind to motion groups, 1 = perfectly separated.
``auc_layers`` gives each layer's AUC alone (a layer constant over the image scores 0.5).
Deterministic: the network (``random``), the pixels and nothing else draw from ``--seed``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

__all__ = ["MOVING", "NEAR", "FAR", "DEFAULT_LAYERS", "roc_auc", "pairs_from_ids", "pairs_from_flow",
           "pair_similarities", "grouping_auc", "eval_view_labels", "load_alexnet", "evaluate"]

MOVING = 1.0                # px (crop pixels): a pixel "moves" above this flow magnitude
NEAR = 1.0                  # px: same motion when the flow vectors differ by at most this (DIS noise ~0.5 px)
FAR = 4.0                   # px: different motion when they differ by at least this
DEFAULT_LAYERS = ("conv1", "pool1", "conv3", "pool5", "fc7")  # P1's hypercolumn
DEFAULT_PIXELS = 256


# --- the maths: pure functions of arrays ------------------------------------------------------------

def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U over the
    average ranks, so tied scores count 1/2). NaN when one of the classes is empty."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def pairs_from_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j of N pixels with ground-truth group ``ids`` (N,): ``(i, j, same)``."""
    i, j = np.triu_indices(len(ids), k=1)
    return i, j, ids[i] == ids[j]


def pairs_from_flow(flow: np.ndarray, moving: float = MOVING, near: float = NEAR,
                    far: float = FAR) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled pairs i < j among the pixels of ``flow`` (N, 2) px that move (``|f| > moving``):
    same motion when ``|f_i - f_j| <= near``, different when ``>= far``; pairs in between dropped."""
    i, j = np.triu_indices(len(flow), k=1)
    speed = np.hypot(flow[:, 0], flow[:, 1])
    difference = np.hypot(*(flow[i] - flow[j]).T)
    keep = (speed[i] > moving) & (speed[j] > moving) & ((difference <= near) | (difference >= far))
    return i[keep], j[keep], difference[keep] <= near


def pair_similarities(features: list[torch.Tensor], i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """``(L, P)`` cosine similarities of pairs (i, j) for each layer's features (N, C_l)."""
    out = []
    for layer in features:
        unit = F.normalize(layer.double(), dim=-1)
        out.append((unit @ unit.T).numpy()[i, j])  # N x N Gram matrix: cheaper than gathering P rows
    return np.stack(out) if out else np.zeros((0, len(i)))


def grouping_auc(similarities: list[np.ndarray], same: list[np.ndarray]) -> tuple[float, list[float], int]:
    """The score of a split: per image (``similarities[k]`` (L, P_k), labels ``same[k]`` (P_k,)),
    the AUC of the mean similarity over layers; returns ``(mean over images, [mean over images of
    each layer's AUC], images scored)``. Per image, so that a feature's image-wide offset (e.g. fc7
    on a 224 crop, one vector per image) cannot rank one image's pairs against another's; images
    whose pairs are all of one class are left out."""
    combined, layers = [], []
    for sim, labels in zip(similarities, same):
        auc = roc_auc(sim.mean(0), labels)
        if math.isfinite(auc):
            combined.append(auc)
            layers.append([roc_auc(s, labels) for s in sim])
    if not combined:
        return math.nan, [math.nan] * (len(similarities[0]) if similarities else 0), 0
    return float(np.mean(combined)), [float(v) for v in np.mean(layers, axis=0)], len(combined)


def eval_view_labels(labels: np.ndarray, crop: int) -> np.ndarray:
    """A per-pixel label map (H, W) in ``pretrain.data``'s evaluation view (scale up so the shorter
    side is at least ``crop``, nearest neighbour as the flow; centre crop), aligned with the image."""
    h, w = labels.shape
    s = max(1.0, crop / min(h, w))
    new_h, new_w = max(crop, round(h * s)), max(crop, round(w * s))
    if (new_h, new_w) != (h, w):
        labels = cv2.resize(np.asarray(labels), (new_w, new_h), interpolation=cv2.INTER_NEAREST_EXACT)
    y0, x0 = (new_h - crop) // 2, (new_w - crop) // 2
    return np.ascontiguousarray(labels[y0:y0 + crop, x0:x0 + crop])


# --- the edges: networks and files ------------------------------------------------------------------

def load_alexnet(ckpt: str, seed: int = 0, data_root: str | None = None):
    """``(AlexNet in eval mode, description)`` for ``ckpt``: ``random`` (PyTorch's init under
    ``seed``, as ``evals.run``), ``random-rescaled`` (that, rescaled on ``data_root``'s VOC2007
    trainval images, as ``evals.run``), a backbone checkpoint any ``backbones.checkpoint`` format,
    or a pretraining checkpoint (its BN backbone, running statistics)."""
    from backbones.checkpoint import CheckpointError, load_backbone, random_backbone
    from runtime.errors import ConfigError

    if ckpt == "random":
        return random_backbone(seed).model.eval(), f"random(seed={seed})"
    if ckpt == "random-rescaled":
        if not data_root:
            raise ConfigError("--ckpt random-rescaled needs --data-root (a folder holding VOCdevkit/VOC2007: the "
                              "rescaling sample)")
        from backbones.rescale import random_rescaled_backbone
        return random_rescaled_backbone(seed, data_root).model.eval(), f"random-rescaled(seed={seed})"
    try:
        return load_backbone(ckpt).model.eval(), ckpt
    except CheckpointError as first:
        from pretrain.model import load_pretrain_checkpoint
        try:
            net, _, _ = load_pretrain_checkpoint(ckpt)
        except (ValueError, OSError, KeyError):
            raise first from None
        return net.backbone.eval(), ckpt


@torch.no_grad()
def hypercolumns(net, image: torch.Tensor, positions: torch.Tensor, layers) -> list[torch.Tensor]:
    """Each layer's activations (N, C_l) at ``positions`` (N, 2) of one image (3, H, W)."""
    from backbones.alexnet import layer_geometry
    from backbones.hypercolumn import sample_layer

    geometry = layer_geometry(net.layout)
    acts = net.activations(image[None], layers, dense=True)
    return [sample_layer(acts[name], positions[None].float(), *geometry[name])[0] for name in layers]


def evaluate(ckpt: str, data: str, split: str = "val", seed: int = 0, pixels: int = DEFAULT_PIXELS,
             layers=DEFAULT_LAYERS, labels: str = "auto", images: int | None = None,
             data_root: str | None = None, progress: bool = False) -> dict:
    """The motion-grouping score of ``ckpt`` on ``split`` of the prepared folder ``data``, as the
    dict the CLI prints (module docstring)."""
    from tqdm import tqdm

    from backbones.alexnet import ACTIVATIONS
    from pretrain.data import FlowPairDataset
    from pretrain.world import object_ids
    from runtime.errors import ConfigError, DatasetError

    layers = tuple(layers)
    if not layers or any(name not in ACTIVATIONS or name == "fc8" for name in layers):
        raise ConfigError(f"--layers {','.join(layers)}: choose among {', '.join(ACTIVATIONS[:-1])}")
    if pixels < 2:
        raise ConfigError(f"--pixels must be at least 2, got {pixels}")
    if labels not in ("auto", "ids", "flow"):
        raise ConfigError(f"--labels must be auto, ids or flow, got {labels!r}")
    if not os.path.isdir(data):
        raise DatasetError(f"{data}: no such data folder (--data must be a folder written by pretrain.prepare)")
    dataset = FlowPairDataset(data, None if split == "all" else split, crop=224, num_pixels=1, train=False,
                              return_flow_map=True)
    count = len(dataset) if images is None else min(images, len(dataset))
    if count == 0:
        raise DatasetError(f"{dataset.manifest_path}: no pairs in split {split!r}")
    ground_truth = [object_ids(dataset.records[k]) for k in range(count)] if labels != "flow" else [None] * count
    if labels == "ids" and any(g is None for g in ground_truth):
        raise DatasetError(f"{data}: --labels ids needs pairs from pretrain.world videos (an .ids.npz beside each)")
    mode = "ids" if labels == "ids" or (labels == "auto" and all(g is not None for g in ground_truth)) else "flow"
    net, description = load_alexnet(ckpt, seed, data_root)
    sims, same_all = [], []
    for k in tqdm(range(count), desc=f"grouping {description}", disable=not progress, leave=False):
        item = dataset[k]
        valid = item["valid_map"].numpy()
        rng = np.random.default_rng([seed, k])
        candidates = np.flatnonzero(valid.ravel())
        chosen = np.sort(rng.choice(candidates, size=min(pixels, len(candidates)), replace=False))
        ys, xs = np.divmod(chosen, valid.shape[1])
        if mode == "ids":
            i, j, same = pairs_from_ids(eval_view_labels(ground_truth[k], dataset.crop)[ys, xs])
        else:
            flow_px = item["flow_map"].numpy()[:, ys, xs].T * dataset.max_magnitude  # eq. (6) undone
            i, j, same = pairs_from_flow(flow_px)
        if len(i) == 0:
            continue
        feats = hypercolumns(net, item["image"], torch.from_numpy(np.stack([ys, xs], 1)), layers)
        sims.append(pair_similarities(feats, i, j))
        same_all.append(same)
    if not sims:
        raise DatasetError(f"{data}: no labelled pixel pairs in split {split!r} (nothing moves?)")
    auc, per_layer, scored = grouping_auc(sims, same_all)
    same = np.concatenate(same_all)
    clean = lambda v: None if not math.isfinite(v) else round(v, 6)  # noqa: E731
    return {"auc": clean(auc), "pairs": int(len(same)), "positives": int(same.sum()), "images": scored,
            "labels": mode, "auc_layers": {name: clean(v) for name, v in zip(layers, per_layer)},
            "layers": list(layers), "pixels": pixels, "split": split, "ckpt": ckpt, "seed": seed}


def describe(result: dict) -> str:
    auc = "undefined" if result["auc"] is None else f"{result['auc']:.3f}"
    layers = ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in result["auc_layers"].items())
    return (f"grouping AUC {auc} ({result['pairs']} {result['labels']}-labelled pixel pairs, {result['positives']} "
            f"same-motion, {result['images']} {result['split']} images; per layer: {layers}; {result['ckpt']})")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.grouping", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="AlexNet checkpoint (any backbones.checkpoint format, or a "
                                                 "pretraining RUN/best.pt), 'random' or 'random-rescaled'")
    p.add_argument("--data", required=True, help="folder written by pretrain.prepare")
    p.add_argument("--split", default="val", help="manifest split to score (default val; 'all': every pair)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random network and of the sampled pixels")
    p.add_argument("--pixels", type=int, default=DEFAULT_PIXELS, help="pixels sampled per image (all pairs of them)")
    p.add_argument("--layers", default=",".join(DEFAULT_LAYERS), help="comma-separated AlexNet activations")
    p.add_argument("--labels", default="auto", choices=("auto", "ids", "flow"),
                   help="same-motion ground truth: world object ids, flow thresholds, or auto (ids when every "
                        "pair has them)")
    p.add_argument("--images", type=int, help="score the first K pairs of the split (default all)")
    p.add_argument("--data-root", help="for random-rescaled: the data root whose VOC2007 trainval images rescale it")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the readable one")
    return p


def main(argv: list[str] | None = None) -> int:
    from runtime.errors import print_result

    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(1)  # small per-image passes: threads cost more than they save here
    return print_result(lambda: evaluate(args.ckpt, args.data, args.split, args.seed, args.pixels,
                                         [s for s in args.layers.split(",") if s], args.labels, args.images,
                                         args.data_root, progress=not args.json),
                        describe, args.json, errors=(ValueError, OSError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
