"""The one training loop of every stage (pretraining and the four benchmark harnesses):
iteration-based, with exact checkpoint/resume, mixed precision, preemption save-and-requeue, a
NaN/inf stop, progress bar, TensorBoard or a log callback, and an after-step hook (see :class:`Trainer`)."""
from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from runtime.atomic import atomic_torch_save, remove_stale_temps
from runtime.distributed import DistInfo
from runtime.errors import CheckpointError, RunError
from runtime.safe_load import safe_torch_load

# Preemption: slurm.runner's SIGUSR2 handler sets PREEMPTION while a Trainer loop runs (TRAINING);
# the loop then saves after the step in progress and raises Preempted, and the job requeues.
PREEMPTION = threading.Event()
TRAINING = threading.Event()


class Preempted(Exception):
    """Raised by :meth:`Trainer.run` once it has saved a checkpoint because PREEMPTION was set."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stops before that step changes any weight, so the
    checkpoint on disk (if any) is the last good state."""


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


def non_finite_message(value: float, step: int, last_path: Path, last_saved_step: int | None) -> str:
    """One line for a NaN/inf loss that names a checkpoint to go back to only if it is on disk
    (a run that saved nothing yet, or whose checkpoint is gone, has none to offer)."""
    if last_saved_step is not None and Path(last_path).is_file():
        where = f"the last good checkpoint is {last_path} (step {last_saved_step})"
    else:
        where = "no checkpoint of this run exists yet"
    return f"non-finite loss ({value}) at step {step}; training stopped without saving it; {where}"


@dataclass
class TrainState:
    """Where a run is: steps done and the data position. Users may extend it (a dataclass
    subclass); every field is saved with ``asdict`` and restored by keyword."""
    step: int = 0
    epoch: int = 0
    offset: int = 0  # samples of `epoch` already consumed by this rank


class _Throughput:
    """Images per second over the steps since the last reset, counting only the time of the steps
    themselves (data wait included; validation and checkpoints excluded), over all ranks."""

    def __init__(self, images_per_step: int):
        self.images_per_step, self.seconds, self.steps = images_per_step, 0.0, 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1

    def rate(self) -> float:
        return self.images_per_step * self.steps / max(self.seconds, 1e-9)

    def reset(self) -> None:
        self.seconds, self.steps = 0.0, 0


class Trainer:
    """Iteration-based training with a checkpoint every ``checkpoint_every`` steps.

    ``step_fn(batch) -> (loss tensor, {name: float})`` computes the loss of one batch (under
    autocast when ``amp_dtype`` is set); the trainer does the NaN/inf check, backward (through the
    ``scaler`` if given), clipping, the optimiser and scheduler steps, logging, the ``after_step``
    hook, checkpoints and the preemption check, in that order, every step.

    The optional parameters let one loop serve runs with their own needs (pretraining uses them
    all; the harnesses none):

    * ``amp_dtype`` / ``scaler``: autocast dtype (None: full precision) and a ``torch.amp.GradScaler``
      (gradients are unscaled before clipping);
    * ``after_step(state) -> bool``: called after every optimiser step, before the checkpoint
      decision (validation, early stopping); returning True saves and ends :meth:`run`;
    * ``checkpoint_name``, ``make_checkpoint() -> dict`` and ``restore_checkpoint(dict) -> state``:
      a checkpoint file and format of the user's own (default: ``checkpoint.pt`` holding model,
      optimiser, scheduler, scaler, state, torch RNG and ``identity``);
    * ``state``: a :class:`TrainState` subclass instance that carries the user's own fields
      through checkpoints;
    * ``log_fn(step, values)``: receives ``loss``, step_fn's values, ``lr`` and ``images_per_s``
      every ``log_every`` steps and at the last one; ``tensorboard`` writes them as ``train/*``;
    * ``progress``: the tqdm bar on the main rank; ``message_file``: where the one-line "resumed"
      message goes (default stdout).
    """

    def __init__(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, total_steps: int,
                 work_dir: Path, checkpoint_every: int, log_every: int = 20, grad_clip: float | None = None,
                 info: DistInfo = DistInfo(), description: str = "train", trainable: Sequence | None = None,
                 identity: Mapping | None = None, amp_dtype: torch.dtype | None = None,
                 scaler: torch.amp.GradScaler | None = None, after_step: Callable[[Any], bool] | None = None,
                 checkpoint_name: str = "checkpoint.pt", make_checkpoint: Callable[[], dict] | None = None,
                 restore_checkpoint: Callable[[dict], TrainState] | None = None, state: TrainState | None = None,
                 log_fn: Callable[[int, dict], None] | None = None, tensorboard: bool = True,
                 progress: bool = True, message_file: TextIO | None = None):
        """``identity``: what makes this run this run (:func:`run_identity`); stored in every checkpoint
        and compared on resume, so a checkpoint of another configuration is never continued."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.identity = dict(identity) if identity is not None else None
        self.total_steps, self.work_dir = total_steps, Path(work_dir)
        self.checkpoint_every, self.log_every, self.grad_clip = checkpoint_every, log_every, grad_clip
        self.info, self.description = info, description
        self.trainable = list(trainable) if trainable is not None else [p for p in model.parameters() if p.requires_grad]
        self.amp_dtype, self.scaler, self.after_step = amp_dtype, scaler, after_step
        self.checkpoint_name = checkpoint_name
        self.make_checkpoint = make_checkpoint or self._default_checkpoint
        self.restore_checkpoint = restore_checkpoint or self._restore_default
        self.log_fn, self.progress, self.message_file = log_fn, progress, message_file
        self.state = state if state is not None else TrainState()
        self.last_loss = math.nan  # the loss of the last step taken (for a summary)
        self._saved_step: int | None = None  # the step of the checkpoint on disk, if any
        self.writer = None
        if info.is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.work_dir / "tensorboard"))

    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / self.checkpoint_name

    @property
    def saved_step(self) -> int | None:
        """The step of the checkpoint this run wrote or resumed from (None: none yet)."""
        return self._saved_step

    # --- checkpoints -------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the checkpoint atomically (main rank); every rank records the step it holds."""
        if self.info.is_main:
            atomic_torch_save(self.make_checkpoint(), self.checkpoint_path)
        self._saved_step = self.state.step

    def _default_checkpoint(self) -> dict:
        module = getattr(self.model, "module", self.model)
        ckpt = {"model": module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "state": asdict(self.state), "torch_rng": torch.get_rng_state(), "run": self.identity}
        if self.scaler is not None:  # only then: checkpoints of runs without one keep their layout
            ckpt["scaler"] = self.scaler.state_dict() if self.scaler.is_enabled() else None
        return ckpt

    def _restore_default(self, ckpt: dict) -> TrainState:
        hint = "start over with --no-resume, or use another --work-dir"
        if not isinstance(ckpt, dict) or not {"model", "optimizer", "state", "torch_rng"} <= set(ckpt):
            raise CheckpointError(self.checkpoint_path, f"not a training checkpoint of this project; {hint}")
        if self.identity is not None and ckpt.get("run") != self.identity:
            raise RunError(f"{self.checkpoint_path}: saved by a different run "
                           f"({identity_difference(ckpt.get('run'), self.identity)}); {hint}")
        getattr(self.model, "module", self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler and ckpt["scheduler"]:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["torch_rng"])
        return type(self.state)(**ckpt["state"])

    def resume(self, checkpoint: Mapping | None = None) -> bool:
        """Restore the last checkpoint if there is one; returns whether it did.

        ``checkpoint``: one the caller already read and checked (pretraining reads ``last.pt``
        before it changes anything in the run folder); otherwise the file is read here, as data
        only, never executing code from it."""
        if checkpoint is None:
            remove_stale_temps(self.work_dir)  # what an interrupted save left behind
            if not self.checkpoint_path.exists():
                return False
            try:
                checkpoint = safe_torch_load(self.checkpoint_path)
            except CheckpointError as err:
                raise CheckpointError(self.checkpoint_path, f"{err.problem}; start over with --no-resume, "
                                                            f"or use another --work-dir") from None
        self.state = self.restore_checkpoint(checkpoint)
        self._saved_step = self.state.step
        if self.info.is_main:
            print(f"[{self.description}] resumed from {self.checkpoint_path} at step {self.state.step}",
                  file=self.message_file or sys.stdout, flush=True)
        return True

    # --- the loop ----------------------------------------------------------------------------------

    def run(self, make_loader: Callable[[int, int], DataLoader], step_fn: Callable, samples_per_step: int,
            dataset_size: int) -> TrainState:
        """Train from ``self.state`` to ``total_steps`` (or until ``after_step`` asks to stop);
        ``make_loader(epoch, offset)`` builds the loader."""
        state = self.state
        if state.step >= self.total_steps:
            return state
        loader = iter(make_loader(state.epoch, state.offset))
        per_epoch = math.ceil(dataset_size / self.info.world_size)
        bar = tqdm(total=self.total_steps, initial=state.step, desc=self.description, unit="it",
                   disable=not (self.info.is_main and self.progress), dynamic_ncols=True, mininterval=1.0)
        self.model.train()
        TRAINING.set()
        try:
            self._train_steps(loader, step_fn, samples_per_step, per_epoch, bar)
        finally:
            TRAINING.clear()
            bar.close()
        if self.writer:
            self.writer.flush()
        return state

    def _train_steps(self, loader, step_fn, samples_per_step: int, per_epoch: int, bar) -> None:
        state = self.state
        speed = _Throughput(samples_per_step * self.info.world_size)
        while state.step < self.total_steps:
            tick = time.monotonic()
            batch = next(loader)
            with self._autocast():
                loss, logs = step_fn(batch)
            self._stop_unless_finite(loss)
            self._optimise(loss)
            state.step += 1
            state.offset += samples_per_step
            while state.offset >= per_epoch:  # the sampler moved on to the next epoch
                state.offset -= per_epoch
                state.epoch += 1
            self.last_loss = loss.item()
            speed.add(time.monotonic() - tick)
            lr = self.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2g}", img_s=f"{speed.rate():.1f}", refresh=False)
            if state.step % self.log_every == 0 or state.step == self.total_steps:
                self._log({"loss": self.last_loss, **logs, "lr": lr, "images_per_s": speed.rate()})
                speed.reset()
            bar.update(1)
            stop = bool(self.after_step(state)) if self.after_step else False
            saved = stop or state.step % self.checkpoint_every == 0 or state.step == self.total_steps
            if saved:
                self.save()
            if preemption_requested(self.info):
                if not saved:
                    self.save()
                raise Preempted(f"{self.description}: preemption requested; saved {self.checkpoint_path} "
                                f"at step {state.step}")
            if stop:
                return

    def _autocast(self):
        """Mixed precision for the forward pass when ``amp_dtype`` is set; otherwise nothing at all
        (so full-precision runs execute exactly the operations they did before AMP existed)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.model.parameters()).device.type
        return torch.autocast(device_type, dtype=self.amp_dtype)

    def _stop_unless_finite(self, loss: torch.Tensor) -> None:
        """Raise NonFiniteLossError before a NaN/inf loss reaches the weights. Under DDP "finite" is
        all-reduced, so every rank stops at the same step instead of one hanging in a collective."""
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        if self.info.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):
            value = loss.item() if not torch.isfinite(loss.detach()) else "on another rank"
            raise NonFiniteLossError(f"{self.description}: " + non_finite_message(
                value, self.state.step + 1, self.checkpoint_path, self._saved_step))

    def _optimise(self, loss: torch.Tensor) -> None:
        """Backward, clipping, optimiser and scheduler step; through the GradScaler when there is one
        (a disabled scaler passes everything through unchanged)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.grad_clip:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler:
            self.scheduler.step()

    def _log(self, values: dict) -> None:
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, self.state.step)
        if self.log_fn:
            self.log_fn(self.state.step, values)


def step_lr(optimizer: torch.optim.Optimizer, step_size: int, gamma: float):
    """Caffe's "step" policy: lr * gamma ** (iteration // step_size), per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: gamma ** (it // step_size))


def multistep_lr(optimizer: torch.optim.Optimizer, milestones: Sequence[int], gamma: float):
    """Caffe's "multistep" policy, per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: gamma ** sum(it >= m for m in milestones))


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
