"""Regenerate the paper's Table 1 (PASCAL VOC) and Table 2 (ImageNet linear probe).

The paper's rows (results/reference/*.csv, protocols.md P7) are printed as
published; this repo's runs (``results.load``: one DataFrame row per record) follow in
a block of their own, one row per (label, checkpoint identity, eval preset), as mean ±
sample std over that checkpoint's eval seeds. The checkpoint identity is the record's
fingerprint, or the ``row`` a run was given (``evals.run --row NAME``) to pool several
checkpoints (e.g. pretraining seeds) under one row. Bold marks the best value per column
within the paper's comparison groups (see reference/README.md); only paper rows take
part: eval preset ``paper`` and, for our checkpoints, pretraining preset ``paper`` or
``direct_paper``. Anything else is labelled, footnoted and never bold. Beside the
Markdown go the figures (results.figures): Table 1 as bars per benchmark, Table 2 as
per-layer curves, PNG and PDF.

    python -m results.report [--results-dir DIR] [--out DIR] [--formats md,tex,csv] [--no-runs]
                             [--no-figures]

Everything from reading the rows to rendering text is pure; ``main`` does the I/O.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import results
from results import store
from results.tasks import TASKS

if TYPE_CHECKING:
    import pandas

# Table 1's columns in the paper's order (the reference CSV's column ids)
TABLE1_TASKS = ("voc07_cls", "voc07_det", "voc12_seg")

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
DEFAULT_OUT_DIR = store.REPO_DIR / "results" / "report"
FORMATS = ("md", "tex", "csv")
RUN_BLOCK = "This reimplementation"
RUN_REF = "This repo"
PAPER_PRESET = "paper"
# Pretraining presets that follow the paper (P1): the model and its direct-regression baseline.
PAPER_PRETRAIN_PRESETS = ("paper", "direct_paper")
MISSING = "-"
DAGGER = "†"
NON_PAPER_NOTE = (
    f"{DAGGER} Non-paper preset of the evaluation (`[preset: …]`) or of the pretraining that made "
    "the checkpoint (`[pretrained: …]`), e.g. a short demo schedule or a data subset: not "
    "comparable to the paper's numbers, and never marked bold."
)


@dataclass(frozen=True)
class TableSpec:
    """What one table shows and where each column's numbers come from in a record."""

    name: str
    title: str
    columns: tuple[str, ...]  # column ids, as in the reference CSV
    headers: tuple[str, ...]  # column titles as printed in the paper
    sources: Mapping[str, tuple[str, tuple[str, ...]]]  # column -> (task, key path in metrics)
    notes: tuple[str, ...] = ()


TABLE1 = TableSpec(
    name="table1",
    title="Table 1: PASCAL VOC: VOC2007 classification %mAP, VOC2007 detection %mAP, "
          "VOC2012 segmentation %mIU",
    columns=TABLE1_TASKS,
    headers=tuple(TASKS[name].column for name in TABLE1_TASKS),
    sources={name: (name, (TASKS[name].headline,)) for name in TABLE1_TASKS},
    notes=("\\* Zhan et al. use a different (mix-and-match) tuning strategy and are not "
           "counted when marking bold (paper, Table 1 caption).",),
)

TABLE2 = TableSpec(
    name="table2",
    title="Table 2: ImageNet ILSVRC-12 linear probing, top-1 % per layer",
    columns=store.LINEAR_LAYERS,
    headers=tuple(layer.capitalize() for layer in store.LINEAR_LAYERS),
    sources={layer: ("in1k_linear", (TASKS["in1k_linear"].headline, layer)) for layer in store.LINEAR_LAYERS},
)

TABLES = (TABLE1, TABLE2)


@dataclass(frozen=True)
class Row:
    """One table row. Paper rows have no ``n``; run rows carry n and std per column."""

    block: str
    method: str
    supervision: str
    ref: str
    values: Mapping[str, float | None]
    bold_group: str = ""
    paper_bold: frozenset[str] = frozenset()
    std: Mapping[str, float | None] = field(default_factory=dict)
    n: Mapping[str, int] = field(default_factory=dict)
    comparable: bool = True  # False for non-paper presets: footnoted, never bold
    per_ckpt: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # runs per checkpoint
    note: str = ""  # why a run row is not comparable (the CSV's note column)


# ---------------------------------------------------------------- reading rows

def parse_value(text: str) -> float | None:
    """A printed cell ("64.4" or "-") as a number, or None for missing."""
    text = text.strip()
    return None if text in ("", MISSING) else float(text)


def reference_rows(spec: TableSpec, csv_text: str) -> list[Row]:
    """The paper's rows from the text of ``reference/<table>.csv``, in the paper's order."""
    rows = []
    for line in csv.DictReader(io.StringIO(csv_text)):
        rows.append(Row(
            block=line["block"],
            method=line["method"],
            supervision=line["supervision"],
            ref=line["ref"],
            values={col: parse_value(line[col]) for col in spec.columns},
            bold_group=line["bold_group"],
            paper_bold=frozenset(c for c in line["paper_bold"].split(";") if c),
        ))
    return rows


def read_reference(spec: TableSpec, reference_dir: Path = REFERENCE_DIR) -> list[Row]:
    """Read ``reference_dir/<spec.name>.csv``."""
    return reference_rows(spec, (reference_dir / f"{spec.name}.csv").read_text(encoding="utf-8"))


def as_frame(runs: "pandas.DataFrame | Iterable[Mapping[str, Any]]") -> "pandas.DataFrame":
    """Runs as the DataFrame of ``results.load``; records (dicts) are converted on the way."""
    import pandas as pd
    return runs if isinstance(runs, pd.DataFrame) else results.frame(runs)


def _column(spec_path: Sequence[str]) -> str:
    """The DataFrame column of a metric key path: ("top1", "conv3") -> "top1.conv3"."""
    return ".".join(spec_path)


def non_paper_pretraining(group: "pandas.DataFrame") -> list[str]:
    """The pretraining presets of ``group``'s checkpoints that do not follow the paper, sorted.

    A checkpoint without a pretraining identity (random, torchvision, an old file) has nothing to
    check; one that names a method but no preset counts as "unknown", since nothing shows that it
    followed the paper."""
    pretrained = group["pretrain_method"].notna() | group["pretrain_preset"].notna()
    presets = group.loc[pretrained, "pretrain_preset"].map(lambda p: "unknown" if p is None or p != p else str(p))
    return sorted(set(presets) - set(PAPER_PRETRAIN_PRESETS))


@dataclass(frozen=True)
class _RunGroup:
    """One (label, checkpoint identity, eval preset) before its printed name is settled."""

    label: str
    row: str
    explicit_row: bool
    preset: str
    pretrained: tuple[str, ...]  # non-paper pretraining presets
    supervision: str
    values: dict
    std: dict
    n: dict
    per_ckpt: dict

    @property
    def comparable(self) -> bool:
        return self.preset == PAPER_PRESET and not self.pretrained

    def markers(self) -> list[str]:
        """The bracketed labels that say why a row is not a paper row."""
        marks = [] if self.preset == PAPER_PRESET else [f"[preset: {self.preset}]"]
        return marks + ([f"[pretrained: {', '.join(self.pretrained)}]"] if self.pretrained else [])

    def method(self, tagged: bool) -> str:
        """``label``, then (when the label needs telling apart) the checkpoint, then the markers."""
        tag = [f"[row: {self.row}]" if self.explicit_row else f"[ckpt {self.row[:8]}]"] if tagged else []
        return " ".join([self.label, *tag, *self.markers()])

    def note(self) -> str:
        if self.comparable:
            return ""
        why = ([] if self.preset == PAPER_PRESET else [f"eval preset {self.preset}"]) + \
              ([f"pretrained at {', '.join(self.pretrained)}"] if self.pretrained else [])
        return f"non-paper preset ({'; '.join(why)}): not comparable to the paper"


def _run_group(spec: TableSpec, key: tuple[str, str, str], group: "pandas.DataFrame") -> _RunGroup:
    """Mean, sample std (ddof=1, from two samples on) and counts of one group, per column."""
    label, row, preset = key
    values, std, n, per_ckpt = {}, {}, {}, {}
    for col, (task, path) in spec.sources.items():
        name = _column(path)
        rows = group[group["task"] == task]
        samples = rows[name].dropna().astype(float) if name in rows else rows.iloc[0:0, 0]
        values[col] = float(samples.mean()) if len(samples) else None
        std[col] = float(samples.std(ddof=1)) if len(samples) >= 2 else None
        n[col] = len(samples)
        counts = rows.loc[samples.index].groupby("fingerprint").size() if len(samples) else []
        per_ckpt[col] = tuple(sorted(int(c) for c in counts))
    return _RunGroup(
        label=label, row=row, explicit_row=bool((group["row"] != group["fingerprint"]).any()),
        preset=preset, pretrained=tuple(non_paper_pretraining(group)),
        supervision=" / ".join(dict.fromkeys(group["supervision"])),
        values=values, std=std, n=n, per_ckpt=per_ckpt)


def run_rows(spec: TableSpec, runs: "pandas.DataFrame | Iterable[Mapping[str, Any]]") -> list[Row]:
    """One row per (label, checkpoint identity, eval preset) with any record for this table's tasks.

    A row pools the eval seeds of one checkpoint, or of several when their records share an
    explicit ``row``. Two checkpoints with one label give two rows, told apart in the printed name
    by the checkpoint's fingerprint (or the row name) when their names would otherwise be equal.
    """
    frame = as_frame(runs)
    tasks = {task for task, _ in spec.sources.values()}
    frame = frame[frame["task"].isin(tasks)]
    if frame.empty:
        return []
    groups = [_run_group(spec, key, group)
              for key, group in frame.groupby(["label", "row", "preset"], sort=True)]
    # Paper rows first within a label, so "Ours" sits above "Ours [preset: demo]".
    groups.sort(key=lambda g: (g.label, not g.comparable, g.preset, g.pretrained, g.row))
    plain = [g.method(tagged=False) for g in groups]
    rows = []
    for group, name in zip(groups, plain):
        # Only paper rows of optical-flow runs compete with the paper's motion block.
        in_motion = group.comparable and group.supervision.lower() == "optical-flow"
        rows.append(Row(
            block=RUN_BLOCK,
            method=group.method(tagged=plain.count(name) > 1),
            supervision=group.supervision,
            ref=RUN_REF,
            values=group.values,
            bold_group="motion" if in_motion else "",
            std=group.std,
            n=group.n,
            comparable=group.comparable,
            per_ckpt=group.per_ckpt,
            note=group.note(),
        ))
    return rows


# ---------------------------------------------------------------- bold and cells

def _shown(value: float) -> float:
    # Compare what the reader sees: 50.26 and 50.3 both print as 50.3 and tie.
    return float(f"{value:.1f}")


def bold_marks(rows: Sequence[Row], columns: Sequence[str]) -> list[frozenset[str]]:
    """Per row, the columns printed bold: the max within each bold_group (ties all bold).

    Rows with an empty bold_group (limits, Zhan et al.*, non-comparable runs) are
    never bold and never compete.
    """
    marks: list[set[str]] = [set() for _ in rows]
    for group in dict.fromkeys(r.bold_group for r in rows if r.bold_group):
        members = [i for i, r in enumerate(rows) if r.bold_group == group]
        for col in columns:
            shown = {i: _shown(rows[i].values[col]) for i in members
                     if rows[i].values.get(col) is not None}
            if shown:
                best = max(shown.values())
                for i, value in shown.items():
                    if value == best:
                        marks[i].add(col)
    return [frozenset(m) for m in marks]


def count_text(row: Row, col: str, times: str = "×") -> str:
    """"n=3" for one checkpoint's seeds; "n=6: 2 ckpts × 3 seeds" when a row pools checkpoints
    (with a range, "2-3 seeds", when they have different numbers of runs)."""
    per_ckpt = row.per_ckpt.get(col, ())
    if len(per_ckpt) <= 1:
        return f"n={row.n[col]}"
    low, high = min(per_ckpt), max(per_ckpt)
    seeds = f"{low}" if low == high else f"{low}-{high}"
    return f"n={row.n[col]}: {len(per_ckpt)} ckpts {times} {seeds} seed{'s' if high > 1 else ''}"


def format_cell(row: Row, col: str, pm: str = "±", times: str = "×") -> str:
    """"64.4" for a paper row; "64.4 ± 0.3 (n=3)" or "64.4 (n=1)" for runs; "-" if missing."""
    value = row.values.get(col)
    if value is None:
        return MISSING
    if not row.n:
        return f"{value:.1f}"
    std = row.std.get(col)
    spread = f" {pm} {std:.1f}" if std is not None else ""
    return f"{value:.1f}{spread} ({count_text(row, col, times)})"


def _blocks(rows: Sequence[Row]) -> list[bool]:
    """For each row, whether it starts a new block."""
    return [i == 0 or row.block != rows[i - 1].block for i, row in enumerate(rows)]


def _footnotes(spec: TableSpec, rows: Sequence[Row]) -> list[str]:
    notes = list(spec.notes)
    if any(not r.comparable for r in rows):
        notes.append(NON_PAPER_NOTE)
    return notes


# ---------------------------------------------------------------- renderers

def render_markdown(spec: TableSpec, rows: Sequence[Row], bold: Sequence[frozenset[str]]) -> str:
    """The table as GitHub Markdown, block name on each block's first row, bold as **x**."""
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"### {spec.title}", "",
             "| " + " | ".join(("Block", "Method", "Supervision", "[Ref]", *spec.headers)) + " |",
             "|" + "---|" * (4 + len(spec.columns))]
    for row, marks, starts in zip(rows, bold, _blocks(rows)):
        method = row.method if row.comparable else f"{row.method} {DAGGER}"
        cells = [row.block if starts else "", method, row.supervision, row.ref]
        for col in spec.columns:
            text = format_cell(row, col)
            cells.append(f"**{text}**" if col in marks else text)
        lines.append("| " + " | ".join(esc(c) for c in cells) + " |")
    notes = _footnotes(spec, rows)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
    "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters in plain text."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def render_latex(spec: TableSpec, rows: Sequence[Row], bold: Sequence[frozenset[str]]) -> str:
    """A booktabs tabular with \\midrule between blocks and \\textbf for bold."""
    ncol = len(spec.columns)
    lines = [f"% {spec.title}",
             "% Generated by `python -m results.report`; needs \\usepackage{booktabs}.",
             "\\begin{tabular}{llll" + "c" * ncol + "}",
             "\\toprule",
             " & ".join(latex_escape(h) for h in
                        ("Block", "Method", "Supervision", "[Ref]", *spec.headers)) + r" \\",
             ]
    for row, marks, starts in zip(rows, bold, _blocks(rows)):
        if starts:
            lines.append("\\midrule")
        method = latex_escape(row.method) + ("" if row.comparable else r"$^\dagger$")
        cells = [latex_escape(row.block) if starts else "", method,
                 latex_escape(row.supervision), latex_escape(row.ref)]
        for col in spec.columns:
            text = format_cell(row, col, pm=r"$\pm$", times=r"$\times$")
            cells.append(f"\\textbf{{{text}}}" if col in marks else text)
        lines.append(" & ".join(cells) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    for note in _footnotes(spec, rows):
        note = latex_escape(note.replace("\\*", "*")).replace(DAGGER, r"$^\dagger$")
        lines.append(f"\\par{{\\footnotesize {note}}}")
    return "\n".join(lines) + "\n"


def render_csv(spec: TableSpec, rows: Sequence[Row], bold: Sequence[frozenset[str]]) -> str:
    """Machine-readable table: printed cells, plus ``bold`` (";"-joined columns) and ``note``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["block", "method", "supervision", "ref", *spec.columns,
                     "bold_group", "bold", "note"])
    for row, marks in zip(rows, bold):
        writer.writerow([
            row.block, row.method, row.supervision, row.ref,
            *(format_cell(row, col) for col in spec.columns),
            row.bold_group,
            ";".join(col for col in spec.columns if col in marks),
            "" if row.comparable else (row.note or "non-paper preset: not comparable to the paper"),
        ])
    return out.getvalue()


RENDERERS = {"md": render_markdown, "tex": render_latex, "csv": render_csv}


Runs = "pandas.DataFrame | Iterable[Mapping[str, Any]]"  # results.load's frame, or records


def build_table(spec: TableSpec, reference: Sequence[Row],
                runs: Runs) -> tuple[list[Row], list[frozenset[str]]]:
    """Paper rows then run rows, with the bold marks for all of them."""
    rows = [*reference, *run_rows(spec, runs)]
    return rows, bold_marks(rows, spec.columns)


def render_all(spec: TableSpec, reference: Sequence[Row], runs: Runs,
               formats: Iterable[str] = FORMATS) -> dict[str, str]:
    """``{format: text}`` for one table."""
    rows, bold = build_table(spec, reference, runs)
    return {fmt: RENDERERS[fmt](spec, rows, bold) for fmt in formats}


# ---------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Regenerate the paper's Table 1 and Table 2 with this repo's runs appended.")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="directory of run records (default: $CPFS_RESULTS_DIR or "
                             "results/runs in the repo)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR,
                        help="directory to write table1.* and table2.* into "
                             "(default: results/report in the repo)")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="comma-separated output formats among md, tex, csv (default: all)")
    parser.add_argument("--no-runs", action="store_true",
                        help="ignore run records and print only the paper's rows")
    parser.add_argument("--no-figures", action="store_true",
                        help="skip the figures (table1/table2 .png and .pdf), which otherwise go "
                             "beside the Markdown whenever md is written")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        get_args_parser().error(f"unknown format(s) {unknown}; choose from {list(FORMATS)}")
    results_dir = args.results_dir or store.default_results_dir()
    try:
        runs = results.frame([]) if args.no_runs else results.load(results_dir)
    except ValueError as err:  # a broken record names its file; a report must not drop it silently
        print(f"error: {err}; move the file away (or repair it) and run the report again", file=sys.stderr)
        return 2

    figures = "md" in formats and not args.no_figures
    for spec in TABLES:
        rows, bold = build_table(spec, read_reference(spec), runs)
        texts = {fmt: RENDERERS[fmt](spec, rows, bold) for fmt in {"md", *formats}}
        for fmt in formats:
            store.write_text_atomic(args.out / f"{spec.name}.{fmt}", texts[fmt])
        if figures:
            from results import figures as plots  # matplotlib only when a figure is drawn
            plots.write_figure(plots.draw(spec, rows), args.out / spec.name)
        print(texts["md"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
