"""A real single-node Slurm cluster for tests: slurmctld and slurmd of this machine with 2 CPUs
and 2 fake GPUs (character devices that gres.conf names), and a munged of its own, in a folder of
its own (on its own ports and socket: pytest-xdist's workers each start one), no accounting
database. Installed from Debian when missing (as root). Every daemon started here is stopped at
the end. (The setup is the engineering guide's, "Slurm on this machine".)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from servers import free_port


def _install() -> None:
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and this is not root: apt-get install slurm-wlm munge")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # pytest-xdist's workers each get here: one installs, the others wait for it; apt waits for
    # another installer (the PostgreSQL fixture's)
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-qq"]
    install = [*apt, "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]
    with open(Path(tempfile.gettempdir()) / "mnist-sweep-slurm-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
            return
        if subprocess.run(install, capture_output=True, env=env).returncode != 0:
            subprocess.run([*apt, "update"], check=True, capture_output=True, env=env)
            subprocess.run(install, check=True, capture_output=True, env=env)


def _pid_in(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    return None


def _stop(pid: int | None, timeout: float = 20) -> None:
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class SlurmCluster:
    """slurmctld + slurmd on loopback; `env` holds SLURM_CONF for every client."""

    def __init__(self) -> None:
        _install()
        self.folder = Path(tempfile.mkdtemp(prefix="mnist-sweep-slurm-"))
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.munge = self.folder / "munge"
        self.write_config()

    def write_config(self) -> None:
        d = self.folder
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        for i in range(2):  # fake GPUs: /dev/null's numbers (gres.conf refuses plain files)
            subprocess.run(["mknod", str(d / f"nvidia{i}"), "c", "1", "3"], check=True)
        self.conf.write_text(
            f"ClusterName=tests\nSlurmctldHost={self.node}(127.0.0.1)\nSlurmUser=root\n"
            f"SlurmctldPort={free_port()}\nSlurmdPort={free_port()}\n"
            f"AuthInfo=cred_expire=10,socket={self.munge}/socket\nProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n"
            "AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\n"
            "MailProg=/bin/true\nReturnToService=2\nMpiDefault=none\nKillWait=5\n"
            "SchedulerParameters=sched_interval=1\nGresTypes=gpu\n"
            f"StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n"
            f"SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n"
            f"SlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd.log\n"
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 Gres=gpu:2 "
            "State=UNKNOWN\n"
            f"PartitionName=main Nodes={self.node} Default=YES MaxTime=INFINITE State=UP\n"
        )
        (d / "gres.conf").write_text(
            f"AutoDetect=off\nNodeName={self.node} Name=gpu File={d}/nvidia[0-1]\n"
        )

    def start(self) -> None:
        self.folder.chmod(0o755)  # munged runs as its own user, with its files in munge/
        m = self.munge
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", m], check=True)
        subprocess.run(
            ["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force", f"--socket={m}/socket",
             f"--pid-file={m}/pid", f"--log-file={m}/log", f"--seed-file={m}/seed"],
            check=True,
        )  # fmt: skip
        env = dict(os.environ, **self.env)
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(self.conf)], check=True, env=env)
        deadline = time.monotonic() + 60
        while True:  # the node idle: ready for jobs
            state = self.run("sinfo", "-h", "-N", "-o", "%T").stdout.strip()
            if state == "idle":
                return
            if time.monotonic() > deadline:
                log = (self.folder / "slurmctld.log").read_text()[-3000:]
                pytest.fail(f"the Slurm node is {state!r}, not idle, after 60 s:\n{log}")
            time.sleep(0.3)

    def run(self, *command: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, **self.env)
        return subprocess.run(command, capture_output=True, text=True, env=env)

    def jobs(self) -> list[str]:
        """Every task in the queue, as JOB_TASK (array) or JOB."""
        return self.run("squeue", "-h", "-r", "-o", "%i").stdout.split()

    def stop(self) -> None:
        if self.conf.exists():
            self.run("scancel", "--user=root")
        for daemon in ("slurmd", "slurmctld"):
            _stop(_pid_in(self.folder / f"{daemon}.pid"))
        _stop(_pid_in(self.munge / "pid"))
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A single-node Slurm cluster (2 CPUs, 2 fake GPUs), started for the session."""
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm(slurm_cluster):
    """The session's cluster, its queue emptied after the test."""
    yield slurm_cluster
    slurm_cluster.run("scancel", "--user=root")
    deadline = time.monotonic() + 30
    while slurm_cluster.jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
