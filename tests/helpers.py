"""Helpers shared by test files (not fixtures)."""
from __future__ import annotations

from pathlib import Path

import torch


def voc07(root) -> Path:
    """The VOC2007 folder of a generated data root."""
    return Path(root) / "VOCdevkit" / "VOC2007"


def pretrain_tensors(path) -> tuple[dict, dict]:
    """A pretraining checkpoint and every tensor in it, flat: backbone, head, sigma, Adam state."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    flat = {f"backbone.{k}": v for k, v in ckpt["state_dict"].items()}
    flat.update({f"head.{k}": v for k, v in ckpt["head"].items()})
    flat.update({f"sigma.{k}": v for k, v in ckpt["sigma"].items()})
    for pid, state in ckpt["optimizer"]["state"].items():
        flat.update({f"adam.{pid}.{k}": v for k, v in state.items()})
    return ckpt, flat
