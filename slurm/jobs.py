"""The jobs before the grid: flow extraction, detection proposals and pretraining, on SLURM.

    python -m slurm.jobs prepare   GRID [--cluster slurm|local] [--dry-run] [--wait]
    python -m slurm.jobs proposals GRID ...
    python -m slurm.jobs pretrain  GRID ...
    python -m slurm.jobs convert   GRID            # on this machine: seconds per checkpoint

Each reads the section of that name in the grid file::

    prepare:                    # pretrain.prepare, sharded: a job array of `shards` tasks per run
      shards: 64
      runs:
        - [--videos, /data/videos, --out, /data/cpfs_flow, --workers, "8", --no-progress]
      merge: [--out, /data/cpfs_flow, --merge]   # one job after every shard has ended
      resources: {cpus: 8, mem_gb: 16, time: "12:00:00"}
    proposals:                  # evals.detection.proposals, sharded the same way
      shards: 16
      runs:
        - [--voc-root, /datasets/VOCdevkit/VOC2007, --split, trainval, --out, /datasets/proposals]
      resources: {cpus: 8, mem_gb: 16, time: "6:00:00"}
    pretrain:                   # pretrain.train, one job per run; keep --resume so a requeued job continues
      runs:
        - [--data, /data/cpfs_flow, --preset, paper, --out, runs/cpfs, --resume]
      resources: {gpus: 4, cpus: 10, mem_gb: 128, time: "3-00:00:00"}

    convert:                    # backbones.convert, here and now: one entry per published checkpoint
      doersch:                  # the name of the checkpoints: entry whose `path` it writes
        src: zoo/doersch/caffenet_context.caffemodel      # relative to the grid's base
        prototxt: zoo/doersch/deploy.prototxt             # optional: --prototxt
        mean: zoo/doersch/mean.binaryproto                 # optional: --mean
        args: [--input, "caffe,mean=none,per_image_mean=1", --discard, fc8]
        note: "Doersch et al. 2015, context prediction"   # shown when files are missing

``convert`` converts every entry whose files are present (an output newer than its source is kept),
lists the missing ones with the files they expect, and exits 1 only if a conversion failed; the
grid then evaluates the converted rows (a checkpoint whose file is still missing is listed by
``slurm.submit`` but not submitted).

Arguments are passed to the module as written (relative paths are relative to the folder you
submit from). A sharded run gets ``--shard-index i --num-shards n`` appended. Every job is a
``slurm.runner.Command``: on preemption or timeout it requeues and the module resumes from its
own files (prepare and proposals skip finished videos/images, pretraining continues from
``last.pt``). Job ids and logs go to ``<log_dir>/jobs-<section>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from slurm.grid import GridError, load_grid, parse_sets, resources
from slurm.executor import make_executor
from slurm.runner import Command
from slurm.status import read_result, squeue_states

MODULES = {"prepare": "pretrain.prepare", "proposals": "evals.detection.proposals", "pretrain": "pretrain.train",
           "convert": "backbones.convert"}
CONVERT_KEYS = {"src", "prototxt", "mean", "args", "note"}
SECTION_KEYS = {"runs", "shards", "merge", "resources"}


def section_commands(grid, name: str) -> tuple[list[Command], Command | None, object]:
    """The section's commands (shards expanded), its merge command, and its resources."""
    where = f"{grid.source}: {name}"
    spec = grid.sections.get(name)
    if spec is None:
        raise GridError(f"{where}: the grid file has no {name!r} section")
    if not isinstance(spec, dict) or set(spec) - SECTION_KEYS:
        raise GridError(f"{where}: expected a mapping with keys {sorted(SECTION_KEYS)}")
    runs = spec.get("runs")
    if not runs or not all(isinstance(r, list) for r in runs):
        raise GridError(f"{where}.runs: expected a list of argument lists")
    res = resources(f"{where}.resources", spec.get("resources"), grid.slurm)
    shards = int(spec.get("shards", 1))
    if name == "pretrain" and shards != 1:
        raise GridError(f"{where}: pretraining is not sharded (use gpus for more devices)")
    module = MODULES[name]
    commands = []
    for run in runs:
        for index in range(shards):
            extra = ["--shard-index", str(index), "--num-shards", str(shards)] if shards > 1 else []
            commands.append(Command(module, [str(a) for a in run] + extra, threads=res.cpus))
    merge = Command(module, [str(a) for a in spec["merge"]], threads=res.cpus) if spec.get("merge") else None
    return commands, merge, res


def _wait(jobs, cluster: str, poll_s: float) -> bool:
    """Until every job has ended; True if all succeeded."""
    while True:
        if cluster == "local":
            running = [j for j in jobs if not j.done()]
        else:
            queue = squeue_states() or {}
            running = [j for j in jobs if str(j.job_id) in queue]
        if not running:
            break
        time.sleep(poll_s)
    outcomes = [read_result(j.paths.result_pickle) for j in jobs]
    for job, outcome in zip(jobs, outcomes):
        if not outcome or outcome[0] != "success":
            print(f"job {job.job_id} failed: {outcome[1] if outcome else 'no result'}; log {job.paths.stderr}",
                  file=sys.stderr)
    return all(o and o[0] == "success" for o in outcomes)


def run_section(grid, name: str, cluster: str = "slurm", dry_run: bool = False, wait: bool = False,
                poll_s: float = 30.0, log=print) -> int:
    commands, merge, res = section_commands(grid, name)
    log(f"{grid.source}: {name}: {len(commands)} job(s) of {MODULES[name]}, each {res.describe()}"
        + (", then a merge job" if merge else ""))
    if dry_run:
        for command in commands + ([merge] if merge else []):
            log(f"  {command}")
        return 0
    executor = make_executor(grid, name, res, cluster)
    if cluster == "slurm":
        with executor.batch():
            jobs = [executor.submit(c) for c in commands]
    else:
        jobs = [executor.submit(c) for c in commands]
    entries = [{"job_id": str(j.job_id), "command": str(c), "stderr": str(j.paths.stderr)}
               for j, c in zip(jobs, commands)]
    log(f"submitted {len(jobs)} job(s): {', '.join(e['job_id'] for e in entries)}; logs in {grid.log_dir}")
    ok = True
    if merge is not None:
        if cluster == "slurm":
            array_id = str(jobs[0].job_id).split("_")[0]
            merge_job = make_executor(grid, f"{name}-merge", res, cluster, dependency=f"afterany:{array_id}").submit(merge)
        else:
            ok = _wait(jobs, cluster, 1.0)
            merge_job = make_executor(grid, f"{name}-merge", res, cluster).submit(merge)
        jobs.append(merge_job)
        entries.append({"job_id": str(merge_job.job_id), "command": str(merge), "stderr": str(merge_job.paths.stderr)})
        log(f"merge job {merge_job.job_id} runs after them")
    from results.store import write_text_atomic
    write_text_atomic(grid.log_dir / f"jobs-{name}.json", json.dumps(entries, indent=1) + "\n")
    if wait or cluster == "local":
        ok = _wait(jobs, cluster, 1.0 if cluster == "local" else poll_s) and ok
    return 0 if ok else 1


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m slurm.jobs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=sorted(MODULES), help="which section of the grid file to submit")
    parser.add_argument("grid", help="grid file holding that section, e.g. slurm/paper.yaml")
    parser.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                        help="slurm (default) or local: run on this machine and wait")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and resources; submit nothing")
    parser.add_argument("--wait", action="store_true", help="wait for the jobs to end; exit 1 if one failed")
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between polls with --wait (default 30)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a top-level value of the grid file (e.g. log_dir=...)")
    return parser


def convert_section(grid, dry_run: bool = False, log=print) -> int:
    """Convert the ``convert:`` entries whose files are present; list the missing ones."""
    from pathlib import Path

    from backbones import convert as converter

    where = f"{grid.source}: convert"
    spec = grid.sections.get("convert")
    if not isinstance(spec, dict) or not spec:
        raise GridError(f"{where}: the grid file has no convert section (a mapping of checkpoint name -> source)")
    done, present, missing, failed = [], [], [], []
    for name, entry in spec.items():
        if not isinstance(entry, dict) or set(entry) - CONVERT_KEYS or "src" not in entry:
            raise GridError(f"{where}.{name}: expected a mapping with src and optionally {sorted(CONVERT_KEYS - {'src'})}")
        ckpt = grid.checkpoints.get(str(name))
        if ckpt is None or ckpt.path in ("random", "random-rescaled"):
            raise GridError(f"{where}.{name}: no checkpoints.{name} entry with the path to write")
        files = {key: Path(str(entry[key])).expanduser() for key in ("src", "prototxt", "mean") if entry.get(key)}
        files = {key: p if p.is_absolute() else grid.base / p for key, p in files.items()}
        args = [str(a) for a in entry.get("args") or []]
        out = Path(ckpt.path)
        absent = [str(p) for p in files.values() if not p.is_file()]
        if absent:
            missing.append((name, entry.get("note", ""), absent))
            continue
        if out.is_file() and out.stat().st_mtime >= max(p.stat().st_mtime for p in files.values()):
            present.append((name, out))
            continue
        argv = [str(files["src"])] + [a for key in ("prototxt", "mean") if key in files
                                      for a in (f"--{key}", str(files[key]))] + args + [
            "--label", ckpt.label or str(name), "--supervision", ckpt.supervision or "-", "--out", str(out), "--quiet"]
        log(f"[convert] {name}: python -m backbones.convert {' '.join(argv)}")
        if dry_run:
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        (done if converter.main(argv) == 0 else failed).append(name)
    log(f"{grid.source}: {len(done)} converted, {len(present)} already converted, {len(missing)} missing, "
        f"{len(failed)} failed" + (" (dry run: nothing written)" if dry_run else ""))
    for name, out in present:
        log(f"  present   {name}: {out}")
    for name, note, absent in missing:
        log(f"  missing   {name}" + (f" ({note})" if note else "") + f": {', '.join(absent)}")
    for name in failed:
        log(f"  FAILED    {name} (the error is above)")
    return 1 if failed else 0


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        grid = load_grid(args.grid, parse_sets(args.set))
        if args.section == "convert":
            return convert_section(grid, args.dry_run)
        return run_section(grid, args.section, args.cluster, args.dry_run, args.wait, args.poll)
    except GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
