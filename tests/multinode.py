"""A Ray cluster of separate "machines" on one host: a head with no CPUs plus worker nodes, each worker
in its own mount namespace (`unshare -m`) where the driver's home and working directory are empty
tmpfs mounts. Only the Python environment and the run's storage stay visible there, as on a cloud
cluster whose nodes share nothing but an image and a network filesystem.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
REPO = Path(__file__).resolve().parents[1]
# Ports Ray would otherwise take at fixed defaults: every node on this host needs its own.
_AGENT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                "runtime-env-agent-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unshare_allowed() -> str:
    """'' when private mount namespaces work here, else why not."""
    try:
        done = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", "/mnt"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unshare unavailable: {err}"
    return "" if done.returncode == 0 else f"unshare -m not permitted: {done.stderr.strip()[:200]}"


def _under(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def namespace_script(hide: list[Path], keep: list[Path], staging: Path, command: list[str]) -> str:
    """Shell run inside `unshare -m`: empty tmpfs over each `hide` dir, with the `keep` paths that lie
    under one of them bound back (the venv's interpreter may live in the hidden home)."""
    kept = [k for k in keep if any(_under(k, h) for h in hide)]
    lines = ["set -e"]
    for i, k in enumerate(kept):  # before hiding: a handle on each path to keep
        lines += [f"mkdir -p {staging}/{i}", f"mount --bind {shlex.quote(str(k))} {staging}/{i}"]
    lines += [f"mount -t tmpfs tmpfs {shlex.quote(str(h))}" for h in hide]
    for i, k in enumerate(kept):
        lines += [f"mkdir -p {shlex.quote(str(k))}", f"mount --bind {staging}/{i} {shlex.quote(str(k))}"]
    lines.append("exec " + shlex.join(command))
    return "\n".join(lines)


@dataclass
class Cluster:
    address: str  # GCS, for RAY_ADDRESS / ray_address
    dashboard: str  # http://..., for `ray job submit`
    env: dict[str, str]
    temp_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def raylet_pids(self, node: str) -> list[int]:
        """The raylet processes under one worker node's `ray start --block`."""
        import psutil

        root = psutil.Process(self.procs[node].pid)
        return [p.pid for p in root.children(recursive=True) if "raylet" in " ".join(p.cmdline()[:1])]

    def alive_worker_nodes(self) -> int:
        import json

        # the State API asks the GCS (the dashboard's node summary can lag behind a node's death)
        with urllib.request.urlopen(f"{self.dashboard}/api/v0/nodes?limit=100", timeout=30) as resp:
            nodes = json.loads(resp.read())["data"]["result"]["result"]
        return sum(1 for n in nodes if n["state"] == "ALIVE" and not n["is_head_node"])

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for proc in self.procs.values():  # a throw-away cluster: a short grace, then SIGKILL
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(self.temp_dir)], capture_output=True)  # and the nodes' _w<i> dirs


def start_cluster(workers: int, cpus_per_worker: int, hide: list[Path], keep: list[Path], log_dir: Path,
                  extra_env: dict[str, str] | None = None, timeout_s: float = 180) -> Cluster:
    port, dash = free_port(), free_port()
    temp_dir = Path("/tmp") / f"ray_mn_{os.getpid()}"  # short: unix socket paths have a length limit
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           **(extra_env or {})}
    log_dir.mkdir(parents=True, exist_ok=True)

    def agent_ports() -> list[str]:
        return [f"--{flag}={free_port()}" for flag in _AGENT_FLAGS]

    cluster = Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", env, temp_dir)
    head = [RAY, "start", "--head", "--block", "--num-cpus=0", "--node-ip-address=127.0.0.1", f"--port={port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}",
            f"--ray-client-server-port={free_port()}", "--disable-usage-stats", *agent_ports()]
    try:
        cluster.procs["head"] = _spawn(head, env, log_dir / "head.log")
        _wait(lambda: _http_ok(f"{cluster.dashboard}/api/version"), timeout_s, "the head's dashboard", cluster)
        for i in range(workers):
            # its own temp dir: nodes on one host would otherwise share unix socket paths
            node_temp = temp_dir.with_name(temp_dir.name + f"_w{i}")
            join = [RAY, "start", "--block", f"--address={cluster.address}", "--node-ip-address=127.0.0.1",
                    f"--num-cpus={cpus_per_worker}", f"--temp-dir={node_temp}", "--disable-usage-stats",
                    *agent_ports()]
            script = namespace_script(hide, keep, node_temp.with_name(node_temp.name + "_keep"), join)
            cluster.procs[f"worker{i}"] = _spawn(["unshare", "-m", "--propagation", "private", "bash", "-c", script],
                                                 env, log_dir / f"worker{i}.log")
        _wait(lambda: cluster.alive_worker_nodes() == workers, timeout_s, f"{workers} worker nodes", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # own process group: the teardown stops exactly this cluster (`ray stop` would stop every Ray here)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


def _wait(ready, timeout_s: float, what: str, cluster: Cluster) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} not up after {timeout_s} s")
