"""Training-step rates of pretraining and of each harness, written to benchmarks/step_rates.json,
which ``python -m slurm.submit GRID --dry-run --estimate`` turns into GPU-hours per cell.

Times ``--steps`` steps (after one warm-up) of each task's model, loss and optimiser at the paper
preset's image sizes (benchmarks/harness_steps.py). On a CPU the batch is cut to ``--batch-fraction``
of the paper's and the rate scaled back to a full batch (compute is linear in the batch), and every
figure is labelled ``CPU-extrapolated``: a GPU is one to two orders of magnitude faster, so the
estimate is an upper bound until ``benchmarks/gpu_check.sh`` (which writes measured GPU figures
with ``--write-rates``) has run. Figures already measured on a GPU are kept unless ``--replace``.

Usage: .venv/bin/python benchmarks/measure_step_rates.py [--steps 2] [--batch-fraction 0.25]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness_steps import STEPS  # noqa: E402

RATES_FILE = Path(__file__).resolve().parent / "step_rates.json"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{platform.node()}: {torch.cuda.get_device_name(0)}"
    return f"{platform.node()}: {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}"


def time_steps(task: str, device: torch.device, steps: int, batch: int) -> float:
    """Seconds per step of ``task`` at ``batch`` images (median of ``steps`` after a warm-up)."""
    builder, _ = STEPS[task]
    step, data = builder(device, batch=batch, generator=torch.Generator().manual_seed(0))
    step(data)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(data)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def merge(existing: dict, new: dict, replace: bool) -> dict:
    """New figures over old ones, except that GPU-measured figures survive a CPU run."""
    tasks = dict(existing.get("tasks", {}))
    for task, figure in new.items():
        if replace or tasks.get(task, {}).get("source") != "GPU" or figure["source"] == "GPU":
            tasks[task] = figure
    return {"tasks": tasks}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-fraction", type=float, default=0.25, help="CPU only: fraction of the paper batch")
    parser.add_argument("--tasks", nargs="*", default=list(STEPS))
    parser.add_argument("--out", type=Path, default=RATES_FILE)
    parser.add_argument("--replace", action="store_true", help="overwrite GPU figures too")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    command = "python benchmarks/measure_step_rates.py " + " ".join(argv if argv is not None else sys.argv[1:])
    new = {}
    for task in args.tasks:
        paper_batch = STEPS[task][1]
        batch = paper_batch if device.type == "cuda" else max(1, round(paper_batch * args.batch_fraction))
        seconds = time_steps(task, device, args.steps, batch) * paper_batch / batch
        new[task] = {"steps_per_s": 1.0 / seconds, "batch": paper_batch, "measured_batch": batch,
                     "source": "GPU" if device.type == "cuda" else "CPU-extrapolated",
                     "machine": machine(), "command": command.strip(),
                     "date": time.strftime("%Y-%m-%d")}
        print(f"{task:12s} {1.0 / seconds:10.4f} steps/s  ({new[task]['source']}, batch {batch} of {paper_batch})",
              flush=True)
    existing = json.loads(args.out.read_text()) if args.out.is_file() else {}
    args.out.write_text(json.dumps(merge(existing, new, args.replace), indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
