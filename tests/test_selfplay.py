"""The driver end to end on the tiny model: phases, manifests, report, and kill-then-resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from sprec_ray.artefacts import read_catalogue
from sprec_ray.config import load_config
from sprec_ray.data.catalogue import load_sprec_catalogue
from sprec_ray.selfplay import run_selfplay

REPO = Path(__file__).resolve().parents[1]
PHASES = ["prepare", "r0_sft", "r0_eval", "r1_negatives", "r1_sft", "r1_dpo", "r1_eval"]


def _overrides(out: Path, data_dir: Path) -> list[str]:
    return [f"output_dir={out}", f"data.path={data_dir}", "data.train_samples=48", "data.valid_samples=12",
            "selfplay.rounds=1", "selfplay.round_samples=24", "generation.backend=hf",
            # greedy, the random tiny model emits only newlines (no title, so no pair); sampled text gives
            # the self-play negatives something to reject (eval stays greedy)
            "generation.decoding=sample", "generation.temperature=2.0"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_data_dir, ray_session):
    out = tmp_path_factory.mktemp("run") / "a"
    cfg = load_config(REPO / "configs" / "tiny.yaml", _overrides(out, tiny_data_dir))
    results = run_selfplay(cfg)
    return out, results


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_run_writes_every_phase_report_and_final_model(finished_run, tiny_data_dir):
    out, results = finished_run
    assert sorted(json.loads((out / "manifests" / f"{p}.json").read_text())["phase"] for p in PHASES) == sorted(PHASES)
    manifest = json.loads((out / "manifests" / "r1_dpo.json").read_text())
    assert manifest["versions"]["ray"] and manifest["data_hashes"] and manifest["seed"] == 0
    assert Path(manifest["outputs"]["adapter"], "adapter_config.json").exists()
    final = json.loads((out / "final.json").read_text())  # run-relative: the run dir may be mounted elsewhere
    assert out / final["adapter"] == Path(manifest["outputs"]["adapter"]) and final["round"] == 1
    assert final["base_model"] == "base_model/tiny-llama" and (out / final["base_model"] / "config.json").exists()
    assert read_catalogue(out).titles == load_sprec_catalogue(tiny_data_dir).titles
    assert [label for label, _ in results] == ["r0 (SFT)", "r1"]
    for _, metrics in results:
        for key in ("NDCG@5", "HR@5", "DivRatio@5", "ORRatio@5"):
            assert 0.0 <= metrics[key] <= 1.0 + 1e-9, key
        # genre unfairness is undefined (NaN) only when nothing at all was recommended
        assert (metrics["n_grounded"] == 0) == math.isnan(metrics["MGU@5"])
        assert metrics["n_rows"] == 12
    assert (out / "report.md").read_text().count("| r1 |") == 3  # one table per K
    page = (out / "report.html").read_text()  # self-contained: rows per K, inline plots, every phase timed
    assert page.count("<td>r1</td>") == 3 and page.count("data:image/png;base64,") == 3
    assert all(f"<td>{p}</td>" in page for p in PHASES)
    assert (out / "rounds_at5.png").stat().st_size > 10_000
    negatives = json.loads((out / "manifests" / "r1_negatives.json").read_text())["metrics"]
    assert negatives["rows_kept"] + negatives["rows_dropped"] == negatives["rows"] == 24
    assert negatives["negatives"] == negatives["rows_kept"] > 0  # K = 1: one rejected response per kept row
    assert manifest["metrics"]["pairs"] == negatives["rows_kept"] - negatives["rows_too_long"]
    # the model's own texts reach the DPO shards verbatim, for exactly the kept rows
    table = pq.read_table(out / "r1" / "negatives.parquet").to_pydict()
    kept = {row: texts for row, texts in zip(table["row_id"], table["rejected_text"], strict=True) if texts}
    shards = pq.read_table(out / "data" / "r1_dpo").to_pydict()
    assert dict(zip(shards["row_id"], shards["rejected_text"], strict=True)) == kept


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_rerun_without_resume_refuses_to_overwrite(finished_run, tiny_data_dir):
    out, _ = finished_run
    cfg = load_config(REPO / "configs" / "tiny.yaml", _overrides(out, tiny_data_dir))
    with pytest.raises(FileExistsError, match="--resume"):
        run_selfplay(cfg)
    changed = load_config(REPO / "configs" / "tiny.yaml", [*_overrides(out, tiny_data_dir), "dpo.beta=0.5"])
    with pytest.raises(RuntimeError, match="config changed"):
        run_selfplay(changed, resume=True)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_killed_driver_resumes_to_the_same_metrics(finished_run, tiny_data_dir, tmp_path):
    reference, _ = finished_run
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "sprec_ray.cli", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
           *_overrides(out, tiny_data_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    # Kill the driver (and its local Ray) once the round's negatives exist: mid-way through r1.
    while not (out / "manifests" / "r1_negatives.json").exists():
        assert proc.poll() is None, "driver exited before the kill point"
        assert time.time() < deadline, "driver never reached r1_negatives"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifests" / "r1_eval.json").exists()
    done = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already done (resume), skipping" in done.stderr
    assert json.dumps(_quality(out), sort_keys=True) == json.dumps(_quality(reference), sort_keys=True)  # NaN-safe
    # stronger than the metrics (a tiny random model recommends little): the final weights match
    got, want = (load_file(r / json.loads((r / "final.json").read_text())["adapter"] / "adapter_model.safetensors")
                 for r in (out, reference))
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, atol=1e-6), name


def _quality(run: Path) -> list[dict]:
    """Per-round ranking metrics and counts; timings legitimately differ between runs."""
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    return [{k: v for k, v in r.items() if "@" in k or k.startswith("n_") or k == "label"} for r in rounds]
