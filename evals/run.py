"""Evaluate a checkpoint on one benchmark and write its result record.

    python -m evals.run --task voc07_cls --ckpt model.pt [--preset paper|demo] [--seed N]
                        [--data-root DIR] [--label "row name"] [--row NAME] [--print-config] [--set KEY=VALUE ...]
                        [--allow-subset]

Tasks: voc07_cls (P2), in1k_linear (P5), voc07_det (P3), voc12_seg (P4) of docs/protocols.md.
``--ckpt`` takes our checkpoints, an exported plain AlexNet, a torchvision AlexNet state dict,
``random`` for the random-initialisation row, or ``random-rescaled`` for Table 2's Random-rescaled
row (``random`` rescaled on the data root's VOC2007 trainval images, backbones.rescale).
Presets: ``paper`` follows the protocol exactly; ``demo`` is a CPU-sized schedule for the
generated data (``python -m evals.data make-demo``).

Preset names: a changed protocol value appends ``+custom``; a ``paper`` run on splits of other
than the official sizes stops before training unless ``--allow-subset``, which inserts ``+subset``
after the base name (``paper+subset``, ``paper+subset+custom``). The report treats every preset
but exactly ``paper`` as non-paper.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import sys
from pathlib import Path

from evals import engine
from evals.common import COMMON_CHOICES
from results import store
from results.store import RecordExistsError
from results.tasks import TASKS as REGISTRY
from runtime.atomic import NoSpaceError
from runtime.config import chosen_values, config_dict, operational_fields, parse_overrides, sources, validate_config
from runtime.errors import CheckpointError, ConfigError, DatasetError, RunError, one_line
from runtime.precision import check_decode_device

TASKS = {name: task.module for name, task in REGISTRY.items()}
PAPER_PRESET = "paper"
SUBSET_TAG = "subset"


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
               ("ckpt", "data_root", "seed", "label", "supervision", "row", "device", "workers", "work_dir", "results_dir")
               if getattr(args, name, None) is not None}
    if args.no_resume:
        changes["resume"] = False
    if args.overwrite:
        changes["overwrite"] = True
    if args.allow_subset:
        changes["allow_subset"] = True
    try:
        overrides = parse_overrides(config, args.set or [])
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if "preset" in overrides:
        raise SystemExit("error: --set preset=...: choose the preset with --preset (a changed value marks it +custom)")
    changes.update(overrides)
    operational = operational_fields(config)
    protocol_changes = sorted(k for k, v in changes.items() if k not in operational and v != getattr(config, k))
    if protocol_changes:  # a run that departs from its preset must not be reported under its name
        changes["preset"] = f"{config.preset}+custom"
        print(f"note: {', '.join(protocol_changes)} differ from preset {config.preset!r}; "
              f"the run is recorded under preset {changes['preset']!r}", file=sys.stderr)
    return module, dataclasses.replace(config, **changes)


def subset_preset(preset: str) -> str:
    """``preset`` marked as run on a data subset: ``+subset`` right after the base name, before any
    ``+custom`` (``paper`` -> ``paper+subset``, ``paper+custom`` -> ``paper+subset+custom``)."""
    base, *tags = preset.split("+")
    return "+".join([base, SUBSET_TAG, *(t for t in tags if t != SUBSET_TAG)])


def _counts(sizes: dict) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in sizes.items())


def check_official_sizes(task: str, harness, config, sizes: dict[str, int]):
    """A run whose preset is based on ``paper`` must read the official splits (``harness.official_sizes``):
    ``sizes`` (split name -> images loaded) is compared with them before anything is trained. A
    mismatch stops the run (DatasetError naming both) unless ``config.allow_subset``; then the
    config comes back with its preset marked ``+subset``, so the record, its path and the report
    never pass it for a paper run. Other presets come back unchanged."""
    if config.preset.split("+")[0] != PAPER_PRESET:
        return config
    wanted = harness.official_sizes(config)
    found = {name: sizes.get(name, 0) for name in wanted}
    if found == wanted:
        return config
    if not config.allow_subset:
        raise DatasetError(f"{config.data_root}: {task} at preset {config.preset!r} needs the official splits "
                           f"({_counts(wanted)} images), found {_counts(found)}; pass --allow-subset to run on "
                           f"these (recorded under preset {subset_preset(config.preset)!r})")
    print(f"note: {task}: splits of {_counts(found)} images, not the official {_counts(wanted)}; the run is "
          f"recorded under preset {subset_preset(config.preset)!r}", file=sys.stderr)
    return dataclasses.replace(config, preset=subset_preset(config.preset))


def split_sizes(splits) -> dict[str, int]:
    return {name: len(ids) for name, ids in splits.items()}


def check_config(harness, config) -> None:
    """Refuse a value that cannot work before any data is read: the harness's CHECKS, the
    choices every harness shares (evals.common.COMMON_CHOICES), and ``decode_device=cuda``
    without a GPU."""
    checks = dict(getattr(harness, "CHECKS", {}))
    checks["choices"] = {**COMMON_CHOICES, **checks.get("choices", {})}
    validate_config(config, **checks)
    if hasattr(config, "decode_device"):
        check_decode_device(config.decode_device)


def run_task(task: str, config) -> dict:
    """A run's whole life, the same for every task: check the config, read the split lists (a
    ``paper`` run: are they the official sizes? see :func:`check_official_sizes`), set up
    (DDP, seed, the checkpoint and its fingerprint, the run's identity), skip a finished record,
    check the data, train and evaluate (the harness: its protocol only), and on the main rank write
    the record and print a summary. Returns the metrics (non-main ranks: {})."""
    harness = task_module(task)
    check_config(harness, config)
    data = harness.load_data(config)
    config = check_official_sizes(task, harness, config, split_sizes(data.splits))  # before the run's identity
    begun = engine.begin_run(task, config, splits=data.splits, **harness.backbone_options(config))
    if begun.finished is not None:
        return begun.finished
    harness.preflight(data, config, begun.log)  # a bad file stops the run now, before training
    result = harness.train_and_evaluate(config, data, begun)
    if not begun.info.is_main:
        return {}
    path = engine.save_record(task=task, metrics=result, metric_definitions=harness.METRIC_DEFINITIONS,
                              begun=begun, config=config, splits=data.splits)
    print(f"[{task}] {harness.summary(result)}; {begun.loaded.source}; record: {path}")
    return result


def plan(argv, cache: dict | None = None) -> dict:
    """What ``python -m evals.run ARGV`` would do, without doing it: the preset it records under,
    the checkpoint's fingerprint (None while the file does not exist), the run key and record path
    (None when the data cannot be read from here), and the protocol values. The cluster grid asks
    this (``--plan``) to know each cell's record before and after submitting it."""
    from backbones.checkpoint import random_backbone, read_checkpoint
    cache = {} if cache is None else cache
    args = get_args_parser().parse_args(list(argv))
    with contextlib.redirect_stderr(io.StringIO()):  # the "+custom" note: the grid shows the preset
        harness, config = resolve_config(args.task, args)
    if config.ckpt == "random":
        key = ("random", config.seed, config.layout)
        if key not in cache:
            cache[key] = random_backbone(config.seed, layout=config.layout).fingerprint
    elif config.ckpt == "random-rescaled":  # built as load_for_eval builds it; None while the data is unreadable
        key = ("random-rescaled", config.seed, config.layout, str(Path(config.data_root).resolve()))
        if key not in cache:
            try:
                cache[key] = engine.load_for_eval(config.ckpt, config.seed, num_classes=None, new_head=False,
                                                  layout=config.layout, data_root=config.data_root,
                                                  cache_dir=engine.builtin_cache(config)).fingerprint
            except (DatasetError, FileNotFoundError):
                cache[key] = None
    else:
        key = ("file", config.ckpt)
        if key not in cache:
            cache[key] = read_checkpoint(config.ckpt).fingerprint if Path(config.ckpt).exists() else None
    fingerprint = cache[key]
    protocol = engine.protocol_values(config)
    data_key = ("data", args.task, json.dumps(config_dict(dataclasses.replace(config, ckpt="", seed=0)),
                                               sort_keys=True))
    if data_key not in cache:
        try:
            splits = harness.load_data(config).splits
            cache[data_key] = (store.run_key(engine.run_identity(args.task, config, splits)), split_sizes(splits))
        except (DatasetError, FileNotFoundError):
            cache[data_key] = (None, None)
    run_key, sizes = cache[data_key]
    if sizes is not None:  # what run_task will record under (or its error, for this cell)
        with contextlib.redirect_stderr(io.StringIO()):
            config = check_official_sizes(args.task, harness, config, sizes)
    record = (store.record_path(engine.results_dir_of(config), args.task, fingerprint, config.seed, config.preset,
                                run_key) if fingerprint and run_key else None)
    return {"task": args.task, "preset": config.preset, "fingerprint": fingerprint, "run_key": run_key,
            "record": str(record) if record else None, "protocol": protocol,
            "record_dir": str(Path(engine.results_dir_of(config)) / args.task / config.preset)}


def plan_lines(lines) -> list[dict]:
    """:func:`plan` for each JSON list of arguments; an unusable cell gives ``{"error": "..."}``."""
    cache, out = {}, []
    for line in lines:
        if not line.strip():
            continue
        try:
            out.append(plan(json.loads(line), cache))
        except SystemExit as err:
            out.append({"error": str(err.code)})
        except (CheckpointError, DatasetError, ConfigError) as err:
            out.append({"error": one_line(err)})
    return out


def _cell(value) -> str:
    """A config value as the README's table shows it."""
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_cell(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def chosen_table() -> str:
    """The Markdown table of every value the protocols leave unpublished, from the config fields'
    declarations (runtime.config.chosen): flow preparation, pretraining and the four tasks. The
    README carries this table; a test keeps the two equal."""
    from pretrain.prepare import PrepareConfig
    from pretrain.train import PRESETS as PRETRAIN_PRESETS
    configs = [("flow preparation (P1)", PrepareConfig()), ("pretraining (P1)", PRETRAIN_PRESETS["paper"])]
    configs += [(f"{name} ({task.protocol})", task_module(name).PRESETS["paper"]) for name, task in REGISTRY.items()]
    rows = ["| stage | field | chosen | why |", "|---|---|---|---|"]
    for stage, config in configs:
        rows += [f"| {stage} | `{c['field']}` | {_cell(c['value'])} | {c['why']} |" for c in chosen_values(config)]
    return "\n".join(rows) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evals.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), help="which benchmark to run (required)")
    parser.add_argument("--ckpt", help="checkpoint to evaluate, 'random' (PyTorch's default init under --seed) or "
                                       "'random-rescaled' (that, rescaled with Krähenbühl et al.'s method on 160 "
                                       "VOC2007 trainval images of --data-root; backbones.rescale) "
                                       "(default: the preset's, 'random')")
    parser.add_argument("--preset", default="paper", help="protocol preset: paper (default) or demo")
    parser.add_argument("--seed", type=int, help="seed of the run (fine-tuning order, augmentation, init)")
    parser.add_argument("--data-root", help="folder with VOCdevkit/, benchmark_RELEASE/, imagenet/")
    parser.add_argument("--label", help="row label in Table 1/2 (default: from the checkpoint)")
    parser.add_argument("--supervision", help="Supervision column in the tables (default: from the checkpoint)")
    parser.add_argument("--row", metavar="NAME",
                        help="pool this checkpoint's runs with those of other checkpoints given the same NAME "
                             "under one table row (e.g. several pretraining seeds); default: a row per checkpoint")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--workers", type=int, help="data-loading worker processes")
    parser.add_argument("--work-dir", help="where training checkpoints and TensorBoard logs go")
    parser.add_argument("--results-dir", help="results store (default: results/runs or $CPFS_RESULTS_DIR)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if a training checkpoint exists")
    parser.add_argument("--overwrite", action="store_true", help="redo and replace an existing finished record")
    parser.add_argument("--allow-subset", action="store_true",
                        help="at preset paper, run even if the splits are not the official sizes; the run is "
                             "recorded under preset paper+subset (a non-paper row)")
    parser.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                        help="override config fields, e.g. --set iterations=500 lr=0.01 (repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as JSON (values the protocol leaves unpublished are "
                             "listed under 'chosen', every field's source under 'sources') and exit")
    parser.add_argument("--chosen-table", action="store_true",
                        help="print the Markdown table of every value the protocols leave unpublished (pretraining "
                             "and the four tasks), as the README shows it, and exit")
    parser.add_argument("--plan", action="store_true",
                        help="read one JSON list of evals.run arguments per stdin line and print, per line, what "
                             "that run would record (preset, fingerprint, run key, record path) without running "
                             "it; the cluster grid uses this")
    return parser


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.chosen_table:
        print(chosen_table(), end="")
        return 0
    if args.plan:
        for entry in plan_lines(sys.stdin):
            print(json.dumps(entry, sort_keys=True))
        return 0
    if not args.task:
        parser.error("--task is required")
    module, config = resolve_config(args.task, args)
    if args.print_config:
        print(json.dumps({"task": args.task, "config": config_dict(config), "sources": sources(config),
                          "chosen": {c["field"]: c["why"] for c in chosen_values(config)}}, indent=2))
        return 0
    try:
        metrics = run_task(args.task, config)
    except USER_ERRORS as err:  # one line naming the file or setting; never a traceback
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    headline = {k: v for k, v in metrics.items() if k in ("mAP", "mIoU", "top1")}
    print(json.dumps({"task": args.task, **headline}, indent=None, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
