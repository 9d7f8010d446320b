"""How far apart the layers' activation scales are after Krähenbühl et al.'s rescaling
(backbones.rescale), over seeds and variants of the between-layer step: the figures behind the
README's "Rescaling" paragraph and issue 14's "every layer within x2" point.

For each seed: the default random AlexNet under that seed and a sample of ``--images`` VOC2007
trainval images under ``--data-root`` chosen by it (227 centre crops, as ``backbones.rescale``);
the standard deviation of every rectified activation conv1..fc7 (:func:`backbones.rescale.activation_stds`)

* ``before``: as initialised;
* ``within``: after the within-layer step alone (``--steps within``);
* ``both``: after both steps, as ``random-rescaled`` and ``backbones.rescale random`` build it;
* ``both, best lambda``: ``both`` with every layer's weights times the one common factor lambda
  (layer k's bias times lambda**k) that brings the layers closest together; this keeps the change
  rates equal (the only freedom the between-layer goal leaves) and scales layer k's output by
  lambda**k exactly (the network is positively homogeneous), which one forward then confirms;
* ``both, per channel`` / ``both, per column``: the between-layer step with each layer's rate
  averaged over output channels / input columns (backbones.rescale.change_rates ``per``).

The spread is the largest std over the smallest. Writes ``--out``.json and ``--out``.png (std per
layer, log scale, one panel per variant family; spreads per seed beside a x2 line).

Usage: .venv/bin/python benchmarks/rescale_spread.py [--data-root demo_output/data] [--seeds 0 1 2]
       [--images 160] [--layout caffenet|torchvision] [--out docs/rescale_spread]
About 1.5 min per seed on 2 CPU cores at the defaults.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backbones import rescale as rs  # noqa: E402
from backbones.checkpoint import random_backbone  # noqa: E402
from runtime.errors import DatasetError, one_line  # noqa: E402

VARIANTS = ("before", "within", "both", "both, best lambda", "both, per channel", "both, per column")


def best_common_factor(stds: dict[str, float]) -> float:
    """The lambda minimising the spread of ``lambda**k * std_k`` (k = 1 for conv1 .. 7 for fc7):
    the spread in log space is piecewise linear in log lambda, so a fine scan finds it."""
    logs = [math.log(stds[n]) for n in rs.RECTIFIED]
    def log_spread(t: float) -> float:
        tilted = [v + k * t for k, v in enumerate(logs, start=1)]
        return max(tilted) - min(tilted)
    return math.exp(min((i / 4000 for i in range(-2000, 2001)), key=log_spread))


def measure(seed: int, data_root: str, images: int, layout: str = "caffenet") -> dict[str, dict[str, float]]:
    batch, _ = rs.sample_images(data_root, images, seed)
    base = random_backbone(seed, layout=layout).model
    out = {"before": rs.activation_stds(base, batch)}
    within, _ = rs.rescale(base, batch, seed=seed, between=False)
    out["within"] = rs.activation_stds(within, batch)
    both, _ = rs.rescale(base, batch, seed=seed)
    out["both"] = rs.activation_stds(both, batch)
    lam = best_common_factor(out["both"])
    tilted = copy.deepcopy(both)
    rs._scale_layers(tilted, torch.full((len(rs.parameter_layers(tilted)),), lam, dtype=torch.float64))
    out["both, best lambda"] = rs.activation_stds(tilted, batch)
    for per in ("channel", "column"):
        model, _ = rs.rescale(base, batch, seed=seed, rate_per=per)
        out[f"both, per {per}"] = rs.activation_stds(model, batch)
    return out


def plot(results: dict, path: Path, layout: str = "caffenet") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seeds = sorted(results, key=int)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    layers = list(rs.RECTIFIED)
    styles = {"before": ("tab:gray", "o"), "within": ("tab:green", "s"), "both": ("tab:blue", "^"),
              "both, best lambda": ("tab:purple", "v")}
    first = results[seeds[0]]
    for variant, (colour, marker) in styles.items():
        left.plot(layers, [first[variant][n] for n in layers], marker=marker, color=colour, label=variant)
    left.set_yscale("log")
    left.set_ylabel("std of the rectified activation")
    left.set_title(f"per layer, {layout} layout (seed {seeds[0]})")
    left.legend(fontsize=8)
    left.grid(alpha=0.3, which="both")
    for i, variant in enumerate(VARIANTS[1:]):
        spreads = [rs.spread(results[s][variant]) for s in seeds]
        right.scatter([i] * len(spreads), spreads, color="tab:blue", zorder=3)
    right.axhline(2.0, color="tab:red", linestyle="--", label="x2 (issue 14)")
    right.set_xticks(range(len(VARIANTS) - 1))
    right.set_xticklabels([v.replace("both, ", "both,\n") for v in VARIANTS[1:]], fontsize=8)
    right.set_ylabel("largest std / smallest std")
    right.set_title(f"spread, seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)} (before: x{min(rs.spread(results[s]['before']) for s in seeds):.0f}+)")
    right.set_ylim(0.9, None)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="demo_output/data", help="folder holding VOCdevkit/VOC2007")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=rs.DEFAULT_IMAGES)
    parser.add_argument("--layout", choices=("caffenet", "torchvision"), default="caffenet",
                        help="the random AlexNet's layout (as backbones.rescale --layout; default caffenet)")
    parser.add_argument("--out", type=Path, default=Path("docs/rescale_spread"), help="writes OUT.json and OUT.png")
    args = parser.parse_args(argv)
    start = time.time()
    results = {}
    for seed in args.seeds:
        try:
            results[str(seed)] = measure(seed, args.data_root, args.images, args.layout)
        except (DatasetError, OSError, ValueError) as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            return 2
        spreads = "  ".join(f"{v} x{rs.spread(results[str(seed)][v]):.2f}" for v in VARIANTS)
        print(f"seed {seed}: {spreads}", flush=True)
    payload = {"command": "python benchmarks/rescale_spread.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": f"{platform.node()}: {torch.get_num_threads()} threads, torch {torch.__version__}",
               "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - start),
               "data_root": args.data_root, "images": args.images, "layout": args.layout, "stds": results,
               "spread": {s: {v: rs.spread(r[v]) for v in VARIANTS} for s, r in results.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"), args.layout)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')} ({payload['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
