"""A real one-node SLURM cluster on this machine: munged + slurmctld + slurmd, for the tests and
for trying a grid before taking it to a cluster.

    sudo .venv/bin/python -m slurm.localcluster start [--dir /tmp/cpfs-slurm]   # prints `export SLURM_CONF=...`
    sudo .venv/bin/python -m slurm.localcluster stop  [--dir /tmp/cpfs-slurm]

Everything (slurm.conf, munge key and socket, state, logs, pid files) lives in one folder, on
free ports, so it touches neither /etc/slurm nor a munged that is already running. Clients find
it through ``SLURM_CONF``. Needs root (slurmd launches jobs as their user) and Debian's
``slurm-wlm`` + ``munge`` packages, which :func:`ensure_installed` installs with apt-get when
``slurmctld`` is missing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order


class ClusterUnavailable(RuntimeError):
    """The daemons cannot be started here (not root, packages missing and not installable, ...)."""


def ensure_installed(log=print) -> None:
    """``apt-get install slurm-wlm munge`` when ``slurmctld`` is missing (root only)."""
    if shutil.which("slurmctld") and shutil.which("munged") and shutil.which("sbatch"):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("slurmctld/munged are not installed and installing them needs root "
                                 f"(apt-get install {' '.join(PACKAGES)})")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable("slurmctld/munged are not installed and there is no apt-get to install them")
    log(f"[localcluster] installing {' '.join(PACKAGES)} with apt-get (SLURM tests need a real slurmctld)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)  # a fresh machine has no lists
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise ClusterUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-500:]}")
    if not shutil.which("slurmctld"):
        raise ClusterUnavailable("apt-get ran but slurmctld is still not on PATH")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _total_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise ClusterUnavailable("cannot read MemTotal from /proc/meminfo")


def slurm_conf(root: Path, host: str, cpus: int, memory_mb: int, ctld_port: int, slurmd_port: int) -> str:
    """slurm.conf for one node, everything under ``root``."""
    return f"""\
# One-node test cluster written by slurm/localcluster.py
ClusterName=cpfs
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again after cred_expire + 1 s (default 120 s)
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
SlurmdTimeout=30
SlurmctldTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
JobRequeue=1
PreemptType=preempt/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class LocalCluster:
    """Start/stop the three daemons of a one-node cluster rooted at ``root``."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="cpfs-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]

    @property
    def env(self) -> dict[str, str]:
        """What clients (sbatch, squeue, submitit) need: ``SLURM_CONF``."""
        return {"SLURM_CONF": str(self.conf)}

    def _pid(self, daemon: str) -> int | None:
        path = self.root / "run" / f"{daemon}.pid"
        try:
            pid = int(path.read_text().split()[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, IndexError):
            return None

    def start(self, timeout: float = 60.0, log=print) -> "LocalCluster":
        ensure_installed(log)
        if os.geteuid() != 0:
            raise ClusterUnavailable("slurmd must run as root to launch jobs; run the SLURM tests as root")
        for sub in ("munge", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        ctld_port, slurmd_port = _free_ports(2)
        cpus = os.cpu_count() or 1
        memory = max(512, int(_total_memory_mb() * 0.9))  # a bit below the total, as slurmd measures it
        self.conf.write_text(slurm_conf(self.root, self.host, cpus, memory, ctld_port, slurmd_port))
        env = {**os.environ, **self.env}
        commands = {
            "munged": ["munged", "--force", f"--socket={self.root}/munge/munge.socket",
                       f"--key-file={key}", f"--pid-file={self.root}/run/munged.pid",
                       f"--log-file={self.root}/log/munged.log", f"--seed-file={self.root}/munge/seed"],
            "slurmctld": ["slurmctld", "-f", str(self.conf), "-i"],  # -i: ignore state left by an earlier run
            "slurmd": ["slurmd", "-f", str(self.conf), "-N", self.host],
        }
        log(f"[localcluster] starting munged, slurmctld, slurmd in {self.root}")
        for daemon in ("munged", "slurmctld", "slurmd"):
            if self._pid(daemon):
                continue
            done = subprocess.run(commands[daemon], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                self.stop()
                raise ClusterUnavailable(f"{daemon} did not start (exit {done.returncode}): "
                                         f"{(done.stderr or done.stdout).strip()[-500:]}; logs in {self.root}/log")
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
            state = out.stdout.strip() or out.stderr.strip()
            if out.returncode == 0 and state.rstrip("*") in ("idle", "mixed", "allocated"):
                log(f"[localcluster] node {self.host} is {state}; SLURM_CONF={self.conf}")
                return self
            time.sleep(0.5)
        self.stop()
        raise ClusterUnavailable(f"the node did not become idle within {timeout:.0f}s (sinfo: {state!r}); "
                                 f"logs in {self.root}/log")

    def stop(self, timeout: float = 15.0) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged (each started by :meth:`start`)."""
        env = {**os.environ, **self.env}
        if self._pid("slurmctld"):
            subprocess.run(["scancel", "--full", "--quiet", "--user", "root"], env=env, capture_output=True)
        for daemon in DAEMONS:
            pid = self._pid(daemon)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._pid(daemon) == pid:
                time.sleep(0.2)
            if self._pid(daemon) == pid:
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.localcluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop"), help="start or stop the daemons")
    parser.add_argument("--dir", default="/tmp/cpfs-slurm",
                        help="folder for slurm.conf, munge key, state and logs (default: %(default)s)")
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.dir)
    try:
        if args.action == "start":
            cluster.start(log=lambda line: print(line, file=sys.stderr))
            print(f"export SLURM_CONF={cluster.conf}")
        else:
            cluster.stop()
    except ClusterUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
