"""The one way this project writes a file: whole or not at all.

The bytes go to a temporary file beside the target (``.tmp-<name>.<pid>.<random>``), are fsynced,
and the temporary file is renamed over the target (or hard-linked to it when the caller must not
replace an existing file). Readers therefore see the old file or the new one, never half of one.
A full disk is reported as ``no space left on <path>`` and leaves the old file intact; a process
killed in the middle leaves only its temporary file, which :func:`remove_stale_temps` deletes at
the next start (only files whose writer process is gone).
"""
from __future__ import annotations

import errno
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

TMP_PREFIX = ".tmp-"
_TMP_PATTERN = re.compile(r"^\.tmp-.*\.(\d+)\.[^.]+$")


class NoSpaceError(OSError):
    """The disk holding ``path`` is full; earlier files are intact."""

    def __init__(self, path: Path):
        super().__init__(errno.ENOSPC, f"no space left on {path.parent} (writing {path.name}; "
                                       f"the previous {path.name}, if any, is intact)")
        self.path = path

    def __str__(self) -> str:
        return self.strerror


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | bytearray | memoryview | str | Iterable[str | bytes], *,
                 overwrite: bool = True, mode: int = 0o644) -> Path:
    """Write ``data`` (text is UTF-8 encoded; an iterable of chunks is streamed, e.g. a JSON
    encoder's ``iterencode``) to ``path`` atomically and durably.

    ``overwrite=False`` publishes with ``os.link``, which fails if ``path`` exists: of two
    concurrent writers exactly one wins and the other gets FileExistsError.
    """
    path = Path(path)
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview, str)) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.{os.getpid()}.", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600; results are meant to be shared with the group
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(path) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically. The object is serialised in memory first, so that a full disk
    surfaces as :class:`NoSpaceError` naming the path instead of torch's internal writer error."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, buffer.getbuffer())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of interrupted writes in ``folder`` (not recursive) whose
    writer process no longer exists; returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TMP_PATTERN.match(entry.name)
        if match and entry.is_file() and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
