"""Run a launcher config's node types on one machine with Ray's fake multi-node provider.

    python cluster/fake_autoscale.py [cluster/aws.yaml]

The head and every "cloud" node are real Ray processes on this machine; only the VM creation is
faked. The node types (names, GPU counts, min/max workers) come from the launcher YAML, so the
autoscaler makes the same decisions it would make on AWS/GCP: a workload that needs GPUs nobody has
makes it launch GPU workers, and they are terminated once idle. CPU counts and per-type max_workers
are capped so the fake nodes fit on a laptop. Nothing is bound to the default Ray port, and only the
processes this script started are stopped (by pid, found under its private temp dir).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
FAKE_HEAD_TYPE = "ray.head.default"  # the only head type name the fake provider knows
OBJECT_STORE_BYTES = 200 * 1024 * 1024
MAX_CPUS_PER_NODE = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_config(launcher_yaml: str | Path, gcs_address: str, idle_timeout_minutes: float = 0.1,
                max_cpus_per_node: int = MAX_CPUS_PER_NODE, max_workers_per_type: int = 2) -> dict[str, Any]:
    """The launcher config with its provider swapped for `fake_multinode` and sizes capped."""
    real = yaml.safe_load(Path(launcher_yaml).read_text())
    head_type = real["head_node_type"]
    node_types: dict[str, Any] = {}
    for name, spec in real["available_node_types"].items():
        resources = dict(spec["resources"])
        if "CPU" in resources:
            resources["CPU"] = min(resources["CPU"], max_cpus_per_node)
        # Fake nodes share this machine's /dev/shm: keep each object store small.
        resources.setdefault("object_store_memory", OBJECT_STORE_BYTES)
        if name == head_type:
            node_types[FAKE_HEAD_TYPE] = {"resources": resources, "node_config": {}, "max_workers": 0}
            continue
        node_types[name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": spec.get("min_workers", 0),
            "max_workers": min(spec.get("max_workers", 1), max_workers_per_type),
        }
    workers = sum(t.get("max_workers", 0) for n, t in node_types.items() if n != FAKE_HEAD_TYPE)
    return {
        "cluster_name": f"fake-{real['cluster_name']}",
        "max_workers": workers,
        "upscaling_speed": real.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        # No SSH updaters and no launch-hash check: fake nodes are started in-process by the provider,
        # one per create call (what Ray's own AutoscalingCluster does for the v1 autoscaler).
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "launch_multiple": False,
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": node_types,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@dataclass
class FakeCluster:
    """A head started with `ray start --block` on free ports, plus the fake nodes its autoscaler adds."""

    launcher_yaml: Path
    idle_timeout_minutes: float = 0.1
    address: str = ""
    temp_dir: str = ""
    _head: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, timeout_s: float = 90.0) -> str:
        import ray._private.services as services

        ip = services.get_node_ip_address()
        port = free_port()
        self.address = f"{ip}:{port}"
        # Short on purpose: Ray's unix socket paths live below it (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="sprfk", dir="/tmp")
        cfg = fake_config(self.launcher_yaml, self.address, self.idle_timeout_minutes)
        cfg_path = Path(self.temp_dir) / "autoscaler.json"
        cfg_path.write_text(json.dumps(cfg))
        head = cfg["available_node_types"][FAKE_HEAD_TYPE]["resources"]
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
               f"--port={port}", f"--autoscaling-config={cfg_path}", f"--temp-dir={self.temp_dir}",
               f"--num-cpus={head.get('CPU', 0)}", f"--num-gpus={head.get('GPU', 0)}",
               f"--object-store-memory={head['object_store_memory']}",
               "--include-dashboard=false", f"--dashboard-agent-listen-port={free_port()}",
               f"--ray-client-server-port={free_port()}", "--disable-usage-stats"]
        env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                   RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
        env.pop("RAY_ADDRESS", None)
        log = open(Path(self.temp_dir) / "head.log", "w")  # noqa: SIM115 - lives as long as the head
        self._head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._head.poll() is not None:
                raise RuntimeError(f"ray start exited with {self._head.returncode}: {self.head_log()[-2000:]}")
            try:
                with socket.create_connection((ip, port), timeout=1):
                    return self.address
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"fake cluster head did not come up in {timeout_s}s: {self.head_log()[-2000:]}")

    def head_log(self) -> str:
        path = Path(self.temp_dir) / "head.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _own_pids(self) -> set[int]:
        """The head's process tree plus anything running out of our private temp dir (fake nodes
        are started by the autoscaler, and may outlive their parent)."""
        import psutil

        pids: set[int] = set()
        if self._head is not None:
            try:
                root = psutil.Process(self._head.pid)
                pids |= {root.pid, *(c.pid for c in root.children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
        me = os.getuid()
        for proc in psutil.process_iter(["pid", "cmdline", "uids"]):
            try:
                if proc.info["uids"] and proc.info["uids"].real == me and self.temp_dir and \
                        any(self.temp_dir in part for part in proc.info["cmdline"] or ()):
                    pids.add(proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        pids.discard(os.getpid())
        return pids

    def stop(self) -> None:
        import psutil

        pids = self._own_pids()
        procs = []
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                proc.terminate()
                procs.append(proc)
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue
        if self._head is not None:
            self._head.wait(timeout=10)
        if self.temp_dir and not os.environ.get("SPREC_KEEP_FAKE_CLUSTER_LOGS"):
            shutil.rmtree(self.temp_dir, ignore_errors=True)


# Runs in a separate interpreter attached to the fake cluster, so the caller's own Ray session
# (a test's ray_session, say) is untouched.
DRIVER = r"""
import json, sys, time
import ray

ray.init(address=sys.argv[1], log_to_driver=False)
num_tasks, hold_s, removal_timeout_s = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])

def workers():
    return [n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] and n["Resources"].get("GPU", 0) > 0]

t0 = time.monotonic()
before = len(workers())

@ray.remote(num_gpus=1, num_cpus=int(sys.argv[5]))
def gpu_step(hold):
    time.sleep(hold)
    return ray.get_runtime_context().get_node_id()

# Each task needs a GPU plus a whole (fake) node's CPUs and the head has neither: nothing runs until
# the autoscaler adds one GPU node per task, like Ray Train workers spread over GPU machines.
node_ids = ray.get([gpu_step.remote(hold_s) for _ in range(num_tasks)], timeout=removal_timeout_s)
t_done = time.monotonic() - t0
peak = workers()
peak_gpus = sum(n["Resources"]["GPU"] for n in peak)
deadline = time.monotonic() + removal_timeout_s
while workers() and time.monotonic() < deadline:
    time.sleep(1)
t_removed = time.monotonic() - t0
print("RESULT " + json.dumps({
    "gpu_workers_before": before, "gpu_workers_peak": len(peak), "gpus_peak": peak_gpus,
    "task_nodes": sorted(set(node_ids)), "gpu_worker_ids_peak": sorted(n["NodeID"] for n in peak),
    "gpu_workers_after": len(workers()), "tasks_done_s": round(t_done, 1), "removed_s": round(t_removed, 1),
}))
"""


def run_demo(launcher_yaml: str | Path = REPO / "cluster" / "aws.yaml", num_tasks: int = 2, hold_s: float = 3.0,
             idle_timeout_minutes: float = 0.1, removal_timeout_s: float = 90.0) -> dict[str, Any]:
    """Start the fake cluster, run GPU tasks the head cannot host, wait for scale-down, stop."""
    cluster = FakeCluster(Path(launcher_yaml), idle_timeout_minutes)
    try:
        address = cluster.start()
        env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run([sys.executable, "-c", DRIVER, address, str(num_tasks), str(hold_s),
                               str(removal_timeout_s), str(MAX_CPUS_PER_NODE)], env=env,
                              capture_output=True, text=True,
                              timeout=2 * removal_timeout_s + 60)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"driver failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n"
                               f"head log:\n{cluster.head_log()[-2000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        result["autoscaler_log"] = _autoscaler_events(cluster.temp_dir)
        result["temp_dir"] = cluster.temp_dir
        return result
    finally:
        cluster.stop()


def _autoscaler_events(temp_dir: str) -> list[str]:
    """Launch/terminate decisions from the monitor's log, as evidence of who added the nodes."""
    logs = sorted(Path(temp_dir).glob("session_*/logs/monitor.log"))
    if not logs:
        return []
    keep = ("event_summary", "Launching", "Terminating the node")
    return [ln.strip() for ln in logs[-1].read_text(errors="replace").splitlines()
            if any(k in ln for k in keep)][-40:]


if __name__ == "__main__":
    summary = run_demo(sys.argv[1] if len(sys.argv) > 1 else REPO / "cluster" / "aws.yaml")
    print(json.dumps(summary, indent=2))
