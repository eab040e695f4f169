"""The driver end to end on the tiny model: phases, manifests, report, test split, the candidate
task, side-effect-free eval, and kill-then-resume."""

import hashlib
import json
import math
import os
import shutil
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
from sprec_ray.cli import main
from sprec_ray.config import load_config
from sprec_ray.data.candidates import candidates_of
from sprec_ray.data.catalogue import load_sprec_catalogue
from sprec_ray.data.prepared import open_prepared
from sprec_ray.selfplay import run_selfplay

REPO = Path(__file__).resolve().parents[1]
PHASES = ["prepare", "r0_sft", "r0_eval", "r1_negatives", "r1_sft", "r1_dpo", "r1_eval", "r1_test"]
TEST_ROWS = 6


def _overrides(out: Path, data_dir: Path) -> list[str]:
    return [f"output_dir={out}", f"data.path={data_dir}", "data.train_samples=48", "data.valid_samples=12",
            "selfplay.rounds=1", "selfplay.round_samples=24", "generation.backend=hf",
            # greedy, the random tiny model emits only newlines (no title, so no pair); sampled text gives
            # the self-play negatives something to reject (eval stays greedy)
            "generation.decoding=sample", "generation.temperature=2.0"]


@pytest.fixture(scope="module")
def data_dir(tiny_data_dir, tmp_path_factory) -> Path:
    """The tiny set plus a test.json (a few train rows: plumbing, not a held-out measurement)."""
    src = shutil.copytree(tiny_data_dir, tmp_path_factory.mktemp("data") / "with_test")
    (src / "test.json").write_text(json.dumps(json.loads((src / "train.json").read_text())[:TEST_ROWS]))
    return src


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir, ray_session):
    out = tmp_path_factory.mktemp("run") / "a"
    cfg = load_config(REPO / "configs" / "tiny.yaml", _overrides(out, data_dir))
    results = run_selfplay(cfg)
    return out, results


@pytest.fixture(scope="module")
def candidate_run(finished_run, data_dir, tmp_path_factory):
    """The candidate task from the finished run's warm start: one self-play round whose negatives are
    the model's own wrong picks among 5 candidates per row; only the final adapter is scored, on valid
    and test (eval.every_round=false: the warm start was scored in the finished run), both by its
    answers and by ranking the candidates by log-prob."""
    warm = json.loads((finished_run[0] / "manifests" / "r0_sft.json").read_text())["outputs"]["adapter"]
    out = tmp_path_factory.mktemp("run") / "cand"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [*_overrides(out, data_dir), "selfplay.round_samples=8",
                                                       f"selfplay.init_adapter={warm}", "data.task=candidates",
                                                       "data.num_candidates=5", "eval.every_round=false",
                                                       "eval.candidate_scoring=logprob"])
    run_selfplay(cfg)
    return out


def _files(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_run_writes_every_phase_report_and_final_model(finished_run, data_dir):
    out, results = finished_run
    assert sorted(json.loads((out / "manifests" / f"{p}.json").read_text())["phase"] for p in PHASES) == sorted(PHASES)
    manifest = json.loads((out / "manifests" / "r1_dpo.json").read_text())
    assert manifest["versions"]["ray"] and manifest["data_hashes"] and manifest["seed"] == 0
    assert Path(manifest["outputs"]["adapter"], "adapter_config.json").exists()
    final = json.loads((out / "final.json").read_text())  # run-relative: the run dir may be mounted elsewhere
    assert out / final["adapter"] == Path(manifest["outputs"]["adapter"]) and final["round"] == 1
    assert final["base_model"] == "base_model/tiny-llama" and (out / final["base_model"] / "config.json").exists()
    assert read_catalogue(out).titles == load_sprec_catalogue(data_dir).titles
    assert [label for label, _ in results] == ["r0 (SFT)", "r1"]
    for _, metrics in results:
        for key in ("NDCG@5", "HR@5", "DivRatio@5", "ORRatio@5"):
            assert 0.0 <= metrics[key] <= 1.0 + 1e-9, key
        # genre unfairness is undefined (NaN) only when nothing at all was recommended
        assert (metrics["n_grounded"] == 0) == math.isnan(metrics["MGU@5"])
        assert metrics["n_rows"] == 12
    # the final adapter on the test split, apart from validation: its own phase, metrics.json section and tables
    test = json.loads((out / "manifests" / "r1_test.json").read_text())["metrics"]
    assert json.loads((out / "metrics.json").read_text())["test"] == [{"label": "r1", "round": 1, **test}]
    assert test["n_rows"] == TEST_ROWS and 0.0 <= test["HR@5"] <= 1.0 and "cand_HR@1" not in test
    assert not (out / "manifests" / "r0_test.json").exists()  # eval.test_every_round is off
    validation, test_section = (out / "report.md").read_text().split("## Test split")
    assert validation.count("| r1 |") == 3 and test_section.count("| r1 |") == 3  # one table per K
    page = (out / "report.html").read_text()  # self-contained: rows per K, inline plots, every phase timed
    assert page.count("<td>r1</td>") == 6 and page.count("data:image/png;base64,") == 3
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


def test_export_ships_the_final_adapter_with_what_made_it(finished_run, tmp_path, capsys):
    out, _ = finished_run
    dest = tmp_path / "shipped"
    assert main(["export", "--run", str(out), "--to", str(dest)]) == 0
    final = out / json.loads((out / "final.json").read_text())["adapter"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (dest / name).read_bytes() == (final / name).read_bytes()
    manifest = json.loads((dest / "manifest.json").read_text())
    dpo, scored = (json.loads((out / "manifests" / f"{p}.json").read_text()) for p in ("r1_dpo", "r1_eval"))
    assert manifest["trained_by"] == "r1_dpo" and manifest["training"]["steps"] == dpo["metrics"]["steps"]
    assert manifest["validation"] == {"phase": "r1_eval", "metrics": scored["metrics"]}
    assert manifest["data"]["sha256"] == dpo["data_hashes"] and manifest["config_digest"] == dpo["config_digest"]
    weights = manifest["base_model"]["weights_sha256"]
    assert weights and all(len(h) == 64 for h in weights.values()) and manifest["versions"]["torch"]
    assert json.loads(capsys.readouterr().out)["exported"] == str(dest.resolve())
    assert main(["export", "--run", str(tmp_path), "--to", str(tmp_path / "x")]) == 2  # no finished run there


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_candidate_task_trains_on_wrong_candidates_and_reports_hr1_and_valid_ratio(candidate_run):
    metrics = json.loads((candidate_run / "metrics.json").read_text())
    [valid], [test] = metrics["rounds"], metrics["test"]  # the final adapter, on each split
    assert not (candidate_run / "manifests" / "r0_eval.json").exists() and (candidate_run / "manifests" / "r1_negatives.json").exists()
    assert test["label"] == "r1" and (valid["n_rows"], test["n_rows"]) == (12, TEST_ROWS)
    for split, m in (("eval", valid), ("test", test)):
        predictions = [json.loads(line) for line in (candidate_run / "r1" / f"{split}_predictions.jsonl").read_text().splitlines()]
        assert all(len(set(p["candidates"])) == 5 and p["target"] in p["candidates"] for p in predictions)
        assert m["cand_ValidRatio"] == sum(len(p["named"]) == 1 for p in predictions) / len(predictions)
        assert 0.0 <= m["cand_HR@1"] <= 1.0 and "HR@1" in m  # beside, not instead of, the grounded metrics
    # the round's DPO rejected only non-target candidates of each row, and every completion is accounted for
    stats = json.loads((candidate_run / "manifests" / "r1_negatives.json").read_text())["metrics"]
    negatives = pq.read_table(candidate_run / "r1" / "negatives.parquet").to_pylist()
    assert stats["negatives"] == stats["own_wrong"] + stats["random_fill"] == len(negatives) == 8
    assert stats["completions"] == sum(stats[k] for k in ("own_wrong", "equal_to_positive", "no_candidate",
                                                          "several_candidates", "duplicates", "surplus"))
    prepared = open_prepared(candidate_run / "data" / "prepared")
    rows = {e.row_id: e for e in prepared.rows("train")}
    for row in negatives:
        e = rows[row["row_id"]]
        assert row["negatives"][0] in candidates_of(e, len(prepared.catalogue), 5, seed=0) and row["negatives"][0] != e.target
    assert json.loads((candidate_run / "manifests" / "r1_dpo.json").read_text())["metrics"]["pairs"] == 8
    report = (candidate_run / "report.md").read_text()
    assert report.count("## candidate task") == 1 and "### test candidate task" in report
    # log-prob ranking of the same lists: every candidate scored, so the target is always in the top 5 of 5
    final = metrics["rounds"][-1]
    assert final["rank_HR@5"] == 1.0 and 0.0 <= final["rank_HR@1"] <= final["rank_NDCG@5"] <= 1.0
    predictions = [json.loads(line) for line in (candidate_run / "r1" / "eval_predictions.jsonl").read_text().splitlines()]
    assert all(sorted(p["ranked"]) == sorted(p["candidates"]) for p in predictions)
    hits = sum(p["ranked"][0] == p["target"] for p in predictions) / len(predictions)
    assert final["rank_HR@1"] == pytest.approx(hits)
    assert report.count("## candidates ranked by log-prob") == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eval_with_out_leaves_the_run_byte_identical(candidate_run, tmp_path, capsys):
    before = _files(candidate_run)
    assert main(["eval", "--run", str(candidate_run), "--split", "test", "--out", str(tmp_path / "m.json")]) == 0
    assert _files(candidate_run) == before
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert (metrics["split"], metrics["task"], metrics["n_rows"]) == ("test", "candidates", TEST_ROWS)
    assert 0.0 <= metrics["cand_ValidRatio"] <= 1.0
    assert len((tmp_path / "m.predictions.jsonl").read_text().splitlines()) == TEST_ROWS
    (tmp_path / "bad.json").write_text(json.dumps([{"input": '"Nowhere Book"', "output": '"Nowhere Book"'}]))
    assert main(["eval", "--run", str(candidate_run), "--data", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b.json")]) == 2
    assert "row 0: unknown title in history: 'Nowhere Book'" in capsys.readouterr().err
    assert _files(candidate_run) == before and not (tmp_path / "b.json").exists()
    assert main(["eval", "--run", str(candidate_run), "--out", str(candidate_run / "m.json")]) == 2
    assert "lies inside the run directory" in capsys.readouterr().err
    assert _files(candidate_run) == before


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_generate_task_run_ranks_sampled_candidate_lists_by_log_prob(finished_run, tmp_path):
    """Any run can rerank a list it was never shown: its own plain prompt, 5 sampled candidates per row."""
    run = finished_run[0]
    assert main(["eval", "--run", str(run), "--out", str(tmp_path / "m.json"), "eval.candidate_scoring=logprob",
                 "data.num_candidates=5", "eval.logprob_norm=sum"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["task"] == "generate" and metrics["rank_HR@5"] == 1.0 and "cand_HR@1" not in metrics
    predictions = [json.loads(line) for line in (tmp_path / "m.predictions.jsonl").read_text().splitlines()]
    assert all(len(p["ranked"]) == 5 and p["target"] in p["ranked"] for p in predictions)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_rerun_without_resume_refuses_to_overwrite(finished_run, data_dir):
    out, _ = finished_run
    cfg = load_config(REPO / "configs" / "tiny.yaml", _overrides(out, data_dir))
    with pytest.raises(FileExistsError, match="--resume"):
        run_selfplay(cfg)
    changed = load_config(REPO / "configs" / "tiny.yaml", [*_overrides(out, data_dir), "dpo.beta=0.5"])
    with pytest.raises(RuntimeError, match="config changed"):
        run_selfplay(changed, resume=True)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_killed_driver_resumes_to_the_same_metrics(finished_run, data_dir, tmp_path, ray_session):
    """The driver joins the session's Ray, as a `ray job` driver joins its cluster, and is killed with
    everything it owns (a second local Ray beside the session's made both crawl: 30 s to hand rows over)."""
    reference, _ = finished_run
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "sprec_ray.cli", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
           *_overrides(out, data_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    # Kill the driver (its train workers and generation actors die with it) once the round's negatives
    # exist: mid-way through r1.
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
