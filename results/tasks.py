"""The one registry of benchmark tasks: which harness runs a task, its headline metric, and where
it appears in the paper's tables. The entry point (``evals.run``), the results store, the report,
the demo and the cluster grid all read it from here."""
from __future__ import annotations

from dataclasses import dataclass

LINEAR_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")  # Table 2's columns


@dataclass(frozen=True)
class Task:
    name: str
    module: str     # the harness, run by ``python -m evals.run --task NAME``
    headline: str   # its metric in a record, percent (in1k_linear: one per layer)
    table: str      # "table1" or "table2"
    column: str     # its column header in Table 1 ("" for Table 2, whose columns are the layers)
    protocol: str   # section of the protocol notes (docs/protocols.md)


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("voc07_cls", "evals.voc07_cls", "mAP", "table1", "Cl.", "P2"),
    Task("in1k_linear", "evals.in1k_linear", "top1", "table2", "", "P5"),
    Task("voc07_det", "evals.voc07_det", "mAP", "table1", "Detection", "P3"),
    Task("voc12_seg", "evals.voc12_seg", "mIoU", "table1", "Seg.", "P4"),
)}
