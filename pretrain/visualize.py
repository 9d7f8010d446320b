"""Figures 2 and 4 of the paper (§3, §4.4) for a pretraining checkpoint, and the flow colour key.

    python -m pretrain.visualize --ckpt RUN/best.pt --data DIR --out FIGS [--num-images 4]

* ``fig2_kernels.png`` (Fig. 2): for one validation frame, the frame, its colour-coded flow and
  its embeddings as colours (first column); for three pixels p, the rows ``K_f(p, .)`` (eq. 2,
  with the learned sigma^2) and ``K_phi(p, .)`` over a dense grid of pixels, shown as images.
  The pixels are the grid pixels with the largest and the smallest flow and one seeded random one.
* ``fig4_embeddings.png`` (Fig. 4): for ``--num-images`` validation frames (spread evenly over the
  split), the frame, the embeddings projected 16D -> 3D by a fixed seeded Gaussian random
  projection and mapped to RGB (each channel stretched between its 1st and 99th percentile in that
  image), and the flow.
  For a direct-regression checkpoint the middle row is the predicted flow (expected bin centre
  per component) colour-coded like the measured one, and Fig. 2 is not drawn (no embedding).
* ``flow_color_wheel.png``: the colour key (hue = direction, saturation = magnitude).

Both figures put the same network at random initialisation beside the trained one (as the paper's
Fig. 5 does for neurons; ``--no-random`` leaves it out): Fig. 4 gets a row of the random network's
outputs under the same projection, Fig. 2 a row of its ``K_phi(p, .)``. The random network is
:func:`pretrain.model.build_model` of the checkpoint's method and head under ``--seed`` (what
``pretrain.proxy --ckpt random`` scores), in evaluation mode, so what training added is visible.

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


def fig4_rows(method: str, random_init: bool) -> list[str]:
    """Row titles of Fig. 4, top to bottom."""
    middle = "embedding (random 16D->3D)" if method == "cpfs" else "predicted flow (direct reg.)"
    return ["frame", middle] + (["random init: " + middle.split(" (")[0]] if random_init else []) + ["flow"]


def fig2_rows(random_init: bool) -> list[str]:
    """Row titles of Fig. 2 (kernel columns), top to bottom."""
    return ["frame", "K_f(p, .)", "K_phi(p, .)"] + (["K_phi(p, .) random init"] if random_init else [])


def random_counterpart(net, cfg: dict, seed: int):
    """The checkpoint's network at random initialisation under ``seed`` (eval mode); the global
    RNG is left as it was."""
    from pretrain.model import build_model
    options = {k: cfg[k] for k in ("hidden", "layers") if k in cfg}
    if net.method == "cpfs" and "embedding_dim" in cfg:
        options["embedding_dim"] = cfg["embedding_dim"]
    if net.method == "direct" and "num_bins" in cfg:
        options["num_bins"] = cfg["num_bins"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(net.method, **options).eval()


def visualize(ckpt: str, data: str, out: str, num_images: int = 4, stride: int = 4, split: str = "val",
              seed: int = 0, random_init: bool = True) -> dict:
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

    untrained = random_counterpart(net, cfg, seed) if random_init else None

    def middle_row(model, outputs):
        if model.method == "cpfs":
            return to_rgb((outputs @ projection).numpy()).reshape(*grid_shape, 3)
        pred = expected_flow(outputs[:, :model.num_bins], outputs[:, model.num_bins:]).numpy()
        return flow_to_color(pred.reshape(*grid_shape, 2), max_norm=max(np.abs(pred).max(), 1e-6))

    frames = []
    # spread over the split (consecutive pairs usually come from one video)
    for index in np.unique(np.linspace(0, len(dataset) - 1, min(num_images, len(dataset))).round().astype(int)):
        item = dataset[int(index)]
        outputs = dense_outputs(net, item["image"], positions)
        flow_map = item["flow_map"].permute(1, 2, 0).numpy()  # (H, W, 2) normalised, eq. (6)
        valid_map = item["valid_map"].numpy()
        flow_grid = flow_map[positions[:, 0], positions[:, 1]]
        valid_grid = valid_map[positions[:, 0], positions[:, 1]]
        flow_rgb = flow_to_color(np.where(valid_map[..., None], flow_map, np.nan))
        entry = dict(frame=frame_to_rgb(item["image"]), middle=middle_row(net, outputs), flow=flow_rgb,
                     outputs=outputs, flow_grid=flow_grid, valid_grid=valid_grid)
        if untrained is not None:
            entry["random_outputs"] = dense_outputs(untrained, item["image"], positions)
            entry["random_middle"] = middle_row(untrained, entry["random_outputs"])
        frames.append(entry)

    # Fig. 4: frames, embeddings as colours (trained, then random init), flow.
    n = len(frames)
    titles = fig4_rows(net.method, untrained is not None)
    keys = ["frame", "middle"] + (["random_middle"] if untrained is not None else []) + ["flow"]
    fig, axes = plt.subplots(len(keys), n, figsize=(2.6 * n, 2.6 * len(keys)), squeeze=False)
    for col, f in enumerate(frames):
        for row, (key, title) in enumerate(zip(keys, titles)):
            ax = axes[row, col]
            ax.imshow(f[key], interpolation="nearest", extent=(0, crop, crop, 0))
            ax.set_xticks([]), ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.suptitle(f"Fig. 4: per-pixel outputs of {os.path.basename(ckpt)} (stride {stride})", fontsize=9)
    fig.tight_layout()
    written["fig4"] = str(out_dir / "fig4_embeddings.png")
    fig.savefig(written["fig4"], dpi=100)
    plt.close(fig)

    # Fig. 2: kernel rows K_f(p, .) and K_phi(p, .) (trained, then random init) for three pixels
    # of the first frame.
    if net.method == "cpfs":
        f = frames[0]
        flows = torch.from_numpy(f["flow_grid"])[None]
        k_f = flow_kernel(flows, sigma2)[0].numpy()
        kernels = [(k_f, "K_f(p, .)"), (embedding_kernel(f["outputs"][None])[0].numpy(), "K_phi(p, .)")]
        if untrained is not None:
            kernels.append((embedding_kernel(f["random_outputs"][None])[0].numpy(), "K_phi(p, .) random init"))
        pixels = _pick_pixels(f["flow_grid"], f["valid_grid"], seed)
        invalid = ~f["valid_grid"].reshape(grid_shape)
        rows = 1 + len(kernels)
        fig, axes = plt.subplots(rows, 4, figsize=(10.4, 2.6 * rows))
        first = ((f["frame"], "frame"), (f["flow"], "flow"), (f["middle"], "embedding"))
        if untrained is not None:
            first += ((f["random_middle"], "embedding, random init"),)
        for row, (img, title) in enumerate(first):
            axes[row, 0].imshow(img, interpolation="nearest", extent=(0, crop, crop, 0))
            axes[row, 0].set_ylabel(title, fontsize=8)
        for col, p in enumerate(pixels, start=1):
            y, x = positions[p].tolist()
            axes[0, col].imshow(f["frame"])
            axes[0, col].set_title(f"p = (y {y}, x {x})", fontsize=8)
            for row, (kernel, name) in enumerate(kernels, start=1):
                image = np.ma.masked_array(kernel[p].reshape(grid_shape), mask=invalid if row == 1 else None)
                axes[row, col].imshow(image, cmap="viridis", interpolation="nearest", extent=(0, crop, crop, 0))
                axes[row, col].set_title(name, fontsize=8)
            for row in range(rows):
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
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random projection, the random pixel and the random-initialisation network")
    p.add_argument("--no-random", action="store_true",
                   help="leave out the random-initialisation rows (Fig. 2, Fig. 4)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        written = visualize(args.ckpt, args.data, args.out, args.num_images, args.stride, args.split, args.seed,
                            random_init=not args.no_random)
    except (ValueError, OSError) as err:  # CheckpointError and DatasetError are ValueErrors
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(json.dumps(written, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
