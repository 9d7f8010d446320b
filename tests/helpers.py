"""Helpers shared by test files (not fixtures)."""
from __future__ import annotations

import torch


def pretrain_tensors(path) -> tuple[dict, dict]:
    """A pretraining checkpoint and every tensor in it, flat: backbone, head, sigma, Adam state."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    flat = {f"backbone.{k}": v for k, v in ckpt["state_dict"].items()}
    flat.update({f"head.{k}": v for k, v in ckpt["head"].items()})
    flat.update({f"sigma.{k}": v for k, v in ckpt["sigma"].items()})
    for pid, state in ckpt["optimizer"]["state"].items():
        flat.update({f"adam.{pid}.{k}": v for k, v in state.items()})
    return ckpt, flat
