"""Results: the run-record store, the paper's reference tables and the report that sets them side by side.

``results.load(dir)`` reads every record of a store into one pandas DataFrame (one row per record), the
form the report and any ad-hoc analysis start from. pandas is imported inside it, so that
``import results.store`` (done by every evaluation run) stays light.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas

# The identity of a record: who ran what, at which preset, from which pretraining. Metrics follow
# (flattened with "."), then provenance.<key>.
IDENTITY_COLUMNS = (
    "task", "label", "supervision", "fingerprint", "seed", "preset", "run_key",
    "pretrain_method", "pretrain_preset", "pretrain_steps", "pretrain_overrides", "pretrain_manifest",
    "row", "path",
)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"top1": {"conv3": 28.9}}`` -> ``{"top1.conv3": 28.9}``: nested dicts become dotted column
    names so that one record is one flat table row; lists and scalars are leaves."""
    if not isinstance(value, Mapping):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, inner in value.items():
        out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return out


def pretraining(record: Mapping[str, Any]) -> dict[str, Any]:
    """The pretraining identity the checkpoint states about itself (``record["checkpoint"]["meta"]``,
    written by evals.engine.save_record). Random and torchvision checkpoints, and records written
    before the meta was stored, have none: every value is then None."""
    meta = (record.get("checkpoint") or {}).get("meta") or {}
    return {
        "pretrain_method": meta.get("method"),
        "pretrain_preset": meta.get("preset"),
        "pretrain_steps": meta.get("step"),
        "pretrain_overrides": meta.get("overrides"),
        "pretrain_manifest": meta.get("manifest_hash"),
    }


def row_identity(record: Mapping[str, Any]) -> str:
    """The checkpoint identity a table row groups by: the explicit ``config.row`` when the run set one
    (to pool several checkpoints, e.g. pretraining seeds), else the checkpoint's fingerprint, so
    that two checkpoints never share a mean by accident."""
    return (record.get("config") or {}).get("row") or record["fingerprint"]


def record_row(record: Mapping[str, Any], path: str | None = None) -> dict[str, Any]:
    """One record as one flat row: identity, pretraining, metrics, ``provenance.<key>``.

    A metric whose name collides with an identity column is kept as ``metrics.<name>`` rather than
    silently overwriting (or being overwritten by) the identity.
    """
    row = {key: record.get(key) for key in ("task", "label", "supervision", "fingerprint", "seed",
                                            "preset", "run_key")}
    row.update(pretraining(record), row=row_identity(record), path=path)
    for name, value in flatten(record.get("metrics") or {}).items():
        row[f"metrics.{name}" if name in IDENTITY_COLUMNS else name] = value
    row.update(flatten(record.get("provenance") or {}, "provenance"))
    return row


def frame(records: Iterable[Mapping[str, Any]], paths: Iterable[str | None] | None = None) -> "pandas.DataFrame":
    """The DataFrame of ``records`` (see :func:`load`), columns in a fixed order: identity, then
    metric columns sorted, then provenance columns sorted, so that the same records always give
    the same frame."""
    import pandas as pd

    records = list(records)
    paths = [None] * len(records) if paths is None else list(paths)
    rows = [record_row(record, path) for record, path in zip(records, paths, strict=True)]
    extra = sorted({key for row in rows for key in row} - set(IDENTITY_COLUMNS))
    metrics = [key for key in extra if not key.startswith("provenance.")]
    provenance = [key for key in extra if key.startswith("provenance.")]
    return pd.DataFrame(rows, columns=[*IDENTITY_COLUMNS, *metrics, *provenance])


def load(results_dir: str | Path) -> "pandas.DataFrame":
    """Every record under ``results_dir`` as one row of a DataFrame: the identity columns
    (``IDENTITY_COLUMNS``; ``row`` is ``config.row`` or the fingerprint, ``path`` the record's file),
    every metric flattened with "." (``mAP``, ``per_class_AP.cat``, ``top1.conv3``) and
    ``provenance.<key>``. A broken record raises ValueError naming its file, as in
    ``results.store.load_records``; an empty or missing folder gives an empty frame."""
    from results import store

    files = store.record_files(results_dir)
    return frame([store.load_record(path) for path in files], [str(path) for path in files])
