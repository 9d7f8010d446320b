"""What a SLURM job runs: ``python -m MODULE ARGV`` in-process, as a submitit checkpointable job.

On preemption or near its time limit SLURM sends SIGUSR2 (submitit asks for it
``signal_delay_s`` before the limit). submitit's handler then calls :meth:`Command.checkpoint`,
pickles what it returns, requeues the job (``scontrol requeue``) and exits; the requeued job
calls the same command again. Every command we run resumes from its own files: a harness from
``work_dir/.../checkpoint.pt`` (``runtime.loop.Trainer``), pretraining from ``last.pt``
(``--resume``), flow and proposal extraction from the files already written.

While an ``runtime.loop.Trainer`` loop runs, the signal is not acted on at once: it sets
``loop.PREEMPTION``, the trainer saves after the step in progress and raises
``loop.Preempted``, and only then does submitit's handler requeue. So a preempted cell loses
at most one step, and a requeued cell ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import importlib
import shlex
import signal
import sys
import time

import submitit


class CommandFailed(RuntimeError):
    """The command returned a non-zero exit status."""


class Command:
    """``python -m {module} {argv}``, run by calling ``module.main(argv)``; requeueable."""

    def __init__(self, module: str, argv, threads: int | None = None):
        self.module, self.argv, self.threads = module, [str(a) for a in argv], threads

    def __repr__(self) -> str:
        return f"Command({self})"

    def __str__(self) -> str:
        return f"python -m {self.module} {shlex.join(self.argv)}"

    def __call__(self):
        if self.threads:  # one process per SLURM task: use exactly the CPUs it was given
            import torch
            torch.set_num_threads(self.threads)
        print(f"[slurm.runner] {self}", flush=True)
        with deferred_preemption():
            try:
                result = importlib.import_module(self.module).main(self.argv)
            except SystemExit as stop:  # argparse errors and the like, but not submitit's requeue exit
                if _requeueing or stop.code in (None, 0):
                    raise
                raise CommandFailed(f"{self} exited with status {stop.code}") from None
        if isinstance(result, int) and not isinstance(result, bool) and result != 0:
            raise CommandFailed(f"{self} exited with status {result}")
        return result

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on SIGUSR2: run the same command again after the requeue."""
        print(f"[slurm.runner] requeueing: {self}", flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


_requeueing = False


@contextlib.contextmanager
def deferred_preemption():
    """While a Trainer loop runs, turn SIGUSR2 into "save after this step, then requeue"."""
    from runtime import loop

    submitit_handler = signal.getsignal(signal.SIGUSR2)
    if not callable(submitit_handler):  # not inside a submitit job: nothing to defer to
        yield
        return

    def requeue(signum, frame):
        global _requeueing
        _requeueing = True
        submitit_handler(signum, frame)  # checkpoint(), scontrol requeue, sys.exit on rank 0
        _requeueing = False              # ranks other than 0 come back here

    def on_signal(signum, frame):
        if loop.TRAINING.is_set():
            print(f"[slurm.runner] caught {signal.Signals(signum).name}: saving after the current step, "
                  f"then requeueing", flush=True)
            loop.PREEMPTION.set()
        else:
            requeue(signum, frame)

    loop.PREEMPTION.clear()
    signal.signal(signal.SIGUSR2, on_signal)
    try:
        yield
    except loop.Preempted as stop:
        print(f"[slurm.runner] {stop}", flush=True)
        signal.signal(signal.SIGUSR2, submitit_handler)
        requeue(signal.SIGUSR2, None)
        # Only ranks other than 0 get here; rank 0's requeue ends them: wait for it.
        time.sleep(300)
        raise
    finally:
        signal.signal(signal.SIGUSR2, submitit_handler)
        loop.PREEMPTION.clear()


def main(argv=None) -> int:
    """``python -m slurm.runner MODULE ARGS...``: run a command the way a job does (for debugging)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\nusage: python -m slurm.runner MODULE [ARGS...]")
        return 0
    result = Command(argv[0], argv[1:])()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
