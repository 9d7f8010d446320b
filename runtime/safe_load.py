"""Reading ``torch.save`` files without ever executing code from them.

``torch.load(weights_only=True)`` unpickles only tensors and plain containers/numbers/strings; a
file whose pickle names any other global (``os.system``, a class, a numpy object) is refused.
Every checkpoint this project writes fits that rule, so nothing here ever falls back to a full
unpickler, and no message suggests one.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

from runtime.errors import CheckpointError

_GLOBAL = re.compile(r"GLOBAL ([\w.]+(?: [\w.]+)?)|Unsupported global: ([^\s]+)")


def _refusal(path: Path, message: str) -> CheckpointError:
    found = _GLOBAL.search(message)
    what = (found.group(1) or found.group(2)).rstrip(".,") if found else "a non-tensor object"
    return CheckpointError(path, f"refused to load: the file contains pickled Python objects ({what}) that could "
                                 f"run code; checkpoints must hold only tensors and plain values")


def safe_torch_load(path: str | os.PathLike):
    """The object in a ``torch.save`` file, on the CPU; CheckpointError (one line) if the file is
    missing, a folder, empty, truncated, not a torch file, or holds anything beyond tensors and
    plain values."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(path, "is a directory, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(path, "no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "empty file, not a checkpoint")
    with open(path, "rb") as handle:
        is_zip_container = handle.read(4) == b"PK\x03\x04"  # torch.save's format since 1.6
    if is_zip_container and not zipfile.is_zipfile(path):
        raise CheckpointError(path, "truncated or corrupt checkpoint (zip archive has no central directory)")
    import pickle

    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        if "weights_only" in message or "GLOBAL" in message or "global" in message:
            raise _refusal(path, message) from None
        raise CheckpointError(path, f"not a PyTorch checkpoint ({_first_line(err)})") from None
    except Exception as err:  # torch raises many types here; all mean the same to the user
        if is_zip_container or isinstance(err, EOFError):
            raise CheckpointError(path, f"truncated or corrupt checkpoint ({_first_line(err)})") from None
        raise CheckpointError(path, f"not a PyTorch checkpoint ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200] or type(err).__name__
