"""A pretrained checkpoint states what it is (issue 13): the preset it followed (``+custom`` when
any protocol value departed from it), those departures, the steps and the data by hash; the
method always brings its own learning rate; a separate validation set; ``prepare --pairs`` never
replaces a training manifest; and BN statistics synchronised over ranks equal one process's."""
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import results
from backbones.checkpoint import load_backbone
from evals.datasets.demo import make_demo
from evals.run import main as run_main
from pretrain import prepare as pretrain_prepare
from pretrain import train as pretrain_train
from pretrain.model import build_model
from pretrain.train import (LABELS, PRESETS, Config, datasets, get_args_parser, label_preset, main,
                            preset_overrides, resolve_config, train)
from runtime.config import sources
from runtime.distributed import DistInfo
from runtime.errors import ConfigError
from test_train import write_flow_folder

TINY = ["--no-progress", "--workers", "0", "--set", "batch_size=2", "num_pixels=16", "val_every=3", "val_items=2",
        "log_every=1"]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolved(*argv) -> Config:
    return resolve_config(get_args_parser().parse_args(list(argv)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_flow_folder(tmp_path_factory.mktemp("flowdata"))


# --- 1. the preset is named after the values ------------------------------------------------------

def test_the_method_brings_its_own_learning_rate_however_it_is_chosen():
    ways = [("--method", "direct"), ("--set", "method=direct"), ("--preset", "direct_paper"),
            ("--preset", "direct_paper", "--method", "direct"), ("--preset", "direct_paper", "--set", "method=direct")]
    configs = [resolved(*way) for way in ways]
    assert all(config == configs[0] for config in configs), [c.preset for c in configs]
    assert configs[0].preset == "direct_paper" and configs[0].lr == 0.01 and configs[0].method == "direct"
    assert LABELS[configs[0].method] == "Ours direct reg."
    assert resolved("--preset", "demo", "--set", "method=direct") == PRESETS["direct_demo"]
    assert resolved("--preset", "direct_demo", "--method", "cpfs") == PRESETS["demo"]
    lr_kept = resolved("--method", "direct", "--set", "lr=1e-4")  # an explicit lr is a departure
    assert lr_kept.preset == "direct_paper+custom" and preset_overrides(lr_kept) == {"lr": 1e-4}


def test_a_non_operational_set_marks_custom_and_an_operational_one_does_not():
    assert resolved("--set", "max_steps=3").preset == "paper+custom"
    assert resolved("--preset", "demo", "--set", "sync_bn=false").preset == "demo+custom"
    plain = resolved("--set", "workers=3", "device=cpu", "log_every=7", "--seed", "4", "--data", "x", "--out", "y")
    assert plain.preset == "paper" and preset_overrides(plain) == {}
    assert resolved("--set", "max_steps=200000").preset == "paper"  # the preset's own value departs from nothing
    with pytest.raises(ConfigError, match="choose the preset with --preset"):
        resolved("--set", "preset=paper", "lr=0.5")
    with pytest.raises(ConfigError, match="disagree"):
        resolved("--method", "cpfs", "--set", "method=direct")


def test_configs_built_in_python_are_named_by_their_values_too():
    assert label_preset(Config(method="direct")).preset == "direct_paper+custom"  # lr 1e-4 is not the baseline's
    assert preset_overrides(label_preset(Config(method="direct"))) == {"lr": 1e-4}
    assert label_preset(Config(preset="paper+custom")).preset == "paper"  # nothing departs: the plain name
    assert label_preset(Config(preset="test", lr=3.0)).preset == "test"   # a caller's own value set keeps its name
    assert preset_overrides(Config(preset="test")) is None


@pytest.mark.slow
def test_set_reaches_the_export_and_the_evaluation_record(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(out), *TINY, "max_steps=3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "paper+custom" and summary["overrides"]["max_steps"] == 3
    meta = load_backbone(out / "alexnet_plain.pt").meta
    assert "custom" in meta["preset"] and meta["base_preset"] == "paper" and meta["method"] == "cpfs"
    assert meta["overrides"] == {"batch_size": 2, "num_pixels": 16, "max_steps": 3, "val_every": 3, "val_items": 2}
    assert meta["manifest_hash"] == sha256(data / "manifest.jsonl") == meta["val_manifest_hash"]
    assert meta["validation"] == "the val split of --data"
    assert meta["step"] == 3 and meta["run_steps"] == 3 and meta["stopped"] == "max_steps"
    for name in ("last.pt", "best.pt"):  # every checkpoint states the same
        saved = torch.load(out / name, map_location="cpu", weights_only=True)["meta"]
        assert saved["preset"] == "paper+custom" and saved["overrides"] == meta["overrides"]
        assert saved["manifest_hash"] == meta["manifest_hash"]

    root = tmp_path / "demo_data"
    make_demo(root, seed=0, scale="tiny", progress=False)
    results_dir = tmp_path / "results"
    assert run_main(["--task", "in1k_linear", "--preset", "demo", "--ckpt", str(out / "alexnet_plain.pt"),
                     "--data-root", str(root), "--work-dir", str(tmp_path / "work"), "--results-dir",
                     str(results_dir), "--workers", "0", "--set", "iterations=2"]) == 0
    row = results.load(results_dir).iloc[0]
    assert "custom" in row["pretrain_preset"] and row["pretrain_method"] == "cpfs" and row["pretrain_steps"] == 3
    assert row["pretrain_overrides"]["max_steps"] == 3
    assert row["pretrain_manifest"] == sha256(data / "manifest.jsonl")


# --- 2. a separate validation set -----------------------------------------------------------------

def test_val_data_validates_on_every_pair_of_another_folder(data, tmp_path):
    other = write_flow_folder(tmp_path / "val", train_pairs=3, val_pairs=1)  # both splits count
    config = resolved("--data", str(data), "--val-data", str(other))
    assert config.val_data == str(other) and config.preset == "paper+custom"
    assert sources(config)["val_data"] == "chosen"
    train_set, val_set = datasets(config)
    assert len(train_set) == 6 and len(val_set) == 4 and val_set.root == str(other)
    assert len(datasets(resolved("--data", str(data)))[1]) == 2  # without it: the val split of --data
    with pytest.raises(ConfigError, match="is the training folder"):
        datasets(dataclasses.replace(config, val_data=str(data)))


@pytest.mark.slow
def test_val_data_is_stated_in_the_checkpoint(data, tmp_path):
    other = write_flow_folder(tmp_path / "val", train_pairs=0, val_pairs=2)
    config = Config(data=str(data), val_data=str(other), out=str(tmp_path / "run"), batch_size=2, num_pixels=16,
                    max_steps=2, val_every=2, val_items=2, workers=0, progress=False, export=False)
    summary = train(config)
    assert summary["preset"] == "paper+custom" and summary["best_step"] == 2
    meta = torch.load(tmp_path / "run" / "best.pt", map_location="cpu", weights_only=True)["meta"]
    assert meta["validation"] == "all pairs of --val-data" and meta["overrides"]["val_data"] == str(other)
    assert meta["val_manifest_hash"] == sha256(other / "manifest.jsonl") != meta["manifest_hash"]


# --- 3. prepare --pairs never replaces a training manifest ----------------------------------------

def _training_folder(root: Path) -> bytes:
    """A folder as `prepare --videos` leaves it (done/ markers, a manifest of video records), with
    a pairs folder inside it."""
    (root / "done").mkdir(parents=True)
    record = {"video": "/videos/a.mp4", "video_key": "a-00000000", "frame": 0, "split": "train",
              "frame_path": "frames/a_000000.jpg", "flow_path": "flow/a_000000.png"}
    (root / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    write_flow_folder(root / "pairs", train_pairs=0, val_pairs=2)
    return (root / "manifest.jsonl").read_bytes()


@pytest.mark.parametrize("done_markers", [True, False])
def test_pairs_refuses_to_overwrite_a_training_manifest(tmp_path, capsys, done_markers):
    before = _training_folder(tmp_path / "train")
    if not done_markers:
        (tmp_path / "train" / "done").rmdir()
    with pytest.raises(SystemExit) as stop:
        pretrain_prepare.main(["--pairs", str(tmp_path / "train" / "pairs"), "--out", str(tmp_path / "train")])
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "will not" in lines[0], lines
    assert (tmp_path / "train" / "manifest.jsonl").read_bytes() == before
    assert not (tmp_path / "train" / "errors.jsonl").exists()


def test_pairs_rewrites_its_own_manifest(tmp_path):
    _training_folder(tmp_path / "train")
    pairs = tmp_path / "train" / "pairs"
    for _ in range(2):  # indexing the same folder again refreshes the manifest --pairs wrote
        summary = pretrain_prepare.main(["--pairs", str(pairs), "--no-progress"])
        assert summary["manifest_pairs"] == 2
    assert all(json.loads(line)["video"] is None for line in (pairs / "manifest.jsonl").read_text().splitlines())


# --- 4. BN statistics under DDP -------------------------------------------------------------------

def test_sync_bn_is_the_paper_value_and_refused_on_cpu_ranks(data, tmp_path, monkeypatch):
    assert PRESETS["paper"].sync_bn and sources(PRESETS["paper"])["sync_bn"].startswith("P1")
    monkeypatch.setattr(pretrain_train, "setup_distributed", lambda: DistInfo(rank=0, world_size=2))
    config = Config(data=str(data), out=str(tmp_path / "run"), preset="test", batch_size=4, num_pixels=16,
                    workers=0, progress=False, device="cpu")
    with pytest.raises(ConfigError, match="sync_bn needs CUDA.*sync_bn=false"):
        train(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_saved_with_per_rank_bn_resumes_in_one_process(data, tmp_path):
    """sync_bn changes nothing in one process, so a run saved when it defaulted to off continues."""
    config = Config(data=str(data), out=str(tmp_path), preset="test", batch_size=2, num_pixels=16, max_steps=1,
                    val_every=0, checkpoint_every=1, workers=0, progress=False, export=False, sync_bn=False)
    train(config)
    again = train(dataclasses.replace(config, sync_bn=True, max_steps=2, resume=True))
    assert again["steps_this_run"] == 1


def test_bn_momentum_default_builds_the_same_network():
    torch.manual_seed(0)
    default = build_model("cpfs")
    torch.manual_seed(0)
    explicit = build_model("cpfs", bn_momentum=0.1)
    bns = [m for m in explicit.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 7 and all(m.momentum == 0.1 for m in bns)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
    assert all(m.momentum == 0.3 for m in build_model("cpfs", bn_momentum=0.3).modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))


def synced_batch_norm(x: torch.Tensor, running_mean, running_var, momentum: float, eps: float) -> torch.Tensor:
    """What SyncBatchNorm computes on each rank, written for the test with two all-reduces over
    gloo: per-channel count, sum and sum of squares over every rank's images, then the batch
    mean and (biased) variance for the output and the unbiased one for the running variance."""
    dims = [d for d in range(x.dim()) if d != 1]
    stats = torch.stack([x.sum(dims), (x * x).sum(dims)])
    count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
    dist.all_reduce(stats)
    dist.all_reduce(count)
    mean = stats[0] / count
    var = stats[1] / count - mean * mean
    running_mean.mul_(1 - momentum).add_(momentum * mean)
    running_var.mul_(1 - momentum).add_(momentum * var * count / (count - 1))
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)


def _rank(rank: int, world: int, store: str, batch: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        half = batch.chunk(world)[rank]
        mean, var = torch.zeros(batch.shape[1], dtype=batch.dtype), torch.ones(batch.shape[1], dtype=batch.dtype)
        y = synced_batch_norm(half, mean, var, momentum=0.1, eps=1e-5)
        torch.save({"y": y, "mean": mean, "var": var}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed (gloo)")
def test_bn_statistics_over_two_ranks_equal_one_rank_over_the_whole_batch(tmp_path):
    """The paper normalises over its batch of 96; under DDP each of W ranks holds 96/W. With the
    statistics reduced over the ranks (sync_bn), every rank's output and running statistics are
    one process's BatchNorm over the concatenated batch (float64: equal to rounding)."""
    batch = torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), batch, str(tmp_path)), nprocs=2, join=True)
    whole = nn.BatchNorm2d(5, affine=False, momentum=0.1, eps=1e-5).double().train()
    expected = whole(batch)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), expected, rtol=0, atol=1e-12)
    for r in ranks:
        torch.testing.assert_close(r["mean"], whole.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(r["var"], whole.running_var, rtol=0, atol=1e-12)
    per_rank = nn.BatchNorm2d(5, affine=False).double().train()(batch[:3])  # what 3 images alone give
    assert not torch.allclose(per_rank, expected[:3])
