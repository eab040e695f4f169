"""A run on nodes that do not share the driver's disk: job submit, eval, serve, and a node lost mid-SFT.

The cluster (tests/multinode.py): a head with no CPUs, so every task, actor and trainer runs on one
of two worker nodes, and each worker node sees an empty home and an empty driver working directory.
What they can read is the Python environment and the run's storage. The base model is a Hub id
that each node resolves from HF_HOME, a cache this test fills, with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
import torch
from faults import KillAfterCheckpoints
from multinode import RAY, REPO, free_port, start_cluster, unshare_allowed
from safetensors.torch import load_file

NO_UNSHARE = unshare_allowed()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(NO_UNSHARE), reason=f"needs private mount namespaces: {NO_UNSHARE}")]

HUB_ID = "sprec-test/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SPREC = str(Path(sys.executable).parent / "sprec-ray")


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("storage")  # the run's storage: the one path every node sees


@pytest.fixture(scope="module")
def driver_cwd(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("driver_cwd")  # hidden on the worker nodes


@pytest.fixture(scope="module")
def cluster(storage, driver_cwd, tiny_model_dir):
    # A Hugging Face cache as `huggingface_hub` lays it out, holding the tiny model at one commit.
    repo = storage / "hf" / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    hf = {"HF_HOME": str(storage / "hf"), "HF_HUB_OFFLINE": "1"}
    cluster = start_cluster(workers=2, cpus_per_worker=3, hide=[Path.home(), driver_cwd],
                            keep=[Path(sys.base_prefix), Path(sys.prefix), REPO, storage],
                            log_dir=storage / "cluster_logs", extra_env=hf)
    yield cluster
    cluster.stop()


def _run_args(config: str, tiny_data_dir: Path) -> list[str]:
    # 12 warm-start steps: with 4, a loaded machine once finished the stage before the node-loss
    # test's kill landed, so nothing was left to resume.
    return ["--config", config, f"model.name={HUB_ID}", f"data.path={tiny_data_dir}",
            "data.train_samples=32", "data.valid_samples=8", "selfplay.rounds=1", "selfplay.round_samples=8",
            "sft.epochs=6", "train.checkpoint_every=2", "generation.backend=hf",
            "generation.decoding=sample", "generation.temperature=2.0"]


def _cli_env(cluster) -> dict[str, str]:
    return {**cluster.env, "RAY_ADDRESS": cluster.address}


def _files(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.timeout(900)
def test_selfplay_job_runs_on_nodes_without_the_drivers_disk(cluster, storage, driver_cwd, tiny_data_dir):
    out = storage / "job_run"
    submit = [RAY, "job", "submit", f"--address={cluster.dashboard}", "--working-dir", str(REPO),
              "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"), "--",
              "python", "jobs/selfplay.py", *_run_args("configs/tiny.yaml", tiny_data_dir), f"output_dir={out}"]
    for _ in range(12):  # the dashboard's job agent comes up a few seconds after the node joins
        done = subprocess.run(submit, cwd=driver_cwd, env=cluster.env, capture_output=True, text=True, timeout=840)
        if "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(5)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    assert [m["label"] for m in json.loads((out / "metrics.json").read_text())["rounds"]] == ["r0 (SFT)", "r1"]
    prepare = json.loads((out / "manifests" / "prepare.json").read_text())["outputs"]
    assert prepare["base_model"] == f"hf://{HUB_ID}@{COMMIT}" and prepare["model_revision"] == COMMIT
    final = json.loads((out / "final.json").read_text())  # run-relative, except the pinned Hub commit
    assert final["base_model"] == prepare["base_model"] and final["adapter"].startswith("r1/")
    assert (out / final["adapter"] / "adapter_config.json").is_file()
    assert (out / "catalogue" / "items.parquet").is_file() and (out / "catalogue" / "embeddings-hash.npy").is_file()


@pytest.mark.timeout(600)
def test_eval_on_the_cluster_leaves_the_run_as_it_was(cluster, storage, driver_cwd):
    run = storage / "job_run"
    before = _files(run)
    done = subprocess.run([SPREC, "eval", "--run", str(run)], cwd=driver_cwd, env=_cli_env(cluster),
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads(done.stdout[done.stdout.index("{"):])
    assert metrics["n_rows"] == 8 and 0.0 <= metrics["HR@5"] <= 1.0
    after = _files(run)
    assert {k: v for k, v in after.items() if not k.startswith("evals/")} == before
    written = [k for k in after if k.startswith("evals/")]
    assert sorted(Path(k).name for k in written) == ["metrics.json", "predictions.jsonl"]


@pytest.mark.timeout(600)
def test_serve_replicas_load_the_run_from_its_storage(cluster, storage, driver_cwd):
    port = free_port()
    cmd = [SPREC, "serve", "--run", str(storage / "job_run"), f"serve.port={port}", "serve.proxy_location=HeadOnly"]
    # Output to a file, not a pipe: a full pipe would block the CLI's Ctrl-C shutdown, and a Serve app
    # left running holds CPUs that later runs on this cluster wait for.
    log = storage / "serve.log"
    with log.open("w") as sink:
        # PYTHONFAULTHANDLER: if Ctrl-C never ends the CLI, SIGABRT below writes every thread's stack to the log
        proc = subprocess.Popen(cmd, cwd=driver_cwd, env={**_cli_env(cluster), "PYTHONFAULTHANDLER": "1"}, stdout=sink,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 420
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # proxy not up, or the replica still starting
                pass
            time.sleep(2)
        health = requests.get(f"{url}/healthz", timeout=10).json()
        assert health["adapter"] and health["round"] == 1
        ok = requests.post(f"{url}/recommend", json={"history": [0, 1, 2], "k": 3}, timeout=120)
        assert ok.status_code == 200, ok.text
        items = ok.json()["items"]
        assert len(items) == 3 and not {0, 1, 2} & {i["id"] for i in items}
        bad = requests.post(f"{url}/recommend", json={"history": [10**6]}, timeout=60)
        assert bad.status_code == 422 and "history" in bad.text
    finally:
        # Ctrl-C once the CLI says it serves: the proxy answers before serve.run returns, and a SIGINT
        # inside serve.run can be swallowed by Serve's own waiting.
        deadline = time.time() + 120
        while "Ctrl-C or SIGTERM to stop" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(1)
        # serve_run shuts Serve down on Ctrl-C, pressed again every 15 s as a user would: once, in a
        # fresh-clone suite, one Ctrl-C led to no shutdown (the CLI slept an hour at a time then).
        for _ in range(8):
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                pass
        else:
            os.kill(proc.pid, signal.SIGABRT)  # where it hangs, into the log
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, log.read_text()[-8000:]
    with pytest.raises(requests.ConnectionError):  # Ctrl-C took the app and its proxy down
        requests.get(f"{url}/healthz", timeout=10)


@pytest.mark.timeout(300)
def test_a_run_dir_only_the_driver_sees_fails_fast_naming_the_nodes(cluster, driver_cwd, tiny_data_dir):
    done = subprocess.run([SPREC, "train", *_run_args(str(REPO / "configs" / "tiny.yaml"), tiny_data_dir),
                           "output_dir=runs/local"], cwd=driver_cwd, env=_cli_env(cluster),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"output_dir {driver_cwd / 'runs' / 'local'} is not visible on node(s)" in done.stderr
    error = done.stderr[done.stderr.index("is not visible on node(s)"):]
    assert len(re.findall(r"\d+\.\d+\.\d+\.\d+ \([0-9a-f]{8}\)", error)) == 2  # both workers named, not the head
    assert not (driver_cwd / "runs" / "local" / "manifests").exists()


@pytest.mark.timeout(600)
def test_node_lost_mid_sft_resumes_on_the_other_node_to_the_same_weights(cluster, storage, driver_cwd, tiny_data_dir):
    """Last in this module: it leaves the cluster one worker node short."""
    out = storage / "node_loss_run"

    def trainer_node_raylet() -> int | None:
        """The raylet of a worker node that runs a training worker: killing it loses the machine."""
        for node in ("worker0", "worker1"):
            children = psutil.Process(cluster.procs[node].pid).children(recursive=True)
            if any((p.cmdline() or [""])[0].startswith("ray::RayTrainWorker") for p in children):
                return cluster.raylet_pids(node)[0]
        return None

    # the warm start alone (rounds=0): its adapter is this run's final one. A checkpoint per step
    # (an operational key: the weights do not change), so a node dies with checkpoints to resume from.
    with KillAfterCheckpoints(out / "ray_results" / "r0_train", trainer_node_raylet) as fault:
        done = subprocess.run([SPREC, "train", *_run_args(str(REPO / "configs" / "tiny.yaml"), tiny_data_dir),
                               f"output_dir={out}", "selfplay.rounds=0", "train.checkpoint_every=1"], cwd=driver_cwd,
                              env=_cli_env(cluster), capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stderr[-4000:]
    assert fault.killed is not None
    assert cluster.alive_worker_nodes() == 1
    sft = json.loads((out / "manifests" / "r0_sft.json").read_text())
    assert 1.0 <= sft["metrics"]["restored_from_step"] < sft["metrics"]["steps"]
    # the same weights as the uninterrupted job run's warm start, same seed and rows
    final = json.loads((out / "final.json").read_text())["adapter"]
    uninterrupted = json.loads((storage / "job_run" / "manifests" / "r0_sft.json").read_text())["outputs"]["adapter"]
    assert out / final == Path(sft["outputs"]["adapter"])
    got, want = (load_file(Path(adapter) / "adapter_model.safetensors") for adapter in (out / final, uninterrupted))
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, atol=1e-6), name
