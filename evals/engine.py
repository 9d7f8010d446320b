"""The evaluation side of a run: the checkpoint to evaluate, the run's identity, the finished-record
check and the record (``evals.run.run_task`` drives them). What pretraining and the harnesses share
(distributed setup, the seeded data order, the training loop, config parsing) lives in ``runtime``.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

import torch

from backbones.checkpoint import CheckpointError, LoadedBackbone, load_backbone, random_backbone
from results import store
from runtime.config import config_dict, operational_fields
from runtime.distributed import DistInfo, pick_device, setup_distributed
from runtime.errors import RunError


# --- checkpoints to evaluate -----------------------------------------------------------------------

def load_for_eval(ckpt: str, seed: int, *, num_classes: int | None, new_head: bool, layout: str = "caffenet",
                  dropout: float = 0.5, data_root: str | None = None, cache_dir=None) -> LoadedBackbone:
    """``ckpt`` is a path (any format backbones.checkpoint reads), ``random`` or ``random-rescaled``.

    ``random-rescaled`` (Table 2's Random-rescaled row): ``random`` under ``seed``, then both
    steps of Krähenbühl et al.'s rescaling (backbones.rescale) on 160 VOC2007 *trainval* images
    under ``data_root`` chosen by ``seed``. Every task reads the same sample (VOC2007 trainval
    sits under every task's data root, also ImageNet's, and holds no test image), so one seed and
    data root give one network, one fingerprint, whichever task evaluates it; it is rebuilt
    identically on every machine (see backbones.rescale, Determinism). ``cache_dir`` (the run's
    :func:`builtin_cache`) keeps the built network, so that the grid's planner and its cells build it once.

    ``new_head``: fc8 is re-initialised for this task (declared missing; a source fc8 is discarded).
    """
    if ckpt == "random":
        return random_backbone(seed, layout=layout, num_classes=num_classes, dropout=dropout)
    if ckpt == "random-rescaled":
        if not data_root:
            raise CheckpointError(ckpt, "needs the run's data root (its VOC2007 trainval images are the "
                                        "rescaling sample)")
        from backbones.rescale import random_rescaled_backbone
        return random_rescaled_backbone(seed, data_root, layout=layout, num_classes=num_classes, dropout=dropout,
                                        cache_dir=cache_dir)
    patterns = ("fc8.*",) if new_head else ()
    return load_backbone(ckpt, num_classes=num_classes, allow_missing=patterns, discard=patterns, dropout=dropout)


def builtin_cache(config) -> Path:
    """Where built-in networks that take a while to build (``random-rescaled``) are kept: the
    run's work dir, beside the training checkpoints."""
    return Path(config.work_dir) / "builtin"


def default_supervision(loaded: LoadedBackbone) -> str:
    """The table's Supervision column, from what the checkpoint says about itself."""
    if loaded.source_format in ("random-init", "random-rescaled"):
        return "-"
    if loaded.source_format == "torchvision-state-dict":
        return "Class Labels"
    return str(loaded.meta.get("supervision", "Optical-flow"))


def default_label(loaded: LoadedBackbone) -> str:
    if loaded.source_format == "random-init":
        return "Random"
    if loaded.source_format == "random-rescaled":
        return "Random-rescaled"  # the paper's Table 2 row is "Random-rescaled [41]"
    if loaded.source_format == "torchvision-state-dict":
        return "Krizhevsky et al. (torchvision)"
    return str(loaded.meta.get("label", Path(loaded.source).stem))






def now() -> datetime:
    return datetime.now(timezone.utc)


def results_dir_of(config) -> Path:
    return Path(config.results_dir) if config.results_dir else store.default_results_dir()


def protocol_values(config) -> dict:
    """The config values that change a run's result (every field not declared operational)."""
    operational = operational_fields(config)
    return {k: v for k, v in config_dict(config).items() if k not in operational}


def run_identity(task: str, config, splits: Mapping[str, Sequence[str]]) -> dict:
    """Everything that makes two runs of one checkpoint and seed give different results besides the
    weights: the task, the protocol values and the data (a hash of the split id lists)."""
    return {"task": task, "protocol": protocol_values(config), "split_hash": store.split_hash(splits)}


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
                           layout=config.layout, data_root=config.data_root, cache_dir=builtin_cache(config),
                           **load_kwargs)
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
        k: v for k, v in loaded.report.items() if k != "loaded"},
        "meta": dict(loaded.meta)}  # what the checkpoint says of itself: for ours, how it was pretrained
    return store.write_record(record, results_dir_of(config), overwrite=config.overwrite)
