"""The tracking backends for real, no Ray: a training phase's step metrics and the driver's per-round
metrics are written through `Tracker` / `log_rounds` and read back with each backend's own reader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sprec_ray.config import load_config
from sprec_ray.train.tracking import Tracker, log_rounds

REPO = Path(__file__).resolve().parents[1]
STEPS = [{"loss": 2.0, "lr": 1e-3}, {"loss": 1.5, "lr": 9e-4}, {"loss": 1.25, "lr": 8e-4}]
ROUNDS = [(0, {"NDCG@5": 0.01, "HR@5": 0.02, "probe_logprob_diff": math.nan}),
          (1, {"NDCG@5": 0.03, "HR@5": 0.05, "probe_logprob_diff": 0.01})]
TESTS = [(1, {"NDCG@5": 0.04, "cand_HR@1": 0.25}), (2, {"NDCG@5": 0.05})]  # round 2: scored on test only


def _run(logger: str, out: Path) -> None:
    """What a run does: one training phase on rank 0 (rank 1 tracks nothing), then the rounds."""
    config = load_config(REPO / "configs" / "tiny.yaml", [f"output_dir={out}", f"train.logger={logger}"]).to_dict()
    for rank in (1, 0):
        tracker = Tracker(rank, logger, out / "tensorboard" / "r0_sft", "r0_sft", config)
        for step, metrics in enumerate(STEPS, start=1):
            tracker.log(step, len(STEPS), metrics)
        tracker.close()
    log_rounds(logger, config, ROUNDS, TESTS)


def _expect(series: dict[str, list[tuple[int, float]]]) -> None:
    assert series["train/loss"] == [(1, 2.0), (2, 1.5), (3, 1.25)]
    assert [s for s, _ in series["train/lr"]] == [1, 2, 3]
    assert series["round/NDCG_at5"] == [(0, 0.01), (1, 0.03)]
    assert series["round/HR_at5"] == [(0, 0.02), (1, 0.05)]
    assert series["round/probe_logprob_diff"] == [(1, 0.01)]  # NaN skipped, never written as a value
    assert series["test/NDCG_at5"] == [(1, 0.04), (2, 0.05)] and series["test/cand_HR_at1"] == [(1, 0.25)]


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run("tensorboard", tmp_path)
    series = {}
    for run in ("r0_sft", "rounds"):
        acc = EventAccumulator(str(tmp_path / "tensorboard" / run))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series[tag] = [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)]
    _expect(series)


def test_mlflow_local_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    _run("mlflow", tmp_path)
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tiny")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["r0_sft", "rounds"]  # rank 1 opened no run
    assert runs["r0_sft"].data.params["lora.r"] == "8" and runs["r0_sft"].info.status == "FINISHED"
    series = {}
    for run in runs.values():
        for key in run.data.metrics:
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            series[key] = [(m.step, pytest.approx(m.value)) for m in history]
    _expect(series)


def _wandb_records(path: Path):
    """Records of an offline run's .wandb file: a LevelDB-style log (7-byte header, 32 KiB blocks,
    chunks of crc32 | length | type) of protobuf `Record`s; wandb ships the proto, not a reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL chunk or the LAST of a split record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_wandb_offline_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run("wandb", tmp_path)
    import wandb

    wandb.teardown()  # finish() can return before wandb-core has written the offline file; exit waits
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # r0_sft and rounds; rank 1 started no run
    series: dict[str, list] = {}
    names = []
    for path in files:
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                names.append(record.run.display_name)
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                for key, value in row.items():
                    if not key.startswith("_"):
                        series.setdefault(key, []).append((row["_step"], pytest.approx(value)))
    assert sorted(names) == ["r0_sft", "rounds"]
    _expect(series)
