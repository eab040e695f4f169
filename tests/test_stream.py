"""A stage past train.stream_rows: each worker streams its own share from the shards (train/stream.py).

The reader and the rank split are checked on files with small row groups; the plans of both paths
for the same shards are compared step by step; a fit with the tiny model and 2 gloo workers
(threshold lowered to 0) killed mid-stage must resume to the weights of one that never stopped.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from sprec_ray.config import load_config
from sprec_ray.data.sharding import PromptShards, write_examples_parquet
from sprec_ray.train.checkpointing import read_state
from sprec_ray.train.phases import PhaseResult, Stage, run_fit
from sprec_ray.train.stream import SpanReader, StreamPlan, split_rows


def _files(tmp_path: Path, sizes: list[int], row_group: int) -> tuple[list[str], pa.Table]:
    tables, files, start = [], [], 0
    for i, n in enumerate(sizes):
        table = pa.table({"row_id": pa.array(range(start, start + n), pa.int64()),
                          "history": pa.array([[start + j] for j in range(n)], pa.list_(pa.int64())),
                          "target": pa.array(range(n), pa.int64()),
                          "candidates": pa.array([[] for _ in range(n)], pa.list_(pa.int64()))})
        files.append(str(tmp_path / f"part-{i:05d}.parquet"))
        pq.write_table(table, files[-1], row_group_size=row_group)
        tables.append(table)
        start += n
    return files, pa.concat_tables(tables)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_row_goes_to_exactly_one_rank_in_equal_shares(tmp_path, world):
    files, whole = _files(tmp_path, [7, 0, 13, 5, 9], row_group=3)
    ranks, total = split_rows(files, world)
    assert total == whole.num_rows == 34
    per = total // world
    seen = []
    for spans in ranks:
        ids = SpanReader(spans).read(0, total).column("row_id").to_pylist()
        assert len(ids) == per
        seen += ids
    # the first world x per rows, each once; the rest (fewer than world) left out
    assert seen == list(range(per * world))


def test_reads_continue_a_stream_and_restart_anywhere(tmp_path):
    files, whole = _files(tmp_path, [10, 11, 6], row_group=4)
    (spans,), _ = split_rows(files, 1)
    ids = whole.column("row_id").to_pylist()
    reader = SpanReader(spans)
    assert [reader.read(o, 5).column("row_id").to_pylist() for o in range(0, 27, 5)] == [ids[o:o + 5] for o in range(0, 27, 5)]
    for offset, count in ((13, 9), (3, 4), (25, 10), (0, 27)):  # seeks, across files and row groups, past the end
        assert reader.read(offset, count).column("row_id").to_pylist() == ids[offset:offset + count]
    assert reader.read(27, 3).num_rows == 0


_BASE = ["seed=5", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "model.max_response_len=64", "sft.lr=0.01",
         "sft.warmup_steps=1", "train.zero_stage=2", "train.checkpoint_every=2", "sft.batch_size=2", "sft.grad_accum=2"]


def _fit(tiny_model_dir: Path, shards: PromptShards, out: Path, name: str, *overrides: str) -> PhaseResult:
    cfg = load_config(None, [f"output_dir={out}", *_BASE, *overrides])
    return run_fit(cfg, tiny_model_dir, [Stage("sft", name, shards, out / "adapter")], None, name)[name]


def _losses(result: PhaseResult) -> list[float]:
    from ray.train import Checkpoint

    return [h["loss"] for h in read_state(Checkpoint(result.checkpoint_path)).history]


@pytest.fixture(scope="module")
def shards(tiny_data, tmp_path_factory) -> PromptShards:
    directory = tmp_path_factory.mktemp("shards")
    write_examples_parquet(tiny_data.train[:45], directory, num_shards=3)  # 45 rows: 22 per rank, 1 left out
    return PromptShards(str(directory), tiny_data.catalogue.titles, "books")


@pytest.mark.parametrize("overrides, needle", [
    (["train.max_tokens_per_batch=64"], r"s: train.max_tokens_per_batch packs batches over a whole shard, "
                                        r"but this stage streams \(more than train.stream_rows=0 rows\)"),
    (["sft.cft.enabled=true"], r"s: sft.cft.enabled needs cf_prompt, but the stage's PromptShards build none"),
    (["train.num_workers=46"], r"s: 45 rows for train.num_workers=46 workers"),
])
def test_a_stage_that_cannot_stream_fails_on_the_driver_naming_why(shards, tmp_path, overrides, needle):
    from sprec_ray.data.records import DataError
    from sprec_ray.train.phases import _shards

    cfg = load_config(None, [f"output_dir={tmp_path}", *_BASE, "train.stream_rows=0", *overrides])
    with pytest.raises(DataError, match=needle):
        _shards(cfg, Stage("sft", "s", shards, tmp_path), cfg.train.num_workers)


@pytest.mark.timeout(120)
def test_a_streamed_share_plans_the_rows_and_batches_the_object_store_path_does(shards, tiny_model_dir, tmp_path,
                                                                                  ray_session):
    """One window per rank: the streamed plan must then be the in-memory plan, row for row and batch for batch."""
    import ray
    from transformers import AutoTokenizer

    from sprec_ray.train.batching import Encoder
    from sprec_ray.train.loop import StepPlan, hyper, load_rows
    from sprec_ray.train.phases import _shards

    cfg = load_config(None, [f"output_dir={tmp_path}", *_BASE, "train.stream_rows=0", "train.stream_window_rows=64"])
    stage = Stage("sft", "s", shards, tmp_path)
    kept = _shards(load_config(None, [f"output_dir={tmp_path}", *_BASE, "train.stream_rows=1000"]), stage, 2)
    streamed = _shards(cfg, stage, 2)
    encoder = Encoder(AutoTokenizer.from_pretrained(tiny_model_dir), cfg.model.max_prompt_len, cfg.model.max_response_len)
    load = lambda table: load_rows(table, "sft", cfg, encoder)  # noqa: E731
    seen = []
    for rank in range(2):
        rows = load(ray.get(kept[rank]))
        plan = StepPlan([r.length for r in rows], hyper(cfg, stage), 0, cfg.seed, torch.device("cpu"))
        stream = StreamPlan(streamed[rank], load, 2, 2, 1, 0, cfg.seed)
        assert stream.total == plan.total == 6  # ceil(ceil(22 / 2) / 2)
        for i in range(plan.total):
            got = [[stream.rows[j] for j in mb] for mb in stream.step(i)]
            assert got == [[rows[j] for j in mb] for mb in plan.step(i)]
        seen += [r.row_id for r in rows]
    assert sorted(seen) == sorted(_row_ids(shards)[:44])  # every row once; the last (45th) left out


def _row_ids(shards: PromptShards) -> list[int]:
    return [i for f in shards.files() for i in pq.read_table(f, columns=["row_id"]).column("row_id").to_pylist()]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_streamed_stage_killed_mid_stage_resumes_to_the_same_weights(shards, tiny_model_dir, tmp_path, ray_session):
    from faults import KillAfterCheckpoints, train_workers

    # Windows of 8 rows = 2 steps each: 22 rows per rank -> windows of 8, 8, 6 -> 6 steps an epoch, 12 in all;
    # killed after step 6's checkpoint or later, so the resume seeks into a window of the second epoch.
    streaming = ["train.stream_rows=0", "train.stream_window_rows=8", "sft.epochs=2", "train.checkpoint_every=2"]
    want = _fit(tiny_model_dir, shards, tmp_path / "whole", "whole", *streaming)
    with KillAfterCheckpoints(tmp_path / "killed" / "ray_results" / "killed", lambda: (train_workers() or [None])[-1],
                              after=3) as fault:
        got = _fit(tiny_model_dir, shards, tmp_path / "killed", "killed", *streaming)
    assert fault.killed is not None
    assert want.metrics["steps"] == got.metrics["steps"] == 12
    assert 1 <= got.metrics["restored_from_step"] < 12
    assert want.metrics["rank0_rows"] == want.metrics["rank1_rows"] == 44  # 22 rows, read once per epoch
    assert _losses(got) == pytest.approx(_losses(want), rel=1e-6)
    a, b = (load_file(str(r.adapter_dir / "adapter_model.safetensors")) for r in (want, got))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
