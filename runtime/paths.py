"""Paths read from data files stay inside their roots."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from runtime.errors import DatasetError


def check_relative(name: str, where: str) -> str:
    """``name`` (an id or a relative path read from ``where``, e.g. ``file:line``) unless it is
    absolute, empty, or climbs out of its folder with ``..``; then a one-line DatasetError."""
    if not name or "\x00" in name:
        raise DatasetError(f"{where}: empty or invalid name {name!r}")
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise DatasetError(f"{where}: absolute path {name!r} not allowed (names must be relative to their folder)")
    if ".." in posix.parts:
        raise DatasetError(f"{where}: {name!r} leaves its folder ('..' is not allowed)")
    return name


def safe_join(root: str | os.PathLike, name: str, where: str, suffix: str = "") -> Path:
    """``root / (name + suffix)`` after :func:`check_relative` (symlinks inside a data root are the
    user's own choice and are followed)."""
    check_relative(name, where)
    return Path(root) / f"{name}{suffix}"
