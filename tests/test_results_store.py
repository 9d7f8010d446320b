"""The results store: validation, atomic no-clobber writes, loading."""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from results import store

REPO = Path(__file__).resolve().parents[1]
FP = "ab" * 32  # a sha256-shaped fingerprint


def _record(task="voc07_cls", metrics=None, **overrides):
    kwargs = dict(label="Ours", supervision="Optical-flow", fingerprint=FP, seed=0,
                  preset="paper", config={"lr": 0.001}, provenance={"host": "h"},
                  metric_definitions={"AP": "sklearn average_precision_score"})
    kwargs.update(overrides)
    return store.make_record(task, {"mAP": 64.4} if metrics is None else metrics, **kwargs)


def test_round_trip(tmp_path):
    record = _record(metrics={"mAP": 64.4, "AP": {"cat": 70.0}})
    path = store.write_record(record, tmp_path)
    assert path == tmp_path / "voc07_cls" / "paper" / f"{FP[:16]}-seed0.json"
    assert store.record_exists(tmp_path, "voc07_cls", FP, 0, "paper")
    assert not store.record_exists(tmp_path, "voc07_cls", FP, 1, "paper")
    assert store.load_records(tmp_path) == [record]


def test_linear_record_round_trip(tmp_path):
    top1 = {f"conv{k}": 10.0 + k for k in range(1, 6)}
    record = _record("in1k_linear", {"top1": top1})
    store.write_record(record, tmp_path)
    assert store.load_records(tmp_path)[0]["metrics"]["top1"] == top1


@pytest.mark.parametrize("task, metrics, overrides, message", [
    ("voc99", {"mAP": 1.0}, {}, "unknown task"),
    ("voc07_cls", {"AP": 1.0}, {}, "headline 'mAP'"),
    ("voc12_seg", {"mAP": 1.0}, {}, "headline 'mIoU'"),
    ("voc07_det", {"mAP": "64.4"}, {}, "finite number"),
    ("voc07_det", {"mAP": float("nan")}, {}, "finite number"),
    ("in1k_linear", {"top1": {"conv1": 1.0}}, {}, "conv2"),
    ("voc07_cls", None, {"seed": "0"}, "seed must be an int"),
    ("voc07_cls", None, {"seed": True}, "seed must be an int"),
    ("voc07_cls", None, {"fingerprint": "not-hex"}, "fingerprint"),
    ("voc07_cls", None, {"fingerprint": "abc"}, "fingerprint"),
    ("voc07_cls", None, {"config": {"x": object()}}, "JSON"),
])
def test_make_record_rejects(task, metrics, overrides, message):
    with pytest.raises(ValueError, match=message):
        _record(task, metrics, **overrides)


def test_no_clobber_unless_overwrite(tmp_path):
    path = store.write_record(_record(metrics={"mAP": 1.0}), tmp_path)
    with pytest.raises(store.RecordExistsError, match=str(path)) as err:
        store.write_record(_record(metrics={"mAP": 2.0}), tmp_path)
    assert isinstance(err.value, FileExistsError)
    assert store.load_records(tmp_path)[0]["metrics"]["mAP"] == 1.0

    store.write_record(_record(metrics={"mAP": 2.0}), tmp_path, overwrite=True)
    assert store.load_records(tmp_path)[0]["metrics"]["mAP"] == 2.0
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp left behind


def test_lost_race_does_not_clobber(tmp_path, monkeypatch):
    # Another writer publishes between our exists() check and our link: the link
    # must fail rather than replace the winner's record.
    winner = _record(metrics={"mAP": 1.0})
    real_exists = Path.exists

    def exists_then_race(self):
        if self.suffix == ".json" and not self.name.startswith(".tmp-"):
            monkeypatch.setattr(Path, "exists", real_exists)
            store.write_record(winner, tmp_path)
            return False
        return real_exists(self)

    monkeypatch.setattr(Path, "exists", exists_then_race)
    with pytest.raises(store.RecordExistsError):
        store.write_record(_record(metrics={"mAP": 2.0}), tmp_path)
    assert store.load_records(tmp_path) == [winner]


# The child blocks halfway through serialising the record, after part of the temp
# file has reached the disk, and says so through a flag file.
_KILLED_WRITER = """
import json, sys, time
from pathlib import Path
from results import store
results_dir, flag = Path(sys.argv[1]), Path(sys.argv[2])
real = json.JSONEncoder.iterencode
def slow(self, o, _one_shot=False):
    for i, chunk in enumerate(real(self, o, _one_shot)):
        if i == 3000:
            sys.stdout.flush()
            flag.write_text("blocked")
            time.sleep(60)
        yield chunk
json.JSONEncoder.iterencode = slow
record = store.make_record(
    "voc07_cls", {"mAP": 50.0, "scores": list(range(5000))}, label="Ours",
    supervision="Optical-flow", fingerprint="%s", seed=0, preset="paper",
    config={}, provenance={})
store.write_record(record, results_dir)
""" % FP


def test_killed_writer_leaves_no_record(tmp_path):
    results_dir, flag = tmp_path / "runs", tmp_path / "flag"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(results_dir), str(flag)],
                             cwd=REPO)
    try:
        deadline = time.monotonic() + 15
        while not flag.exists():
            assert child.poll() is None, "writer exited before blocking"
            assert time.monotonic() < deadline, "writer never reached the middle of the write"
            time.sleep(0.02)
        final = store.record_path(results_dir, "voc07_cls", FP, 0, "paper")
        temps = list(final.parent.glob(".tmp-*"))
        assert len(temps) == 1 and temps[0].stat().st_size > 0  # genuinely mid-write
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not final.exists()
    assert temps[0].exists()  # the half-written temp is still there ...
    assert store.load_records(results_dir) == []  # ... and ignored


def test_load_records_names_corrupt_file(tmp_path):
    store.write_record(_record(), tmp_path)
    bad = tmp_path / "voc07_det" / "paper" / "broken.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"schema": 1, "task": ')
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        store.load_records(tmp_path)
    bad.write_text(json.dumps({"schema": 2}))
    with pytest.raises(ValueError, match="broken.json.*schema"):
        store.load_records(tmp_path)


def test_load_records_missing_dir_is_empty(tmp_path):
    assert store.load_records(tmp_path / "nothing") == []


def test_split_hash_deterministic_and_order_sensitive():
    splits = {"train": ["a", "b", "c"], "val": ["d"]}
    h = store.split_hash(splits)
    assert len(h) == 64 and h == store.split_hash(dict(splits))
    assert h == store.split_hash({"val": ["d"], "train": ["a", "b", "c"]})  # names sorted
    assert h != store.split_hash({"train": ["b", "a", "c"], "val": ["d"]})  # ids in order
    assert h != store.split_hash({"train": ["a", "b"], "val": ["c", "d"]})
    assert store.split_hash({"t": ["a b"]}) != store.split_hash({"t": ["a", "b"]})


def test_provenance_fields():
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    t1 = datetime(2024, 1, 2, tzinfo=timezone.utc)
    prov = store.provenance("cpu", t0, t1, {"test": ["x"]})
    assert prov["device"] == "cpu"
    assert prov["start_time"] == t0.isoformat() and prov["end_time"] == t1.isoformat()
    assert prov["split_hash"] == store.split_hash({"test": ["x"]})
    assert set(prov["packages"]) == {"torch", "torchvision", "numpy", "cpfs-bench"}
    assert prov["git_commit"] is None or len(prov["git_commit"]) == 40
    # Provenance must fit into a record.
    _record(provenance=prov)


def test_provenance_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable to be found
    t = datetime(2024, 1, 1)
    prov = store.provenance("cpu", t, t, {}, repo_dir=tmp_path)
    assert prov["git_commit"] is None and prov["git_dirty"] is None


def test_results_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("CPFS_RESULTS_DIR", str(tmp_path))
    assert store.default_results_dir() == tmp_path
    monkeypatch.delenv("CPFS_RESULTS_DIR")
    assert store.default_results_dir() == REPO / "results" / "runs"
