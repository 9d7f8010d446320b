"""Evaluate a checkpoint on one benchmark and write its result record.

    python -m evals.run --task voc07_cls --ckpt model.pt [--preset paper|demo] [--seed N]
                        [--data-root DIR] [--label "row name"] [--print-config] [--set KEY=VALUE ...]

Tasks: voc07_cls (P2), in1k_linear (P5), voc07_det (P3), voc12_seg (P4) of ../shared/protocols.md.
``--ckpt`` takes our checkpoints, an exported plain AlexNet, a torchvision AlexNet state dict, or
``random`` for the random-initialisation row. Presets: ``paper`` follows the protocol exactly;
``demo`` is a CPU-sized schedule for the generated data (``python -m evals.data make-demo``).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys

from results.store import RecordExistsError
from runtime.atomic import NoSpaceError
from runtime.errors import CheckpointError, ConfigError, DatasetError, RunError, one_line
from evals.engine import OPERATIONAL_FIELDS, config_dict, parse_overrides

TASKS = {
    "voc07_cls": "evals.voc07_cls",
    "in1k_linear": "evals.in1k_linear",
    "voc07_det": "evals.voc07_det",
    "voc12_seg": "evals.voc12_seg",
}


# What a user's input or environment can cause; anything else is a bug and keeps its traceback.
USER_ERRORS = (CheckpointError, DatasetError, ConfigError, RunError, RecordExistsError, NoSpaceError,
               FileNotFoundError, FloatingPointError)


def task_module(task: str):
    try:
        return importlib.import_module(TASKS[task])
    except ModuleNotFoundError as err:
        if err.name == TASKS[task]:
            raise SystemExit(f"error: task {task!r} is not implemented in this version yet") from None
        raise


def resolve_config(task: str, args: argparse.Namespace):
    """The preset's config with the command line's values on top."""
    module = task_module(task)
    if args.preset not in module.PRESETS:
        raise SystemExit(f"error: task {task} has no preset {args.preset!r}; choose from {sorted(module.PRESETS)}")
    config = module.PRESETS[args.preset]
    changes = {name: getattr(args, name) for name in
               ("ckpt", "data_root", "seed", "label", "supervision", "device", "workers", "work_dir", "results_dir")
               if getattr(args, name, None) is not None}
    if args.no_resume:
        changes["resume"] = False
    if args.overwrite:
        changes["overwrite"] = True
    try:
        overrides = parse_overrides(config, args.set or [])
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if "preset" in overrides:
        raise SystemExit("error: --set preset=...: choose the preset with --preset (a changed value marks it +custom)")
    changes.update(overrides)
    protocol_changes = sorted(k for k, v in changes.items()
                              if k not in OPERATIONAL_FIELDS and v != getattr(config, k))
    if protocol_changes:  # a run that departs from its preset must not be reported under its name
        changes["preset"] = f"{config.preset}+custom"
        print(f"note: {', '.join(protocol_changes)} differ from preset {config.preset!r}; "
              f"the run is recorded under preset {changes['preset']!r}", file=sys.stderr)
    return module, dataclasses.replace(config, **changes)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evals.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="which benchmark to run")
    parser.add_argument("--ckpt", help="checkpoint to evaluate, or 'random' (default: the preset's, 'random')")
    parser.add_argument("--preset", default="paper", help="protocol preset: paper (default) or demo")
    parser.add_argument("--seed", type=int, help="seed of the run (fine-tuning order, augmentation, init)")
    parser.add_argument("--data-root", help="folder with VOCdevkit/, benchmark_RELEASE/, imagenet/")
    parser.add_argument("--label", help="row label in Table 1/2 (default: from the checkpoint)")
    parser.add_argument("--supervision", help="Supervision column in the tables (default: from the checkpoint)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--workers", type=int, help="data-loading worker processes")
    parser.add_argument("--work-dir", help="where training checkpoints and TensorBoard logs go")
    parser.add_argument("--results-dir", help="results store (default: results/runs or $CPFS_RESULTS_DIR)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if a training checkpoint exists")
    parser.add_argument("--overwrite", action="store_true", help="redo and replace an existing finished record")
    parser.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                        help="override config fields, e.g. --set iterations=500 lr=0.01 (repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as JSON (values the protocol leaves unpublished are "
                             "listed under 'chosen') and exit")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    module, config = resolve_config(args.task, args)
    if args.print_config:
        print(json.dumps({"task": args.task, "config": config_dict(config),
                          "chosen": list(getattr(module, "CHOSEN", ()))}, indent=2))
        return 0
    try:
        metrics = module.run(config)
    except USER_ERRORS as err:  # one line naming the file or setting; never a traceback
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    headline = {k: v for k, v in metrics.items() if k in ("mAP", "mIoU", "top1")}
    print(json.dumps({"task": args.task, **headline}, indent=None, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
