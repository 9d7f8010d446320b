"""Submit a benchmark grid: one submitit job array per task, one array task per cell.

    python -m slurm.submit GRID [--cluster slurm|local] [--dry-run] [--only-failed] [--wait]
    python -m slurm.submit GRID --report          # regenerate Table 1/2 from the grid's results dir
    python -m slurm.status GRID                   # where every cell stands

A cell is (task, checkpoint, seed): ``python -m evals.run`` with the grid's preset and paths.
Cells whose result record already exists are skipped, and so are cells whose job is still
pending or running, so submitting the same grid again only runs what is missing;
``--only-failed`` resubmits just the cells whose job ended without a record. Job ids and log
paths go to ``<log_dir>/cells.json`` (written atomically); submitit's logs to
``<log_dir>/<job id>/``.

Each job runs ``slurm.runner.Command``: on preemption or near its time limit it saves, requeues
itself and continues from its last training checkpoint. A job with G GPUs runs G processes
(``--ntasks-per-node=G``) that start DDP from SLURM's variables.

``--cluster local`` runs the cells on this machine with submitit's LocalExecutor, at most
``slurm.array_parallelism`` at a time, and returns when they are done.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone

from slurm.grid import Cell, Grid, GridError, load_grid, parse_sets
from slurm.executor import local_parameters, make_executor, sbatch_preview
from slurm.runner import Command
from slurm.status import cell_states, load_state, print_table, read_result, save_state, summary_line

def command_of(cell: Cell) -> Command:
    return Command("evals.run", cell.argv, threads=cell.resources.cpus)


def sbatch_lines(grid: Grid, cell: Cell, count: int) -> list[str]:
    """The ``#SBATCH`` lines of a task's array (no SLURM installation needed)."""
    return sbatch_preview(grid, cell.task, cell.resources, count)


def _record_job(state: dict, cell: Cell, job, cluster: str) -> None:
    entry = state["cells"].setdefault(cell.key, {"attempts": []})
    entry.update({"task": cell.task, "checkpoint": cell.checkpoint.name, "ckpt": cell.checkpoint.path,
                  "seed": cell.seed, "fingerprint": cell.fingerprint, "preset": cell.preset,
                  "record": cell.where, "cluster": cluster, "job_id": str(job.job_id),
                  "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
                  "result": str(job.paths.result_pickle), "command": cell.command,
                  "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    entry["attempts"].append(entry["job_id"])


def submit_slurm(grid: Grid, cells: list[Cell], state: dict, log=print) -> None:
    """One job array per task (submitit's batch), recorded in the state file as they go."""
    for task in grid.tasks:
        mine = [c for c in cells if c.task == task]
        if not mine:
            continue
        executor = make_executor(grid, task, mine[0].resources, "slurm")
        with executor.batch():
            jobs = [executor.submit(command_of(cell)) for cell in mine]
        for cell, job in zip(mine, jobs):
            _record_job(state, cell, job, "slurm")
        save_state(grid, state)
        log(f"[{task}] submitted job array {jobs[0].job_id.split('_')[0]} with {len(jobs)} cell(s); "
            f"logs in {grid.log_dir}")


def run_local(grid: Grid, cells: list[Cell], state: dict, log=print, poll_s: float = 0.5) -> None:
    """Run cells with submitit's LocalExecutor, at most ``array_parallelism`` at once."""
    parallel = max(1, int(grid.slurm.get("array_parallelism", 1)))
    waiting, running, started, finished = list(cells), [], {}, 0
    while waiting or running:
        while waiting and len(running) < parallel:
            cell = waiting.pop(0)
            job = make_executor(grid, cell.task, cell.resources, "local").submit(command_of(cell))
            _record_job(state, cell, job, "local")
            save_state(grid, state)
            running.append((cell, job))
            started[cell.key] = time.monotonic()
            log(f"[local] started {cell.key} (job {job.job_id}; log {job.paths.stderr})")
        time.sleep(poll_s)
        for cell, job in [r for r in running if r[1].done()]:
            running.remove((cell, job))
            finished += 1
            if cell.finished_record() is not None:
                outcome = "done"
            else:
                result = read_result(job.paths.result_pickle)
                outcome = f"FAILED ({result[1] if result else 'no result'}); log {job.paths.stderr}"
            log(f"[local] {finished}/{len(cells)} {cell.key}: {outcome} in {time.monotonic() - started[cell.key]:.0f}s")


def wait(grid: Grid, cells: list[Cell], log=print, poll_s: float = 10.0, timeout_s: float | None = None) -> dict:
    """Poll until none of ``cells`` is pending or running; returns their final states."""
    last, deadline = None, None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        states = cell_states(grid, cells)
        line = summary_line(states)
        if line != last:
            log(f"[{datetime.now().strftime('%H:%M:%S')}] {line}")
            last = line
        if not any(kind in ("pending", "running") for kind, _ in states.values()):
            return states
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"cells still pending or running after {timeout_s:.0f}s: {line}")
        time.sleep(poll_s)


def report(grid: Grid) -> int:
    from results import report as table_report
    return table_report.main(["--results-dir", str(grid.results_dir), "--out", str(grid.report_dir)])


def submit(grid: Grid, cluster: str = "slurm", dry_run: bool = False, only_failed: bool = False,
           wait_done: bool = False, log=print, poll_s: float = 10.0, estimate: bool = False) -> int:
    """Submit the grid's missing (or only its failed) cells; 0 unless a cell failed (with wait)."""
    cells = grid.cells()
    state = load_state(grid)
    states = cell_states(grid, cells, state)
    wanted = {"failed"} if only_failed else {"failed", "unsubmitted"}
    todo = [c for c in cells if states[c.key][0] in wanted]
    waiting = [c for c in cells if c.waiting] if not only_failed else []
    log(f"{grid.source}: {len(cells)} cells ({summary_line(states)}); "
        f"{'would submit' if dry_run else 'submitting'} {len(todo)}"
        + (" (--only-failed)" if only_failed else ""))
    for path in dict.fromkeys(c.checkpoint.path for c in waiting):
        first = "convert" if "convert" in grid.sections else "pretrain"
        log(f"note: {path} does not exist yet: its cells are listed but not submitted "
            f"({first} first: python -m slurm.jobs {first} {grid.source})")
    if dry_run:
        for task in grid.tasks:
            listed = {c.key for c in todo + waiting}
            mine = [c for c in cells if c.task == task and c.key in listed]
            if not mine:
                continue
            log(f"\n[{task}] {len(mine)} cell(s), each {mine[0].resources.describe()}")
            if cluster == "slurm":
                log("  " + "\n  ".join(sbatch_lines(grid, mine[0], len(mine))))
            else:
                log(f"  local executor: {local_parameters(mine[0].resources)}")
            for cell in mine:
                log(f"  {cell.key}: {cell.command}" + ("   [waiting for its checkpoint]" if cell.waiting else ""))
        if estimate:
            from slurm.estimate import estimate_lines

            listed = {c.key for c in todo + waiting}
            for line in estimate_lines(grid, [c for c in cells if c.key in listed]):
                log(line)
        return 0
    if not todo:
        log("nothing to submit")
    elif cluster == "local":
        run_local(grid, todo, state, log)
    else:
        submit_slurm(grid, todo, state, log)
    if not (wait_done or cluster == "local"):
        log(f"watch with: python -m slurm.status {grid.source}")
        return 0
    final = wait(grid, cells, log, poll_s) if cluster == "slurm" else cell_states(grid, cells)
    failed = [c for c in cells if final[c.key][0] == "failed"]
    if failed:
        print_table(failed, final, load_state(grid), file=sys.stderr)
        log(f"{len(failed)} cell(s) failed; after fixing the cause: python -m slurm.submit {grid.source} "
            f"--only-failed")
        return 1
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="grid file, e.g. slurm/paper.yaml (see slurm/grid.py for the format)")
    parser.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                        help="slurm: sbatch job arrays (default); local: run the cells on this machine with "
                             "submitit's LocalExecutor and wait for them")
    parser.add_argument("--dry-run", action="store_true",
                        help="print every cell that would be submitted, its command and its sbatch parameters; "
                             "submit nothing")
    parser.add_argument("--estimate", action="store_true",
                        help="with --dry-run: also print GPU-hours per listed cell and in total, from the step "
                             "rates in benchmarks/step_rates.json (benchmarks/measure_step_rates.py)")
    parser.add_argument("--only-failed", action="store_true",
                        help="resubmit only the cells whose job ended without a record (not the unsubmitted ones)")
    parser.add_argument("--wait", action="store_true",
                        help="after submitting, poll until every cell is done or failed; exit 1 if any failed")
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between polls with --wait (default 30)")
    parser.add_argument("--report", action="store_true",
                        help="submit nothing: regenerate Table 1/2 from the grid's results_dir into report_dir")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a top-level value of the grid file: base, preset, data_root, results_dir, "
                             "work_dir, log_dir, report_dir or name (repeatable)")
    return parser


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.estimate and not args.dry_run:
        parser.error("--estimate goes with --dry-run")
    try:
        grid = load_grid(args.grid, parse_sets(args.set))
        if args.report:
            return report(grid)
        return submit(grid, args.cluster, args.dry_run, args.only_failed, args.wait, poll_s=args.poll,
                      estimate=args.estimate)
    except GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
