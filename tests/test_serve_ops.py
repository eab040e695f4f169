"""`sprec-ray serve` as a platform runs it: a real CLI process with its own local Ray, stopped with
SIGTERM (what docker stop, Kubernetes and systemd send) while clients keep sending requests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_serve import _free_port, make_serve_run


@pytest.fixture(scope="module")
def ops_run_dir(tiny_data_dir, tiny_model_dir, tmp_path_factory) -> Path:
    return make_serve_run(tmp_path_factory.mktemp("ops_run"), tiny_data_dir, tiny_model_dir)


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"sprec-ray serve exited early with {proc.returncode}"
        try:
            if requests.get(f"{url}/readyz", timeout=10).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or the proxy holds it until the app is up
            pass
        time.sleep(1)
    raise AssertionError(f"{url}/readyz did not answer 200 within {timeout_s}s")


def _alive(pids: list[int]) -> list[str]:
    import psutil

    left = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {' '.join(proc.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigterm_drains_requests_in_flight_and_leaves_no_process(ops_run_dir, tmp_path):
    import psutil
    import requests

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # batch_wait_timeout_s=1 with batches that never fill: every request is in flight for ~1 s, so
    # SIGTERM always lands on some (a shutdown without draining would cut them).
    cmd = [sys.executable, "-m", "sprec_ray.cli", "serve", "--run", str(ops_run_dir), "ray_address=local",
           "serve.host=127.0.0.1", f"serve.port={port}", "serve.min_replicas=1", "serve.max_replicas=1",
           "serve.batch_wait_timeout_s=1.0", "serve.max_batch_size=64"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    family: list[int] = []
    try:
        _wait_ready(url, proc, 300)
        family = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert family, "the CLI started no Ray processes?"

        results: list[tuple[float, float, object]] = []  # (sent, answered, status code or exception name)
        pending: dict[int, float] = {}  # client -> when its current request was sent
        stop = threading.Event()

        def client(i: int) -> None:
            session = requests.Session()
            while not stop.is_set():
                sent = pending[i] = time.monotonic()
                try:
                    code: object = session.post(f"{url}/recommend", json={"history": [i, i + 1], "k": 3},
                                                timeout=120).status_code
                except requests.RequestException as err:
                    code = type(err).__name__
                results.append((sent, time.monotonic(), code))
                pending.pop(i, None)
                if not isinstance(code, int):
                    return  # the service is gone

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(3)
        # Signal while a request has been in flight for 0.6 s or more: inside the gateway by then.
        while not any(0.6 < time.monotonic() - t < 0.9 for t in list(pending.values())):
            time.sleep(0.02)
        term = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=90)  # the bound: a 25 s drain plus Serve's shutdown
        stopped = time.monotonic() - term
        stop.set()
        for t in threads:
            t.join(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert rc == 0 and "Traceback" not in output, output[-3000:]
    assert "stopped" in output, output[-3000:]

    # Sent at least 0.5 s before SIGTERM: inside the gateway by then, so each must be answered,
    # including those still in flight when the signal came (a batch waits up to 1 s).
    early = [(sent, done, code) for sent, done, code in results if sent < term - 0.5]
    spanning = [code for sent, done, code in early if done > term]
    assert early and all(code == 200 for _, _, code in early), early
    assert spanning, "no request was in flight at SIGTERM: the test proves nothing"
    # Anything later is answered, refused with 503 + Retry-After, or finds the port closed; never a 500.
    later = {code for sent, _, code in results if sent >= term - 0.5}
    assert later <= {200, 503, "ConnectionError"}, later
    print(f"{len(early)} requests sent before SIGTERM ({len(spanning)} in flight), exit after {stopped:.1f}s")

    deadline = time.monotonic() + 30  # orphans are reaped by init; give it a moment
    while _alive(family) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _alive(family), _alive(family)
