"""Pictures beside the tables: Table 1 as bars per benchmark, Table 2 as per-layer curves.

Both are drawn from the report's rows (the paper's, then this repo's), so a picture never says
more than its table: the same means, the same std (as error bars), the same non-paper marks
(hatched bars, dotted curves, "† non-paper" in the legend). ``python -m results.report`` writes
them next to the Markdown as ``table1.png/.pdf`` and ``table2.png/.pdf``.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot, so no global backend or state: Agg
for PNG, the PDF backend for PDF) and saved without a creation date, so the same rows give the
same bytes.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

from results.report import DAGGER, RUN_BLOCK, TABLE1, TABLE2, Row, TableSpec
from runtime.atomic import atomic_write

FIGURE_FORMATS = ("png", "pdf")
DPI = 150
NON_PAPER = f"{DAGGER} non-paper preset: not comparable to the paper"
# One colour per block of the paper's tables (Table 1 and Table 2 spell the motion block differently).
BLOCK_COLOURS = {
    "Limits": "0.55", "Motion cues": "tab:blue", "Motion": "tab:blue", "Ours": "tab:red",
    "Other cues": "tab:green", "Zhan et al. [40]*": "tab:purple", RUN_BLOCK: "tab:orange",
}
RUN_COLOURS = ("black", "tab:red", "darkorange", "tab:blue", "saddlebrown", "darkviolet")
# Saved without dates or tool versions: identical rows give identical files.
METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
}


def is_run(row: Row) -> bool:
    """This repo's rows carry run counts; the paper's rows do not."""
    return bool(row.n)


def row_name(row: Row) -> str:
    """The method with its supervision, since the paper repeats names (Noroozi et al. [29] twice)."""
    name = row.method if row.comparable else f"{row.method} {DAGGER}"
    return name if row.supervision in ("", "-") else f"{name} ({row.supervision})"


def _error(row: Row, col: str) -> float:
    std = row.std.get(col)
    return 0.0 if std is None else std


def table1_figure(rows: Sequence[Row], spec: TableSpec = TABLE1) -> Figure:
    """One panel per benchmark (Cl., Detection, Seg.), one horizontal bar per table row in the
    table's order, coloured by block; our runs with their std as error bars, non-paper ones
    hatched. A row the paper gives no number for has no bar."""
    height = 1.4 + 0.24 * len(rows)
    fig = Figure(figsize=(13, height), layout="constrained")
    axes = fig.subplots(1, len(spec.columns), sharey=True)
    positions = list(range(len(rows)))[::-1]  # first row on top
    for ax, col, header in zip(axes, spec.columns, spec.headers):
        for y, row in zip(positions, rows):
            value = row.values.get(col)
            if value is None:
                continue
            colour = BLOCK_COLOURS.get(row.block, "tab:gray")
            ax.barh(y, value, height=0.75, color="white" if not row.comparable else colour,
                    edgecolor=colour, hatch="///" if not row.comparable else None, linewidth=1.0,
                    xerr=_error(row, col) if is_run(row) else None, capsize=2)
        ax.set_title(header)
        ax.set_xlabel("%mIU" if col == "voc12_seg" else "%mAP")
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].set_yticks(positions, [row_name(row) for row in rows], fontsize=7)
    axes[0].set_ylim(-0.7, len(rows) - 0.3)
    _block_legend(fig, rows)
    fig.suptitle(spec.title, fontsize=10)
    return fig


def _block_legend(fig: Figure, rows: Sequence[Row]) -> None:
    """Legend of the blocks present, plus the hatched non-paper swatch when a row needs it."""
    from matplotlib.patches import Patch
    blocks = list(dict.fromkeys(row.block for row in rows))
    handles = [Patch(facecolor=BLOCK_COLOURS.get(b, "tab:gray"), label=b) for b in blocks]
    if any(not row.comparable for row in rows):
        handles.append(Patch(facecolor="white", edgecolor="tab:orange", hatch="///", label=NON_PAPER))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8)


def table2_figure(rows: Sequence[Row], spec: TableSpec = TABLE2) -> Figure:
    """Top-1 against layer (conv1..conv5), one curve per table row: the paper's dashed (dotted for
    the limits), ours solid with std error bars, non-paper ones dotted with hollow markers."""
    fig = Figure(figsize=(11, 6), layout="constrained")
    ax = fig.add_subplot()
    x = list(range(len(spec.columns)))
    paper_colours = iter(colormaps["tab20"].colors * 3)  # 20 distinct colours for the paper's rows
    run_colours = iter(RUN_COLOURS * 10)                  # strong ones for ours
    for row in rows:
        points = [(i, row.values.get(col), _error(row, col)) for i, col in enumerate(spec.columns)
                  if row.values.get(col) is not None]
        if not points:
            continue
        xs, ys, errs = zip(*points)
        colour = next(run_colours if is_run(row) else paper_colours)
        if not is_run(row):
            ax.plot(xs, ys, linestyle=":" if row.block == "Limits" else "--", marker=".",
                    color=colour, linewidth=1.0, label=row_name(row))
        else:
            ax.errorbar(xs, ys, yerr=errs, color=colour, capsize=3, linewidth=2.2 if row.comparable else 1.6,
                        linestyle="-" if row.comparable else ":", marker="o", markersize=6,
                        markerfacecolor=colour if row.comparable else "white", label=row_name(row))
    ax.set_xticks(x, list(spec.headers))
    ax.set_xlabel("layer the linear classifier reads")
    ax.set_ylabel("ImageNet top-1 %")
    ax.set_title(spec.title, fontsize=10)
    ax.grid(alpha=0.3)
    title = "paper: dashed (limits dotted); this repo: solid"
    if any(not row.comparable for row in rows):
        title += f"\n{NON_PAPER}:\ndotted, hollow markers"
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7,
               title=title, title_fontsize=7)
    return fig


DRAWERS = {TABLE1.name: table1_figure, TABLE2.name: table2_figure}


def draw(spec: TableSpec, rows: Sequence[Row]) -> Figure:
    """The figure of one table from its built rows (``report.build_table``)."""
    return DRAWERS[spec.name](rows, spec)


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure encoded as ``fmt`` (png or pdf), without dates, so the bytes are reproducible."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=DPI, metadata=METADATA[fmt])
    return buffer.getvalue()


def write_figure(fig: Figure, stem: Path, formats: Sequence[str] = FIGURE_FORMATS) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` atomically (a reader never sees half a file)."""
    return [atomic_write(stem.with_name(f"{stem.name}.{fmt}"), figure_bytes(fig, fmt)) for fmt in formats]
