"""The one place that builds a submitit executor, for every job kind (benchmark cells, flow
extraction, proposals, pretraining, merges), and previews its ``#SBATCH`` lines without one.

Parameters are computed once, in sbatch's own names (:func:`slurm_parameters`): the executor for a
real cluster receives exactly these, and the dry run renders them with submitit's sbatch template
without constructing a ``SlurmExecutor`` — which refuses to exist where ``srun`` is not installed,
e.g. on the laptop where a user previews a grid. The grid file's ``signal_delay_s`` (the warning
before the time limit that lets a job save and requeue) and ``max_num_timeout`` reach every kind.
"""
from __future__ import annotations

from typing import Any

DEFAULT_ARRAY_PARALLELISM = 64
DEFAULT_MAX_NUM_TIMEOUT = 3


def slurm_parameters(grid, name: str, res, dependency: str | None = None) -> dict[str, Any]:
    """sbatch parameters (submitit's SlurmExecutor names) of a job named ``<grid>-<name>``."""
    from submitit.slurm.slurm import _convert_mem

    params: dict[str, Any] = {"job_name": f"{grid.name}-{name}", "time": res.time_min, "nodes": 1,
                              "ntasks_per_node": res.tasks, "cpus_per_task": res.cpus,
                              "mem": _convert_mem(res.mem_gb),
                              "array_parallelism": int(grid.slurm.get("array_parallelism",
                                                                      DEFAULT_ARRAY_PARALLELISM))}
    if res.gpus:
        params["gpus_per_node"] = res.gpus
    if res.partition:
        params["partition"] = res.partition
    extra = dict(res.additional_parameters)
    if dependency:
        extra["dependency"] = dependency
    if extra:
        params["additional_parameters"] = extra
    if grid.slurm.get("setup"):
        params["setup"] = list(grid.slurm["setup"])
    if "signal_delay_s" in grid.slurm:
        params["signal_delay_s"] = int(grid.slurm["signal_delay_s"])
    return params


def local_parameters(res) -> dict[str, Any]:
    """LocalExecutor parameters: one process per job (no SLURM variables to start DDP from)."""
    params: dict[str, Any] = {"timeout_min": res.time_min, "tasks_per_node": 1}
    if res.gpus:
        params["gpus_per_node"] = res.gpus
    return params


def max_num_timeout(grid) -> int:
    return int(grid.slurm.get("max_num_timeout", DEFAULT_MAX_NUM_TIMEOUT))


def make_executor(grid, name: str, res, cluster: str, dependency: str | None = None):
    """A submitit executor for ``cluster`` ("slurm" or "local"), logs under ``<log_dir>/<job id>/``."""
    import submitit

    folder = grid.log_dir / "%j"
    if cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_num_timeout(grid))
        executor.update_parameters(**slurm_parameters(grid, name, res, dependency))
    elif cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(**local_parameters(res))
    else:
        raise ValueError(f"unknown cluster {cluster!r}: expected slurm or local")
    return executor


def sbatch_preview(grid, name: str, res, count: int, dependency: str | None = None) -> list[str]:
    """The ``#SBATCH`` lines of a job array of ``count`` tasks, as submitit would write them; needs
    no SLURM installation."""
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(command="...", folder=grid.log_dir / "%j", map_count=count if count > 1 else None,
                               **slurm_parameters(grid, name, res, dependency))
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]
