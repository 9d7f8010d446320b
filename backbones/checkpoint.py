"""Reading and writing AlexNet weights without ever dropping one silently.

Accepted sources, detected from the file's content:

* our checkpoints: a dict ``{"format": "cpfs-bench/...", "arch": {...}, "state_dict": {...}}``
  (the plain export of ``pretrain.export``, or a pretraining checkpoint, whose AlexNet weights sit
  under ``state_dict`` and whose BN statistics are folded in when a plain network is asked for);
* a bare AlexNet state dict in our key names (``conv1.weight`` ... ``fc8.bias``);
* a torchvision AlexNet ``state_dict`` (``features.0.weight`` ... ``classifier.6.bias``), mapped
  to our names; also inside ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and with a DDP
  ``module.`` prefix.

Loading is strict: every target key must come from the source and every source key must be used,
with equal shapes, unless the caller names the keys that may be missing (a new classifier head)
or that are deliberately discarded (the old one). Problems are listed by key name in one error.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

import dataclasses
import json

from backbones.alexnet import AlexNet, AlexNetArch, arch_from_dict, fold_batchnorm
from runtime.atomic import atomic_torch_save  # noqa: F401  (re-exported)
from runtime.errors import CheckpointError  # noqa: F401  (re-exported)
from runtime.safe_load import safe_torch_load

FORMAT_PREFIX = "cpfs-bench/"
EXPORT_FORMAT = "cpfs-bench/alexnet"

# torchvision.models.alexnet module indices -> our layer names
TORCHVISION_KEYS = {
    "features.0": "conv1", "features.3": "conv2", "features.6": "conv3", "features.8": "conv4",
    "features.10": "conv5", "classifier.1": "fc6", "classifier.4": "fc7", "classifier.6": "fc8",
}


@dataclass
class Checkpoint:
    """AlexNet weights read from a file, in our key names."""

    source: str
    arch: AlexNetArch
    state_dict: dict[str, torch.Tensor]
    source_format: str  # "cpfs-bench/...", "alexnet-state-dict" or "torchvision-state-dict"
    meta: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.state_dict, self.arch)


def arch_identity(arch: AlexNetArch | None) -> str | None:
    """What of ``arch`` changes the network's output beyond its tensors, as text; ``None`` for
    the two members the project began with (``caffenet``/``torchvision`` with the canonical
    input), whose fingerprints therefore stay what they always were. Two files with the same
    weights but another input spec, LRN or pooling are different networks and must not share a
    fingerprint (a finished record of one would otherwise be taken for the other's)."""
    if arch is None:
        return None
    plain = dataclasses.replace(arch, num_classes=None, dropout=0.5, batchnorm=False)
    if arch.layout in ("caffenet", "torchvision") and plain == AlexNetArch(arch.layout) \
            and arch.input.mean_image is None:
        return None
    described = plain.to_dict()
    del described["layout"], described["num_classes"], described["dropout"], described["batchnorm"]
    if not described["relu_slope"]:  # plain ReLU: as before the field existed (fingerprints unchanged)
        del described["relu_slope"]
    image = arch.input.mean_image
    if image is not None:
        described["input"]["mean_image"] = hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()
    return json.dumps(described, sort_keys=True)


def fingerprint(state_dict: Mapping[str, torch.Tensor], arch: AlexNetArch | None = None) -> str:
    """sha256 over the sorted key names, dtypes, shapes and raw bytes of every tensor, and over
    :func:`arch_identity` when the architecture or the input convention is not a plain original."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    identity = arch_identity(arch)
    if identity is not None:
        digest.update(b"arch|" + identity.encode())
    return digest.hexdigest()


# --- reading ---------------------------------------------------------------------------------------

def _torch_load(path: Path):
    return safe_torch_load(path)


def _strip_prefix(state: Mapping, prefix: str) -> dict:
    if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _infer_arch(path: Path, state: Mapping[str, torch.Tensor], layout: str | None = None) -> AlexNetArch:
    if "conv1.weight" not in state:
        raise CheckpointError(path, f"not an AlexNet state dict (no conv1.weight; keys start with "
                                    f"{sorted(state)[:3]})")
    if layout is None:
        channels = state["conv1.weight"].shape[0]
        layout = {96: "caffenet", 64: "torchvision"}.get(channels)
        if layout is None:
            raise CheckpointError(path, f"wrong architecture: conv1 has {channels} filters, "
                                        f"expected 96 (caffenet) or 64 (torchvision)")
    fc8 = state.get("fc8.weight")
    return AlexNetArch(layout=layout, batchnorm="bn1.running_mean" in state,
                       num_classes=int(fc8.shape[0]) if fc8 is not None else None)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read any accepted source (see module docstring) into our key names, without building a model."""
    path = Path(path)
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("format"), str) and obj["format"].startswith(FORMAT_PREFIX):
        if not isinstance(obj.get("arch"), Mapping) or not _is_state_dict(obj.get("state_dict")):
            raise CheckpointError(path, f"{obj['format']} checkpoint without 'arch' and 'state_dict'")
        try:
            arch = arch_from_dict(obj["arch"])
        except (TypeError, ValueError) as err:
            raise CheckpointError(path, f"bad 'arch' entry ({err})") from None
        ckpt = Checkpoint(str(path), arch, dict(obj["state_dict"]), obj["format"], dict(obj.get("meta") or {}))
        recorded = obj.get("fingerprint")
        if recorded and recorded != ckpt.fingerprint:
            raise CheckpointError(path, "tensor contents do not match the fingerprint recorded in the file "
                                        "(corrupted or edited)")
        return ckpt
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and _is_state_dict(obj.get(wrapper)):
            obj = obj[wrapper]
            break
    if not _is_state_dict(obj):
        raise CheckpointError(path, f"not a checkpoint: contains a {type(obj).__name__}, expected a state dict "
                                    f"or a cpfs-bench checkpoint")
    state = _strip_prefix(obj, "module.")
    if any(k.startswith("features.") for k in state):
        mapped = {}
        for key, value in state.items():
            module, _, param = key.rpartition(".")
            if module not in TORCHVISION_KEYS:
                raise CheckpointError(path, f"unexpected key {key!r} for a torchvision AlexNet state dict")
            mapped[f"{TORCHVISION_KEYS[module]}.{param}"] = value
        return Checkpoint(str(path), _infer_arch(path, mapped, "torchvision"), mapped, "torchvision-state-dict")
    return Checkpoint(str(path), _infer_arch(path, state), state, "alexnet-state-dict")


# --- strict loading --------------------------------------------------------------------------------

def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                           source: str = "<state dict>", allow_missing: Sequence[str] = (),
                           discard: Sequence[str] = ()) -> dict:
    """Copy ``state_dict`` into ``model``; every difference must be declared.

    ``allow_missing``: glob patterns of model keys that may be absent from the source (they keep
    their fresh initialisation). ``discard``: patterns of source keys that are deliberately not
    used. Anything else missing, unexpected or of another shape raises :class:`CheckpointError`
    listing the keys. Returns ``{"loaded": [...], "missing": [...], "discarded": [...]}``.
    """
    target = model.state_dict()
    source_keys = [k for k in state_dict if not _matches(k, discard)]
    discarded = sorted(k for k in state_dict if _matches(k, discard))
    missing = sorted(k for k in target if k not in source_keys)
    unexpected = sorted(k for k in source_keys if k not in target)
    mismatched = sorted(f"{k} {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}"
                        for k in source_keys if k in target and state_dict[k].shape != target[k].shape)
    undeclared = [k for k in missing if not _matches(k, allow_missing)]
    problems = []
    if undeclared:
        problems.append(f"missing keys {undeclared}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatch {mismatched}")
    if problems:
        raise CheckpointError(source, "wrong architecture: " + "; ".join(problems))
    loaded = [k for k in source_keys if k in target]
    with torch.no_grad():
        for key in loaded:
            target[key].copy_(state_dict[key])
    return {"loaded": loaded, "missing": missing, "discarded": discarded}


@dataclass
class LoadedBackbone:
    model: AlexNet
    fingerprint: str  # of the checkpoint's tensors as stored (after key renaming)
    source: str
    source_format: str
    report: dict  # loaded / missing / discarded keys, and whether BN was folded
    meta: dict


def load_backbone(path: str | os.PathLike, *, num_classes: int | None = None, batchnorm: bool = False,
                  allow_missing: Sequence[str] = (), discard: Sequence[str] = (),
                  dropout: float = 0.5) -> LoadedBackbone:
    """Build an AlexNet of the checkpoint's layout and load it strictly.

    ``num_classes`` sets the fc8 of the returned model (``None``: no head); a head that is new
    must be declared in ``allow_missing`` (e.g. ``("fc8.*",)``) and an old head that is dropped in
    ``discard``. A checkpoint with BN statistics is folded into a plain network unless
    ``batchnorm=True`` asks to keep BN.
    """
    ckpt = read_checkpoint(path)
    bad = [k for k, v in ckpt.state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # found now, not as a NaN loss at step 1
        raise CheckpointError(path, f"non-finite values (NaN or inf) in {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    source_arch = ckpt.arch
    model = AlexNet(arch=dataclasses.replace(source_arch, num_classes=num_classes, dropout=dropout))
    report = load_state_dict_strict(model, ckpt.state_dict, source=ckpt.source,
                                    allow_missing=allow_missing, discard=discard)
    report["folded_batchnorm"] = False
    if source_arch.batchnorm and not batchnorm:
        model = fold_batchnorm(model)
        report["folded_batchnorm"] = True
    elif batchnorm and not source_arch.batchnorm:
        raise CheckpointError(path, "a BatchNorm network was asked for but the checkpoint has no BN statistics")
    return LoadedBackbone(model, ckpt.fingerprint, ckpt.source, ckpt.source_format, report, ckpt.meta)


def random_backbone(seed: int, *, layout: str = "caffenet", num_classes: int | None = None,
                    dropout: float = 0.5) -> LoadedBackbone:
    """The random-initialisation row: PyTorch's default init under ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AlexNet(layout, num_classes=None, dropout=dropout)
    backbone_fp = fingerprint(model.state_dict())
    if num_classes:
        full = AlexNet(layout, num_classes=num_classes, dropout=dropout)
        load_state_dict_strict(full, model.state_dict(), source=f"random(seed={seed})", allow_missing=("fc8.*",))
        model = full
    return LoadedBackbone(model, backbone_fp, f"random(seed={seed})", "random-init",
                          {"loaded": [], "missing": list(model.state_dict()), "discarded": [],
                           "folded_batchnorm": False}, {"seed": seed})


# --- writing ---------------------------------------------------------------------------------------

def save_backbone(model: AlexNet, path: str | os.PathLike, meta: Mapping | None = None) -> str:
    """Write ``model`` as a plain cpfs-bench AlexNet checkpoint; returns its fingerprint."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    fp = fingerprint(state, model.arch)
    atomic_torch_save({"format": EXPORT_FORMAT, "version": 1, "arch": model.arch.to_dict(),
                       "state_dict": state, "fingerprint": fp, "meta": dict(meta or {})}, path)
    return fp
