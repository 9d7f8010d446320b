"""What every benchmark harness shares: seeded data order, an iteration-based training loop with
exact checkpoint/resume, TensorBoard + progress bar, DDP setup, and writing the result record.

Exact resume rests on three rules: (1) the data order of epoch ``e`` is a permutation seeded by
``(seed, e)``; (2) every random augmentation of sample ``i`` in epoch ``e`` draws from a generator
seeded by ``(seed, e, i)``, so it does not depend on worker processes; (3) a checkpoint stores the
step, the position in the epoch, model/optimiser/scheduler states and torch's RNG (dropout).
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from backbones.checkpoint import LoadedBackbone, load_backbone, random_backbone
from results import store
from runtime.atomic import atomic_torch_save, remove_stale_temps
from runtime.errors import CheckpointError, RunError
from runtime.safe_load import safe_torch_load

# --- distributed -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Initialise torch.distributed from torchrun's or SLURM's environment; single process otherwise."""
    env = os.environ
    if "WORLD_SIZE" in env and int(env["WORLD_SIZE"]) > 1:  # torchrun / submitit helpers
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return DistInfo(rank, world, local)


def pick_device(requested: str = "auto", info: DistInfo = DistInfo()) -> torch.device:
    if requested == "auto":
        return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(requested)


# --- seeded data order and augmentation ------------------------------------------------------------

def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for every random choice made for sample ``index`` in ``epoch``."""
    return np.random.default_rng([seed, epoch, index])


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` forever: a fresh permutation per epoch seeded by ``(seed, epoch)``,
    starting at ``(start_epoch, start_offset)``; with several ranks each takes every world-th item."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, start_epoch: int = 0, start_offset: int = 0,
                 info: DistInfo = DistInfo()):
        if size == 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.start_epoch, self.start_offset, self.info = start_epoch, start_offset, info

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = self.start_epoch, self.start_offset
        while True:
            mine = self.order(epoch)[self.info.rank::self.info.world_size]
            for index in mine[offset:]:
                yield epoch, int(index)
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # per epoch and rank
        return math.ceil(self.size / self.info.world_size)


class Augmented(Dataset):
    """``base[i]`` passed through ``transform(sample, rng)`` with the rng of :func:`sample_rng`.
    Indexed by ``(epoch, index)`` (training) or by a plain ``index`` (evaluation, epoch 0)."""

    def __init__(self, base: Dataset, transform: Callable[[Any, np.random.Generator], Any], seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.transform(self.base[index], sample_rng(self.seed, epoch, index))


def training_loader(dataset: Dataset, batch_size: int, seed: int, workers: int, start_epoch: int = 0,
                    start_offset: int = 0, info: DistInfo = DistInfo(), collate_fn=None) -> DataLoader:
    sampler = EpochSampler(len(dataset), seed, True, start_epoch, start_offset, info)
    # The loader gets a generator of its own: creating an iterator would otherwise draw from
    # torch's global RNG (which drives dropout) and a resumed run would diverge.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))



def loader_factory(dataset: Dataset, batch_size: int, config, info: DistInfo, collate_fn=None):
    """``make_loader(epoch, offset)`` for :meth:`Trainer.run`: :func:`training_loader` with the
    harness config's seed and worker count."""
    return lambda epoch, offset: training_loader(dataset, batch_size, config.seed, config.workers, epoch, offset,
                                                 info, collate_fn=collate_fn)

# --- the training loop -----------------------------------------------------------------------------

# Preemption: slurm.runner's SIGUSR2 handler sets PREEMPTION while a Trainer loop runs (TRAINING);
# the loop then saves after the step in progress and raises Preempted, and the job requeues.
PREEMPTION = threading.Event()
TRAINING = threading.Event()


class Preempted(Exception):
    """Raised by a training loop (Trainer.run, pretrain.train) once it has saved a checkpoint
    because PREEMPTION was set."""


def preemption_requested(info: DistInfo) -> bool:
    """Whether PREEMPTION is set on any rank (an all-reduce under DDP, so every rank stops after
    the same step)."""
    requested = PREEMPTION.is_set()
    if info.world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([float(requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        requested = bool(flag.item())
    return requested


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    offset: int = 0  # samples of `epoch` already consumed by this rank


class Trainer:
    """Iteration-based training with a checkpoint every ``checkpoint_every`` steps.

    ``step_fn(batch) -> (loss tensor, {name: float})`` computes the loss of one batch; the trainer
    does backward, clipping, the optimiser and scheduler steps, logging and checkpoints.
    """

    def __init__(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, total_steps: int,
                 work_dir: Path, checkpoint_every: int, log_every: int = 20, grad_clip: float | None = None,
                 info: DistInfo = DistInfo(), description: str = "train", trainable: Sequence | None = None,
                 identity: Mapping | None = None):
        """``identity``: what makes this run this run (:func:`run_identity`); stored in every checkpoint
        and compared on resume, so a checkpoint of another configuration is never continued."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.identity = dict(identity) if identity is not None else None
        self.total_steps, self.work_dir = total_steps, Path(work_dir)
        self.checkpoint_every, self.log_every, self.grad_clip = checkpoint_every, log_every, grad_clip
        self.info, self.description = info, description
        self.trainable = list(trainable) if trainable is not None else [p for p in model.parameters() if p.requires_grad]
        self.state = TrainState()
        self._saved_step: int | None = None  # the step of the checkpoint on disk, if any
        self.writer = None
        if info.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.work_dir / "tensorboard"))

    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / "checkpoint.pt"

    def save(self) -> None:
        if not self.info.is_main:
            return
        module = getattr(self.model, "module", self.model)
        atomic_torch_save({"model": module.state_dict(), "optimizer": self.optimizer.state_dict(),
                           "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                           "state": asdict(self.state), "torch_rng": torch.get_rng_state(),
                           "run": self.identity}, self.checkpoint_path)
        self._saved_step = self.state.step

    def resume(self) -> bool:
        """Restore the last checkpoint if there is one; returns whether it did."""
        remove_stale_temps(self.work_dir)  # what an interrupted save left behind
        if not self.checkpoint_path.exists():
            return False
        hint = "start over with --no-resume, or use another --work-dir"
        try:
            ckpt = safe_torch_load(self.checkpoint_path)  # never executes code from the file
        except CheckpointError as err:
            raise CheckpointError(self.checkpoint_path, f"{err.problem}; {hint}") from None
        if not isinstance(ckpt, dict) or not {"model", "optimizer", "state", "torch_rng"} <= set(ckpt):
            raise CheckpointError(self.checkpoint_path, f"not a training checkpoint of this project; {hint}")
        if self.identity is not None and ckpt.get("run") != self.identity:
            raise RunError(f"{self.checkpoint_path}: saved by a different run "
                           f"({identity_difference(ckpt.get('run'), self.identity)}); {hint}")
        getattr(self.model, "module", self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler and ckpt["scheduler"]:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state = TrainState(**ckpt["state"])
        torch.set_rng_state(ckpt["torch_rng"])
        self._saved_step = self.state.step
        return True

    def run(self, make_loader: Callable[[int, int], DataLoader], step_fn: Callable, samples_per_step: int,
            dataset_size: int) -> TrainState:
        """Train from ``self.state`` to ``total_steps``; ``make_loader(epoch, offset)`` builds the loader."""
        state = self.state
        if state.step >= self.total_steps:
            return state
        loader = iter(make_loader(state.epoch, state.offset))
        per_epoch = math.ceil(dataset_size / self.info.world_size)
        bar = tqdm(total=self.total_steps, initial=state.step, desc=self.description, unit="it",
                   disable=not self.info.is_main, dynamic_ncols=True, mininterval=1.0)
        start, seen = time.monotonic(), 0
        self.model.train()
        TRAINING.set()
        try:
            self._train_steps(loader, step_fn, samples_per_step, per_epoch, bar, start)
        finally:
            TRAINING.clear()
            bar.close()
        if self.writer:
            self.writer.flush()
        return state

    def _train_steps(self, loader, step_fn, samples_per_step: int, per_epoch: int, bar, start: float) -> None:
        state, seen = self.state, 0
        while state.step < self.total_steps:
            batch = next(loader)
            loss, logs = step_fn(batch)
            if not torch.isfinite(loss):
                last = (f"last good checkpoint: {self.checkpoint_path} (step {self._saved_step})"
                        if self._saved_step is not None else "no checkpoint was written before it")
                raise FloatingPointError(f"{self.description}: loss is {loss.item()} at step {state.step + 1}; "
                                         f"{last}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
            self.optimizer.step()
            if self.scheduler:
                self.scheduler.step()
            state.step += 1
            state.offset += samples_per_step
            while state.offset >= per_epoch:  # the sampler moved on to the next epoch
                state.offset -= per_epoch
                state.epoch += 1
            seen += samples_per_step
            if self.writer and (state.step % self.log_every == 0 or state.step == self.total_steps):
                self.writer.add_scalar("train/loss", loss.item(), state.step)
                self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], state.step)
                for name, value in logs.items():
                    self.writer.add_scalar(f"train/{name}", value, state.step)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2g}",
                            img_s=f"{seen / max(time.monotonic() - start, 1e-9):.1f}", refresh=False)
            bar.update(1)
            saved = state.step % self.checkpoint_every == 0 or state.step == self.total_steps
            if saved:
                self.save()
            if preemption_requested(self.info):
                if not saved:
                    self.save()
                raise Preempted(f"{self.description}: preemption requested; saved {self.checkpoint_path} "
                                f"at step {state.step}")



def step_lr(optimizer: torch.optim.Optimizer, step_size: int, gamma: float):
    """Caffe's "step" policy: lr * gamma ** (iteration // step_size), per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: gamma ** (it // step_size))


def multistep_lr(optimizer: torch.optim.Optimizer, milestones: Sequence[int], gamma: float):
    """Caffe's "multistep" policy, per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: gamma ** sum(it >= m for m in milestones))


# --- checkpoints to evaluate -----------------------------------------------------------------------

def load_for_eval(ckpt: str, seed: int, *, num_classes: int | None, new_head: bool, layout: str = "caffenet",
                  dropout: float = 0.5) -> LoadedBackbone:
    """``ckpt`` is a path (any format backbones.checkpoint reads) or ``random``.

    ``new_head``: fc8 is re-initialised for this task (declared missing; a source fc8 is discarded).
    """
    if ckpt == "random":
        return random_backbone(seed, layout=layout, num_classes=num_classes, dropout=dropout)
    patterns = ("fc8.*",) if new_head else ()
    return load_backbone(ckpt, num_classes=num_classes, allow_missing=patterns, discard=patterns, dropout=dropout)


def default_supervision(loaded: LoadedBackbone) -> str:
    """The table's Supervision column, from what the checkpoint says about itself."""
    if loaded.source_format == "random-init":
        return "-"
    if loaded.source_format == "torchvision-state-dict":
        return "Class Labels"
    return str(loaded.meta.get("supervision", "Optical-flow"))


def default_label(loaded: LoadedBackbone) -> str:
    if loaded.source_format == "random-init":
        return "Random"
    if loaded.source_format == "torchvision-state-dict":
        return "Krizhevsky et al. (torchvision)"
    return str(loaded.meta.get("label", Path(loaded.source).stem))


def config_dict(config) -> dict:
    """A dataclass config as JSON-able values (tuples become lists, paths strings)."""
    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return {f.name: plain(getattr(config, f.name)) for f in fields(config)} if is_dataclass(config) else dict(config)


def _parse_value(key: str, text: str, current):
    """``text`` read as the type of the field's current value (tuples: comma-separated)."""
    if text.lower() == "none":
        return None
    if isinstance(current, bool):
        if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"{key} expects true/false, got {text!r}")
        return text.lower() in ("1", "true", "yes", "on")
    if isinstance(current, tuple):
        kind = type(current[0]) if current else str
        return tuple(_parse_value(key, item.strip(), kind()) for item in text.strip("()[] ").split(",") if item.strip())
    if isinstance(current, int):
        return int(float(text)) if "e" in text.lower() else int(text)  # 1e5 is a fine iteration count
    if current is None:  # optional fields default to None: keep numbers as numbers
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    return type(current)(text)


def parse_overrides(config, pairs: Sequence[str]) -> dict:
    """``KEY=VALUE`` strings (the CLIs' ``--set``) as ``{field: typed value}`` for ``config``;
    a ValueError names the bad pair."""
    names = {f.name for f in fields(config)}
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {sorted(names)}")
        try:
            changes[key] = _parse_value(key, value.strip(), getattr(config, key))
        except ValueError as err:
            raise ValueError(f"--set {pair!r}: {err}") from None
    return changes


# --- configuration checks --------------------------------------------------------------------------

# Numeric fields that may be 0 (or any sign); every other int/float field of a harness config must be
# > 0: iteration counts, batch sizes, crops, learning rates, scales, thresholds.
NON_NEGATIVE = frozenset({"seed", "workers", "weight_decay", "momentum", "dropout", "head_dropout",
                          "score_threshold", "sample_border", "example_images", "fg_fraction"})
ANY_VALUE = frozenset({"head_init_bias"})
BELOW_ONE = frozenset({"momentum", "dropout", "head_dropout", "fg_fraction"})
RANGES = frozenset({"scale_range", "bg_range"})  # (low, high) with low < high


def validate_config(config, choices: Mapping[str, Sequence] = (), lengths: Mapping[str, int] = (),
                    minimum: Mapping[str, float] = ()) -> None:
    """Refuse, before anything runs, a config that cannot work: ConfigError naming the field and value.

    ``choices``: allowed values of a field (each element, for tuples); ``lengths``: exact tuple lengths;
    ``minimum``: smallest allowed values (e.g. a crop AlexNet can still take).
    """
    from runtime.errors import ConfigError

    def bad(name, value, why):
        raise ConfigError(f"{name}={value!r}: {why}")

    choices, lengths, minimum = dict(choices), dict(lengths), dict(minimum)
    for f in fields(config):
        name, value = f.name, getattr(config, f.name)
        if value is None or isinstance(value, (bool, str)) or name in ANY_VALUE:
            pass
        elif isinstance(value, (int, float)):
            if not math.isfinite(value):
                bad(name, value, "must be a finite number")
            if name in NON_NEGATIVE and value < 0:
                bad(name, value, "must be >= 0")
            if name not in NON_NEGATIVE and value <= 0:
                bad(name, value, "must be > 0")
            if name in BELOW_ONE and value >= 1:
                bad(name, value, "must be < 1")
        elif isinstance(value, tuple):
            if not value:
                bad(name, value, "must not be empty")
            numbers = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if any(not math.isfinite(v) or v < 0 or (v == 0 and name not in RANGES) for v in numbers):
                bad(name, value, "every value must be > 0")
            if name in RANGES and (len(value) != 2 or not value[0] < value[1]):
                bad(name, value, "must be two numbers (low, high) with low < high")
        if name in minimum and value < minimum[name]:
            bad(name, value, f"must be at least {minimum[name]}")
        if name in lengths and len(value) != lengths[name]:
            bad(name, value, f"must have {lengths[name]} values")
        if name in choices:
            for item in value if isinstance(value, tuple) else (value,):
                if item not in choices[name]:
                    bad(name, value, f"{item!r} is not one of {list(choices[name])}")


def now() -> datetime:
    return datetime.now(timezone.utc)


def results_dir_of(config) -> Path:
    return Path(config.results_dir) if config.results_dir else store.default_results_dir()


# Fields that say where and how a run executes, not what protocol it follows: they do not enter a
# run's identity and changing them keeps the preset's name.
OPERATIONAL_FIELDS = frozenset({
    "ckpt", "data_root", "seed", "label", "supervision", "device", "workers", "work_dir", "results_dir",
    "resume", "overwrite", "checkpoint_every", "proposals_dir", "test_roi_chunk", "test_chunk", "preset"})


def protocol_values(config) -> dict:
    """The config values that change a run's result (everything but :data:`OPERATIONAL_FIELDS`)."""
    return {k: v for k, v in config_dict(config).items() if k not in OPERATIONAL_FIELDS}


def run_identity(task: str, config, splits: Mapping[str, Sequence[str]]) -> dict:
    """Everything that makes two runs of one checkpoint and seed give different results besides the
    weights: the task, the protocol values and the data (a hash of the split id lists)."""
    return {"task": task, "protocol": protocol_values(config), "split_hash": store.split_hash(splits)}


def identity_difference(saved, wanted: Mapping) -> str:
    """What differs between two run identities, for an error message: the fields with both values."""
    if not isinstance(saved, Mapping):
        return "it records no run identity (written by an older version)"
    parts = []
    if saved.get("task") != wanted.get("task"):
        parts.append(f"task {saved.get('task')!r} vs {wanted.get('task')!r}")
    old, new = saved.get("protocol") or {}, wanted.get("protocol") or {}
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            parts.append(f"{key}: {old.get(key, '<absent>')!r} there, {new.get(key, '<absent>')!r} now")
    if saved.get("split_hash") != wanted.get("split_hash"):
        parts.append("the data's split lists differ")
    return "; ".join(parts) or "identities differ"


def finished_metrics(task: str, loaded: LoadedBackbone, config, key: str) -> dict | None:
    """The metrics of an already finished record of this very run (same checkpoint, seed, preset,
    protocol values and data), unless ``config.overwrite``: re-running a grid only runs what is missing."""
    path = store.record_path(results_dir_of(config), task, loaded.fingerprint, config.seed, config.preset, key)
    if config.overwrite or not path.is_file():
        return None
    record = store.load_record(path)
    if record.get("run_key") != key:  # cannot happen unless the file was renamed by hand
        raise RunError(f"{path}: holds run {record.get('run_key')!r}, not {key!r}; move it away or pass --overwrite")
    print(f"[{task}] a finished record exists, skipping (pass --overwrite to redo it): {path}")
    return record["metrics"]


@dataclass
class RunStart:
    """What every harness's ``run`` begins with (see :func:`begin_run`)."""
    info: DistInfo
    device: torch.device
    start: datetime
    loaded: LoadedBackbone
    finished: dict | None  # the metrics of an existing record: the harness returns them at once
    identity: dict         # run_identity(): stored in training checkpoints and compared on resume
    key: str               # store.run_key(identity): in the record's and the work folder's names
    work_dir: Path         # this run's training checkpoints and TensorBoard logs

    @property
    def log(self):
        """``print`` on the main rank, None elsewhere (one copy of each progress line)."""
        return print if self.info.is_main else None


def begin_run(task: str, config, *, splits: Mapping[str, Sequence[str]], num_classes: int | None,
              new_head: bool, **load_kwargs) -> RunStart:
    """DDP setup, device, seed, the start time, the checkpoint, the run's identity, and the
    finished record if any. ``splits``: the id lists the run reads (its data identity)."""
    info = setup_distributed()
    device = pick_device(config.device, info)
    torch.manual_seed(config.seed)
    start = now()
    loaded = load_for_eval(config.ckpt, config.seed, num_classes=num_classes, new_head=new_head,
                           layout=config.layout, **load_kwargs)
    identity = run_identity(task, config, splits)
    key = store.run_key(identity)
    work_dir = Path(config.work_dir) / task / config.preset / f"{loaded.fingerprint[:16]}-{key}-seed{config.seed}"
    return RunStart(info, device, start, loaded, finished_metrics(task, loaded, config, key), identity, key, work_dir)


def save_record(*, task: str, metrics: Mapping, metric_definitions: Mapping, begun: RunStart, config,
                splits: Mapping[str, Sequence[str]]) -> Path:
    """Build the record (results.store schema) and write it atomically."""
    loaded = begun.loaded
    record = store.make_record(
        task, dict(metrics), label=config.label or default_label(loaded),
        supervision=config.supervision or default_supervision(loaded), fingerprint=loaded.fingerprint,
        seed=config.seed, preset=config.preset, config=config_dict(config),
        provenance=store.provenance(str(begun.device), begun.start, now(), splits),
        metric_definitions=dict(metric_definitions))
    record["run_key"] = begun.key
    record["run_identity"] = begun.identity
    record["checkpoint"] = {"source": loaded.source, "format": loaded.source_format, "load_report": {
        k: v for k, v in loaded.report.items() if k != "loaded"}}
    return store.write_record(record, results_dir_of(config), overwrite=config.overwrite)
