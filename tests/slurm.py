"""A real single-node SLURM cluster on this host, for tests of the SLURM executor.

`slurm_cluster` (session-scoped) starts Debian's `munged`, `slurmctld` and `slurmd` as root
daemons with everything they write (slurm.conf, munge key and socket, state, spool, logs, pid
files) in a fresh temporary folder and on free TCP ports, so it touches neither /etc/slurm nor a
system munged, two sessions can run side by side, and a second run never sees stale state.
Clients find it through `SLURM_CONF`; tests put `cluster.env` (or just `SLURM_CONF`) in their
environment. Without the binaries (a laptop) the SLURM tests are skipped with the reason.

What it takes to run in a container without systemd or cgroups (slurm-wlm 22.05, munge 0.5):
- munged as root needs `--force`; it runs in the foreground (`-F`) with its own key
  (1024 random bytes, mode 0400), socket, pid, seed and log files, and slurm.conf points Slurm at
  that socket with `AuthInfo=socket=PATH`.
- `ProctrackType=proctrack/linuxproc`, `TaskPlugin=task/none`, `JobAcctGatherType=
  jobacct_gather/none` (nothing needs cgroups); no accounting storage, so no slurmdbd (and no
  sacct: the executors never use it).
- `SelectType=select/cons_tres` + `CR_Core`; the node line is `slurmd -C`'s own CPUs and
  RealMemory, named `hostname -s` (slurmctld only runs where SlurmctldHost names its host),
  with `NodeAddr=127.0.0.1` so no DNS is needed.
- The "pmix can not load" and "MailProg is invalid" errors in the logs are harmless.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scancel", "scontrol")
SKIP_REASON = ("slurm-wlm and munge are not installed (apt-get install slurm-wlm munge); "
               "SLURM tests skipped")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    env: dict[str, str]
    """os.environ plus SLURM_CONF: what a client (sbatch, squeue, saectl) needs."""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), check=False, capture_output=True, text=True, env=self.env,
                             timeout=timeout, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr}\n"
                                 f"{self.logs()}")
        return res

    def logs(self, lines: int = 15) -> str:
        """The tail of every daemon's log, for failure messages."""
        out = []
        for f in sorted((self.root / "log").glob("*")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f}\n" + "\n".join(tail))
        return "\n".join(out)


def _missing() -> list[str]:
    return [b for b in DAEMONS + CLIENTS if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line(node: str) -> str:
    """This host's CPUs and memory as slurmd sees them (a larger number leaves the node
    INVALID); falls back to the CPU count."""
    res = subprocess.run(["slurmd", "-C"], check=False, capture_output=True, text=True, timeout=30,
                         env={k: v for k, v in os.environ.items() if k != "SLURM_CONF"})
    fields = dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)
    cpus = fields.get("CPUs") or str(len(os.sched_getaffinity(0)))
    mem = f" RealMemory={fields['RealMemory']}" if "RealMemory" in fields else ""
    return f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus}{mem} State=UNKNOWN"


def _conf(root: Path, node: str, munge_socket: Path) -> str:
    return "\n".join([
        "ClusterName=saectltest",
        f"SlurmctldHost={node}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "ReturnToService=2",
        "InactiveLimit=0",
        "MinJobAge=10",
        "KillWait=2",
        _node_line(node),
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _wait(what: str, ok, cluster: SlurmCluster, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        for name, p in cluster.procs.items():
            if p.poll() is not None:
                pytest.fail(f"SLURM test cluster: {name} exited ({p.returncode}) while waiting "
                            f"for {what}\n{cluster.logs()}")
        if time.monotonic() > deadline:
            pytest.fail(f"SLURM test cluster: no {what} after {timeout:.0f}s\n{cluster.logs()}")
        time.sleep(0.2)


def _start(cluster: SlurmCluster, name: str, *cmd: str) -> None:
    with open(cluster.root / "log" / f"{name}.out", "wb") as log:  # the daemon keeps a copy
        cluster.procs[name] = subprocess.Popen([*cmd], stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env=cluster.env)


def _stop(cluster: SlurmCluster) -> None:
    """Cancel every job, wait for the queue to empty (so no job step outlives slurmd), then stop
    the daemons this fixture started, by their pids, last started first."""
    if "slurmd" in cluster.procs and cluster.procs["slurmd"].poll() is None:
        cluster.run("scancel", "--user", str(os.getuid()), check=False)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            res = cluster.run("squeue", "-h", "-o", "%i", check=False)
            if res.returncode != 0 or not res.stdout.strip():
                break
            time.sleep(0.2)
    for name in reversed(list(cluster.procs)):
        p = cluster.procs[name]
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    missing = _missing()
    if missing:
        pytest.skip(SKIP_REASON + f" (missing: {', '.join(missing)})")
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster runs its daemons as root; SLURM tests skipped")
    root = tmp_path_factory.mktemp("slurm")
    if len(str(root / "munge" / "munge.socket")) > 100:  # a Unix socket path holds 108 bytes
        root = Path(tempfile.mkdtemp(prefix="saectl-slurm-"))
    for d in ("munge", "munge-key", "state", "spool", "log", "run"):
        (root / d).mkdir()
    (root / "munge").chmod(0o755)
    (root / "munge-key").chmod(0o700)
    key = root / "munge-key" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = root / "munge" / "munge.socket"
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, node, munge_socket))
    cluster = SlurmCluster(root, conf, node, {**os.environ, "SLURM_CONF": str(conf)})
    try:
        _start(cluster, "munged", "munged", "-F", "--force", f"--key-file={key}",
               f"--socket={munge_socket}", f"--pid-file={root / 'run' / 'munged.pid'}",
               f"--seed-file={root / 'munge-key' / 'munged.seed'}",
               f"--log-file={root / 'log' / 'munged.log'}")
        _wait("munge socket", munge_socket.exists, cluster)
        _start(cluster, "slurmctld", "slurmctld", "-D", "-i")
        _start(cluster, "slurmd", "slurmd", "-D", "-N", node)

        def idle() -> bool:
            try:
                res = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10)
            except subprocess.TimeoutExpired:
                return False
            return res.returncode == 0 and f"{node} idle" in res.stdout

        _wait(f"idle node {node} in sinfo", idle, cluster)
        yield cluster
    finally:
        _stop(cluster)
