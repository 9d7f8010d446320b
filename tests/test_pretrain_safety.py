"""pretrain.train never destroys an earlier run, refuses bad settings and unsafe files in one line
(issue 11): each test reproduces a failure that used to delete results, run code from a
checkpoint or end in a traceback."""
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from backbones.checkpoint import CheckpointError
from pretrain import export as pretrain_export
from pretrain import train as pretrain_train
from pretrain import visualize as pretrain_visualize
from pretrain.model import load_pretrain_checkpoint
from pretrain.train import Config, main, train
from runtime.loop import non_finite_message
from runtime.errors import ConfigError, RunError
from test_train import write_flow_folder

REPO = Path(__file__).resolve().parents[1]
TINY = ["--no-progress", "--workers", "0", "--set", "batch_size=2", "num_pixels=16", "max_steps=2", "val_every=2",
        "val_items=2", "checkpoint_every=2", "log_every=1", "export=false"]
RUN_FILES = "best.pt, last.pt, log.jsonl, config.json, summary.json, alexnet_plain.pt, tensorboard"


def tiny(data, out, **changes):
    base = Config(data=str(data), out=str(out), preset="test", batch_size=2, num_pixels=16, max_steps=2,
                  val_every=2, patience=10, val_items=2, checkpoint_every=2, log_every=1, workers=0,
                  progress=False, export=False)
    return dataclasses.replace(base, **changes)


def hashes(folder: Path) -> dict:
    """Every file under ``folder`` (recursively) by relative path -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def dead_pid() -> int:
    """The id of a process that has exited (for a temp file whose writer is gone)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_flow_folder(tmp_path_factory.mktemp("flowdata"))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 2-step run with every file a run writes (export included)."""
    out = tmp_path_factory.mktemp("finished")
    train(tiny(data, out, export=True))
    return out


@pytest.fixture
def finished_copy(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A file whose unpickling would run ``touch marker`` (a ``__reduce__`` payload)."""
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"format": "cpfs-bench/pretrain", "optimizer": {}, "payload": Payload()}, path)
    return path


# --- 1. no run destroys an earlier one -------------------------------------------------------------

@pytest.mark.slow
def test_fresh_run_into_a_finished_folder_refuses_and_changes_nothing(data, finished, capsys):
    before = hashes(finished)
    assert {"best.pt", "last.pt", "log.jsonl", "config.json", "alexnet_plain.pt"} <= set(before)
    assert main(["--data", str(data), "--out", str(finished), *TINY]) == 2
    lines = error_lines(capsys)
    assert lines == [f"error: {finished} already holds a run ({RUN_FILES}): pass --resume to continue it, "
                     f"a new --out, or --overwrite to move the old files aside"]
    assert hashes(finished) == before


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True])
def test_mistyped_data_fails_before_the_run_folder_is_touched(finished, tmp_path, capsys, overwrite):
    before = hashes(finished)
    flags = ["--overwrite"] if overwrite else []
    assert main(["--data", str(tmp_path / "no_such_data"), "--out", str(finished), *flags, *TINY]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "no_such_data: no such data folder" in lines[0]
    (tmp_path / "empty").mkdir()  # a folder without manifest.jsonl
    assert main(["--data", str(tmp_path / "empty"), "--out", str(finished), *flags, *TINY]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "manifest not found" in lines[0]
    assert hashes(finished) == before
    new_out = tmp_path / "new_run"
    assert main(["--data", str(tmp_path / "empty"), "--out", str(new_out), *TINY]) == 2
    assert not new_out.exists()  # not even created
    assert not list(finished.glob("replaced-*"))


@pytest.mark.slow
def test_overwrite_moves_the_old_files_aside_and_removes_stale_temps(data, finished_copy, capsys):
    before = hashes(finished_copy)
    stale = finished_copy / f".tmp-last.pt.{dead_pid()}.abc123"  # a save killed half-way
    stale.write_bytes(b"half a checkpoint")
    train(tiny(data, finished_copy, max_steps=1, val_every=0, overwrite=True))
    moved = list(finished_copy.glob("replaced-*"))
    assert len(moved) == 1 and moved[0].name.startswith("replaced-") and moved[0].name.endswith("Z")
    assert hashes(moved[0]) == before  # every old file, byte for byte, nothing deleted
    assert not stale.exists()
    assert json.loads((finished_copy / "summary.json").read_text())["steps"] == 1
    assert "moved the earlier files" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_with_other_settings_refuses_naming_the_fields(data, finished_copy):
    before = hashes(finished_copy)
    with pytest.raises(RunError, match=r"last\.pt was written with other settings: lr \(saved 0\.0001, now 0\.001\), "
                                       r"seed \(saved 0, now 3\)"):
        train(tiny(data, finished_copy, resume=True, lr=1e-3, seed=3))
    assert hashes(finished_copy) == before
    # operational settings may change: nothing left to run, but the resume is accepted
    summary = train(tiny(data, finished_copy, resume=True, log_every=5, checkpoint_every=7, workers=1))
    assert summary["steps_this_run"] == 0


def test_resume_and_overwrite_together_are_refused(data, tmp_path, capsys):
    assert main(["--data", str(data), "--out", str(tmp_path / "run"), "--resume", "--overwrite", *TINY]) == 2
    assert len(error_lines(capsys)) == 1 and not (tmp_path / "run").exists()


# --- 2. settings are checked before anything runs --------------------------------------------------

@pytest.mark.parametrize("args, named", [
    (["--set", "max_steps=0"], "max_steps must be positive, got 0"),
    (["--set", "batch_size=0"], "batch_size must be positive, got 0"),
    (["--set", "lr=-1"], "lr must be positive, got -1.0"),
    (["--set", "method=bogus"], "method must be one of ['cpfs', 'direct'], got 'bogus'"),
    (["--seed", "-1"], "seed must be >= 0, got -1"),
    (["--set", "num_pixels=0"], "num_pixels must be positive, got 0"),
    (["--set", "crop=-5"], "crop must be positive, got -5"),
    (["--set", "val_every=-1"], "val_every must be >= 0, got -1"),
    (["--set", "scale_range=1.25,0.8"], "scale_range must be (low, high) with low <= high"),
    (["--set", "scale_range=1.0"], "scale_range must have 2 values, got 1"),
    (["--set", "betas=0.9,1.5"], "betas[1] must be a number in [0.0, 1.0)"),
    (["--set", "layers=conv1,fc9"], "layers: unknown value(s) ['fc9']"),
    (["--set", "amp=fp8"], "amp must be one of"),
    (["--set", "batch_size=1"], "BatchNorm in training mode needs at least 2"),
    (["--set", "max_steps=abc"], "--set 'max_steps=abc'"),
    (["--set", "no_such_key=1"], "--set 'no_such_key=1'"),
])
def test_bad_settings_are_refused_in_one_line_before_training(data, tmp_path, capsys, args, named):
    out = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(out), *TINY, *args]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert not out.exists()  # refused before the run folder was made


def test_bad_settings_raise_config_error_from_the_api(data, tmp_path):
    with pytest.raises(ConfigError, match="max_steps must be positive, got 0"):
        train(tiny(data, tmp_path / "run", max_steps=0))
    assert not (tmp_path / "run").exists()


# --- 3. nothing read from disk executes code -------------------------------------------------------

def test_a_planted_pickle_is_refused_and_never_runs(data, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    run.mkdir()
    evil = evil_checkpoint(run / "last.pt", marker)
    expected = "refused to load: the file contains pickled Python objects (GLOBAL posix.system); " \
               "checkpoints must hold tensors and plain values only"
    assert main(["--data", str(data), "--out", str(run), "--resume", *TINY]) == 2
    lines = error_lines(capsys)
    assert lines == [f"error: {evil}: {expected}"]
    assert "weights_only" not in lines[0]
    with pytest.raises(CheckpointError, match="refused to load"):
        load_pretrain_checkpoint(evil)
    assert pretrain_visualize.main(["--ckpt", str(evil), "--data", str(data), "--out", str(tmp_path / "fig")]) == 2
    assert pretrain_export.main([str(evil), str(tmp_path / "plain.pt")]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 2 and all("refused to load" in line for line in lines)
    assert not marker.exists()
    assert [p.name for p in run.iterdir()] == ["last.pt"]  # the refused resume changed nothing


@pytest.mark.slow
@pytest.mark.parametrize("cli", ["export", "visualize"])
def test_export_and_visualize_report_bad_checkpoints_in_one_line(data, finished, tmp_path, capsys, cli):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((finished / "best.pt").read_bytes()[:4096])
    for bad, problem in ((tmp_path, "is a directory"), (truncated, "truncated or corrupt")):
        if cli == "export":
            code = pretrain_export.main([str(bad), str(tmp_path / "plain.pt")])
        else:
            code = pretrain_visualize.main(["--ckpt", str(bad), "--data", str(data), "--out", str(tmp_path / "f")])
        lines = error_lines(capsys)
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {bad}") and problem in lines[0], lines


# --- 4. interrupted and failed saves ---------------------------------------------------------------

def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True)
    return done.returncode == 0


def _fail_checkpoint_fsync(monkeypatch) -> None:
    """Without root: the fsync of a checkpoint's temporary file reports a full disk."""
    real_fsync = os.fsync

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith((".tmp-last.pt.", ".tmp-best.pt.")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.slow
def test_a_full_disk_names_the_folder_and_keeps_the_earlier_checkpoints(data, finished, tmp_path, capsys,
                                                                        monkeypatch):
    """Resume a finished run on a disk with room for its files but not for one more checkpoint."""
    disk = tmp_path / "disk"
    size = sum(p.stat().st_size for p in finished.rglob("*") if p.is_file()) + 8 * 2 ** 20
    mounted = _mount_tmpfs(disk, size)
    try:
        if not mounted:  # not root: the same failure, injected (reported, not skipped)
            print("tmpfs mount failed: ENOSPC injected with a patched os.fsync", file=sys.stderr)
            _fail_checkpoint_fsync(monkeypatch)
        run = disk / "run"
        shutil.copytree(finished, run)
        before = {name: hashes(run)[name] for name in ("last.pt", "best.pt")}
        # recorded as paper+custom now: the preset's name may change on resume, its values may not
        assert main(["--data", str(data), "--out", str(run), "--resume", *TINY, "--set", "max_steps=4"]) == 2
        lines = [line for line in error_lines(capsys) if line.startswith("error: ")]
        assert len(lines) == 1 and lines[0].startswith(f"error: no space left on {run} (writing "), lines
        after = hashes(run)
        assert {name: after[name] for name in ("last.pt", "best.pt")} == before
        assert not list(run.glob(".tmp-*"))
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)
    assert mounted or os.geteuid() != 0, "running as root, the tmpfs should have mounted"


# --- 5. a non-finite loss names a checkpoint only if there is one ----------------------------------

def test_non_finite_message_names_only_an_existing_checkpoint(tmp_path):
    last = tmp_path / "last.pt"
    assert "no checkpoint of this run exists yet" in non_finite_message(float("nan"), 3, last, 2)  # deleted
    assert "no checkpoint of this run exists yet" in non_finite_message(float("nan"), 1, last, None)
    last.write_bytes(b"x")
    message = non_finite_message(float("nan"), 3, last, 2)
    assert f"the last good checkpoint is {last} (step 2)" in message and "\n" not in message


def test_nan_before_the_first_checkpoint_says_there_is_none(data, tmp_path, monkeypatch, capsys):
    real_loss = pretrain_train.cpfs_loss
    monkeypatch.setattr(pretrain_train, "cpfs_loss", lambda *args: real_loss(*args) * float("nan"))
    assert main(["--data", str(data), "--out", str(tmp_path / "run"), *TINY]) == 3
    lines = error_lines(capsys)
    assert len(lines) == 1 and "at step 1" in lines[0] and "no checkpoint of this run exists yet" in lines[0]
    assert not (tmp_path / "run" / "last.pt").exists()


# --- 6. one line from the command line, never a traceback ------------------------------------------

def test_a_dataloader_worker_error_is_one_line(data, tmp_path, capsys):
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    for frame in (broken / "frames").glob("*.jpg"):
        frame.unlink()
    assert main(["--data", str(broken), "--out", str(tmp_path / "run"), *TINY, "--workers", "1"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "frame not found" in lines[0], lines
    assert "Traceback" not in lines[0]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["finished_folder", "bad_setting", "planted_pickle"])
def test_the_command_line_ends_with_one_error_line_and_no_traceback(data, finished, tmp_path, case):
    before = hashes(finished)
    if case == "finished_folder":
        done = _cli("--data", str(data), "--out", str(finished), *TINY)
        expected = f"error: {finished} already holds a run ({RUN_FILES}): pass --resume"
    elif case == "bad_setting":
        done = _cli("--data", str(data), "--out", str(tmp_path / "run"), *TINY, "--set", "lr=-1")
        expected = "error: lr must be positive, got -1.0"
    else:
        marker = tmp_path / f"MARKER-{uuid.uuid4().hex}"
        (tmp_path / "run").mkdir()
        evil_checkpoint(tmp_path / "run" / "last.pt", marker)
        done = _cli("--data", str(data), "--out", str(tmp_path / "run"), "--resume", *TINY)
        expected = f"error: {tmp_path / 'run' / 'last.pt'}: refused to load: the file contains pickled Python objects"
        assert not marker.exists()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(expected), done.stderr
    assert hashes(finished) == before


def test_an_8bit_flow_png_stops_pretraining_before_the_first_step(data, tmp_path, capsys):
    """Found by the pre-flight in seconds, one line naming the file; no run folder is created."""
    import shutil
    import cv2
    import numpy as np
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    flow_png = sorted((broken / "flow").glob("*.png"))[0]
    cv2.imwrite(str(flow_png), np.zeros((8, 8, 3), np.uint8))  # an ordinary 8-bit image
    out = tmp_path / "run"
    assert main(["--data", str(broken), "--out", str(out), *TINY]) == 2
    lines = error_lines(capsys)
    assert lines[-1].startswith(f"error: {flow_png}: flow PNG must be 16-bit") and not out.exists()
