"""Reading ``torch.save`` files without ever executing code from them.

``torch.load(weights_only=True)`` unpickles only tensors and plain containers/numbers/strings; a
file whose pickle names any other global (``os.system``, a class, a numpy object) is refused.
Every checkpoint this project writes fits that rule, so nothing here ever falls back to a full
unpickler, and no message suggests one (torch's own message does: it is not passed on).
"""
from __future__ import annotations

import os
import re
import warnings
import zipfile
from pathlib import Path

from runtime.errors import CheckpointError

_GLOBAL = re.compile(r"GLOBAL [\w.]+")


def _refusal(path: Path, err: Exception) -> CheckpointError:
    """One line naming the offending global (e.g. ``GLOBAL posix.system``) or opcode."""
    text = str(err)
    found = _GLOBAL.search(text)
    if found:
        what = found.group(0)
    else:
        _, _, detail = text.partition("WeightsUnpickler error:")
        what = next((line.strip() for line in detail.splitlines() if line.strip()), "")[:120] or "non-tensor data"
    return CheckpointError(path, f"refused to load: the file contains pickled Python objects ({what}); "
                                 f"checkpoints must hold tensors and plain values only")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200] or type(err).__name__


def check_file(path: Path) -> None:
    """CheckpointError unless ``path`` is an existing, non-empty file (every reader's first check)."""
    if path.is_dir():
        raise CheckpointError(path, "is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "empty file, not a checkpoint")


def safe_torch_load(path: str | os.PathLike, map_location="cpu"):
    """The object in a ``torch.save`` file; CheckpointError (one line naming the file) if the file is
    missing, a folder, empty, truncated, not a torch file, or holds anything beyond tensors and
    plain values."""
    path = Path(path)
    check_file(path)
    with open(path, "rb") as handle:
        is_zip_container = handle.read(4) == b"PK\x03\x04"  # torch.save's format since 1.6
    if is_zip_container and not zipfile.is_zipfile(path):
        raise CheckpointError(path, "truncated or corrupt checkpoint (zip archive has no central directory)")
    import torch
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it then refuses
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types here; all mean "unusable file" to the user
        if "weights only load failed" in str(err).lower() or _GLOBAL.search(str(err)):
            raise _refusal(path, err) from None
        if is_zip_container or isinstance(err, EOFError):
            raise CheckpointError(path, f"truncated or corrupt checkpoint ({_first_line(err)})") from None
        raise CheckpointError(path, f"not a PyTorch checkpoint ({type(err).__name__}: {_first_line(err)})") from None
