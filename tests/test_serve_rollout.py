"""Live adapter rollout and the filter bubble watched live, on the real service.

The service runs as an operator runs it: a separate process with its own Ray (whose metrics agent
exports to Prometheus on a loopback port), `sprec-ray serve` semantics (serve_run, blocking, SIGTERM
to stop), changed by the real `sprec-ray deploy` CLI; the test talks HTTP to it and scrapes the
metrics endpoint. The first tests need no Ray: the adapter checks, the round discovery over the
driver's own manifest files, and the live window's metrics against the offline functions.
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
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from reference import load_dataset
from test_serve import _free_port, make_serve_run

from sprec_ray.artefacts import load_grounder
from sprec_ray.config import load_config
from sprec_ray.eval.evaluate import answer_stats, evaluate_completions
from sprec_ray.eval.metrics import ranking_metrics
from sprec_ray.manifest import ManifestStore, PhaseRecord
from sprec_ray.serve.adapters import AdapterError, describe_adapter, finished_rounds, newest_round
from sprec_ray.serve.recommender import load_run
from sprec_ray.serve.stats import LiveStats, Served, window_metrics

CHECKOUT = Path(__file__).resolve().parents[1]
OTHER_BASE_ADAPTER = CHECKOUT / "adapters" / "smollm2-goodreads-sft"  # a real adapter, for SmolLM2


def _lora(model_dir: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out)
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    new = _lora(tiny_model_dir, root / "new", seed=1)
    corrupt = root / "corrupt"
    shutil.copytree(new, corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    return {"new": new, "corrupt": corrupt, "other_base": OTHER_BASE_ADAPTER, "missing": root / "nothing-here"}


# ---- adapter checks and round discovery (no Ray) ----------------------------------------------
def test_describe_adapter_names_it_and_refuses_what_cannot_be_served(adapters, tiny_model_dir, tmp_path):
    ref = describe_adapter(adapters["new"], tiny_model_dir, 3)
    assert ref.sha256 == _sha(adapters["new"]) and ref.round == 3 and ref.engine_id >= 2
    for name, needle in (("other_base", "not an adapter for the served base model"),
                         ("corrupt", "cannot be read as safetensors"), ("missing", "is not a directory")):
        with pytest.raises(AdapterError, match=needle):
            describe_adapter(adapters[name], tiny_model_dir)
    nan = shutil.copytree(adapters["new"], tmp_path / "nan")
    from safetensors.torch import load_file, save_file

    tensors = load_file(nan / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, nan / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=f"{first} holds NaN"):
        describe_adapter(nan, tiny_model_dir)


def _finish_round(run: Path, round_id: int, adapter: Path, stage: str = "dpo") -> None:
    """What the driver writes when a round's training ends: its phase manifest naming the adapter."""
    store = ManifestStore(run, "digest", 0, {})
    store.save(PhaseRecord(f"r{round_id}_{stage}", {"adapter": str(adapter), "checkpoint": ""}, {}, 1.0))


def test_rounds_are_read_from_the_drivers_manifests(adapters, tmp_path):
    _finish_round(tmp_path, 0, adapters["new"], "sft")
    assert newest_round(tmp_path, sft_only=False) == (0, adapters["new"])
    _finish_round(tmp_path, 1, adapters["corrupt"], "sft")  # round 1's SFT: not its final adapter
    assert finished_rounds(tmp_path, sft_only=False) == {0: adapters["new"]}
    assert finished_rounds(tmp_path, sft_only=True) == {0: adapters["new"], 1: adapters["corrupt"]}
    _finish_round(tmp_path, 1, adapters["other_base"])
    assert newest_round(tmp_path, sft_only=False) == (1, adapters["other_base"])


def test_a_run_still_training_is_served_from_its_newest_round_only_with_follow(serve_run_dir, tiny_model_dir,
                                                                               adapters, tmp_path):
    run = tmp_path / "training"
    run.mkdir()
    shutil.copy(serve_run_dir / "config.yaml", run / "config.yaml")
    shutil.copytree(serve_run_dir / "catalogue", run / "catalogue")
    store = ManifestStore(run, "digest", 0, {})
    store.save(PhaseRecord("prepare", {"base_model": str(tiny_model_dir)}, {}, 1.0))
    with pytest.raises(ValueError, match="serve.follow=true"):
        load_run(run)
    with pytest.raises(ValueError, match="no finished round yet"):
        load_run(run, ["serve.follow=true"])
    _finish_round(run, 0, adapters["new"], "sft")
    info = load_run(run, ["serve.follow=true"])
    assert (info.round, info.adapter, info.base_model) == (0, adapters["new"], tiny_model_dir)


@pytest.fixture(scope="module")
def serve_run_dir(tiny_data_dir, tiny_model_dir, tmp_path_factory) -> Path:
    return make_serve_run(tmp_path_factory.mktemp("rollout_run"), tiny_data_dir, tiny_model_dir)


def test_window_metrics_are_the_offline_metrics(serve_run_dir):
    """Random answers, some popularity fallbacks, mixed k: each @k equals ranking_metrics over the rows
    that asked for k or more, and the answer shares equal answer_stats."""
    run = load_run(serve_run_dir)
    from sprec_ray.serve.recommender import load_catalogue

    catalogue = load_catalogue(run)
    rng = np.random.default_rng(0)
    served = []
    for i in range(60):
        k = int(rng.choice([1, 5, 10]))
        grounded = i % 7 != 0
        items = tuple(int(x) for x in rng.choice(len(catalogue), size=k, replace=False))
        answer = catalogue.titles[items[0]] if i % 3 else f"an invented title {i}"
        served.append(Served(items, grounded, answer if grounded else "", k))
    got = window_metrics(served, catalogue, (1, 5, 10))
    for k in (1, 5, 10):
        rows = [s for s in served if s.k >= k]
        ranked = np.array([s.items[:k] for s in rows])
        offline = ranking_metrics(ranked, [0] * len(rows), [[0]] * len(rows), catalogue, (k,),
                                  valid=np.array([s.grounded for s in rows]))
        assert got[f"rows@{k}"] == len(rows)
        for name in ("DivRatio", "ORRatio", "DivCount"):
            assert got[f"{name}@{k}"] == pytest.approx(offline[f"{name}@{k}"], abs=1e-12), (name, k)
    valid = np.array([s.grounded for s in served])
    shares = answer_stats([s.answer for s in served], np.array([s.items[0] for s in served]), valid, catalogue)
    assert got["top10_share@1"] == pytest.approx(shares["top10_share@1"])
    assert got["not_in_catalogue_share"] == pytest.approx(1 - shares["exact_share"])
    stats = LiveStats(catalogue, (1, 5, 10), window=10)  # the window slides per adapter
    for s in served[:25]:
        stats.add({"items": [{"id": i} for i in s.items], "source": "model" if s.grounded else "popularity",
                   "generated": [s.answer], "adapter": {"round": 1, "sha256": "a" * 64}}, s.k)
    entry = stats.snapshot()["adapters"]["a" * 12]
    assert entry["responses_total"] == 25 and entry["metrics"]["responses"] == 10
    assert entry["metrics"]["DivRatio@1"] == window_metrics(served[15:25], catalogue, (1,))["DivRatio@1"]


# ---- the service, changed while it answers ----------------------------------------------------
SERVER = """
import sys, ray
from sprec_ray.runtime import apply_default_env, worker_env
apply_default_env()
ray.init(num_cpus=4, include_dashboard=False, _metrics_export_port=int(sys.argv[1]),
         runtime_env={"env_vars": worker_env()})
from sprec_ray.serve.app import serve_run
serve_run(sys.argv[2], sys.argv[3:], block=True)
"""


class Service:
    def __init__(self, run: Path, tmp: Path) -> None:
        self.run = run
        self.port, self.metrics_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "serve.log"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(self.metrics_port), str(run), "serve.host=127.0.0.1",
             f"serve.port={self.port}", "serve.min_replicas=1", "serve.max_replicas=1", "serve.follow=true",
             "serve.follow_interval_s=1", "serve.stats_window=1000"],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=CHECKOUT, start_new_session=True)
        self.ray_address = self._wait_ready(300)

    def _wait_ready(self, timeout_s: float) -> str:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the service exited early:\n{self.log.read_text()[-3000:]}"
            found = re.search(r"ray_address=(\S+)", self.log.read_text())
            try:
                if found and requests.get(f"{self.url}/readyz", timeout=10).status_code == 200:
                    return found.group(1)
            except requests.RequestException:
                pass
            time.sleep(1)
        raise AssertionError(f"not ready within {timeout_s}s:\n{self.log.read_text()[-3000:]}")

    def deploy(self, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        return subprocess.run([sys.executable, "-m", "sprec_ray.cli", "deploy", "--run", str(self.run),
                                f"ray_address={self.ray_address}", *args], capture_output=True, text=True,
                               timeout=300, env=env, cwd=CHECKOUT)

    def get(self, path: str) -> dict:
        import requests

        resp = requests.get(f"{self.url}/{path}", timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def post(self, path: str, body: dict):
        import requests

        return requests.post(f"{self.url}/{path}", json=body, timeout=120)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the process group this test started, nothing else
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def service(serve_run_dir, tmp_path_factory):
    svc = Service(serve_run_dir, tmp_path_factory.mktemp("service"))
    yield svc
    svc.stop()


def _scrape(port: int, metric: str, adapter: str, k: str) -> float | None:
    import requests

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f"{metric}{{") and f'adapter="{adapter}"' in line and f'k="{k}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stats_replay_equals_the_offline_metrics_and_prometheus_reads_them(service, serve_run_dir, tiny_data_dir):
    """Validation histories replayed through /recommend; /stats must equal the offline evaluation of
    the same answers (parsed and grounded offline), and Ray's Prometheus endpoint must carry them."""
    cfg = load_config(serve_run_dir / "config.yaml")
    rows = load_dataset(cfg.data, serve_run_dir / "scratch2").valid[:40]
    ks = cfg.eval.ks
    bodies = []
    for row in rows:
        resp = service.post("recommend", {"history": list(row.history), "k": max(ks), "exclude_history": False})
        assert resp.status_code == 200, resp.text
        bodies.append(resp.json())
    live = service.get("stats")
    key = live["live"]["sha256"][:12]
    entry = live["adapters"][key]
    assert entry["responses_total"] == len(rows), "the window must hold exactly the replayed answers"

    run = load_run(serve_run_dir)
    from sprec_ray.serve.recommender import load_catalogue

    catalogue = load_catalogue(run)
    offline, _ = evaluate_completions([[b["generated"][0]] for b in bodies], rows, catalogue,
                                      load_grounder(serve_run_dir, catalogue, cfg.eval.embedder), ks)
    for k in ks:
        for name in ("DivRatio", "ORRatio"):
            assert entry["metrics"][f"{name}@{k}"] == pytest.approx(offline[f"{name}@{k}"], abs=1e-9), (name, k)
    assert entry["metrics"]["top10_share@1"] == pytest.approx(offline["top10_share@1"], abs=1e-9)
    assert entry["metrics"]["not_in_catalogue_share"] == pytest.approx(1 - offline["exact_share"], abs=1e-9)

    deadline = time.monotonic() + 90  # Ray's metrics agent exports every few seconds
    scraped = None
    while time.monotonic() < deadline and scraped != pytest.approx(entry["metrics"][f"DivRatio@{max(ks)}"]):
        scraped = _scrape(service.metrics_port, "ray_sprec_live_divratio", key, str(max(ks)))
        time.sleep(2)
    assert scraped == pytest.approx(entry["metrics"][f"DivRatio@{max(ks)}"]), scraped
    assert _scrape(service.metrics_port, "ray_sprec_live_orratio", key, "1") == pytest.approx(
        entry["metrics"]["ORRatio@1"])


class Load:
    """Clients that keep posting while the adapter changes; each records (status, adapter sha) in order."""

    def __init__(self, service: Service, history: list[int], clients: int = 2) -> None:
        self.service, self.history = service, history
        self.seen: list[list[tuple[int, str | None]]] = [[] for _ in range(clients)]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, i: int) -> None:
        import requests

        with requests.Session() as session:
            while not self.stop.is_set():
                path = "recommend" if i % 2 == 0 else "rank"
                body = {"history": self.history, "k": 3} if path == "recommend" else \
                    {"history": self.history, "candidates": [5, 6, 7], "k": 2}
                resp = session.post(f"{self.service.url}/{path}", json=body, timeout=120)
                sha = resp.json()["adapter"]["sha256"] if resp.status_code == 200 else None
                self.seen[i].append((resp.status_code, sha))

    def wait_for(self, n: int, timeout_s: float = 120) -> None:
        start = [len(s) for s in self.seen]
        deadline = time.monotonic() + timeout_s
        while any(len(s) - s0 < n for s, s0 in zip(self.seen, start, strict=True)) and time.monotonic() < deadline:
            time.sleep(0.2)

    def finish(self) -> list[list[tuple[int, str | None]]]:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)
        return self.seen


def _runs(shas: list[str | None]) -> list[str | None]:
    """The sequence of distinct adapters a client saw, in order (AAABBA -> A B A)."""
    return [s for i, s in enumerate(shas) if i == 0 or s != shas[i - 1]]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rollout_and_rollback_under_load_lose_no_request(service, serve_run_dir, adapters):
    old = _sha(serve_run_dir / "adapter")
    new = _sha(adapters["new"])
    load = Load(service, [3, 17, 42])
    load.wait_for(3)
    out = service.deploy("--adapter", str(adapters["new"]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["live"]["sha256"] == new
    load.wait_for(3)
    back = service.deploy("--rollback")
    assert back.returncode == 0, back.stderr[-2000:]
    assert json.loads(back.stdout)["live"]["sha256"] == old
    load.wait_for(3)
    seen = load.finish()
    for client in seen:
        assert {status for status, _ in client} == {200}, client
        assert _runs([sha for _, sha in client]) == [old, new, old], "each switch is seen once, in order"
    version = service.get("version")
    assert version["live"]["sha256"] == old and version["previous"] == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bad_adapters_are_refused_and_the_live_one_keeps_serving(service, serve_run_dir, adapters):
    live = service.get("version")["live"]
    for name, needle in (("other_base", "not an adapter for the served base model"),
                         ("corrupt", "cannot be read as safetensors"), ("missing", "is not a directory")):
        out = service.deploy("--adapter", str(adapters[name]))
        assert out.returncode == 1, (name, out.stdout[-1000:], out.stderr[-2000:])
        assert needle in out.stderr and "still serving" in out.stderr, out.stderr[-2000:]
    out = service.deploy("--round", "7")
    assert out.returncode == 1 and "no finished round 7" in out.stderr, out.stderr[-2000:]
    version = service.get("version")
    assert version["live"] == live
    assert [r["path"] for r in version["refused"][-3:]] == [str(adapters[n].resolve()) for n in
                                                            ("other_base", "corrupt", "missing")]
    resp = service.post("recommend", {"history": [1, 2], "k": 2})
    assert resp.status_code == 200 and resp.json()["adapter"]["sha256"] == live["sha256"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_follow_deploys_each_round_as_the_run_finishes_it(service, serve_run_dir, adapters):
    """serve.follow: the run directory gains round 2's manifest (as the driver writes it) and the
    service switches to it; a refused round (corrupt) leaves it serving round 2."""
    _finish_round(serve_run_dir, 2, adapters["new"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and service.get("version")["live"]["round"] != 2:
        time.sleep(1)
    version = service.get("version")
    assert version["live"]["round"] == 2 and version["live"]["sha256"] == _sha(adapters["new"])
    body = service.post("recommend", {"history": [1, 2], "k": 2}).json()
    assert body["round"] == 2 and body["adapter"]["sha256"] == _sha(adapters["new"])
    refused = len(version["refused"])
    _finish_round(serve_run_dir, 3, adapters["corrupt"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(service.get("version")["refused"]) == refused:
        time.sleep(1)
    version = service.get("version")
    assert version["live"]["round"] == 2 and version["refused"][-1]["path"] == str(adapters["corrupt"].resolve())
    assert "cannot be read" in version["refused"][-1]["reason"]
    out = service.deploy("--round", "1")  # final.json's round, deployed by number like any round
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["live"]["round"] == 1 and service.get("version")["live"]["round"] == 1
