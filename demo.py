"""The README's main job: the whole pipeline on built-in data, ending with Table 1 / Table 2.

    python -m demo [--out demo_output] [--results-dir DIR]

Stages run in order with a progress line each. Stages whose parts of the toolkit are not built
yet are listed as such rather than faked; today the job builds the Table 1/2 report from the
paper's reference rows plus every run record found in the results store.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from results import report, store


def _stage_report(args) -> None:
    argv = ["--out", str(args.out / "report")]
    if args.results_dir is not None:
        argv += ["--results-dir", str(args.results_dir)]
    if report.main(argv) != 0:
        raise RuntimeError("the report command failed")


# Later stages (flow preparation, pretraining, the four benchmarks) are added here as they land.
STAGES: list[tuple[str, Callable]] = [
    ("Table 1 / Table 2 report (paper rows + our runs)", _stage_report),
]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_output"),
                        help="folder for everything the demo writes (default: demo_output)")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help=f"results store to read runs from (default: {store.default_results_dir()})")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    for i, (title, stage) in enumerate(STAGES, start=1):
        print(f"\n=== [{i}/{len(STAGES)}] {title}", flush=True)
        t0 = time.monotonic()
        stage(args)
        print(f"=== [{i}/{len(STAGES)}] done in {time.monotonic() - t0:.1f}s", flush=True)
    print(f"\nDemo finished in {time.monotonic() - start:.1f}s; outputs in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
