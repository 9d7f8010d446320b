"""Regenerate the paper's Table 1 (PASCAL VOC) and Table 2 (ImageNet linear probe).

The paper's rows (results/reference/*.csv, protocols.md P7) are printed as
published; this repo's runs (results.store records) follow in a block of their own,
one row per (label, preset), as mean ± sample std over runs. Bold marks the best
value per column within the paper's comparison groups (see reference/README.md).

    python -m results.report [--results-dir DIR] [--out DIR] [--formats md,tex,csv] [--no-runs]

Everything from reading the rows to rendering text is pure; ``main`` does the I/O.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from results import store

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
DEFAULT_OUT_DIR = store.REPO_DIR / "results" / "report"
FORMATS = ("md", "tex", "csv")
RUN_BLOCK = "This reimplementation"
RUN_REF = "This repo"
PAPER_PRESET = "paper"
MISSING = "-"
DAGGER = "†"
NON_PAPER_NOTE = (
    f"{DAGGER} Non-paper preset (e.g. a short demo schedule or a data subset): not "
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
    columns=("voc07_cls", "voc07_det", "voc12_seg"),
    headers=("Cl.", "Detection", "Seg."),
    sources={
        "voc07_cls": ("voc07_cls", ("mAP",)),
        "voc07_det": ("voc07_det", ("mAP",)),
        "voc12_seg": ("voc12_seg", ("mIoU",)),
    },
    notes=("\\* Zhan et al. use a different (mix-and-match) tuning strategy and are not "
           "counted when marking bold (paper, Table 1 caption).",),
)

TABLE2 = TableSpec(
    name="table2",
    title="Table 2: ImageNet ILSVRC-12 linear probing, top-1 % per layer",
    columns=store.LINEAR_LAYERS,
    headers=tuple(layer.capitalize() for layer in store.LINEAR_LAYERS),
    sources={layer: ("in1k_linear", ("top1", layer)) for layer in store.LINEAR_LAYERS},
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


def _metric(metrics: Mapping[str, Any], path: Sequence[str]) -> float | None:
    value: Any = metrics
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return float(value)


def run_rows(spec: TableSpec, records: Iterable[Mapping[str, Any]]) -> list[Row]:
    """One row per (label, preset) that has any record for this table's tasks.

    Each cell is the mean over that group's records for the column's task, with the
    sample std (ddof=1) when there are at least two.
    """
    tasks = {task for task, _ in spec.sources.values()}
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        if record["task"] in tasks:
            groups.setdefault((record["label"], record["preset"]), []).append(record)

    rows = []
    # Paper preset first within a label, so "Ours" sits above "Ours [preset: demo]".
    for label, preset in sorted(groups, key=lambda k: (k[0], k[1] != PAPER_PRESET, k[1])):
        group = groups[(label, preset)]
        supervision = " / ".join(dict.fromkeys(r["supervision"] for r in group))
        values, std, n = {}, {}, {}
        for col, (task, path) in spec.sources.items():
            samples = [v for r in group if r["task"] == task
                       for v in [_metric(r["metrics"], path)] if v is not None]
            values[col] = statistics.fmean(samples) if samples else None
            std[col] = statistics.stdev(samples) if len(samples) >= 2 else None
            n[col] = len(samples)
        comparable = preset == PAPER_PRESET
        # Only comparable optical-flow runs compete with the paper's motion block.
        in_motion = comparable and supervision.lower() == "optical-flow"
        rows.append(Row(
            block=RUN_BLOCK,
            method=label if comparable else f"{label} [preset: {preset}]",
            supervision=supervision,
            ref=RUN_REF,
            values=values,
            bold_group="motion" if in_motion else "",
            std=std,
            n=n,
            comparable=comparable,
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


def format_cell(row: Row, col: str, pm: str = "±") -> str:
    """"64.4" for a paper row; "64.4 ± 0.3 (n=3)" or "64.4 (n=1)" for runs; "-" if missing."""
    value = row.values.get(col)
    if value is None:
        return MISSING
    if not row.n:
        return f"{value:.1f}"
    std = row.std.get(col)
    spread = f" {pm} {std:.1f}" if std is not None else ""
    return f"{value:.1f}{spread} (n={row.n[col]})"


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
            text = format_cell(row, col, pm=r"$\pm$")
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
            "" if row.comparable else "non-paper preset: not comparable to the paper",
        ])
    return out.getvalue()


RENDERERS = {"md": render_markdown, "tex": render_latex, "csv": render_csv}


def build_table(spec: TableSpec, reference: Sequence[Row],
                records: Iterable[Mapping[str, Any]]) -> tuple[list[Row], list[frozenset[str]]]:
    """Paper rows then run rows, with the bold marks for all of them."""
    rows = [*reference, *run_rows(spec, records)]
    return rows, bold_marks(rows, spec.columns)


def render_all(spec: TableSpec, reference: Sequence[Row], records: Iterable[Mapping[str, Any]],
               formats: Iterable[str] = FORMATS) -> dict[str, str]:
    """``{format: text}`` for one table."""
    rows, bold = build_table(spec, reference, records)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        get_args_parser().error(f"unknown format(s) {unknown}; choose from {list(FORMATS)}")
    results_dir = args.results_dir or store.default_results_dir()
    try:
        records = [] if args.no_runs else store.load_records(results_dir)
    except ValueError as err:  # a broken record names its file; a report must not drop it silently
        print(f"error: {err}; move the file away (or repair it) and run the report again", file=sys.stderr)
        return 2

    for spec in TABLES:
        texts = render_all(spec, read_reference(spec), records, {"md", *formats})
        for fmt in formats:
            store.write_text_atomic(args.out / f"{spec.name}.{fmt}", texts[fmt])
        print(texts["md"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
