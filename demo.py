"""The README's main job: the whole pipeline on built-in data, ending with Table 1 / Table 2.

    python -m demo [--out demo_output] [--fresh]

1. generated VOC2007 / VOC2012 / SBD / ImageNet-format data (``evals.data make-demo``);
2. videos of the moving-objects world (``pretrain.world``: the generated data set's object kinds
   moving independently, a moving camera, occlusion), frames + DIS optical flow as KITTI PNGs
   (``pretrain.prepare``);
3. pretraining of the CPFS model and of the direct-regression baseline at the ``demo`` presets,
   exported as plain AlexNets (``pretrain.train``), and the figures (``pretrain.visualize``);
4. the four benchmarks (VOC07 classification and detection, VOC12 segmentation, ImageNet linear
   probing) on both checkpoints and on ``random`` (linear probing also on ``random-rescaled``) at
   the ``demo`` preset: the grid of ``slurm/demo.yaml`` run with submitit's local executor
   (``slurm.submit --cluster local``);
5. the Table 1 / Table 2 report with the paper's rows and these runs (``results.report``).

Every stage skips work that is already done, so an interrupted demo continues where it stopped
(``--fresh`` starts over). Demo-preset numbers come from minutes of CPU training on toy data:
they show the pipeline works end to end and are labelled as non-paper rows in the tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

from results.tasks import TASKS

# the moving-objects world (pretrain.world): objects of the generated data set's classes moving
# independently over a textured background seen by a moving, zooming camera
WORLD_VIDEOS = 24       # videos of WORLD_FRAMES frames at pretrain.world's 160 x 208
WORLD_FRAMES = 30
DEMO_CHECKPOINTS = ("cpfs", "direct", "random", "random_rescaled")  # random_rescaled: in1k_linear only
# All four benchmarks, the longest cells first: two cells run at once, so starting detection and
# segmentation early keeps both cores busy to the end (the records do not depend on the order).
DEMO_TASKS = ("voc07_det", "voc12_seg", "voc07_cls", "in1k_linear")
assert set(DEMO_TASKS) == set(TASKS)


def stage_data(args) -> None:
    from evals.datasets.demo import make_demo
    data = args.out / "data"
    if (data / "DEMO_DATASET").exists():
        print(f"generated data already in {data}")
        return
    make_demo(data, seed=0, scale="small")


def stage_flow(args) -> None:
    from pretrain.prepare import PrepareConfig, prepare
    from pretrain.world import write_world_videos
    made = write_world_videos(args.out / "videos", count=WORLD_VIDEOS, seed=0, frames=WORLD_FRAMES)
    print(f"{made['videos']} world videos of {WORLD_FRAMES} frames ({made['written']} written now)")
    summary = prepare(PrepareConfig(out=str(args.out / "flow"), videos=str(args.out / "videos"), val_fraction=0.2,
                                    frames_per_video=8, workers=2))
    print({k: v for k, v in summary.items() if not isinstance(v, (list, dict))})


def stage_pretrain(args) -> None:
    from pretrain.train import PRESETS, train
    for method, preset in (("cpfs", "demo"), ("direct", "direct_demo")):
        out = args.out / "pretrain" / method
        if (out / "alexnet_plain.pt").exists():
            print(f"{method}: already pretrained ({out / 'alexnet_plain.pt'})")
            continue
        config = dataclasses.replace(PRESETS[preset], data=str(args.out / "flow"), out=str(out), resume=True,
                                     workers=1)
        summary = train(config)
        print(f"{method}: {summary}")


def stage_figures(args) -> None:
    from pretrain import visualize
    visualize.main(["--ckpt", str(args.out / "pretrain" / "cpfs" / "best.pt"), "--data", str(args.out / "flow"),
                    "--out", str(args.out / "figures")])


def stage_evaluate(args) -> None:
    """The grid of slurm/demo.yaml (DEMO_TASKS x DEMO_CHECKPOINTS) with the local executor: the same
    machinery as on a cluster; cells with a record are skipped, logs go to OUT/slurm_logs/."""
    from slurm.grid import load_grid
    from slurm.submit import submit
    grid = load_grid(Path(__file__).resolve().parent / "slurm" / "demo.yaml",
                     {"base": str(args.out.resolve()), "results_dir": str(args.results_dir.resolve())})
    grid = grid.select(tasks=DEMO_TASKS, checkpoints=DEMO_CHECKPOINTS)
    if submit(grid, cluster="local") != 0:
        raise RuntimeError(f"some cells failed; see python -m slurm.status slurm/demo.yaml --set base={args.out} "
                           f"--set results_dir={args.results_dir}")


def stage_report(args) -> None:
    from results import report
    if report.main(["--results-dir", str(args.results_dir), "--out", str(args.out / "report")]) != 0:
        raise RuntimeError("the report command failed")


STAGES = [
    ("generated VOC/SBD/ImageNet-format data", stage_data),
    ("moving-objects world videos, frames + optical flow (pretrain.world, pretrain.prepare)", stage_flow),
    ("pretraining: CPFS and the direct-regression baseline (demo presets)", stage_pretrain),
    ("figures: Fig. 2, Fig. 4, flow colour wheel", stage_figures),
    ("benchmarks: VOC07 cls + det, VOC12 seg, ImageNet linear probe (slurm/demo.yaml, local executor)",
     stage_evaluate),
    ("Table 1 / Table 2 report (paper rows + these runs)", stage_report),
]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_output"),
                        help="folder for everything the demo writes (default: demo_output)")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="results store for the demo's runs (default: OUT/results)")
    parser.add_argument("--fresh", action="store_true", help="delete OUT first and start over")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    args.results_dir = args.results_dir or args.out / "results"
    start = time.monotonic()
    for i, (title, stage) in enumerate(STAGES, start=1):
        print(f"\n=== [{i}/{len(STAGES)}] {title}", flush=True)
        t0 = time.monotonic()
        stage(args)
        print(f"=== [{i}/{len(STAGES)}] done in {time.monotonic() - t0:.0f}s "
              f"(total {time.monotonic() - start:.0f}s)", flush=True)
    print(f"\nDemo finished in {time.monotonic() - start:.0f}s. Tables: {args.out / 'report'}/table1.md, "
          f"table2.md; figures: {args.out / 'figures'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
