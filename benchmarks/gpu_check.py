"""One-call GPU check (benchmarks/gpu_check.sh): AMP agreement, step throughput, data wait.

On one CUDA GPU, within ``--budget-s`` (default 420 s, so the call fits 8 minutes):

1. bf16 autocast vs fp32 agreement of the CPFS loss (pretrain.loss.cpfs_loss) on the same inputs;
2. the same for the first ``--agree-steps`` training steps of pretraining and each harness
   (benchmarks/harness_steps.py: the harness's model class and loss at the paper's shapes), from
   the same initial weights and batch;
3. step throughput (steps/s, images/s) of each, fp32 and bf16;
4. the fraction of step time spent waiting for data: a DataLoader with ``--workers`` workers over
   generated files through the real pipeline (benchmarks/bench_loaders.py) feeding the bf16 step;
5. whether the harnesses offer the ``channels_last`` / ``amp`` options (skipped, and said so, when absent);
6. ``decode_device=cuda``: the batch's JPEGs decoded with nvJPEG and their windows resampled on the
   GPU (``evals.common.decode_views``), images/s against the CPU path on one core, and how far the
   views are from the CPU path's (mean absolute difference, grey levels).

Everything is generated here; nothing is downloaded. Without CUDA it prints the plan and exits 0.
``--write-rates`` stores the measured bf16 step rates in benchmarks/step_rates.json (source GPU),
which ``python -m slurm.submit GRID --dry-run --estimate`` then uses.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness_steps import STEPS  # noqa: E402

PIPELINE_OF = {"pretrain": "pretrain_pairs", "voc07_cls": "voc07_cls_train", "voc07_det": "voc07_det_train",
               "voc12_seg": "voc12_seg_train", "in1k_linear": "in1k_linear_train"}
HARNESS_OPTIONS = ("channels_last", "amp", "decode_device")


def plan(args) -> list[str]:
    return [
        "1. CPFS loss (pretrain.loss.cpfs_loss): bf16 autocast vs fp32, batch 96 x 512 pixels, D=16",
        f"2. first {args.agree_steps} steps, bf16 vs fp32 from the same weights and batch: {', '.join(STEPS)}",
        f"3. step throughput (fp32, bf16), {args.steps} timed steps each at the paper's batch per GPU",
        f"4. data wait: DataLoader, {args.workers} workers, generated JPEGs through the real pipelines "
        f"({', '.join(PIPELINE_OF.values())}), fraction of step time waiting",
        f"5. harness options {', '.join(HARNESS_OPTIONS)}: used if the harness configs have them, else skipped",
        "6. decode_device=cuda: nvJPEG batch decode + window resampling on the GPU (voc07_cls train views, "
        "in1k_linear centre crops) vs the CPU path: images/s and mean |difference| in grey levels",
        f"budget {args.budget_s:.0f} s" + ("; then write bf16 step rates to benchmarks/step_rates.json"
                                          if args.write_rates else ""),
    ]


def loss_agreement(device) -> tuple[float, float, float]:
    from pretrain.loss import cpfs_loss

    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(96, 512, 16, generator=g), dim=-1).to(device)
    flows = (torch.randn(96, 512, 2, generator=g) * 0.3).to(device)
    sigma2 = torch.tensor(0.01, device=device)
    fp32 = float(cpfs_loss(emb, flows, sigma2))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = float(cpfs_loss(emb, flows, sigma2))
    return fp32, bf16, abs(bf16 - fp32) / max(abs(fp32), 1e-12)


def first_steps(task: str, device, count: int) -> tuple[list[float], list[float]]:
    builder, batch = STEPS[task]
    losses = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        step, data = builder(device, batch=batch, generator=torch.Generator().manual_seed(0))
        losses[dtype] = [float(step(data, dtype)) for _ in range(count)]
    return losses[None], losses[torch.bfloat16]


def throughput(task: str, device, dtype, steps: int) -> float:
    builder, batch = STEPS[task]
    step, data = builder(device, batch=batch, generator=torch.Generator().manual_seed(0))
    data = tuple(t.to(device) for t in data)
    step(data, dtype)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(data, dtype)
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def data_wait(task: str, pipes: dict, device, workers: int, steps: int) -> float:
    """Fraction of wall time a bf16 step loop spends waiting for the next loader batch."""
    from torch.utils.data import DataLoader, Dataset

    ours, _, count = pipes[PIPELINE_OF[task]]

    class Items(Dataset):
        def __len__(self):
            return count

        def __getitem__(self, i):
            return ours(i)

    builder, batch = STEPS[task]
    collate = None
    if task == "voc07_det":
        from evals.detection.data import collate_images as collate
    loader = DataLoader(Items(), batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                        drop_last=True, persistent_workers=False)
    step, data = builder(device, batch=batch, generator=torch.Generator().manual_seed(0))
    data = tuple(t.to(device) for t in data)
    waited, total, done = 0.0, 0.0, 0
    iterator = iter(loader)
    next(iterator)  # workers started
    start = time.perf_counter()
    while done < steps:
        t0 = time.perf_counter()
        try:
            next(iterator)
        except StopIteration:
            iterator = iter(loader)
            next(iterator)
        waited += time.perf_counter() - t0
        step(data, torch.bfloat16)
        torch.cuda.synchronize()
        done += 1
    total = time.perf_counter() - start
    return waited / total


def gpu_decode(root: Path, device, count: int = 64) -> list[str]:
    """decode_device=cuda against the CPU path on the generated files: rows of text."""
    from evals.common import center_crop, decode_views, random_scaled_view, resize_shorter, stack_views
    from evals.datasets.imagenet import ImageNetDataset
    from evals.datasets.voc import VOCClassificationDataset
    from runtime.data import sample_rng

    voc = VOCClassificationDataset(root / "VOCdevkit" / "VOC2007", "trainval")
    imagenet = ImageNetDataset(root / "imagenet", "val")
    pipelines = {
        "voc07_cls train views": lambda i, where: random_scaled_view(
            voc[i][0], sample_rng(0, 0, i), 227, (0.5, 2.0), normalise=False, decode_device=where),
        "in1k_linear centre crops": lambda i, where: center_crop(
            resize_shorter(imagenet[i][0], 256), 227, normalise=False, decode_device=where),
    }
    rows = []
    for name, view in pipelines.items():
        n = min(count, len(voc) if name.startswith("voc") else len(imagenet))
        torch.set_num_threads(1)
        start = time.perf_counter()
        cpu = torch.stack([view(i, "cpu") for i in range(n)])
        cpu_rate = n / (time.perf_counter() - start)
        torch.set_num_threads(os.cpu_count() or 1)
        deferred = stack_views([view(i, "cuda") for i in range(n)])  # the workers' part: read, draw
        decode_views(deferred, device)  # warm-up (nvJPEG handles)
        torch.cuda.synchronize()
        start = time.perf_counter()
        gpu = decode_views(deferred, device)
        torch.cuda.synchronize()
        gpu_rate = n / (time.perf_counter() - start)
        diff = float((gpu.cpu().float() - cpu.float()).abs().mean())
        rows.append(f"  {name}: GPU {gpu_rate:8.0f} img/s (decode + resample, batch {n}), CPU path "
                    f"{cpu_rate:6.0f} img/s per core; mean |GPU - CPU| {diff:.2f} grey levels "
                    f"{'ok' if diff < 2.0 else 'DISAGREE'}")
    return rows


def harness_options() -> dict[str, list[str]]:
    import importlib

    found = {}
    for task in ("voc07_cls", "voc07_det", "voc12_seg", "in1k_linear"):
        config = importlib.import_module(f"evals.{task}").Config
        found[task] = [o for o in HARNESS_OPTIONS if o in getattr(config, "__dataclass_fields__", {})]
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--agree-steps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--write-rates", action="store_true")
    parser.add_argument("--tasks", nargs="*", default=list(STEPS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing measured. On a GPU machine this would run:")
        print("\n".join("  " + line for line in plan(args)))
        return 0
    deadline = time.monotonic() + args.budget_s
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    fp32, bf16, rel = loss_agreement(device)
    print(f"CPFS loss fp32 {fp32:.6f}  bf16 {bf16:.6f}  rel. diff {rel:.2e}  {'ok' if rel < 1e-2 else 'DISAGREE'}")
    rows, rates = [], {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        from benchmarks.bench_loaders import pipelines

        pipes = pipelines(Path(tmp), 128, (500, 375))
        for task in args.tasks:
            if time.monotonic() > deadline:
                rows.append((task, "skipped: budget spent"))
                continue
            a, b = first_steps(task, device, args.agree_steps)
            agree = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
            s32 = throughput(task, device, None, args.steps)
            s16 = throughput(task, device, torch.bfloat16, args.steps)
            wait = data_wait(task, pipes, device, args.workers, min(args.steps, 10))
            batch = STEPS[task][1]
            rates[task] = s16
            rows.append((task, f"{agree:9.2e} {s32:9.2f} {s16:9.2f} {s16 * batch:10.0f} {100 * wait:8.1f}%"))
            print(f"  {task}: first-step losses fp32 {a} bf16 {b}", flush=True)
        decode_rows = ["  skipped: budget spent"] if time.monotonic() > deadline else gpu_decode(Path(tmp), device)
    print(f"\n{'task':12s} {'bf16 diff':>9s} {'fp32 st/s':>9s} {'bf16 st/s':>9s} {'bf16 img/s':>10s} {'data wait':>9s}")
    for task, text in rows:
        print(f"{task:12s} {text}")
    print("\ndecode_device=cuda (nvJPEG):")
    print("\n".join(decode_rows))
    for task, options in harness_options().items():
        missing = [o for o in HARNESS_OPTIONS if o not in options]
        print(f"{task}: options {options or 'none'}" + (f"; not offered: {missing}" if missing else ""))
    if args.write_rates and rates:
        import json

        from benchmarks.measure_step_rates import RATES_FILE, machine, merge

        new = {t: {"steps_per_s": r, "batch": STEPS[t][1], "measured_batch": STEPS[t][1], "source": "GPU",
                   "machine": machine(), "command": "benchmarks/gpu_check.sh --write-rates (bf16)",
                   "date": time.strftime("%Y-%m-%d")} for t, r in rates.items()}
        existing = json.loads(RATES_FILE.read_text()) if RATES_FILE.is_file() else {}
        RATES_FILE.write_text(json.dumps(merge(existing, new, True), indent=1, sort_keys=True) + "\n")
        print(f"wrote {RATES_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
