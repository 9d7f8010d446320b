"""CPFS pretraining harness (pretrain/train.py) and figures (pretrain/visualize.py) on a tiny
synthetic flow folder: outputs, exact resume, NaN handling, early stopping, export, presets."""
import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch

from backbones.checkpoint import load_backbone, read_checkpoint
from pretrain import train as pretrain_train
from pretrain.flow import encode_flow_png
from pretrain.model import load_pretrain_checkpoint
from pretrain.train import Config, NonFiniteLossError, main, train
from pretrain.visualize import visualize
from runtime import loop
from tests.helpers import pretrain_tensors


def write_flow_folder(root, train_pairs=6, val_pairs=2, size=(232, 240)):
    """Frames with a textured square moving over a textured background, KITTI flow PNGs of that
    motion, and a manifest in the format pretrain.prepare writes."""
    (root / "frames").mkdir(parents=True)
    (root / "flow").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(train_pairs + val_pairs):
        h, w = size
        frame = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        flow = np.zeros((h, w, 2), np.float32)
        flow[..., 0] = rng.normal(0.5, 0.1)
        y, x = rng.integers(20, h - 100), rng.integers(20, w - 100)
        frame[y:y + 80, x:x + 80] = rng.integers(0, 255, 3, dtype=np.uint8)
        flow[y:y + 80, x:x + 80] = rng.normal(0, 8, 2)
        name = f"video_{i:06d}"
        cv2.imwrite(str(root / "frames" / f"{name}.jpg"), frame)
        encode_flow_png(root / "flow" / f"{name}.png", flow)
        lines.append({"video_key": "video", "frame": i, "height": h, "width": w,
                      "split": "train" if i < train_pairs else "val",
                      "frame_path": f"frames/{name}.jpg", "flow_path": f"flow/{name}.png"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_flow_folder(tmp_path_factory.mktemp("flowdata"))


def tiny(data, out, **changes):
    base = Config(data=str(data), out=str(out), preset="test", batch_size=2, num_pixels=16, max_steps=4,
                  val_every=2, patience=10, val_items=2, checkpoint_every=2, log_every=1, workers=0,
                  progress=False, export=False)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """An uninterrupted 4-step run (workers=0), exported at the end."""
    out = tmp_path_factory.mktemp("straight")
    return out, train(tiny(data, out, export=True))


_tensors = pretrain_tensors


@pytest.mark.slow
def test_training_writes_checkpoints_logs_tensorboard_and_learns_sigma(straight):
    out, summary = straight
    assert summary["steps"] == 4 and summary["stopped"] == "max_steps"
    assert np.isfinite(summary["final_loss"]) and np.isfinite(summary["best_val_loss"])
    assert summary["sigma2"] != pytest.approx(0.01, rel=0, abs=0)  # sigma is learned (init 0.01)
    ckpt, _ = _tensors(out / "last.pt")
    assert ckpt["format"] == "cpfs-bench/pretrain" and ckpt["state"]["step"] == 4
    for key in ("optimizer", "head", "sigma", "torch_rng", "model_config", "config"):
        assert ckpt[key] is not None, key
    assert {"epoch", "offset", "best_val", "bad_validations"} <= set(ckpt["state"])
    assert ckpt["meta"]["label"] == "Ours" and ckpt["meta"]["supervision"] == "Optical-flow"
    assert read_checkpoint(out / "last.pt").arch.batchnorm  # backbones.checkpoint reads the AlexNet part
    net, sigma2, best = load_pretrain_checkpoint(out / "best.pt")
    assert best["state"]["step"] == summary["best_step"] and sigma2 > 0 and "optimizer" not in best
    records = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert {"sigma2", "lr", "images_per_s"} <= set(records[0])
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(out.glob(".tmp-*"))  # atomic writes leave nothing behind


@pytest.mark.slow
def test_export_is_a_plain_alexnet_that_load_backbone_reads(straight):
    out, summary = straight
    loaded = load_backbone(out / "alexnet_plain.pt")
    assert not loaded.model.has_batchnorm and loaded.fingerprint == summary["fingerprint"]
    assert loaded.meta["label"] == "Ours" and loaded.meta["supervision"] == "Optical-flow"
    assert loaded.meta["method"] == "cpfs" and loaded.meta["folded_batchnorm"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_ends_bit_identical_to_uninterrupted(data, straight, tmp_path, workers):
    train(tiny(data, tmp_path, max_steps=2, workers=workers))  # "killed" after step 2 (checkpoint at 2)
    resumed = train(tiny(data, tmp_path, workers=workers, resume=True))
    assert resumed["steps_this_run"] == 2
    ckpt_a, a = _tensors(straight[0] / "last.pt")
    ckpt_b, b = _tensors(tmp_path / "last.pt")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
    assert {k: ckpt_a["state"][k] for k in ("step", "epoch", "offset")} == \
           {k: ckpt_b["state"][k] for k in ("step", "epoch", "offset")}
    steps = [json.loads(l)["step"] for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(3) == 1  # the log continues, no duplicates


@pytest.mark.slow
def test_preemption_saves_after_the_step_in_progress_and_resume_matches(data, straight, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = pretrain_train.cpfs_loss

    def preempted_during_step_3(*args):  # what slurm.runner's SIGUSR2 handler does mid-step
        calls["n"] += torch.is_grad_enabled()  # training steps only, not validation
        if calls["n"] == 3:
            loop.PREEMPTION.set()
        return real_loss(*args)

    monkeypatch.setattr(pretrain_train, "cpfs_loss", preempted_during_step_3)
    try:
        with pytest.raises(loop.Preempted, match="at step 3"):  # checkpoints are every 2 steps
            train(tiny(data, tmp_path))
    finally:
        loop.PREEMPTION.clear()
    assert not loop.TRAINING.is_set()
    assert torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)["state"]["step"] == 3
    monkeypatch.setattr(pretrain_train, "cpfs_loss", real_loss)
    assert train(tiny(data, tmp_path, resume=True))["steps_this_run"] == 1
    _, a = _tensors(straight[0] / "last.pt")
    _, b = _tensors(tmp_path / "last.pt")
    assert not [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = pretrain_train.cpfs_loss

    def loss_nan_at_step_3(*args):
        calls["n"] += 1
        return real_loss(*args) * (float("nan") if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(pretrain_train, "cpfs_loss", loss_nan_at_step_3)
    with pytest.raises(NonFiniteLossError, match=r"at step 3\b.*last\.pt \(step 2\)"):
        train(tiny(data, tmp_path, max_steps=6, val_every=0, checkpoint_every=2))
    ckpt = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["state"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_early_stopping_when_the_validation_loss_stops_improving(data, tmp_path, monkeypatch):
    values = iter([1.0, 0.5, 0.7, 0.8, 0.1, 0.1])
    monkeypatch.setattr(pretrain_train, "validate", lambda *args: next(values))
    summary = train(tiny(data, tmp_path, max_steps=10, val_every=1, patience=2, checkpoint_every=100))
    assert summary["stopped"] == "early_stopping" and summary["steps"] == 4
    assert summary["best_step"] == 2 and summary["best_val_loss"] == 0.5
    best = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    assert best["state"]["step"] == 2 and best["meta"]["val_loss"] == 0.5
    again = train(tiny(data, tmp_path, max_steps=10, val_every=1, patience=2, resume=True))
    assert again["steps_this_run"] == 0  # an early-stopped run stays stopped


@pytest.mark.slow
def test_cli_direct_regression_baseline(data, tmp_path):
    out = tmp_path / "direct"
    code = main(["--data", str(data), "--method", "direct", "--out", str(out), "--no-progress", "--workers", "0",
                 "--set", "batch_size=2", "num_pixels=16", "max_steps=2", "val_every=2", "val_items=2"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "direct" and summary["sigma2"] is None
    assert summary["preset"] == "direct_paper+custom"  # the baseline's preset (lr 0.01), resized by --set
    assert summary["overrides"] == {"num_pixels": 16, "batch_size": 2, "max_steps": 2, "val_every": 2, "val_items": 2}
    assert np.isfinite(summary["final_loss"])
    assert load_backbone(out / "alexnet_plain.pt").meta["label"] == "Ours direct reg."


def test_print_config_shows_the_p1_values(capsys):
    assert main(["--print-config"]) == 0
    paper = json.loads(capsys.readouterr().out)
    assert paper["method"] == "cpfs" and paper["lr"] == 1e-4 and paper["betas"] == [0.9, 0.999]
    assert paper["eps"] == 1e-8 and paper["weight_decay"] == 0.0
    assert paper["batch_size"] == 96 and paper["num_pixels"] == 512 and paper["crop"] == 224
    assert paper["embedding_dim"] == 16 and paper["max_magnitude"] == 56.0
    assert paper["layers"] == ["conv1", "pool1", "conv3", "pool5", "fc7"]
    assert main(["--method", "direct", "--print-config"]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert direct["preset"] == "direct_paper" and direct["lr"] == 0.01 and direct["num_bins"] == 16
    assert main(["--preset", "demo", "--set", "max_steps=7", "scale_range=0.9,1.1", "--print-config"]) == 0
    demo = json.loads(capsys.readouterr().out)
    assert demo["max_steps"] == 7 and demo["scale_range"] == [0.9, 1.1] and demo["lr"] == 1e-4
    assert main(["--set", "no_such_key=1", "--print-config"]) == 2


@pytest.mark.slow
def test_visualize_writes_figures_2_and_4_and_the_colour_wheel(data, straight, tmp_path):
    written = visualize(str(straight[0] / "best.pt"), str(data), str(tmp_path), num_images=2)
    assert set(written) == {"fig2", "fig4", "color_wheel"}
    for path in written.values():
        image = cv2.imread(path)
        assert image is not None and image.shape[0] > 100


@pytest.mark.slow
def test_figures_put_a_random_initialisation_row_beside_the_trained_network(data, straight, tmp_path):
    from pretrain.visualize import fig2_rows, fig4_rows
    assert fig4_rows("cpfs", True) == ["frame", "embedding (random 16D->3D)", "random init: embedding", "flow"]
    assert fig4_rows("direct", False) == ["frame", "predicted flow (direct reg.)", "flow"]
    assert fig2_rows(True)[-1] == "K_phi(p, .) random init" and len(fig2_rows(False)) == 3
    with_random = visualize(str(straight[0] / "best.pt"), str(data), str(tmp_path / "a"), num_images=2)
    without = visualize(str(straight[0] / "best.pt"), str(data), str(tmp_path / "b"), num_images=2,
                        random_init=False)
    for fig, rows in (("fig4", 4 / 3), ("fig2", 4 / 3)):
        tall, short = cv2.imread(with_random[fig]), cv2.imread(without[fig])
        assert tall.shape[1] == short.shape[1] and tall.shape[0] == pytest.approx(short.shape[0] * rows, rel=0.02)


@pytest.mark.slow
def test_two_steps_in_bf16_channels_last_on_cpu_stay_close_to_fp32(data, tmp_path):
    """amp=bf16 and channels_last (operational: no override, no +custom) train on CPU with finite
    losses; under bf16 autocast the loss is float32 and close to fp32's on the same weights and batch."""
    summary = train(tiny(data, tmp_path, max_steps=2, val_every=0, val_skill=False, amp="bf16", channels_last=True))
    assert summary["preset"] == "test" and summary["steps"] == 2
    records = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)
    torch.manual_seed(0)
    objective = pretrain_train.build_objective(tiny(data, tmp_path))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 224, 224, generator=g)
    positions, flows = torch.randint(0, 224, (4, 16, 2), generator=g).float(), torch.randn(4, 16, 2, generator=g)
    with torch.no_grad():
        fp32 = objective(images, positions, flows)
        objective.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = objective(images.contiguous(memory_format=torch.channels_last), positions, flows)
    assert bf16.dtype == fp32.dtype == torch.float32 and torch.isfinite(bf16)
    assert float(bf16) == pytest.approx(float(fp32), rel=0.05)
    with pytest.raises(pretrain_train.ConfigError, match="amp=fp16 needs a CUDA device"):
        pretrain_train.resolve_amp("fp16", torch.device("cpu"))
