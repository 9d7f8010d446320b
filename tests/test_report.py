"""The report reproduces the paper's Tables 1 and 2 and appends runs correctly."""

import csv
import io
import math
import re

import pandas as pd
import pytest

import results
from results import report, store

# Typed in from the paper's Tables 1 and 2 (method, values, bold columns), kept
# independent of results/reference/*.csv so a transcription slip there shows up.
# "*" after a value marks it bold in the paper.
PAPER_TABLE1 = """
Krizhevsky et al. [35] | 79.9 56.8 48.0
Random | 53.3 43.4 19.8
Agrawal et al. [5] | 63.1 43.9 -
Jayaraman et al. [20] | - 41.7 -
Lee et al. [10] | 63.8 46.9 -
Misra et al. [8] | - 42.4 -
Pathak et al. [2] | 61.0 50.2 -
Wang et al. [13] | 63.1 47.5 -
Ours | 64.4* 50.3* 41.4*
Ours direct reg. | 61.4 44.0 37.1
Bojanowski et al. [34] | 65.3 49.4 -
Doersch et al. [55] | 65.3 51.1 -
Donahue et al. [31] | 60.3 46.9 35.2
Gidaris et al. [37] | 73.0* 54.4 39.1
Krahenbuhl et al. [41] | 56.6 45.6 32.6
Larssons et.al. [24] | 65.9 - 38.4
Mundhenk et al. [30] | 69.3 55.2 40.6*
Noroozi et al. [28] | 67.6 53.2 37.6
Noroozi et al. [38] | 67.7 51.4 36.6
Noroozi et al. [29] | 69.8 55.5* 38.1
Noroozi et al. [29] | 69.9 55.0 40.0
Owens et al. [17] | 61.3 44.1 -
Pathak et al. [27] | 56.5 44.5 29.7
Jenni et al. [32] | 69.8 52.5 38.1
Zhang et al. [25] | 65.9 46.9 35.6
Zhang et al. [26] | 67.1 46.7 36.0
Zhan et al. [40]* | - - 42.8
Zhan et al. [40]* | - - 44.5
"""

PAPER_TABLE2 = """
Krizhevsky et.al. [35] | 19.3 36.3 44.2 48.3 50.5
Random | 11.6 17.1 16.9 16.3 14.1
Random-rescaled [41] | 17.5 23.0 24.5 23.2 20.6
Pathak et.al. [2] | 15.8* 23.2 29.0* 29.5* 25.4
Ours | 15.0 24.8* 28.9 29.4 28.0*
Ours direct reg. | 14.0 22.6 25.3 25.0 23.0
Doersch et.al. [22] | 16.2 23.3 30.2 31.7 29.6
Gidaris et.al. [37] | 18.8 31.7 38.7* 38.2 36.5*
Jenni et.al. [32] | 19.5 33.3* 37.9 38.9* 34.9
Mundhenk et.al. [30] | 19.6* 31.4 37.0 37.8 33.3
Noroozi et.al. [28] | 18.2 28.8 34.0 33.9 27.1
Noroozi et.al. [38] | 18.0 30.6 34.3 32.5 25.7
Noroozi et.al. [29] | 18.2 28.7 34.1 33.2 28.0
Noroozi et.al. [29] | 18.9 30.5 35.7 35.4 32.2
Pathak et.al. [27] | 14.1 20.7 21.0 19.8 15.5
Zhang et.al. [25] | 13.1 24.8 31.0 32.6 31.8
Zhang et.al. [26] | 17.7 29.3 35.4 35.2 32.8
"""


def _paper(text, columns):
    """[(method, {col: printed value}, {bold cols})] from the typed-in table."""
    rows = []
    for line in text.strip().splitlines():
        method, cells = (part.strip() for part in line.split("|"))
        cells = cells.split()
        assert len(cells) == len(columns)
        rows.append((method,
                     {c: v.rstrip("*") for c, v in zip(columns, cells)},
                     {c for c, v in zip(columns, cells) if v.endswith("*")}))
    return rows


def _build(spec, records=()):
    return report.render_all(spec, report.read_reference(spec), records)


def _csv_rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def _markdown_rows(text):
    """Body rows of the Markdown table as lists of cells (block, method, ..., values)."""
    lines = [l for l in text.splitlines() if l.startswith("| ")][1:]  # drop header
    return [[c.strip() for c in l.strip("|").split(" | ")] for l in lines]


@pytest.mark.parametrize("spec, paper, n_rows", [
    (report.TABLE1, PAPER_TABLE1, 28),
    (report.TABLE2, PAPER_TABLE2, 17),
])
def test_no_runs_reproduces_paper(spec, paper, n_rows):
    expected = _paper(paper, spec.columns)
    assert len(expected) == n_rows
    texts = _build(spec)

    rows = _csv_rows(texts["csv"])
    assert len(rows) == n_rows
    for row, (method, values, bold) in zip(rows, expected):
        assert row["method"] == method
        assert {c: row[c] for c in spec.columns} == values, method
        assert set(filter(None, row["bold"].split(";"))) == bold, method

    md = _markdown_rows(texts["md"])
    assert len(md) == n_rows
    for cells, (method, values, bold) in zip(md, expected):
        assert cells[1] == method
        shown = cells[4:]
        assert [v.strip("*") for v in shown] == [values[c] for c in spec.columns]
        assert {c for c, v in zip(spec.columns, shown) if v.startswith("**")} == bold

    tex = texts["tex"]
    assert tex.count(r"\textbf{") == sum(len(b) for _, _, b in expected)
    assert tex.count(r"\midrule") == len({r["block"] for r in rows})


def test_computed_bold_equals_paper_bold():
    for spec in report.TABLES:
        rows = report.read_reference(spec)
        assert report.bold_marks(rows, spec.columns) == [r.paper_bold for r in rows]


def test_reference_keeps_refs_and_blocks_verbatim():
    rows = report.read_reference(report.TABLE1)
    by_method = {r.method: r for r in rows}
    assert by_method["Pathak et al. [2]"].ref == "[2], Self"
    assert by_method["Wang et al. [13]"].ref == "[41,13]"
    assert [r.block for r in rows].count("Zhan et al. [40]*") == 2
    assert all(r.bold_group == "" for r in rows if r.block in ("Limits", "Zhan et al. [40]*"))
    table2 = report.read_reference(report.TABLE2)
    assert [r.method for r in table2 if r.block == "Limits"] == [
        "Krizhevsky et.al. [35]", "Random", "Random-rescaled [41]"]


FP = "0123456789abcdef" * 4


def _rec(task, metrics, seed=0, label="Ours", preset="paper", supervision="Optical-flow"):
    return store.make_record(task, metrics, label=label, supervision=supervision,
                             fingerprint=FP, seed=seed, preset=preset, config={},
                             provenance={})


def _linear(values):
    return {"top1": {f"conv{k}": v for k, v in zip(range(1, 6), values)}}


def test_mean_std_and_n():
    records = [_rec("voc07_cls", {"mAP": v}, seed=s) for s, v in enumerate([60.0, 61.0, 62.0])]
    records.append(_rec("voc07_det", {"mAP": 40.04}, seed=0))
    rows = _csv_rows(_build(report.TABLE1, records)["csv"])
    ours = rows[-1]
    assert len(rows) == 29 and ours["block"] == report.RUN_BLOCK and ours["method"] == "Ours"
    assert ours["supervision"] == "Optical-flow"
    assert ours["voc07_cls"] == "61.0 ± 1.0 (n=3)"  # sample std (ddof=1) of 60, 61, 62
    assert ours["voc07_det"] == "40.0 (n=1)"
    assert ours["voc12_seg"] == "-"
    # No in1k_linear record: Table 2 gets no run row.
    assert len(_csv_rows(_build(report.TABLE2, records)["csv"])) == 17


def test_demo_preset_is_labelled_and_never_bold():
    records = [_rec("voc07_cls", {"mAP": 99.0}, preset="demo"),
               _rec("in1k_linear", _linear([99.0] * 5), preset="demo")]
    for spec in report.TABLES:
        texts = _build(spec, records)
        demo = _csv_rows(texts["csv"])[-1]
        assert demo["method"] == "Ours [preset: demo]"
        assert demo["bold"] == "" and demo["bold_group"] == "" and demo["note"]
        assert "Ours [preset: demo] †" in texts["md"]
        assert "not comparable to the paper" in texts["md"]
        assert r"Ours [preset: demo]$^\dagger$" in texts["tex"]
        # The paper's marks are untouched.
        paper_rows = _csv_rows(texts["csv"])[:-1]
        assert [r["bold"] for r in paper_rows] == [
            ";".join(sorted(r.paper_bold, key=spec.columns.index))
            for r in report.read_reference(spec)]


def test_paper_subset_preset_is_a_non_paper_row():
    """evals.run records a paper run on a data subset (--allow-subset) as preset paper+subset: only
    exactly ``paper`` is a paper row."""
    for preset in ("paper+subset", "paper+subset+custom"):
        row = _csv_rows(_build(report.TABLE1, [_rec("voc07_cls", {"mAP": 99.0}, preset=preset)])["csv"])[-1]
        assert row["method"] == f"Ours [preset: {preset}]"
        assert row["bold"] == "" and "not comparable" in row["note"]


def test_winning_optical_flow_run_takes_motion_bold():
    records = [_rec("voc07_cls", {"mAP": 70.0}, seed=0),
               _rec("voc07_cls", {"mAP": 71.0}, seed=1),
               _rec("in1k_linear", _linear([16.0, 20.0, 30.0, 29.5, 20.0]))]
    rows = _csv_rows(_build(report.TABLE1, records)["csv"])
    ours_paper = next(r for r in rows if r["method"] == "Ours" and r["ref"] == "Self")
    assert rows[-1]["bold"] == "voc07_cls"
    assert rows[-1]["voc07_cls"] == "70.5 ± 0.7 (n=2)"
    assert ours_paper["bold"] == "voc07_det;voc12_seg"  # lost classification only
    assert next(r for r in rows if r["method"] == "Gidaris et al. [37]")["bold"] == "voc07_cls"

    rows = _csv_rows(_build(report.TABLE2, records)["csv"])
    # conv1 16.0 > Pathak 15.8; conv3 30.0 > 29.0; conv4 29.5 ties Pathak (both bold).
    assert rows[-1]["bold"] == "conv1;conv3;conv4"
    assert rows[3]["method"] == "Pathak et.al. [2]" and rows[3]["bold"] == "conv4"
    assert rows[4]["method"] == "Ours" and rows[4]["bold"] == "conv2;conv5"


def test_other_supervision_run_joins_no_group():
    records = [_rec("voc07_cls", {"mAP": 99.0}, label="Rot", supervision="Rotation")]
    rows = _csv_rows(_build(report.TABLE1, records)["csv"])
    assert rows[-1]["bold"] == "" and rows[-1]["bold_group"] == ""


@pytest.mark.slow
def test_cli_writes_all_six_files(tmp_path, capsys):
    runs = tmp_path / "runs"
    store.write_record(_rec("voc12_seg", {"mIoU": 42.0}), runs)
    out = tmp_path / "report"
    assert report.main(["--results-dir", str(runs), "--out", str(out), "--no-figures"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"table{t}.{f}" for t in (1, 2) for f in ("md", "tex", "csv"))
    printed = capsys.readouterr().out
    assert "### Table 1" in printed and "### Table 2" in printed
    assert "**42.0 (n=1)**" in printed  # beats Ours 41.4 in the motion group
    assert "**42.0 (n=1)**" in (out / "table1.md").read_text()
    assert re.search(r"\\textbf\{42\.0 \(n=1\)\}", (out / "table1.tex").read_text())


def test_cli_no_runs_and_formats(tmp_path, capsys):
    runs = tmp_path / "runs"
    store.write_record(_rec("voc12_seg", {"mIoU": 42.0}), runs)
    out = tmp_path / "report"
    report.main(["--results-dir", str(runs), "--out", str(out), "--no-runs", "--formats", "csv"])
    assert sorted(p.name for p in out.iterdir()) == ["table1.csv", "table2.csv"]
    assert report.RUN_BLOCK not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        report.main(["--out", str(out), "--formats", "pdf"])


# ---------------------------------------------------------------- results.load and the row rule

FP_A, FP_B, FP_C = "1a2b3c4d" * 8, "5e6f7a8b" * 8, "9c0d1e2f" * 8
PAPER_META = {"label": "Ours", "method": "cpfs", "preset": "paper", "step": 100}


def _ckpt_rec(task, metrics, fingerprint, seed=0, meta=None, row=None, preset="paper", label="Ours"):
    """A record as evals.engine.save_record writes it: with the checkpoint's meta, maybe a row."""
    record = store.make_record(task, metrics, label=label, supervision="Optical-flow",
                               fingerprint=fingerprint, seed=seed, preset=preset,
                               config={"row": row, "lr": 0.001},
                               provenance={"host": "h", "packages": {"torch": "2.0"}})
    record["run_key"] = "0123456789ab"
    if meta is not None:
        record["checkpoint"] = {"source": "x.pt", "format": "cpfs-pretrain", "load_report": {}, "meta": meta}
    return record


def test_load_round_trip(tmp_path):
    meta = {**PAPER_META, "overrides": {"batch_size": 8}, "manifest_hash": "feed"}
    paths = [store.write_record(_ckpt_rec("voc07_cls", {"mAP": 64.4, "per_class_AP": {"cat": 70.0}},
                                          FP_A, meta=meta), tmp_path),
             store.write_record(_ckpt_rec("in1k_linear", _linear([15.0, 24.8, 28.9, 29.4, 28.0]),
                                          FP_B, seed=1, row="ours-seeds"), tmp_path)]
    frame = results.load(tmp_path)
    assert len(frame) == 2
    assert set(results.IDENTITY_COLUMNS) <= set(frame.columns)
    assert {"mAP", "per_class_AP.cat", "top1.conv3", "provenance.host", "provenance.packages.torch"} <= set(
        frame.columns)
    cls = frame[frame["task"] == "voc07_cls"].iloc[0]
    assert (cls["label"], cls["supervision"], cls["fingerprint"], cls["seed"], cls["preset"], cls["run_key"]) == (
        "Ours", "Optical-flow", FP_A, 0, "paper", "0123456789ab")
    assert (cls["pretrain_method"], cls["pretrain_preset"], cls["pretrain_steps"]) == ("cpfs", "paper", 100)
    assert cls["pretrain_overrides"] == {"batch_size": 8} and cls["pretrain_manifest"] == "feed"
    assert cls["row"] == FP_A  # no explicit row: the checkpoint is its own row
    assert cls["mAP"] == 64.4 and cls["per_class_AP.cat"] == 70.0 and math.isnan(cls["top1.conv3"])
    assert cls["provenance.host"] == "h" and cls["provenance.packages.torch"] == "2.0"
    linear = frame[frame["task"] == "in1k_linear"].iloc[0]
    assert linear["row"] == "ours-seeds" and linear["top1.conv3"] == 28.9
    assert all(pd.isna(linear[c]) for c in ("pretrain_method", "pretrain_preset", "pretrain_steps",
                                            "pretrain_manifest"))  # no checkpoint meta: no pretraining
    assert sorted(frame["path"]) == sorted(str(p) for p in paths)

    empty = results.load(tmp_path / "nothing")
    assert empty.empty and list(empty.columns) == list(results.IDENTITY_COLUMNS)


def test_two_checkpoints_with_one_label_give_two_rows():
    records = [_ckpt_rec("voc07_cls", {"mAP": 60.0 + s}, FP_A, seed=s, meta=PAPER_META) for s in range(3)]
    records += [_ckpt_rec("voc07_cls", {"mAP": 70.0 + s}, FP_B, seed=s, meta=PAPER_META) for s in range(3)]
    runs = _csv_rows(_build(report.TABLE1, records)["csv"])[28:]
    assert [r["method"] for r in runs] == ["Ours [ckpt 1a2b3c4d]", "Ours [ckpt 5e6f7a8b]"]
    assert [r["voc07_cls"] for r in runs] == ["61.0 ± 1.0 (n=3)", "71.0 ± 1.0 (n=3)"]  # never pooled
    assert runs[1]["bold"] == "voc07_cls" and runs[0]["bold"] == ""  # both are paper rows


def test_demo_pretrained_checkpoint_is_non_paper_even_at_paper_eval():
    demo_meta = {**PAPER_META, "preset": "demo", "step": 3}
    records = [_ckpt_rec("voc07_cls", {"mAP": 99.0}, FP_C, meta=demo_meta),
               _ckpt_rec("in1k_linear", _linear([99.0] * 5), FP_C, meta=demo_meta)]
    for spec in report.TABLES:
        texts = _build(spec, records)
        row = _csv_rows(texts["csv"])[-1]
        assert row["method"] == "Ours [pretrained: demo]"
        assert row["bold"] == "" and row["bold_group"] == "" and "not comparable" in row["note"]
        assert "Ours [pretrained: demo] †" in texts["md"] and "**99.0" not in texts["md"]
        assert r"\textbf{99.0" not in texts["tex"]
    # A +custom pretraining preset is not the paper's either; direct_paper is.
    custom = [_ckpt_rec("voc07_cls", {"mAP": 99.0}, FP_C, meta={**PAPER_META, "preset": "paper+custom"})]
    assert _csv_rows(_build(report.TABLE1, custom)["csv"])[-1]["method"] == "Ours [pretrained: paper+custom]"
    direct = [_ckpt_rec("voc07_cls", {"mAP": 99.0}, FP_C, label="Ours direct reg.",
                        meta={**PAPER_META, "method": "direct", "preset": "direct_paper"})]
    assert _csv_rows(_build(report.TABLE1, direct)["csv"])[-1]["bold"] == "voc07_cls"


def test_row_pools_checkpoints_and_the_count_says_both():
    records = [_ckpt_rec("voc07_cls", {"mAP": value}, fp, seed=s, meta=PAPER_META, row="ours-seeds")
               for fp, values in ((FP_A, (60.0, 61.0, 62.0)), (FP_B, (63.0, 64.0, 65.0)))
               for s, value in enumerate(values)]
    texts = _build(report.TABLE1, records)
    runs = _csv_rows(texts["csv"])[28:]
    assert len(runs) == 1 and runs[0]["method"] == "Ours"
    assert runs[0]["voc07_cls"] == "62.5 ± 1.9 (n=6: 2 ckpts × 3 seeds)"  # std over all six, ddof=1
    assert r"(n=6: 2 ckpts $\times$ 3 seeds)" in texts["tex"]
    # Without the shared row the same records give one row per checkpoint.
    for record in records:
        record["config"]["row"] = None
    assert len(_csv_rows(_build(report.TABLE1, records)["csv"])[28:]) == 2


def test_report_writes_figures(tmp_path):
    runs = tmp_path / "runs"
    store.write_record(_ckpt_rec("in1k_linear", _linear([16.0, 25.0, 29.0, 30.0, 28.5]), FP_A, meta=PAPER_META),
                       runs)
    store.write_record(_ckpt_rec("voc07_cls", {"mAP": 50.0}, FP_C, preset="demo",
                                 meta={**PAPER_META, "preset": "demo"}), runs)
    out = tmp_path / "report"
    assert report.main(["--results-dir", str(runs), "--out", str(out), "--formats", "md"]) == 0
    for name in ("table1", "table2"):
        png, pdf = out / f"{name}.png", out / f"{name}.pdf"
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
        assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 1_000
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"table{t}.{f}" for t in (1, 2) for f in ("md", "png", "pdf"))


def test_row_flag_reaches_config_and_grid(tmp_path):
    from evals import run
    from slurm.grid import load_grid
    args = run.get_args_parser().parse_args(["--task", "voc07_cls", "--preset", "demo", "--row", "ours-seeds"])
    _, config = run.resolve_config("voc07_cls", args)
    assert config.row == "ours-seeds" and config.preset == "demo"  # operational: no +custom
    grid = tmp_path / "g.yaml"
    grid.write_text("results_dir: r\nlog_dir: l\ntasks: {voc07_cls: {}}\n"
                    "checkpoints: {a: {path: random, label: Ours, row: ours-seeds}, b: {path: random}}\n")
    loaded = load_grid(grid)
    task = loaded.tasks["voc07_cls"]
    argv = loaded.argv(task, loaded.checkpoints["a"], 0)
    assert argv[argv.index("--row") + 1] == "ours-seeds"
    assert "--row" not in loaded.argv(task, loaded.checkpoints["b"], 0)
