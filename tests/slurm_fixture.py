"""A real one-node Slurm (slurmctld + slurmd + munged) on 127.0.0.1, started per test session.

Everything lives in a temp dir with its own munge socket and free ports, so it never touches a
system Slurm or another session's. Needs root and Debian's `slurm-wlm` and `munge` (scripts/install.sh
installs them when run as root); without them the fixture fails, it never skips.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel", "srun")


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class SlurmCluster:
    """A running one-node Slurm: its dir, config and the environment its clients need."""

    root: Path
    conf: Path
    partition: str
    cpus: int
    mem_mb: int

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ plus SLURM_CONF, for sinfo/sbatch/squeue subprocesses."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def jobs(self) -> list[str]:
        """Job ids in the queue (pending or running)."""
        out = subprocess.run(["squeue", "--noheader", "--format=%i"], env=self.env(), capture_output=True,
                             text=True, timeout=20, check=True).stdout
        return out.split()


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _stop_pidfile(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


CONF = """\
ClusterName=sqtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
KillWait=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=localhost MaxTime=10 State=UP
"""


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """Start munged, slurmctld and slurmd on 127.0.0.1; stop them and remove their files after."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.fail(f"Slurm is not installed (missing {', '.join(missing)}): run scripts/install.sh as root, "
                    "or apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests start slurmd, which must run as root")
    root = Path(tempfile.mkdtemp(prefix="sq-slurm-", dir="/tmp"))  # short: socket paths
    root.chmod(0o755)
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir()
    munge_dir = root / "munge"
    munge_dir.chmod(0o755)  # munged requires its socket's dir to be searchable by all
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munged = ["munged", f"--key-file={key}", f"--socket={munge_dir / 'munge.socket'}",
              f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
              f"--seed-file={munge_dir / 'munged.seed'}"]
    try:
        user = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        munged = ["runuser", "-u", "munge", "--", *munged]
    except KeyError:  # no munge user: run it as root
        munged.append("--force")
    ctld_port, slurmd_port = free_ports(2)
    cpus = os.cpu_count() or 1
    conf = root / "slurm.conf"
    conf.write_text(CONF.format(root=root, ctld_port=ctld_port, slurmd_port=slurmd_port, cpus=cpus, mem=4000))
    cluster = SlurmCluster(root, conf, "debug", cpus, 4000)
    try:
        subprocess.run(munged, check=True, capture_output=True, timeout=30)
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, capture_output=True, timeout=30, env=cluster.env())
        subprocess.run(["slurmd", "-f", str(conf), "-N", "localhost"], check=True, capture_output=True, timeout=30,
                       env=cluster.env())

        def idle() -> bool:
            out = subprocess.run(["sinfo", "--noheader", "--format=%t"], env=cluster.env(), capture_output=True,
                                 text=True, timeout=10).stdout
            return out.strip() == "idle"

        _wait(idle, 30, "the Slurm node to be idle")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError) as e:
        logs = "".join(p.read_text()[-1500:] for p in sorted(root.glob("**/*.log")) if p.is_file())
        stderr = getattr(e, "stderr", b"") or b""
        _teardown(cluster)
        pytest.fail(f"could not start Slurm: {e}: {stderr.decode(errors='replace')[-500:]}\n{logs}")
    yield cluster
    _teardown(cluster)


def _teardown(cluster: SlurmCluster) -> None:
    root = cluster.root
    try:
        jobs = cluster.jobs()
        if jobs:
            subprocess.run(["scancel", *jobs], env=cluster.env(), timeout=20)
            _wait(lambda: not cluster.jobs(), 60, "cancelled jobs to leave the queue")
    except (subprocess.SubprocessError, RuntimeError, OSError):
        pass
    for pidfile in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
        _stop_pidfile(root / pidfile)
    shutil.rmtree(root, ignore_errors=True)
