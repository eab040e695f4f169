"""`ray job submit` against a real local cluster started with `ray start --head` on 127.0.0.1."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_dashboard(address: str, head: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert head.poll() is None, f"`ray start --head` exited with {head.returncode}"
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard at {address} not up after {timeout_s} s")


@pytest.fixture()
def local_cluster(tmp_path):
    port, dash = _free_port(), _free_port()
    # Every fixed default port gets a free one: another Ray instance on the machine (the test
    # session's own, or a user's) already holds 52365 etc., and the job agent then never serves.
    agent_ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]
    # The job driver runs `python` from PATH: make it this venv's.
    env = {**os.environ, "RAY_ADDRESS": "", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    temp_dir = Path("/tmp") / f"ray_job_{os.getpid()}"  # short: unix socket paths have a length limit
    start = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
             *agent_ports]
    # --block keeps `ray start` in the foreground of its own process group, so the teardown stops
    # exactly this cluster; `ray stop` would kill every Ray process on the machine.
    head = subprocess.Popen([*start, "--block"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for_dashboard(f"http://127.0.0.1:{dash}", head)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(temp_dir)], capture_output=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_job_submit_runs_a_selfplay_job(local_cluster, tiny_data_dir, tmp_path):
    address, env = local_cluster
    out = tmp_path / "job_run"
    submit = [RAY, "job", "submit", f"--address={address}", "--working-dir", str(REPO),
              "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"), "--",
              "python", "jobs/selfplay.py", "--config", "configs/tiny.yaml", f"output_dir={out}",
              f"data.path={tiny_data_dir}", "data.train_samples=32", "data.valid_samples=8",
              "selfplay.rounds=0", "generation.backend=hf"]
    started = time.time()
    for _ in range(12):  # the dashboard's job agent comes up a few seconds after `ray start` returns
        done = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
        if "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(5)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    metrics = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [m["label"] for m in metrics] == ["r0 (SFT)"] and metrics[0]["n_rows"] == 8
    assert time.time() - started < 840
