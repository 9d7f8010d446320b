"""Export a pretrained AlexNet as the plain network the benchmarks load.

The paper pretrains with parameter-free BatchNorm after every conv/fc and absorbs the BN
statistics into the weights afterwards (§4.3; protocols.md P1), so the evaluated AlexNet has no
BN layers. ``python -m pretrain.export CKPT OUT`` does that and prints the new fingerprint.
"""
from __future__ import annotations

import argparse
import os
import sys

from backbones.alexnet import fold_batchnorm
from backbones.checkpoint import CheckpointError, load_backbone, save_backbone
from runtime.errors import one_line

__all__ = ["fold_batchnorm", "export", "main"]


def export(checkpoint: str, out: str, extra_meta: dict | None = None) -> str:
    """Fold BN of ``checkpoint`` (any format ``backbones.checkpoint`` reads) and write a plain
    AlexNet to ``out``; returns the exported fingerprint. The pretraining head (hypercolumn MLP)
    is not part of the AlexNet state and is left behind, as the paper discards it (§4.5).

    The checkpoint's ``meta`` (how it was pretrained: method, preset, step, overrides, data
    hashes) is kept, so every evaluation record of the export can state it; ``extra_meta`` adds values
    the source file cannot know (pretrain.train: how many steps the whole run took)."""
    if os.path.isdir(checkpoint):  # would otherwise surface as an IsADirectoryError from open()
        raise CheckpointError(checkpoint, "is a directory, not a checkpoint file")
    if os.path.isdir(out):
        raise CheckpointError(out, "is a directory: give the path of the .pt file to write")
    loaded = load_backbone(checkpoint, discard=("fc8.*",))
    meta = dict(loaded.meta)
    meta.update(extra_meta or {})
    meta.update(exported_from=loaded.source, source_fingerprint=loaded.fingerprint,
                folded_batchnorm=loaded.report["folded_batchnorm"])
    return save_backbone(loaded.model.eval(), out, meta=meta)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="pretraining checkpoint (or any AlexNet checkpoint) to export")
    parser.add_argument("out", help="where to write the plain AlexNet checkpoint (.pt)")
    args = parser.parse_args(argv)
    try:
        fp = export(args.checkpoint, args.out)
    except (CheckpointError, ValueError, OSError) as err:  # bad input file, full disk, unwritable out
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}  fingerprint {fp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
