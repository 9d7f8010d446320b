"""Worker processes that end with their parent.

A pool worker of ``pretrain.prepare`` or ``evals.detection.proposals`` that outlives a killed parent (SIGKILL
from the scheduler, an OOM kill, ``kill -9``) keeps decoding a video or running Selective Search
for minutes, holding CPUs a new run needs, and may write into a folder that run now owns.

:func:`die_with_parent` is meant as (part of) a pool initializer. On Linux it asks the kernel,
with ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, to kill the worker the moment its parent dies, even
while the worker is blocked in C code. Everywhere (and in case prctl is unavailable) a daemon
thread also polls ``os.getppid()`` and exits once the parent is gone (re-parented workers see
another parent pid).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 1.0


def _set_parent_death_signal(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, interval: float) -> None:
    """Exit this process as soon as ``parent_pid`` is no longer its parent."""
    stop = threading.Event()
    while not stop.wait(interval):
        if os.getppid() != parent_pid:
            os._exit(1)  # no cleanup handlers: the parent that wanted the results is gone


def die_with_parent(parent_pid: int, interval: float = POLL_SECONDS) -> bool:
    """Make this (worker) process end when ``parent_pid`` (the pid of the process that created
    the pool, passed via ``initargs``) dies. Returns whether the kernel signal was set up.

    The parent may have died before this runs; then the process exits at once.
    """
    armed = _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # too late: the parent is already gone
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid, interval), name="parent-watch", daemon=True).start()
    return armed


__all__ = ["die_with_parent"]
