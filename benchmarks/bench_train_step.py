"""Cost of the CPFS head: one full training step vs. the bare AlexNet it trains.

    .venv/bin/python benchmarks/bench_train_step.py [--batch 8] [--pixels 512] [--repeats 5]

Both sides run forward + backward on the same batch of 224 x 224 crops (P1), in training mode
(batch-statistics BN), with gradients w.r.t. every parameter; the Adam step is timed separately
(it is the same for both, plus the head's 1.3M parameters):

* ``alexnet``: AlexNet (CaffeNet layout, parameter-free BN) to dense fc7 (``activations(...,
  dense=True)``), backward of the mean of fc7 - the least any pretraining step has to do;
* ``cpfs``: the same AlexNet plus the sparse hypercolumn at N pixels per image, the MLP to 16-D
  embeddings and the CPFS loss with learned sigma (pretrain.train.PretrainObjective), backward.

The ratio cpfs / alexnet is the overhead of the paper's head and loss (target <= 1.15). The
paper's batch of 96 does not fit a 2-core CPU's time budget; the default batch is 8 with the
paper's N = 512 pixels per image. The median of ``--repeats`` timed steps after one warm-up is
reported.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from backbones.alexnet import AlexNet
from pretrain.model import HYPERCOLUMN_LAYERS
from pretrain.train import Config, build_objective


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, oneDNN primitive caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="images per step (the paper uses 96)")
    p.add_argument("--pixels", type=int, default=512, help="sampled pixels per image (P1: 512)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side (median reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, 224, 224, generator=g).to(device)
    positions = torch.randint(0, 224, (args.batch, args.pixels, 2), generator=g).to(device)
    flows = (torch.rand(args.batch, args.pixels, 2, generator=g) * 2 - 1).to(device)

    torch.manual_seed(0)
    alexnet = AlexNet("caffenet", batchnorm=True).to(device).train()
    objective = build_objective(Config()).to(device).train()
    objective.net.backbone.load_state_dict(alexnet.state_dict())

    def bare_step():
        alexnet.zero_grad(set_to_none=True)
        acts = alexnet.activations(images, HYPERCOLUMN_LAYERS, dense=True)
        acts["fc7"].mean().backward()
        sync()

    def cpfs_step():
        objective.zero_grad(set_to_none=True)
        objective(images, positions, flows).backward()
        sync()

    bare = _median_time(bare_step, args.repeats)
    cpfs = _median_time(cpfs_step, args.repeats)
    params = [q for q in objective.parameters() if q.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4, fused=device.type in ("cpu", "cuda"))
    adam = _median_time(lambda: (optimizer.step(), sync()), args.repeats)
    result = {"device": str(device), "threads": torch.get_num_threads(), "batch": args.batch,
              "pixels": args.pixels, "alexnet_fwd_bwd_s": bare, "cpfs_fwd_bwd_s": cpfs, "ratio": cpfs / bare,
              "adam_step_s": adam, "ratio_with_adam": (cpfs + adam) / (bare + adam)}
    print(f"device {device} ({result['threads']} threads), batch {args.batch}, N = {args.pixels} pixels/image, "
          f"224x224, median of {args.repeats}")
    print(f"  bare AlexNet (BN) fwd+bwd to dense fc7 : {bare * 1e3:8.1f} ms")
    print(f"  CPFS step fwd+bwd (hypercolumn+MLP+loss): {cpfs * 1e3:8.1f} ms")
    print(f"  ratio                                   : {cpfs / bare:8.3f}  (target <= 1.15)")
    print(f"  Adam step (fused, both sides)           : {adam * 1e3:8.1f} ms  -> ratio incl. Adam "
          f"{result['ratio_with_adam']:.3f}")
    return result


if __name__ == "__main__":
    main()
