"""Errors meant for the user: one line naming the file (or setting) and the problem."""
from __future__ import annotations


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file (``path:line``)."""


class MissingFileError(DatasetError, FileNotFoundError):
    """A file a dataset names does not exist. Both a DatasetError (one line, names the path) and a
    FileNotFoundError, so that callers catching either keep working."""


class ConfigError(ValueError):
    """A configuration value that cannot work (names the field and the value)."""


class RunError(RuntimeError):
    """A run that must not start or continue as asked (e.g. it would destroy earlier results)."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` as one line.

    A DataLoader worker re-raises the worker's exception with the worker's whole traceback in the
    message ("Caught X in DataLoader worker process 0. Original Traceback ..."); what the user needs
    is its last line, the original message.
    """
    text = str(err).strip()
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        kind, sep, message = last.partition(": ")
        text = message if sep and kind.replace(".", "").replace("_", "").isalnum() else last
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) if lines else type(err).__name__


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""

    def __init__(self, source, problem: str):
        self.source, self.problem = str(source), problem
        super().__init__(f"{source}: {problem}")


def print_result(compute, describe, as_json: bool, errors: tuple = (ValueError, OSError)) -> int:
    """A command line's last step: run ``compute()`` and print its result (one JSON object with
    ``as_json``, else ``describe(result)``); one of ``errors`` becomes one line on stderr and exit
    code 2 (CheckpointError, DatasetError and ConfigError are ValueErrors)."""
    import json
    import sys
    try:
        result = compute()
    except errors as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(json.dumps(result) if as_json else describe(result))
    return 0
