"""The results store: one JSON record per finished evaluation.

A record is a plain dict (schema 1) naming the task, the checkpoint fingerprint,
the seed and the preset, the headline metrics in percent, the resolved config and
where/when/with what it ran. Records live at
``<results_dir>/<task>/<preset>/<fingerprint[:16]>-seed<seed>.json``; a finished
record is never overwritten unless the caller asks, so re-running a sweep is safe.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import socket
import subprocess
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from results.tasks import LINEAR_LAYERS, TASKS as TASK_REGISTRY  # noqa: F401  (LINEAR_LAYERS re-exported)
from runtime.atomic import TMP_PREFIX, atomic_write

SCHEMA = 1
REPO_DIR = Path(__file__).resolve().parents[1]

# Headline metric of each task (percent). in1k_linear reports one top-1 per layer.
HEADLINE = {name: task.headline for name, task in TASK_REGISTRY.items()}
TASKS = tuple(HEADLINE)
PACKAGES = ("torch", "torchvision", "numpy", "cpfs-bench")
REQUIRED_KEYS = (
    "schema", "task", "label", "supervision", "fingerprint", "seed", "preset",
    "metrics", "metric_definitions", "config", "provenance",
)


def default_results_dir() -> Path:
    """``$CPFS_RESULTS_DIR`` if set, else ``results/runs`` in the repo (git-ignored)."""
    return Path(os.environ.get("CPFS_RESULTS_DIR", REPO_DIR / "results" / "runs"))


DEFAULT_RESULTS_DIR = default_results_dir()


class RecordExistsError(FileExistsError):
    """A finished record is already at the path and overwrite was not asked for."""


def split_hash(splits: Mapping[str, Sequence[str]]) -> str:
    """sha256 of the dataset split lists: split names sorted, ids in their given order.

    Id order matters (it fixes the data order); the order of the mapping does not.
    JSON framing keeps ``{"a": ["b c"]}`` and ``{"a": ["b", "c"]}`` apart.
    """
    payload = [[name, [str(i) for i in splits[name]]] for name in sorted(splits)]
    return hashlib.sha256(json.dumps(payload).encode("utf-8")).hexdigest()


def _git(repo_dir: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=repo_dir, capture_output=True, text=True,
            timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(
    device: str,
    start_time: datetime,
    end_time: datetime,
    splits: Mapping[str, Sequence[str]],
    repo_dir: Path = REPO_DIR,
) -> dict[str, Any]:
    """Where, when and with which code a run happened.

    Anything that cannot be found (no git, a package not installed) is None rather
    than an error: a record without a commit is still worth keeping.
    """
    status = _git(repo_dir, "status", "--porcelain")
    return {
        "git_commit": _git(repo_dir, "rev-parse", "HEAD") or None,
        "git_dirty": None if status is None else bool(status),
        "packages": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "device": device,
        "start_time": start_time.isoformat(),
        "end_time": end_time.isoformat(),
        "split_hash": split_hash(splits),
    }


def _is_number(value: Any) -> bool:
    # bool is an int subclass but never a metric; NaN/inf would poison means.
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def validate_record(record: Any) -> None:
    """Raise ValueError (one line) unless ``record`` is a well-formed schema-1 record."""
    if not isinstance(record, dict):
        raise ValueError(f"record must be a dict, got {type(record).__name__}")
    if record.get("schema") != SCHEMA:
        raise ValueError(f"schema must be {SCHEMA}, got {record.get('schema')!r}")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"record is missing keys {missing}")
    task = record["task"]
    if task not in HEADLINE:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    for key in ("label", "supervision", "preset"):
        if not isinstance(record[key], str) or not record[key]:
            raise ValueError(f"{key} must be a non-empty string, got {record[key]!r}")
    fingerprint = record["fingerprint"]
    # The path uses the first 16 hex digits, so at least that many are needed.
    if not isinstance(fingerprint, str) or not re.fullmatch(r"[0-9a-f]{16,}", fingerprint):
        raise ValueError(f"fingerprint must be lowercase hex (>= 16 digits), got {fingerprint!r}")
    seed = record["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    metrics = record["metrics"]
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics must be a dict, got {type(metrics).__name__}")
    name = HEADLINE[task]
    if name not in metrics:
        raise ValueError(f"{task} metrics must contain headline {name!r}")
    if task == "in1k_linear":
        top1 = metrics[name]
        if not isinstance(top1, dict):
            raise ValueError("in1k_linear metrics['top1'] must map conv1..conv5 to numbers")
        for layer in LINEAR_LAYERS:
            if not _is_number(top1.get(layer)):
                raise ValueError(f"in1k_linear top1[{layer!r}] must be a finite number, "
                                 f"got {top1.get(layer)!r}")
    elif not _is_number(metrics[name]):
        raise ValueError(f"{task} {name} must be a finite number, got {metrics[name]!r}")
    key = record.get("run_key")
    if key is not None and not (isinstance(key, str) and re.fullmatch(r"[0-9a-f]{12}", key)):
        raise ValueError(f"run_key must be 12 lowercase hex digits, got {key!r}")
    for key in ("metric_definitions", "config", "provenance"):
        if not isinstance(record[key], dict):
            raise ValueError(f"{key} must be a dict, got {type(record[key]).__name__}")
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"record is not JSON-serialisable: {err}") from None


def make_record(
    task: str,
    metrics: Mapping[str, Any],
    *,
    label: str,
    supervision: str,
    fingerprint: str,
    seed: int,
    preset: str,
    config: Mapping[str, Any],
    provenance: Mapping[str, Any],
    metric_definitions: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build and validate a schema-1 record; ValueError says what is wrong."""
    record = {
        "schema": SCHEMA,
        "task": task,
        "label": label,
        "supervision": supervision,
        "fingerprint": fingerprint,
        "seed": seed,
        "preset": preset,
        "metrics": dict(metrics),
        "metric_definitions": dict(metric_definitions or {}),
        "config": dict(config),
        "provenance": dict(provenance),
    }
    validate_record(record)
    return record


def record_path(results_dir: Path | str, task: str, fingerprint: str, seed: int,
                preset: str, run_key: str | None = None) -> Path:
    """``results_dir/<task>/<preset>/<fingerprint[:16]>-<run_key>-seed<seed>.json``.

    ``run_key`` (see :func:`run_key`) tells apart runs of one checkpoint and seed that differ in a
    protocol value or in their data; records written before it existed have no key in the name.
    """
    middle = f"-{run_key}" if run_key else ""
    return Path(results_dir) / task / preset / f"{fingerprint[:16]}{middle}-seed{seed}.json"


def record_exists(results_dir: Path | str, task: str, fingerprint: str, seed: int,
                  preset: str, run_key: str | None = None) -> bool:
    """True when a finished record for this (task, fingerprint, seed, preset, run key) exists."""
    return record_path(results_dir, task, fingerprint, seed, preset, run_key).is_file()


def run_key(identity: Mapping[str, Any]) -> str:
    """12 hex digits of sha256 over a run's identity (task, protocol values, data split hash):
    two runs share a key only when everything that changes their result is equal."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Replace ``path`` with ``text`` so readers see the old or new file, never half."""
    return atomic_write(path, text)


def write_record(record: Mapping[str, Any], results_dir: Path | str,
                 overwrite: bool = False) -> Path:
    """Validate and atomically write ``record``; return its path.

    The record is written whole to a temp file, fsynced, then published: with
    ``overwrite`` by ``os.replace``; without, by ``os.link``, which fails if the
    final name exists, so of two concurrent writers exactly one wins and the other
    gets RecordExistsError. A writer killed midway leaves only a ``.tmp-*`` file,
    which ``load_records`` ignores.
    """
    record = dict(record)
    validate_record(record)
    path = record_path(results_dir, record["task"], record["fingerprint"],
                       record["seed"], record["preset"], record.get("run_key"))
    if not overwrite and path.exists():
        # Cheap early exit; the link below is what actually guarantees no clobber.
        raise RecordExistsError(f"record already exists: {path} (pass overwrite=True to replace)")
    encoder = json.JSONEncoder(indent=2, sort_keys=True, allow_nan=False)
    try:
        return atomic_write(path, itertools.chain(encoder.iterencode(record), ["\n"]), overwrite=overwrite)
    except FileExistsError:
        raise RecordExistsError(f"record already exists: {path} (pass overwrite=True to replace)") from None


def load_record(path: Path | str) -> dict[str, Any]:
    """One record; a file that is not JSON or not a schema-1 record raises ValueError naming it."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    try:
        validate_record(record)
    except ValueError as err:
        raise ValueError(f"{path}: not a schema-{SCHEMA} record ({err})") from None
    return record


def load_records(results_dir: Path | str) -> list[dict[str, Any]]:
    """All records under ``results_dir`` (recursively, sorted by path).

    ``.tmp-*`` files are unfinished writes and are skipped. A file that is not JSON
    or not a schema-1 record raises ValueError naming the file: a broken record
    should stop a report, not silently drop a run.
    """
    return [load_record(path) for path in record_files(results_dir)]


def record_files(results_dir: Path | str) -> list[Path]:
    """The finished record files under ``results_dir``, sorted; ``.tmp-*`` (unfinished writes)
    left out. Shared by :func:`load_records` and ``results.load``, which also keeps each path."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    return [path for path in sorted(results_dir.rglob("*.json")) if not path.name.startswith(TMP_PREFIX)]
