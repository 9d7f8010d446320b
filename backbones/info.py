"""What a checkpoint file is, on one screen, without building or running the network.

    python -m backbones.info CKPT

Prints what :func:`backbones.checkpoint.read_checkpoint` knows: the file's format (ours, a bare
AlexNet state dict, torchvision's), the family member and its layers (widths, groups, LRN,
pooling, front-end), the input spec (channel order, value range, mean, std, colour space), BatchNorm statistics (folded away when
the file is evaluated), the classifier head, the parameter count, each layer's weight shape, the
fingerprint the result records carry, and the meta the file states about itself (how it was
pretrained or rescaled). Long meta values are shortened to keep to one screen. A file that cannot
be read gives one line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from backbones.alexnet import CONV_LAYERS, FC_LAYERS
from backbones.checkpoint import Checkpoint, read_checkpoint
from runtime.errors import CheckpointError, one_line

WIDTH = 110  # characters per meta line (a fingerprint fits)


def parameter_count(ckpt: Checkpoint) -> int:
    """Learned values: every tensor but BatchNorm's running statistics and counters."""
    return sum(v.numel() for k, v in ckpt.state_dict.items()
               if not (k.startswith("bn") and (".running_" in k or k.endswith("num_batches_tracked"))))


def _line(prefix: str, value) -> str:
    """``prefix`` and ``value`` as JSON, shortened to :data:`WIDTH` characters in all."""
    text = json.dumps(value, sort_keys=True, default=str)
    room = WIDTH - len(prefix)
    if len(text) <= room:
        return prefix + text
    suffix = f" ... ({len(text)} chars)"
    return prefix + text[:max(room - len(suffix), 0)] + suffix


def describe(ckpt: Checkpoint) -> list[str]:
    """The lines ``main`` prints."""
    arch = ckpt.arch
    head = f"fc8 with {arch.num_classes} classes" if arch.num_classes else "none (headless backbone)"
    shapes = [f"{name} {'x'.join(map(str, ckpt.state_dict[f'{name}.weight'].shape))}"
              for name in CONV_LAYERS + FC_LAYERS + ("fc8",) if f"{name}.weight" in ckpt.state_dict]
    lines = [
        f"file         {ckpt.source}",
        f"format       {ckpt.source_format}",
        f"family       AlexNet, layout {arch.layout}",
        *[f"{'layers' if i == 0 else '':13}{line}" for i, line in enumerate(arch.describe()[1:])],
        f"input        {arch.input.describe()}",
        f"batchnorm    {'yes: statistics stored, folded into conv/fc when evaluated' if arch.batchnorm else 'no'}",
        f"head         {head}",
        f"parameters   {parameter_count(ckpt):,}",
        f"weights      {', '.join(shapes[:4])}",
        *([f"             {', '.join(shapes[4:])}"] if shapes[4:] else []),
        f"fingerprint  {ckpt.fingerprint}",
    ]
    if not ckpt.meta:
        lines.append("meta         none (the file says nothing about its provenance)")
    for i, (key, value) in enumerate(sorted(ckpt.meta.items())):
        if isinstance(value, dict):  # one level down, e.g. the rescaling's parameters
            lines.append(f"{'meta' if i == 0 else '':13}{key}:")
            lines += [_line(f"{'':15}{k} = ", v) for k, v in sorted(value.items())]
        else:
            lines.append(_line(f"{'meta' if i == 0 else '':13}{key} = ", value))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backbones.info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="checkpoint file (any format backbones.checkpoint reads)")
    args = parser.parse_args(argv)
    try:
        ckpt = read_checkpoint(args.ckpt)
    except (CheckpointError, FileNotFoundError, IsADirectoryError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print("\n".join(describe(ckpt)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
