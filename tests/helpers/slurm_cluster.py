"""A real two-node SLURM on this one machine, for the `slurm`-marked tests.

Two network namespaces (nodes `n1`, `n2`) hang off a bridge in the root namespace through veth
pairs, all on the private 10.77.0.0/24 (nothing is routed or forwarded: traffic never leaves
the machine). `slurmctld` listens on the bridge address; one `slurmd` runs in each namespace
with its own UTS namespace and hostname. Daemons are started without systemd, their state,
logs and pid files live in one scratch folder, and `stop()` removes everything this module
created (daemons by pid file, processes left in the namespaces, the namespaces, the bridge),
also when called again after a crash: `start()` first clears what a previous run left behind.

Usage: `cluster = SlurmCluster(); reason = cluster.start()` (None when it is up, else why
not: not root, packages cannot be installed, ...); `cluster.env()` is the environment that
points `sbatch`/`scontrol` at it; `cluster.stop()`. A test that cannot get a cluster calls
`unavailable(reason)`: a skip, or a failure naming the reason when MEGALITE_REQUIRE_SLURM=1 (.ci/run
sets it, so an apt outage or a broken harness cannot leave CI green).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import NoReturn

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "iproute2", "shellcheck"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel", "munged", "munge", "ip",
            "nsenter", "unshare", "shellcheck"]

SUBNET_PREFIX = "10.77.0"
BRIDGE = "mlslurm0"
BRIDGE_ADDR = f"{SUBNET_PREFIX}.254"
NODES = {"n1": f"{SUBNET_PREFIX}.1", "n2": f"{SUBNET_PREFIX}.2"}
NETNS = {name: f"mlslurm-{name}" for name in NODES}
HOST_VETH = {name: f"mlsv-{name}" for name in NODES}
# The same interface name inside every namespace, so one GLOO_SOCKET_IFNAME fits all ranks.
NODE_IFNAME = "mleth0"
SCRATCH = Path(os.environ.get("MEGALITE_SLURM_SCRATCH", "/tmp/megalite-slurm-cluster"))
SBIN_DIRS = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
# One cluster per machine (fixed names and addresses): a second test session waits for the first.
LOCK_FILE = Path(f"{SCRATCH}.lock")
LOCK_WAIT_S = 300.0
# Set to 1 (.ci/run does) to make a missing cluster a test failure instead of a skip.
REQUIRE_ENV = "MEGALITE_REQUIRE_SLURM"


def unavailable(reason: str) -> NoReturn:
    """Skip the calling test (SLURM cannot run here, for `reason`), or fail it when MEGALITE_REQUIRE_SLURM=1."""
    import pytest

    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: the SLURM tests must run here, so this is a failure)", pytrace=False)
    pytest.skip(reason)


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def _run(cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes (PLATFORM.md: killed daemons can linger as zombies).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _kill_pid(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`: only pids this module started or found in its namespaces."""
    if pid <= 1 or not _pid_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def ensure_installed() -> str | None:
    """Install the SLURM/munge/iproute2/shellcheck packages if missing; None when ready, else the reason."""
    missing = [b for b in BINARIES if _which(b) is None]
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"missing {', '.join(missing)} and not root to apt-get install them"
    if shutil.which("apt-get") is None:
        return f"missing {', '.join(missing)} and no apt-get to install them"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    try:
        if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
            # A fresh machine may have no package lists yet.
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                return f"apt-get install {' '.join(PACKAGES)} failed: {r.stderr.strip()[-500:]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"apt-get install failed: {e}"
    missing = [b for b in BINARIES if _which(b) is None]
    return f"still missing after install: {', '.join(missing)}" if missing else None


class SlurmCluster:
    """Start/stop a two-node SLURM (nodes n1, n2) in network namespaces on this machine."""

    def __init__(self, scratch: Path = SCRATCH) -> None:
        self.scratch = Path(scratch)
        self.conf = self.scratch / "slurm.conf"
        self.started = False
        self._atexit = False
        self._lock: int | None = None

    # ------------------------------------------------------------------ public
    def env(self) -> dict[str, str]:
        """Environment for client commands and jobs: the cluster's slurm.conf and gloo's interface."""
        path = os.environ.get("PATH", "")
        for d in ("/usr/sbin", "/sbin"):
            if d not in path.split(":"):
                path += f":{d}"
        return dict(os.environ, SLURM_CONF=str(self.conf), GLOO_SOCKET_IFNAME=NODE_IFNAME,
                    NCCL_SOCKET_IFNAME=NODE_IFNAME, PATH=path)

    def scontrol(self, *args: str, check: bool = True) -> str:
        """Run scontrol against this cluster; its stdout."""
        return _run(["scontrol", *args], env=self.env(), check=check, timeout=30).stdout

    def start(self, timeout_s: float = 60.0) -> str | None:
        """Bring the cluster up (clearing leftovers first); None when ready, else why it cannot run."""
        if os.geteuid() != 0:
            return "needs root (network namespaces, munge and slurmd)"
        if not Path("/proc/self/ns/net").exists():
            return "no network namespaces on this kernel"
        reason = ensure_installed()
        if reason:
            return reason
        if not self._acquire_lock():
            return f"another session holds {LOCK_FILE} (its SLURM test cluster) for more than {LOCK_WAIT_S:.0f} s"
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        self._teardown()  # idempotent: whatever an earlier (crashed) run left behind
        try:
            clash = self._subnet_clash()
            if clash:
                return clash
            # Fresh state: a recovered job queue from an earlier run would start old jobs again.
            for stale in [self.scratch / "state", *self.scratch.glob("spool-*"), *self.scratch.glob("*.log")]:
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
            self.scratch.mkdir(parents=True, exist_ok=True)
            self._start_munge()
            self._network()
            self._write_conf()
            self.started = True
            self._start_daemons()
            self._wait_idle(timeout_s)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, RuntimeError) as e:
            detail = getattr(e, "stderr", None) or ""
            logs = self.logs()
            self.stop()
            return f"could not start SLURM: {e} {detail}\n{logs}"
        return None

    def stop(self) -> None:
        """Tear everything down (jobs, daemons, processes left in the namespaces, namespaces, bridge); unlock."""
        if self._lock is None:
            return  # never started here: another session's cluster is not ours to stop
        try:
            self._teardown()
        finally:
            os.close(self._lock)
            self._lock = None

    def _acquire_lock(self) -> bool:
        if self._lock is not None:
            return True
        fd = os.open(LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                # Released by the kernel when this process ends, however it ends.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock = fd
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    return False
                time.sleep(1.0)

    def _teardown(self) -> None:
        if self.conf.exists() and _which("scancel"):
            try:
                _run(["scancel", "--full", "--quiet", "--user=root"], env=self.env(), check=False, timeout=10)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for pidfile in sorted(self.scratch.glob("slurmd-*.pid")) + [self.scratch / "slurmctld.pid"]:
            pid = _read_pid(pidfile)
            if pid:
                _kill_pid(pid)
            pidfile.unlink(missing_ok=True)
        for ns in NETNS.values():
            self._kill_namespace_processes(ns)
            _run(["ip", "netns", "del", ns], check=False)
        for veth in HOST_VETH.values():
            _run(["ip", "link", "del", veth], check=False)
        _run(["ip", "link", "del", BRIDGE], check=False)
        munged_pid = self.scratch / "munged.pid"
        pid = _read_pid(munged_pid)
        if pid:
            _kill_pid(pid)
            munged_pid.unlink(missing_ok=True)
        self.started = False

    def logs(self) -> str:
        """The tails of the daemon logs (for failure messages)."""
        out = []
        for log in sorted(self.scratch.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    # ------------------------------------------------------------------ pieces
    def _subnet_clash(self) -> str | None:
        routes = _run(["ip", "-4", "route", "show"], check=False).stdout
        for line in routes.splitlines():
            if line.startswith(f"{SUBNET_PREFIX}.") or f" {SUBNET_PREFIX}." in line.split(" dev ")[0]:
                return f"{SUBNET_PREFIX}.0/24 is already routed on this host ({line.strip()}); not touching it"
        return None

    def _kill_namespace_processes(self, ns: str) -> None:
        if not Path(f"/var/run/netns/{ns}").exists():
            return
        pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            if pid.isdigit():
                _kill_pid(int(pid), grace_s=2.0)

    def _start_munge(self) -> None:
        """Reuse a working munged; otherwise start one (and remember to stop it)."""
        if _run(["munge", "-n"], check=False).returncode == 0:
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            mungekey = _which("mungekey")
            if mungekey:
                _run([mungekey, "--create"], check=False)
            else:
                _run(["dd", "if=/dev/urandom", f"of={key}", "bs=1", "count=1024"])
            _run(["chown", "munge:munge", str(key)], check=False)
            key.chmod(0o400)
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            _run(["chown", "munge:munge", d], check=False)
        pidfile = self.scratch / "munged.pid"
        pidfile.unlink(missing_ok=True)
        # munged refuses pid files in folders it does not own; write its own and copy the pid.
        _run(["runuser", "-u", "munge", "--", _which("munged") or "munged"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _run(["munge", "-n"], check=False).returncode == 0:
                pid = _read_pid(Path("/run/munge/munged.pid"))
                if pid:
                    pidfile.write_text(str(pid))
                return
            time.sleep(0.2)
        raise RuntimeError("munged did not start (munge -n fails)")

    def _network(self) -> None:
        ip = ["ip"]
        _run([*ip, "link", "add", BRIDGE, "type", "bridge"])
        _run([*ip, "addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE])
        _run([*ip, "link", "set", BRIDGE, "up"])
        for name, addr in NODES.items():
            ns, host_end = NETNS[name], HOST_VETH[name]
            _run([*ip, "netns", "add", ns])
            _run([*ip, "link", "add", host_end, "type", "veth", "peer", "name", NODE_IFNAME, "netns", ns])
            _run([*ip, "link", "set", host_end, "master", BRIDGE])
            _run([*ip, "link", "set", host_end, "up"])
            _run([*ip, "-n", ns, "addr", "add", f"{addr}/24", "dev", NODE_IFNAME])
            _run([*ip, "-n", ns, "link", "set", NODE_IFNAME, "up"])
            _run([*ip, "-n", ns, "link", "set", "lo", "up"])

    def _write_conf(self) -> None:
        s = self.scratch
        for name in NODES:
            (s / f"spool-{name}").mkdir(exist_ok=True)
        (s / "state").mkdir(exist_ok=True)
        cpus, memory = self._node_resources()
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={n} NodeAddr={a} NodeHostname={n} CPUs={cpus} RealMemory={memory} State=UNKNOWN"
            for n, a in NODES.items()
        )
        self.conf.write_text(f"""# written by tests/helpers/slurm_cluster.py
ClusterName=megalite-test
SlurmctldHost={host}({BRIDGE_ADDR})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=5
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={s}/state
SlurmdSpoolDir={s}/spool-%n
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd-%n.pid
SlurmctldLogFile={s}/slurmctld.log
SlurmdLogFile={s}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=10
MinJobAge=600
InactiveLimit=0
MessageTimeout=20
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _node_resources(self) -> tuple[int, int]:
        out = _run([_which("slurmd") or "slurmd", "-C"], check=False).stdout
        fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
        cpus = int(fields.get("CPUs", os.cpu_count() or 1))
        # Half the memory per node: both "nodes" share this machine.
        memory = max(1000, int(fields.get("RealMemory", 4000)) // 2)
        return cpus, memory

    def _start_daemons(self) -> None:
        env = self.env()
        _run([_which("slurmctld") or "slurmctld", "-f", str(self.conf)], env=env)
        for name in NODES:
            # Not `ip netns exec`: it remounts /sys without cgroups and slurmd then fails (PLATFORM.md).
            _run(["nsenter", f"--net=/var/run/netns/{NETNS[name]}", "unshare", "-u", "sh", "-c",
                  f'hostname {name} && exec "$0" -f "$1" -N {name}', _which("slurmd") or "slurmd", str(self.conf)],
                 env=env)

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        states = ""
        while time.monotonic() < deadline:
            r = _run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env(), check=False, timeout=15)
            states = r.stdout.strip()
            lines = [ln.split() for ln in states.splitlines() if ln.strip()]
            if len(lines) == len(NODES) and all(st[1].rstrip("*") == "idle" for st in lines):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout_s:.0f} s: {states!r}")


if __name__ == "__main__":  # manual use: python tests/helpers/slurm_cluster.py start|stop (the lock ends with it)
    import sys

    cluster = SlurmCluster()
    if sys.argv[1:] == ["stop"]:
        if cluster._acquire_lock():
            cluster.stop()
    else:
        why = cluster.start()
        print(why or f"up: export SLURM_CONF={cluster.conf} GLOO_SOCKET_IFNAME={NODE_IFNAME}")
        atexit.unregister(cluster.stop)
