"""Figures 2 and 4 of the paper (§3, §4.4) for a pretraining checkpoint, and the flow colour key.

    python -m pretrain.visualize --ckpt RUN/best.pt --data DIR --out FIGS [--num-images 4]

* ``fig2_kernels.png`` (Fig. 2): for one validation frame, the frame, its colour-coded flow and
  its embeddings as colours (first column); for three pixels p, the rows ``K_f(p, .)`` (eq. 2,
  with the learned sigma^2) and ``K_phi(p, .)`` over a dense grid of pixels, shown as images.
  The pixels are the grid pixels with the largest and the smallest flow and one seeded random one.
* ``fig4_embeddings.png`` (Fig. 4): for ``--num-images`` validation frames, the frame, the
  embeddings projected 16D -> 3D by a fixed seeded Gaussian random projection and mapped to RGB
  (each channel stretched between its 1st and 99th percentile in that image), and the flow.
  For a direct-regression checkpoint the middle row is the predicted flow (expected bin centre
  per component) colour-coded like the measured one, and Fig. 2 is not drawn (no embedding).
* ``flow_color_wheel.png``: the colour key (hue = direction, saturation = magnitude).

Embeddings are computed at every pixel of a stride ``--stride`` grid (4 by default, the
resolution of conv1) from one backbone pass per frame, through the same hypercolumn + MLP as
in training. Frames come from the manifest's validation split in the evaluation view (centre
crop, no flip), so the figures are reproducible.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backbones.alexnet import IMAGENET_MEAN, IMAGENET_STD
from pretrain.data import FlowPairDataset
from pretrain.flow import color_wheel_image, flow_to_color
from pretrain.loss import embedding_kernel, flow_kernel
from pretrain.model import load_pretrain_checkpoint
from runtime.errors import one_line


def dense_grid(size: int, stride: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(y, x) int64 positions of a stride-``stride`` grid over a ``size`` square, row-major, and its shape."""
    coords = torch.arange(stride // 2, size, stride)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1), (len(coords), len(coords))


@torch.no_grad()
def dense_outputs(net, image: torch.Tensor, positions: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """The network's per-pixel outputs at ``positions (N, 2)`` of one image, (N, out_dim): one
    backbone pass, the hypercolumn + MLP in chunks. CPFS embeddings are L2-normalised."""
    acts = net.activations(image[None])
    parts = [net.head.forward_sampled(acts, positions[i:i + chunk][None], net.geometry)[0]
             for i in range(0, len(positions), chunk)]
    out = torch.cat(parts)
    return F.normalize(out, dim=-1) if net.method == "cpfs" else out


def random_projection(dim: int, seed: int = 0) -> torch.Tensor:
    """A fixed Gaussian ``dim x 3`` projection (§4.4: "random projections" to RGB)."""
    return torch.randn(dim, 3, generator=torch.Generator().manual_seed(seed))


def to_rgb(values: np.ndarray) -> np.ndarray:
    """(..., 3) values -> [0, 1] colours, each channel stretched between its 1st and 99th percentile."""
    flat = values.reshape(-1, 3)
    lo, hi = np.percentile(flat, 1, axis=0), np.percentile(flat, 99, axis=0)
    return np.clip((values - lo) / np.maximum(hi - lo, 1e-8), 0.0, 1.0)


def expected_flow(logits_x: torch.Tensor, logits_y: torch.Tensor) -> torch.Tensor:
    """Direct regression: the expected bin centre of each component, (N, 2) in [-1, 1]."""
    bins = logits_x.shape[-1]
    centres = -1.0 + (torch.arange(bins, dtype=torch.float32) + 0.5) * (2.0 / bins)
    return torch.stack([logits_x.softmax(-1) @ centres, logits_y.softmax(-1) @ centres], dim=-1)


def frame_to_rgb(image: torch.Tensor) -> np.ndarray:
    """Undo the dataset's ImageNet normalisation: (3, H, W) -> (H, W, 3) in [0, 1]."""
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    return np.clip(image.permute(1, 2, 0).numpy() * std + mean, 0.0, 1.0)


def _pick_pixels(flow_grid: np.ndarray, valid_grid: np.ndarray, seed: int) -> list[int]:
    """Grid indices of the largest and smallest valid flow and a seeded random valid pixel."""
    magnitude = np.where(valid_grid, np.hypot(flow_grid[:, 0], flow_grid[:, 1]), np.nan)
    largest, smallest = int(np.nanargmax(magnitude)), int(np.nanargmin(magnitude))
    candidates = [i for i in np.flatnonzero(valid_grid) if i not in (largest, smallest)] or [largest]
    return [largest, smallest, int(np.random.default_rng(seed).choice(candidates))]


def visualize(ckpt: str, data: str, out: str, num_images: int = 4, stride: int = 4, split: str = "val",
              seed: int = 0) -> dict:
    """Write the figures for checkpoint ``ckpt`` on frames of ``data``; returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    net, sigma2, raw = load_pretrain_checkpoint(ckpt)
    cfg = raw.get("config", {})
    dataset = FlowPairDataset(data, split, crop=cfg.get("crop", 224), num_pixels=1,
                              max_magnitude=cfg.get("max_magnitude", 56.0), seed=cfg.get("seed", 0),
                              train=False, return_flow_map=True)
    if len(dataset) == 0:
        raise ValueError(f"{data}: the manifest has no {split!r} pairs to visualise")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    crop = dataset.crop
    positions, grid_shape = dense_grid(crop, stride)
    projection = random_projection(net.head.fc2.out_features, seed)
    written = {}

    frames = []
    for index in range(min(num_images, len(dataset))):
        item = dataset[index]
        outputs = dense_outputs(net, item["image"], positions)
        flow_map = item["flow_map"].permute(1, 2, 0).numpy()  # (H, W, 2) normalised, eq. (6)
        valid_map = item["valid_map"].numpy()
        flow_grid = flow_map[positions[:, 0], positions[:, 1]]
        valid_grid = valid_map[positions[:, 0], positions[:, 1]]
        if net.method == "cpfs":
            middle = to_rgb((outputs @ projection).numpy()).reshape(*grid_shape, 3)
        else:
            pred = expected_flow(outputs[:, :net.num_bins], outputs[:, net.num_bins:]).numpy()
            middle = flow_to_color(pred.reshape(*grid_shape, 2), max_norm=max(np.abs(pred).max(), 1e-6))
        flow_rgb = flow_to_color(np.where(valid_map[..., None], flow_map, np.nan))
        frames.append(dict(frame=frame_to_rgb(item["image"]), middle=middle, flow=flow_rgb, outputs=outputs,
                           flow_grid=flow_grid, valid_grid=valid_grid))

    # Fig. 4: frames, embeddings as colours, flow.
    n = len(frames)
    fig, axes = plt.subplots(3, n, figsize=(2.6 * n, 7.8), squeeze=False)
    middle_title = "embedding (random 16D->3D)" if net.method == "cpfs" else "predicted flow (direct reg.)"
    for col, f in enumerate(frames):
        for row, (img, title) in enumerate(((f["frame"], "frame"), (f["middle"], middle_title), (f["flow"], "flow"))):
            ax = axes[row, col]
            ax.imshow(img, interpolation="nearest", extent=(0, crop, crop, 0))
            ax.set_xticks([]), ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.suptitle(f"Fig. 4: per-pixel outputs of {os.path.basename(ckpt)} (stride {stride})", fontsize=9)
    fig.tight_layout()
    written["fig4"] = str(out_dir / "fig4_embeddings.png")
    fig.savefig(written["fig4"], dpi=100)
    plt.close(fig)

    # Fig. 2: kernel rows K_f(p, .) and K_phi(p, .) for three pixels of the first frame.
    if net.method == "cpfs":
        f = frames[0]
        flows = torch.from_numpy(f["flow_grid"])[None]
        k_f = flow_kernel(flows, sigma2)[0].numpy()
        k_phi = embedding_kernel(f["outputs"][None])[0].numpy()
        pixels = _pick_pixels(f["flow_grid"], f["valid_grid"], seed)
        invalid = ~f["valid_grid"].reshape(grid_shape)
        fig, axes = plt.subplots(3, 4, figsize=(10.4, 7.8))
        first = ((f["frame"], "frame"), (f["flow"], "flow"), (f["middle"], "embedding"))
        for row, (img, title) in enumerate(first):
            axes[row, 0].imshow(img, interpolation="nearest", extent=(0, crop, crop, 0))
            axes[row, 0].set_ylabel(title, fontsize=8)
        for col, p in enumerate(pixels, start=1):
            y, x = positions[p].tolist()
            axes[0, col].imshow(f["frame"])
            axes[0, col].set_title(f"p = (y {y}, x {x})", fontsize=8)
            for row, (kernel, name) in enumerate(((k_f, "K_f(p, .)"), (k_phi, "K_phi(p, .)")), start=1):
                image = np.ma.masked_array(kernel[p].reshape(grid_shape), mask=invalid if row == 1 else None)
                axes[row, col].imshow(image, cmap="viridis", interpolation="nearest", extent=(0, crop, crop, 0))
                axes[row, col].set_title(name, fontsize=8)
            for row in range(3):
                axes[row, col].plot([x], [y], marker="+", color="red", markersize=10, mew=2)
        for ax in axes.ravel():
            ax.set_xticks([]), ax.set_yticks([])
        fig.suptitle(f"Fig. 2: flow and embedding kernels (sigma^2 = {sigma2:.4g})", fontsize=9)
        fig.tight_layout()
        written["fig2"] = str(out_dir / "fig2_kernels.png")
        fig.savefig(written["fig2"], dpi=100)
        plt.close(fig)

    wheel = out_dir / "flow_color_wheel.png"
    plt.imsave(wheel, color_wheel_image(256))
    written["color_wheel"] = str(wheel)
    return written


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.visualize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="pretraining checkpoint (RUN/best.pt or RUN/last.pt)")
    p.add_argument("--data", required=True, help="folder written by pretrain.prepare")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--num-images", type=int, default=4, help="validation frames in Fig. 4")
    p.add_argument("--stride", type=int, default=4, help="grid stride in pixels for the dense embeddings")
    p.add_argument("--split", default="val", help="manifest split to take frames from")
    p.add_argument("--seed", type=int, default=0, help="seed of the random projection and the random pixel")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        written = visualize(args.ckpt, args.data, args.out, args.num_images, args.stride, args.split, args.seed)
    except (ValueError, OSError) as err:  # CheckpointError and DatasetError are ValueErrors
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(json.dumps(written, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
