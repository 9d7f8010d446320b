"""Issue 11 on the evaluation side: a run is identified by everything that changes its result,
nothing read from disk executes code, bad values stop before training with one line, a full disk
names its path. Every test first builds the situation that used to go wrong."""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones import AlexNet
from backbones.checkpoint import CheckpointError, load_backbone, save_backbone
from evals.datasets.demo import make_demo
from evals.run import main as run_main
from results import store
from runtime import atomic
from runtime.errors import RunError
from runtime.safe_load import safe_torch_load
from runtime import loop

REPO = Path(__file__).resolve().parents[1]
TINY = ["iterations=2", "crop=64", "test_views=1", "checkpoint_every=1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_data")
    make_demo(root, seed=0, scale="tiny", progress=False)
    return root


def cls_args(data_root, tmp_path, *sets, extra=()):
    return ["--task", "voc07_cls", "--preset", "demo", "--ckpt", "random", "--data-root", str(data_root),
            "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results"), "--workers", "0",
            *extra, "--set", *TINY, *sets]


def records(tmp_path):
    return store.load_records(tmp_path / "results")


# --- a run is identified by its protocol values and its data ------------------------------------------

@pytest.mark.slow
def test_runs_differing_in_a_set_value_get_two_records_and_never_share_a_checkpoint(data_root, tmp_path, capsys):
    assert run_main(cls_args(data_root, tmp_path, "iterations=3")) == 0
    assert run_main(cls_args(data_root, tmp_path)) == 0  # iterations=2: used to return the 3-step record
    by_iterations = {r["config"]["iterations"]: r for r in records(tmp_path)}
    assert set(by_iterations) == {2, 3}
    assert by_iterations[2]["run_key"] != by_iterations[3]["run_key"]
    works = sorted(p.name for p in (tmp_path / "work" / "voc07_cls" / "demo+custom").iterdir())
    assert len(works) == 2  # one training folder each: the 2-step run did not resume the 3-step one
    # the 2-step run equals a fresh 2-step run elsewhere (it did not continue another configuration)
    fresh = tmp_path / "fresh"
    assert run_main(cls_args(data_root, fresh)) == 0
    (alone,) = records(fresh)
    assert alone["metrics"]["mAP"] == by_iterations[2]["metrics"]["mAP"]
    assert alone["run_key"] == by_iterations[2]["run_key"]
    # the same run again is recognised as finished, whatever operational values change
    capsys.readouterr()
    assert run_main(cls_args(data_root, tmp_path, extra=["--workers", "1"])) == 0
    assert "a finished record exists" in capsys.readouterr().out
    assert len(records(tmp_path)) == 2


@pytest.mark.slow
def test_another_data_root_with_other_split_lists_gets_its_own_record(data_root, tmp_path):
    other = tmp_path / "other_data"
    shutil.copytree(data_root, other)
    main = other / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    dropped = (main / "test.txt").read_text().split()[-1]
    for path in main.glob("*test.txt"):  # one test image fewer, in the split and every class file
        lines = [line for line in path.read_text().splitlines() if line.split() and line.split()[0] != dropped]
        path.write_text("\n".join(lines) + "\n")
    assert run_main(cls_args(data_root, tmp_path)) == 0
    assert run_main(cls_args(other, tmp_path)) == 0
    first, second = records(tmp_path)
    assert first["run_key"] != second["run_key"]
    assert first["provenance"]["split_hash"] != second["provenance"]["split_hash"]
    # the same data under another path is the same run
    moved = tmp_path / "moved_data"
    shutil.copytree(data_root, moved)
    assert run_main(cls_args(moved, tmp_path)) == 0
    assert len(records(tmp_path)) == 2


def test_resume_refuses_a_checkpoint_saved_by_another_configuration(tmp_path):
    def trainer(identity):
        model = torch.nn.Linear(2, 2)
        return loop.Trainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=None,
                              total_steps=1, work_dir=tmp_path, checkpoint_every=1, identity=identity)
    saved = {"task": "voc07_cls", "protocol": {"iterations": 6, "lr": 0.01}, "split_hash": "a"}
    trainer(saved).save()
    assert trainer(saved).resume()
    with pytest.raises(RunError, match=r"iterations: 6 there, 2 now.*--no-resume"):
        trainer({**saved, "protocol": {"iterations": 2, "lr": 0.01}}).resume()
    with pytest.raises(RunError, match="split lists differ"):
        trainer({**saved, "split_hash": "b"}).resume()


# --- nothing read from disk executes code ---------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    with open(path, "wb") as handle:
        pickle.dump({"model": _Payload(marker), "state": {"step": 1}}, handle)


@pytest.mark.slow
def test_planted_work_dir_checkpoint_is_refused_and_runs_nothing(data_root, tmp_path, capsys):
    assert run_main(cls_args(data_root, tmp_path)) == 0
    (checkpoint,) = (tmp_path / "work").rglob("checkpoint.pt")
    (record_file,) = (tmp_path / "results").rglob("*.json")
    before = record_file.read_bytes()
    marker = tmp_path / "executed"
    _plant(checkpoint, marker)
    torch.save({"model": _Payload(marker)}, checkpoint)  # also in torch's zip container
    capsys.readouterr()
    assert run_main(cls_args(data_root, tmp_path, extra=["--overwrite"])) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the "+custom" note)
    assert not marker.exists()
    assert err.startswith("error: ") and str(checkpoint) in err
    assert "refused to load" in err and "system" in err  # names what was refused (posix.system)
    assert "weights_only=False" not in err
    assert record_file.read_bytes() == before  # the finished record is untouched


@pytest.mark.parametrize("container", ["pickle", "zip"])
def test_safe_load_refuses_code_in_any_container(tmp_path, container):
    marker, path = tmp_path / "executed", tmp_path / "evil.pt"
    if container == "pickle":
        _plant(path, marker)
    else:
        torch.save({"x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load") as err:
        safe_torch_load(path)
    assert not marker.exists() and "weights_only" not in str(err.value)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_backbone(path)
    assert not marker.exists()


@pytest.mark.slow
def test_checkpoint_with_nan_weights_is_refused_at_load(tmp_path):
    model = AlexNet("caffenet")
    with torch.no_grad():
        model.conv3.weight[0, 0, 0, 0] = float("nan")
    save_backbone(model, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"non-finite values .*conv3\.weight"):
        load_backbone(tmp_path / "nan.pt")


# --- values that cannot work are refused before training ------------------------------------------------

@pytest.mark.parametrize("bad, field", [
    (["--set", "iterations=0"], "iterations"), (["--set", "iterations=-3"], "iterations"),
    (["--set", "batch_size=0"], "batch_size"), (["--set", "test_views=0"], "test_views"),
    (["--set", "crop=1"], "crop"), (["--set", "lr=-1"], "lr"), (["--set", "train_layers=bogus"], "train_layers"),
    (["--set", "scale_range=1"], "scale_range"), (["--set", "scale_range=2,1"], "scale_range"),
    (["--seed", "-1"], "seed"), (["--set", "momentum=1.5"], "momentum"),
])
def test_bad_values_are_refused_before_anything_runs(data_root, tmp_path, capsys, bad, field):
    args = ["--task", "voc07_cls", "--preset", "demo", "--ckpt", "random", "--data-root", str(data_root),
            "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results"), *bad]
    assert run_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.match(rf"error: {field}(\[\d+\])?[ :]", err[-1]) and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()


def test_a_directory_as_checkpoint_is_one_line(data_root, tmp_path, capsys):
    folder = tmp_path / "ckpt_dir"
    folder.mkdir()
    args = ["--task", "in1k_linear", "--preset", "demo", "--ckpt", str(folder), "--data-root", str(data_root),
            "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work")]
    assert run_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {folder}: is a directory, not a checkpoint file"


def test_an_operational_set_keeps_the_preset_name(capsys):
    assert run_main(["--task", "voc12_seg", "--preset", "paper", "--set", "test_chunk=4096", "--print-config"]) == 0
    out = capsys.readouterr()
    assert '"preset": "paper"' in out.out and "custom" not in out.err
    assert run_main(["--task", "voc12_seg", "--preset", "paper", "--set", "crop=400", "--print-config"]) == 0
    assert '"preset": "paper+custom"' in capsys.readouterr().out


# --- disk full, interrupted saves ------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (we run as root here and in CI); otherwise writes are made to fail with
    ENOSPC at the OS call, which exercises the same code path."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                                   capture_output=True).returncode == 0
    yield mount, mounted
    if mounted:
        subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_names_the_path_and_keeps_the_earlier_file(small_disk, monkeypatch):
    mount, mounted = small_disk
    target = mount / "checkpoint.pt"
    atomic.atomic_torch_save({"w": torch.zeros(1000)}, target)
    before = target.read_bytes()
    if not mounted:
        def full(*_args, **_kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(atomic.NoSpaceError) as err:
        atomic.atomic_torch_save({"w": torch.zeros(1_000_000)}, target)  # 4 MB on a 256 KiB disk
    assert str(err.value).startswith(f"no space left on {mount}")
    assert target.read_bytes() == before
    assert [p.name for p in mount.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_temp_files_of_killed_writers_are_removed_on_the_next_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".tmp-checkpoint.pt.{dead.pid}.x1y2"
    live = tmp_path / f".tmp-checkpoint.pt.{os.getpid()}.a1b2"  # ours: a write in progress
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    model = torch.nn.Linear(2, 2)
    trainer = loop.Trainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=None,
                             total_steps=1, work_dir=tmp_path, checkpoint_every=1)
    assert not trainer.resume()
    assert not stale.exists() and live.exists()


@pytest.mark.slow
def test_truncated_work_dir_checkpoint_says_to_start_over(data_root, tmp_path, capsys):
    assert run_main(cls_args(data_root, tmp_path)) == 0
    (checkpoint,) = (tmp_path / "work").rglob("checkpoint.pt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    capsys.readouterr()
    assert run_main(cls_args(data_root, tmp_path, extra=["--overwrite"])) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the "+custom" note)
    assert err.startswith("error: ") and str(checkpoint) in err and "truncated" in err and "--no-resume" in err
    assert run_main(cls_args(data_root, tmp_path, extra=["--overwrite", "--no-resume"])) == 0


# --- the command lines never show a traceback for these inputs -------------------------------------------

def _cli(*argv, cwd=REPO):
    out = subprocess.run([sys.executable, "-m", *argv], cwd=cwd, capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    return out.returncode, lines


@pytest.mark.slow
def test_command_lines_end_in_one_line_errors(data_root, tmp_path):
    truncated_record = tmp_path / "results" / "voc07_cls" / "demo" / "0123456789abcdef-seed0.json"
    truncated_record.parent.mkdir(parents=True)
    truncated_record.write_text('{"schema": 1, "task": "voc07')
    folder = tmp_path / "a_folder"
    folder.mkdir()
    cases = [
        (("results.report", "--results-dir", str(tmp_path / "results"), "--out", str(tmp_path / "report")),
         str(truncated_record)),
        (("evals.run", "--task", "voc07_cls", "--preset", "demo", "--ckpt", str(folder), "--data-root",
          str(data_root), "--results-dir", str(tmp_path / "r2")), "is a directory"),
        (("evals.run", "--task", "voc07_cls", "--preset", "demo", "--seed", "-1", "--data-root", str(data_root)),
         "seed must be >= 0, got -1"),
        (("evals.run", "--task", "voc07_cls", "--preset", "demo", "--data-root", str(tmp_path / "nowhere")),
         "split file not found"),
    ]
    for argv, expected in cases:
        code, lines = _cli(*argv)
        assert code == 2, (argv, lines)
        assert lines and lines[-1].startswith("error: ") and expected in lines[-1], (argv, lines)
        assert not any("Traceback" in line for line in lines), (argv, lines)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["corrupt_test_image", "empty_test_split"])
def test_bad_data_stops_the_run_before_the_first_training_step(data_root, tmp_path, capsys, damage):
    broken = tmp_path / "data"
    shutil.copytree(data_root, broken)
    voc = broken / "VOCdevkit" / "VOC2007"
    if damage == "corrupt_test_image":
        bad = voc / "JPEGImages" / f"{(voc / 'ImageSets' / 'Main' / 'test.txt').read_text().split()[-1]}.jpg"
        bad.write_bytes(b"\xff\xd8 not really a jpeg")
    else:
        bad = voc / "ImageSets" / "Main" / "test.txt"
        for path in (voc / "ImageSets" / "Main").glob("*test.txt"):
            path.write_text("")
    assert run_main(cls_args(broken, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {bad}") and "Traceback" not in err
    assert not list((tmp_path / "work").rglob("checkpoint.pt")) and not (tmp_path / "results").exists()


# --- the paper preset checks its data --------------------------------------------------------------------

OFFICIAL = {"voc07_cls": ("5,011", "4,952"), "voc07_det": ("5,011", "4,952"), "voc12_seg": ("10,582", "1,449"),
            "in1k_linear": ("1,281,167", "50,000")}


@pytest.mark.parametrize("task", sorted(OFFICIAL))
def test_paper_preset_on_a_data_subset_stops_in_seconds_naming_the_counts(data_root, tmp_path, capsys, task):
    import time
    args = ["--task", task, "--preset", "paper", "--ckpt", "random", "--data-root", str(data_root),
            "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results"), "--workers", "0"]
    start = time.monotonic()
    assert run_main(args) == 2
    assert time.monotonic() - start < 15
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {data_root}: {task} at preset 'paper'")
    for count in OFFICIAL[task]:
        assert count in err  # what paper needs ...
    assert "found" in err and "--allow-subset" in err and "'paper+subset'" in err  # ... what it found, the way out
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()  # nothing trained or written


def test_allow_subset_names_the_preset_paper_subset(data_root, tmp_path):
    from evals.run import plan, plan_lines, subset_preset
    assert [subset_preset(p) for p in ("paper", "paper+custom", "paper+subset")] == \
        ["paper+subset", "paper+subset+custom", "paper+subset"]
    base = ["--task", "voc07_cls", "--preset", "paper", "--ckpt", "random", "--data-root", str(data_root),
            "--results-dir", str(tmp_path / "results")]
    planned = plan([*base, "--allow-subset"])
    assert planned["preset"] == "paper+subset" and "/paper+subset/" in planned["record"]
    assert plan([*base, "--allow-subset", "--set", "iterations=1"])["preset"] == "paper+subset+custom"
    (refused,) = plan_lines([json.dumps(base)])  # what the cluster grid sees for such a cell
    assert "needs the official splits" in refused["error"]
    # the demo preset, and a paper run on the official sizes, keep their names
    assert plan([*base[:3], "demo", *base[4:], "--allow-subset"])["preset"] == "demo"
    from evals import voc07_cls
    from evals.run import check_official_sizes
    paper = voc07_cls.PRESETS["paper"]
    assert check_official_sizes("voc07_cls", voc07_cls, paper, {"trainval": 5011, "test": 4952}) is paper


@pytest.mark.slow
def test_a_paper_run_on_a_subset_with_allow_subset_is_recorded_as_paper_subset(data_root, tmp_path, capsys):
    args = ["--task", "voc07_cls", "--preset", "paper", "--ckpt", "random", "--data-root", str(data_root),
            "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results"), "--workers", "0",
            "--allow-subset", "--set", *TINY]
    assert run_main(args) == 0
    assert "recorded under preset 'paper+subset+custom'" in capsys.readouterr().err
    (record,) = records(tmp_path)
    assert record["preset"] == "paper+subset+custom" and record["config"]["allow_subset"] is True
    assert (tmp_path / "work" / "voc07_cls" / "paper+subset+custom").is_dir()
