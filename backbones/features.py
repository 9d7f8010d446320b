"""Save a network's activations for one image, e.g. to compare against another implementation.

    python -m backbones.features --ckpt CKPT|random --image IMG --layers conv1,conv2,...,fc7
                                 [--no-resize] [--seed S] --out FEATS.npz

Each named layer is saved as it comes out of its ReLU (``convK``, ``fc6``, ``fc7``; the pooled
maps ``pool1``/``pool2``/``pool5`` may be asked for too), as float32 under its name, without the
batch dimension: conv layers ``C x H x W``, fc layers a vector of 4096. The image is fed in the
checkpoint's own input convention (its input spec: channel order, scale, mean, std, colour space;
``python -m backbones.info CKPT`` shows it), after the harnesses' test-time view: shorter side
resized to 227, centre 227 crop.

``--no-resize`` feeds the image at its own size, uncropped. fc6/fc7 then run in their dense form
(fc6 as a 6x6 convolution over pool5, fc7 as 1x1; ``AlexNet.activations(dense=True)``), the map
of the fc vectors of every 6x6 window of pool5, saved ``4096 x H' x W'``; an image too small for
one window (pool5 under 6x6, i.e. a side under 217 px) is refused rather than padded. The
file also holds ``meta``: a JSON string with the checkpoint, its fingerprint, the image, the input
size and whether fc layers are dense. Bad paths and layer names give one line and exit status 2.
"""
from __future__ import annotations

import argparse
import io
import json
import sys

import numpy as np
import torch

from backbones.alexnet import ACTIVATIONS, FC6_GRID, FC_LAYERS, AlexNet
from backbones.checkpoint import load_backbone, random_backbone
from backbones.inputs import load_input
from runtime.atomic import NoSpaceError, atomic_write
from runtime.errors import CheckpointError, DatasetError, one_line

LAYERS = tuple(n for n in ACTIVATIONS if n != "fc8")  # a backbone has no classifier to speak of
RESIZE = 227


class UsageError(ValueError):
    """A bad command-line value (a layer name); one line."""


def parse_layers(text: str) -> list[str]:
    """``"conv1,fc7"`` -> ``["conv1", "fc7"]``; unknown or empty names are a one-line error."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LAYERS]
    if unknown or not names:
        raise UsageError(f"--layers: unknown layer(s) {unknown or [text]}; choose from {','.join(LAYERS)}")
    return list(dict.fromkeys(names))


def load_model(ckpt: str, seed: int = 0) -> tuple[AlexNet, str]:
    """The plain, headless network of ``ckpt`` (a file or ``random``) in eval mode, and its fingerprint."""
    if ckpt == "random":
        loaded = random_backbone(seed)
    else:
        loaded = load_backbone(ckpt, discard=("fc8.*",))  # a classifier head, if any, is not needed
    return loaded.model.eval(), loaded.fingerprint


@torch.no_grad()
def extract(model: AlexNet, image: torch.Tensor, layers: list[str], dense: bool) -> dict[str, np.ndarray]:
    """The named activations of one normalised ``3 x H x W`` image, batch dimension dropped."""
    x = image.unsqueeze(0)
    if dense and any(n in FC_LAYERS for n in layers):
        pool5 = model.activations(x, ["pool5"])["pool5"]
        if min(pool5.shape[-2:]) < FC6_GRID:
            raise UsageError(f"the image ({image.shape[-1]}x{image.shape[-2]} px) gives a "
                             f"{pool5.shape[-1]}x{pool5.shape[-2]} pool5, smaller than fc6's {FC6_GRID}x{FC6_GRID} "
                             f"window: drop fc6/fc7 or --no-resize")
    acts = model.activations(x, layers, dense=dense)
    return {name: acts[name][0].float().numpy() for name in layers}


def save_npz(path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, meta=np.array(json.dumps(meta, sort_keys=True)))
    atomic_write(path, buffer.getbuffer())


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backbones.features", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint (any format backbones.checkpoint reads) or 'random'")
    parser.add_argument("--image", required=True, help="the image (any format PIL reads)")
    parser.add_argument("--layers", required=True, help=f"comma-separated, from {','.join(LAYERS)}")
    parser.add_argument("--no-resize", action="store_true",
                        help="feed the image at its own size (fc6/fc7 then as dense maps) instead of the "
                             "227 centre crop")
    parser.add_argument("--seed", type=int, default=0, help="seed of --ckpt random")
    parser.add_argument("--out", required=True, help="the .npz to write")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        layers = parse_layers(args.layers)
        image = load_input(args.image, None if args.no_resize else RESIZE)  # cheap checks first
        model, fp = load_model(args.ckpt, args.seed)
        arrays = extract(model, image, layers, dense=args.no_resize)
        meta = {"ckpt": args.ckpt, "fingerprint": fp, "image": args.image, "input_hw": list(image.shape[-2:]),
                "resized": not args.no_resize, "dense_fc": args.no_resize, "layers": layers}
        save_npz(args.out, arrays, meta)
    except (UsageError, CheckpointError, DatasetError, FileNotFoundError, NoSpaceError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    shapes = ", ".join(f"{n} {'x'.join(map(str, a.shape))}" for n, a in arrays.items())
    print(f"wrote {args.out}: {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
