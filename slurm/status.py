"""Where every cell of a grid stands: done, pending, running, failed, unsubmitted or waiting.

    python -m slurm.status GRID [--set KEY=VALUE ...] [--hide-done] [--json]

*done*: its result record exists (the record store is the truth, whoever wrote it).
Otherwise the job recorded for it in ``<log_dir>/cells.json`` decides: *pending* / *running*
from ``squeue`` (a requeued job is pending again), *failed* once the job has left the queue
without a record (submitit's result file holds the error; ``sacct`` adds the final state where
the cluster keeps accounting), *unsubmitted* when no job was ever recorded for it, *waiting*
while its checkpoint file does not exist yet (pretraining still to run; never submitted).
Local jobs (``--cluster local``) are checked by their process id.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from slurm.grid import Cell, Grid, GridError, load_grid, parse_sets

STATES = ("done", "running", "pending", "failed", "unsubmitted", "waiting")
QUEUED = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED",
          "STOPPED", "RESIZING"}


# --- the state file: job ids and log paths of the submitted cells ---------------------------------

def load_state(grid: Grid) -> dict:
    try:
        return json.loads(grid.state_file.read_text())
    except FileNotFoundError:
        return {"grid": str(grid.source), "cells": {}}


def save_state(grid: Grid, state: dict) -> Path:
    from results.store import write_text_atomic
    return write_text_atomic(grid.state_file, json.dumps(state, indent=1, sort_keys=True) + "\n")


# --- job states ------------------------------------------------------------------------------------

def squeue_states() -> dict[str, tuple[str, str]] | None:
    """``{job id: (state, reason)}`` of this user's queued and running jobs (array tasks one by
    one, as ``<array id>_<index>``); None when squeue cannot be asked."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T|%r"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    states = {}
    for line in out.stdout.splitlines():
        job_id, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        states[job_id] = (state, reason)
    return states


def sacct_states(job_ids) -> dict[str, str]:
    """Final states from accounting; {} where the cluster keeps none (then sacct only warns)."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    return {job_id: state.split()[0] for job_id, _, state in
            (line.partition("|") for line in out.stdout.splitlines()) if state}


def read_result(path: str | os.PathLike) -> tuple[str, str] | None:
    """submitit's result file: ("success", "") or ("error", last line of the traceback)."""
    from submitit.core.utils import pickle_load
    try:
        outcome, value = pickle_load(Path(path))
    except FileNotFoundError:
        return None
    except Exception as err:  # a half-written or foreign file
        return "error", f"unreadable result file ({type(err).__name__})"
    if outcome == "success":
        return "success", ""
    lines = [line for line in str(value).strip().splitlines() if line.strip()]
    return "error", lines[-1].strip() if lines else "error"


def _process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def cell_states(grid: Grid, cells: list[Cell], state: dict | None = None) -> dict[str, tuple[str, str]]:
    """``{cell key: (state, detail)}`` with state one of :data:`STATES`."""
    state = load_state(grid) if state is None else state
    jobs = state.get("cells", {})
    queue = None
    if any(not c.waiting and c.finished_record() is None and jobs.get(c.key, {}).get("cluster") == "slurm"
           for c in cells):
        queue = squeue_states()
    out, lost = {}, []
    for cell in cells:
        job = jobs.get(cell.key)
        if cell.waiting:
            out[cell.key] = ("waiting", f"checkpoint {cell.checkpoint.path} does not exist yet")
        elif (record := cell.finished_record()) is not None:
            out[cell.key] = ("done", str(record))
        elif job is None:
            out[cell.key] = ("unsubmitted", "")
        elif job["cluster"] == "slurm" and queue is None:
            out[cell.key] = ("pending", f"job {job['job_id']}: squeue unavailable, state unknown")
        elif job["cluster"] == "slurm" and job["job_id"] in queue:
            slurm_state, reason = queue[job["job_id"]]
            kind = "pending" if slurm_state in QUEUED else "running"
            out[cell.key] = (kind, f"job {job['job_id']} {slurm_state}" +
                             (f" ({reason})" if kind == "pending" and reason not in ("", "None") else ""))
        elif job["cluster"] == "local" and _process_alive(int(job["job_id"])) and not Path(job["result"]).exists():
            out[cell.key] = ("running", f"local job {job['job_id']}")
        else:
            result = read_result(job["result"])
            if result is None:
                out[cell.key] = ("failed", f"job {job['job_id']} ended without a result (killed, timed out or "
                                           f"cancelled)")
                lost.append(cell.key)
            elif result[0] == "error":
                out[cell.key] = ("failed", f"job {job['job_id']}: {result[1]}")
            else:
                out[cell.key] = ("failed", f"job {job['job_id']} finished but wrote no record at {cell.where}")
    final = sacct_states([jobs[k]["job_id"] for k in lost if jobs[k]["cluster"] == "slurm"])
    for key in lost:
        if jobs[key]["job_id"] in final:
            out[key] = ("failed", f"job {jobs[key]['job_id']} {final[jobs[key]['job_id']]}, no result")
    return out


def summary_line(states: dict[str, tuple[str, str]]) -> str:
    counts = Counter(kind for kind, _ in states.values())
    return ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s]) or "no cells"


def print_table(cells: list[Cell], states: dict, state: dict, show_all: bool = True, file=None) -> None:
    jobs, file = state.get("cells", {}), file or sys.stdout
    width = max((len(c.key) for c in cells), default=4)
    for cell in cells:
        kind, detail = states[cell.key]
        if not show_all and kind == "done":
            continue
        log = jobs.get(cell.key, {}).get("stderr", "") if kind != "done" else ""
        print(f"{cell.key:<{width}}  {kind:<11}  {detail}" + (f"\n{'':<{width}}  {'':<11}  log: {log}" if log else ""),
              file=file)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m slurm.status", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="grid file, e.g. slurm/paper.yaml")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a top-level value of the grid file (base, preset, data_root, results_dir, "
                             "work_dir, log_dir, report_dir, name), as given to slurm.submit")
    parser.add_argument("--hide-done", action="store_true", help="list only the cells that are not done")
    parser.add_argument("--json", action="store_true", help="print {cell: {state, detail, log}} as JSON")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        grid = load_grid(args.grid, parse_sets(args.set))
        cells = grid.cells()
    except GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    state = load_state(grid)
    states = cell_states(grid, cells, state)
    if args.json:
        print(json.dumps({k: {"state": s, "detail": d, "log": state["cells"].get(k, {}).get("stderr")}
                          for k, (s, d) in states.items()}, indent=1))
    else:
        print_table(cells, states, state, show_all=not args.hide_done)
        print(f"{grid.source}: {len(cells)} cells: {summary_line(states)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
