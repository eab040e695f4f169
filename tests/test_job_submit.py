"""`ray job submit` against a real local cluster started with `ray start --head` on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def local_cluster(tmp_path):
    port, dash = _free_port(), _free_port()
    # The job driver runs `python` from PATH: make it this venv's.
    env = {**os.environ, "RAY_ADDRESS": "", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    temp_dir = Path("/tmp") / f"ray_job_{os.getpid()}"  # short: unix socket paths have a length limit
    start = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skip(reason="fails on a fresh `ray start` cluster (job does not succeed); not debugged yet, see issue 5")
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
