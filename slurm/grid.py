"""The benchmark grid file: which checkpoints, tasks and seeds to run, where, and on what resources.

A grid is a YAML file (``slurm/paper.yaml``, ``slurm/demo.yaml``); every (task, checkpoint,
seed) is one *cell*, i.e. one ``python -m evals.run`` run and one result record::

    name: paper                  # job-name prefix
    base: .                      # relative paths below are relative to this folder (itself to the cwd)
    preset: paper                # evals preset of every cell
    data_root: /datasets         # VOCdevkit/, benchmark_RELEASE/, imagenet/
    results_dir: results/runs    # the record store (results.store)
    work_dir: work_dirs          # training checkpoints: a requeued cell resumes from here
    log_dir: slurm_logs/paper    # submitit logs and cells.json (job ids, log paths)
    report_dir: results/report   # where --report writes Table 1/2
    seeds: [0]                   # default seeds of every task
    checkpoints:                 # name -> path (or `random`, `random-rescaled`), optional row label,
                                 # supervision, row, and tasks (default: every task)
      cpfs: {path: runs/cpfs/alexnet_plain.pt, label: Ours, supervision: Optical-flow}
      cpfs_s1: {path: runs/cpfs_s1/alexnet_plain.pt, label: Ours, row: ours-seeds}  # `row`: pool under one
      cpfs_s2: {path: runs/cpfs_s2/alexnet_plain.pt, label: Ours, row: ours-seeds}  # table row (evals.run --row)
      random: {path: random}
      random_rescaled: {path: random-rescaled, tasks: [in1k_linear]}  # `tasks`: only these tasks' cells
    slurm:                       # defaults of every job; a task's `resources` override them
      partition: gpu
      array_parallelism: 64      # array tasks running at once (per task's array)
      additional_parameters: {account: myproject, qos: normal, constraint: volta32gb}
      setup: []                  # shell lines run before the job (module load ..., source .venv/bin/activate)
      signal_delay_s: 120        # SIGUSR2 this long before the time limit (save + requeue)
      max_num_timeout: 3         # requeues after reaching the time limit (preemptions do not count)
    tasks:
      voc07_cls:
        resources: {gpus: 1, cpus: 8, mem_gb: 32, time: "12:00:00"}
        seeds: [0, 1, 2]         # optional: this task's seeds
        workers: 8               # optional: data-loading processes (evals.run --workers)
        set: {iterations: 1000}  # optional protocol overrides: recorded under preset "<preset>+custom"

Resources: ``gpus`` per node (the job runs ``tasks`` = max(gpus, 1) processes, one per GPU, which
start DDP from SLURM's variables), ``cpus`` per process, ``mem_gb`` per node, ``time`` as minutes
or ``[D-]HH:MM:SS``, ``partition``, ``additional_parameters`` (any sbatch option, merged over
the ``slurm:`` ones), ``tasks`` (processes, to force CPU DDP). Unknown keys are errors.

Optional sections ``prepare:``, ``proposals:``, ``pretrain:`` and ``convert:`` describe the jobs
before the grid (``python -m slurm.jobs``); see that module (``slurm/zoo.yaml`` has a ``convert:``).
"""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

from results.tasks import TASKS

REPO_DIR = Path(__file__).resolve().parents[1]

TOP_KEYS = {"name", "base", "preset", "data_root", "results_dir", "work_dir", "log_dir", "report_dir", "seeds",
            "checkpoints", "slurm", "tasks", "prepare", "proposals", "pretrain", "convert"}
PATH_KEYS = ("data_root", "results_dir", "work_dir", "log_dir", "report_dir")
SCALAR_KEYS = ("name", "base", "preset") + PATH_KEYS  # what `--set KEY=VALUE` may change
SLURM_KEYS = {"partition", "array_parallelism", "additional_parameters", "setup", "signal_delay_s", "max_num_timeout"}
RESOURCE_KEYS = {"gpus", "cpus", "mem_gb", "time", "partition", "tasks", "additional_parameters"}
TASK_KEYS = {"resources", "seeds", "workers", "set"}
CHECKPOINT_KEYS = {"path", "label", "supervision", "row", "tasks"}
BUILTIN_CHECKPOINTS = ("random", "random-rescaled")  # evals.run builds these; not file paths
DEFAULT_RESOURCES = {"gpus": 0, "cpus": 1, "mem_gb": 4, "time": 60}


class GridError(ValueError):
    """The grid file is malformed; the message names the file and the key."""


def parse_time(value, where: str) -> int:
    """Minutes from ``90``, ``"90"``, ``"HH:MM:SS"``, ``"MM:SS"`` or ``"D-HH:MM:SS"``."""
    if isinstance(value, bool):
        raise GridError(f"{where}: time must be minutes or [D-]HH:MM:SS, got {value!r}")
    if isinstance(value, (int, float)):
        return max(1, int(value))
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(value).strip())
    if not match:
        raise GridError(f"{where}: time must be minutes or [D-]HH:MM:SS, got {value!r}")
    days, a, b, c = match.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if len(parts) == 1:
        minutes = parts[0] if days is None else parts[0] * 60  # "D-HH" is days and hours
    elif len(parts) == 2:
        minutes = parts[0] * 60 + parts[1] if days is not None else parts[0] + parts[1] / 60  # D-HH:MM or MM:SS
    else:
        minutes = parts[0] * 60 + parts[1] + parts[2] / 60
    return max(1, int(round(minutes + int(days or 0) * 24 * 60)))


@dataclasses.dataclass(frozen=True)
class Resources:
    gpus: int = 0
    cpus: int = 1          # per process
    mem_gb: float = 4      # per node
    time_min: int = 60
    partition: str | None = None
    tasks: int = 1         # processes (DDP ranks) on the node
    additional_parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        gpus = f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}, " if self.gpus else ""
        return (f"{gpus}{self.tasks} task{'s' if self.tasks != 1 else ''} x {self.cpus} CPU, {self.mem_gb:g} GB, "
                f"{self.time_min} min" + (f", partition {self.partition}" if self.partition else ""))


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    name: str
    path: str            # a file, or one of BUILTIN_CHECKPOINTS
    label: str | None
    supervision: str | None
    row: str | None = None  # pools checkpoints sharing it under one table row (evals.run --row)
    tasks: tuple[str, ...] | None = None  # the only tasks it runs on (None: all of the grid's)

    def runs_on(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    resources: Resources
    seeds: tuple[int, ...]
    workers: int | None
    overrides: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (task, checkpoint, seed): one ``python -m evals.run`` and one result record."""

    task: str
    checkpoint: Checkpoint
    seed: int
    argv: tuple[str, ...]       # evals.run's command line
    preset: str                 # the record's preset ("<preset>+custom" with overrides)
    fingerprint: str | None     # None while the checkpoint file does not exist yet
    record: Path | None         # where its record lands once it is done (None: see `protocol`)
    resources: Resources
    # When the data cannot be read from the submitting machine (mounted on compute nodes only),
    # the record's name, which includes a hash of the split lists, is unknown: a record of the same
    # checkpoint, seed and protocol values then counts as this cell's, whatever its data.
    protocol: str | None = None  # JSON of the protocol values (record["run_identity"]["protocol"])
    record_dir: Path | None = None  # <results_dir>/<task>/<preset>

    @property
    def waiting(self) -> bool:
        """The checkpoint file does not exist yet (e.g. pretraining still runs)."""
        return self.fingerprint is None

    def finished_record(self) -> Path | None:
        """The cell's record if it exists."""
        if self.record is not None:
            return self.record if self.record.is_file() else None
        if self.fingerprint is None or self.protocol is None:
            return None
        import json
        wanted = json.loads(self.protocol)
        for path in sorted(self.record_dir.glob(f"{self.fingerprint[:16]}-*-seed{self.seed}.json")):
            try:
                identity = json.loads(path.read_text()).get("run_identity") or {}
            except (OSError, ValueError):
                continue
            if identity.get("task") == self.task and identity.get("protocol") == wanted:
                return path
        return None

    @property
    def where(self) -> str:
        """The record's path, or its folder and name pattern when the data hash is unknown."""
        return str(self.record or self.record_dir / f"{(self.fingerprint or '?')[:16]}-*-seed{self.seed}.json")

    @property
    def key(self) -> str:
        return f"{self.task}/{self.checkpoint.name}/seed{self.seed}"

    @property
    def command(self) -> str:
        import shlex
        return "python -m evals.run " + shlex.join(self.argv)


@dataclasses.dataclass
class Grid:
    source: Path
    name: str
    base: Path
    preset: str
    data_root: Path
    results_dir: Path
    work_dir: Path
    log_dir: Path
    report_dir: Path
    checkpoints: dict[str, Checkpoint]
    tasks: dict[str, TaskSpec]
    slurm: dict[str, Any]
    sections: dict[str, Any]    # prepare / proposals / pretrain, read by slurm.jobs

    @property
    def state_file(self) -> Path:
        return self.log_dir / "cells.json"

    def select(self, tasks=None, checkpoints=None) -> "Grid":
        """The same grid restricted to some tasks and checkpoints (in the order given)."""
        def pick(table: dict, names, what: str) -> dict:
            if names is None:
                return dict(table)
            missing = [n for n in names if n not in table]
            if missing:
                raise GridError(f"{self.source}: no {what} {missing} in the grid (it has {sorted(table)})")
            return {n: table[n] for n in names}
        return dataclasses.replace(self, tasks=pick(self.tasks, tasks, "task"),
                                   checkpoints=pick(self.checkpoints, checkpoints, "checkpoint"))

    def cells(self) -> list[Cell]:
        """Every cell, task-major. What each cell records where is asked of ``evals.run`` itself
        (``--plan``: preset, checkpoint fingerprint, run key, record path), in one subprocess: the
        grid runs the same command line the jobs run, so it cannot disagree with them, and this
        package imports nothing from the evaluation code. A checkpoint file that does not exist yet
        gives cells that are :attr:`Cell.waiting`; an unreadable one or a bad setting is an error."""
        specs = [(task, ckpt, seed) for task in self.tasks.values() for ckpt in self.checkpoints.values()
                 if ckpt.runs_on(task.name) for seed in task.seeds]
        argvs = [self.argv(task, ckpt, seed) for task, ckpt, seed in specs]
        plans = plan_runs(argvs, self.source)
        cells = []
        for (task, ckpt, seed), argv, plan in zip(specs, argvs, plans):
            if "error" in plan:
                where = f"checkpoint {ckpt.name!r}" if plan["error"].startswith(ckpt.path) else f"tasks.{task.name}"
                raise GridError(f"{self.source}: {where}: {plan['error']}")
            cells.append(Cell(task.name, ckpt, seed, tuple(argv), plan["preset"], plan["fingerprint"],
                              Path(plan["record"]) if plan["record"] else None, task.resources,
                              json.dumps(plan["protocol"], sort_keys=True), Path(plan["record_dir"])))
        return cells

    def argv(self, task: TaskSpec, ckpt: Checkpoint, seed: int) -> list[str]:
        argv = ["--task", task.name, "--preset", self.preset, "--ckpt", ckpt.path, "--seed", str(seed),
                "--data-root", str(self.data_root), "--work-dir", str(self.work_dir),
                "--results-dir", str(self.results_dir)]
        if ckpt.label:
            argv += ["--label", ckpt.label]
        if ckpt.supervision:
            argv += ["--supervision", ckpt.supervision]
        if ckpt.row:
            argv += ["--row", ckpt.row]
        if task.workers is not None:
            argv += ["--workers", str(task.workers)]
        for key, value in task.overrides.items():
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            argv += ["--set", f"{key}={value}"]
        return argv


def plan_runs(argvs: list[list[str]], source) -> list[dict]:
    """``python -m evals.run --plan`` over the cells' command lines (one JSON list per line)."""
    lines = "".join(json.dumps(argv) + "\n" for argv in argvs)
    done = subprocess.run([sys.executable, "-m", "evals.run", "--plan"], input=lines, capture_output=True,
                          text=True, cwd=REPO_DIR)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise GridError(f"{source}: could not plan the grid's cells with evals.run --plan: {last}")
    plans = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    if len(plans) != len(argvs):
        raise GridError(f"{source}: evals.run --plan answered {len(plans)} of {len(argvs)} cells")
    return plans


# --- reading ---------------------------------------------------------------------------------------

def _check_keys(where: str, table: Any, allowed: set[str]) -> dict:
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise GridError(f"{where}: expected a mapping, got {type(table).__name__}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise GridError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return table


def _seeds(where: str, value) -> tuple[int, ...]:
    seeds = [value] if isinstance(value, int) else value
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise GridError(f"{where}: seeds must be an integer or a non-empty list of integers, got {value!r}")
    return tuple(seeds)


def _checkpoint_tasks(where: str, value) -> tuple[str, ...] | None:
    """A checkpoint's optional ``tasks`` list: known task names, at least one."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise GridError(f"{where}: expected a non-empty list of task names, got {value!r}")
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise GridError(f"{where}: unknown task(s) {unknown}; known: {sorted(TASKS)}")
    return tuple(names)


def resources(where: str, table: Mapping, defaults: Mapping) -> Resources:
    """A task's ``resources`` over the ``slurm:`` defaults over :data:`DEFAULT_RESOURCES`."""
    table = _check_keys(where, table, RESOURCE_KEYS)
    merged = {**DEFAULT_RESOURCES, **{k: v for k, v in defaults.items() if k == "partition"}, **table}
    for key in ("gpus", "cpus", "tasks"):
        if key in merged and (not isinstance(merged[key], int) or isinstance(merged[key], bool) or merged[key] < 0):
            raise GridError(f"{where}: {key} must be a non-negative integer, got {merged[key]!r}")
    if merged["cpus"] < 1:
        raise GridError(f"{where}: cpus must be at least 1")
    if not isinstance(merged["mem_gb"], (int, float)) or merged["mem_gb"] <= 0:
        raise GridError(f"{where}: mem_gb must be a positive number, got {merged['mem_gb']!r}")
    extra = {**(defaults.get("additional_parameters") or {}), **(merged.get("additional_parameters") or {})}
    return Resources(gpus=merged["gpus"], cpus=merged["cpus"], mem_gb=merged["mem_gb"],
                     time_min=parse_time(merged["time"], f"{where}.time"), partition=merged.get("partition"),
                     tasks=merged.get("tasks") or max(1, merged["gpus"]), additional_parameters=extra)


def load_grid(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Grid:
    """Read and validate a grid file; ``overrides`` replace top-level scalars (``--set``)."""
    source = Path(path)
    try:
        raw = yaml.safe_load(source.read_text())
    except FileNotFoundError:
        raise GridError(f"{source}: no such grid file") from None
    except yaml.YAMLError as err:
        raise GridError(f"{source}: not valid YAML ({str(err).splitlines()[0]})") from None
    raw = _check_keys(str(source), raw, TOP_KEYS)
    for key, value in (overrides or {}).items():
        if key not in SCALAR_KEYS:
            raise GridError(f"--set {key}=...: only {list(SCALAR_KEYS)} can be set from the command line")
        raw[key] = value
    for key in ("checkpoints", "tasks", "results_dir", "log_dir"):
        if key not in raw:
            raise GridError(f"{source}: missing required key {key!r}")
    base = Path(str(raw.get("base", ".")))

    def path_of(value) -> Path:
        value = Path(str(value)).expanduser()
        return value if value.is_absolute() else base / value

    slurm = _check_keys(f"{source}: slurm", raw.get("slurm"), SLURM_KEYS)
    checkpoints = {}
    for name, spec in _check_keys(f"{source}: checkpoints", raw["checkpoints"], set(raw["checkpoints"] or {})).items():
        spec = {"path": spec} if isinstance(spec, str) else spec
        spec = _check_keys(f"{source}: checkpoints.{name}", spec, CHECKPOINT_KEYS)
        if "path" not in spec:
            raise GridError(f"{source}: checkpoints.{name} needs a path (a file, or one of "
                            f"{list(BUILTIN_CHECKPOINTS)})")
        ckpt_path = spec["path"] if spec["path"] in BUILTIN_CHECKPOINTS else str(path_of(spec["path"]))
        checkpoints[str(name)] = Checkpoint(str(name), ckpt_path, spec.get("label"), spec.get("supervision"),
                                            None if spec.get("row") is None else str(spec["row"]),
                                            _checkpoint_tasks(f"{source}: checkpoints.{name}.tasks", spec.get("tasks")))
    if not checkpoints:
        raise GridError(f"{source}: checkpoints is empty")
    default_seeds = _seeds(f"{source}: seeds", raw.get("seeds", [0]))
    tasks = {}
    for name, spec in _check_keys(f"{source}: tasks", raw["tasks"], set(TASKS)).items():
        where = f"{source}: tasks.{name}"
        spec = _check_keys(where, spec, TASK_KEYS)
        workers = spec.get("workers")
        if workers is not None and (not isinstance(workers, int) or workers < 0):
            raise GridError(f"{where}.workers must be a non-negative integer, got {workers!r}")
        tasks[name] = TaskSpec(name, resources(f"{where}.resources", spec.get("resources"), slurm),
                               _seeds(f"{where}.seeds", spec["seeds"]) if "seeds" in spec else default_seeds,
                               workers, dict(_check_keys(f"{where}.set", spec.get("set"), set(spec.get("set") or {}))))
    if not tasks:
        raise GridError(f"{source}: tasks is empty")
    return Grid(source=source, name=str(raw.get("name", source.stem)), base=base,
                preset=str(raw.get("preset", "paper")), data_root=path_of(raw.get("data_root", "data")),
                results_dir=path_of(raw["results_dir"]), work_dir=path_of(raw.get("work_dir", "work_dirs")),
                log_dir=path_of(raw["log_dir"]), report_dir=path_of(raw.get("report_dir", "results/report")),
                checkpoints=checkpoints, tasks=tasks, slurm=dict(slurm),
                sections={k: raw[k] for k in ("prepare", "proposals", "pretrain", "convert") if k in raw})


def parse_sets(pairs) -> dict[str, str]:
    """``KEY=VALUE`` strings of ``--set`` as a dict."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep:
            raise GridError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {list(SCALAR_KEYS)}")
        out[key.strip()] = value.strip()
    return out
