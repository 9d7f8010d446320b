"""GPU-hours of a grid from measured step rates (``--dry-run --estimate`` of ``slurm.submit``).

A cell costs ``iterations / steps_per_s * gpus`` GPU-seconds: the iterations of its task at the
grid's preset (the harness's ``PRESETS``, with the grid task's ``set`` overrides; voc12_seg: stage 1
+ stage 2), the step rate of that task from ``benchmarks/step_rates.json`` (written by
``benchmarks/measure_step_rates.py`` on a CPU, labelled ``CPU-extrapolated``, or by
``benchmarks/gpu_check.sh --write-rates`` on a GPU), and the cell's GPU count. Testing, data
preparation and queueing are not counted.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

RATES_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "step_rates.json"
ITERATION_FIELDS = {"voc12_seg": ("stage1_iterations", "stage2_iterations")}  # default: ("iterations",)


def load_rates(path: Path | None = None) -> dict:
    """task -> figure (steps_per_s, source, machine, command); {} when nothing was measured."""
    path = RATES_FILE if path is None else path
    if not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text()).get("tasks", {})


def iterations(task: str, preset: str, overrides) -> int:
    """Training iterations of ``task`` at ``preset`` (base name, e.g. 'paper' of 'paper+custom')."""
    presets = importlib.import_module(f"evals.{task}").PRESETS
    config = presets.get(preset.split("+")[0]) or presets["paper"]
    fields = ITERATION_FIELDS.get(task, ("iterations",))
    return sum(int(overrides.get(f, getattr(config, f))) for f in fields)


def estimate_lines(grid, cells, rates: dict | None = None) -> list[str]:
    """The step-rate table, one cost line per cell and the total, as printed lines."""
    rates = load_rates() if rates is None else rates
    lines = ["", "step rates (benchmarks/step_rates.json):"]
    for task in grid.tasks:
        figure = rates.get(task)
        if figure:
            lines.append(f"  {task:12s} {figure['steps_per_s']:9.4f} steps/s  [{figure['source']}] "
                         f"{figure.get('machine', '?')}: {figure.get('command', '?')}")
        else:
            lines.append(f"  {task:12s}   not measured (python benchmarks/measure_step_rates.py)")
    lines.append("estimated cost per cell (iterations / steps_per_s x GPUs):")
    total, labels, missing = 0.0, set(), 0
    for cell in cells:
        figure = rates.get(cell.task)
        spec = grid.tasks[cell.task]
        its = iterations(cell.task, cell.preset, getattr(spec, "overrides", {}) or {})
        gpus = max(1, cell.resources.gpus)
        if not figure:
            missing += 1
            lines.append(f"  {cell.key}: {its} iterations, no step rate")
            continue
        hours = its / figure["steps_per_s"] / 3600.0 * gpus
        total += hours
        labels.add(figure["source"])
        lines.append(f"  {cell.key}: {its} iterations x {gpus} GPU = {hours:,.1f} GPU-hours [{figure['source']}]")
    label = ", ".join(sorted(labels)) or "none"
    lines.append(f"total: {total:,.1f} GPU-hours over {len(cells) - missing} cells [{label}]"
                 + (f"; {missing} cells without a step rate" if missing else ""))
    if "CPU-extrapolated" in labels:
        lines.append("  (CPU-extrapolated: step rates measured on a CPU, so an upper bound; run "
                     "benchmarks/gpu_check.sh --write-rates on a GPU for real figures)")
    return lines
