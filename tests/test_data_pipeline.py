"""The Ray raw-log pipeline and prepared example shards, against the in-memory reader."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from reference import load_dataset, read_interactions

from sprec_ray.config import DataConfig
from sprec_ray.data import pipeline
from sprec_ray.data.catalogue import load_sprec_catalogue
from sprec_ray.data.prepared import examples_from_table, open_prepared, prepare_dataset, sample_examples
from sprec_ray.data.readers import read_sprec_json
from sprec_ray.data.records import DataError
from sprec_ray.data.sharding import PromptShards


def _log(n: int, users: int, items: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"user": [f"u{u}" for u in rng.integers(0, users, n)],
                     "item": [f"i{i}" for i in rng.integers(0, items, n)],
                     "timestamp": rng.integers(0, 50, n)})  # few stamps: ties must fall back to file order


def _all(prepared, split):
    files = sorted(prepared.split_dir(split).glob("*.parquet"))
    rows = [e for f in files for e in examples_from_table(pq.read_table(f))]
    return sorted(rows, key=lambda e: e.row_id)


@pytest.mark.timeout(180)
def test_sequences_and_splits_match_the_current_reader(tmp_path, ray_session, monkeypatch):
    table = _log(3000, 150, 60, seed=4)
    shards = tmp_path / "log"
    shards.mkdir()
    pq.write_table(table.slice(0, 1700), shards / "a.parquet", row_group_size=400)  # several pieces per file
    pq.write_table(table.slice(1700), shards / "b.parquet", row_group_size=400)
    single = tmp_path / "log.parquet"
    pq.write_table(table, single)
    monkeypatch.setattr(pipeline, "ROWS_PER_PIECE", 500)
    catalogue, splits, bad = read_interactions(single, max_history=4)
    assert len(bad) == 0
    data = prepare_dataset(DataConfig(path=str(shards), format="interactions", max_history=4, num_shards=3),
                           tmp_path / "prep", tmp_path)
    assert data.manifest["pieces"] > 2 and data.manifest["buckets"] == 3
    assert data.catalogue.titles == catalogue.titles
    for split in ("train", "valid", "test"):
        want = sorted(splits[split], key=lambda e: e.row_id)
        assert _all(data, split) == want, split  # same row ids, users, histories (in order) and targets
    want_pop = catalogue.with_popularity(i for e in splits["train"] for i in (*e.history, e.target)).popularity
    assert np.array_equal(data.catalogue.popularity, want_pop)
    assert data.counts == {s: len(v) for s, v in splits.items()} and data.bad_rows == {}
    again = prepare_dataset(DataConfig(path=str(shards), format="interactions", max_history=4, num_shards=3),
                            tmp_path / "prep", tmp_path)
    assert again.manifest == data.manifest  # reopened, not rebuilt


@pytest.mark.timeout(180)
def test_every_kind_of_bad_row_is_written_with_its_row_and_reason(tmp_path, ray_session):
    path = tmp_path / "log.csv"
    path.write_text("user,item,timestamp\nu1,a,1\n,a,2\nu1,,3\nu1,b,soon\nu1,b,nan\nu1,zz,4\nu1,b,5\nu1,a,6\nu2,a,1\nu2,b,2\nu2,a,3\nu1,b,7\n")
    items = tmp_path / "items.csv"
    items.write_text("item,title,genres\na,Book A,fiction|romance\nb,Book B,\n")
    cfg = DataConfig(path=str(path), format="interactions", items_file=str(items))
    data = prepare_dataset(cfg, tmp_path / "prep", tmp_path)
    bad = pq.read_table(tmp_path / "prep" / "bad_rows").sort_by("row").to_pydict()
    assert list(zip(bad["row"], bad["reason"], strict=True)) == [
        (1, "missing user or item"), (2, "missing user or item"), (3, "missing or non-numeric timestamp"),
        (4, "missing or non-numeric timestamp"), (5, "item not in the items table")]
    assert "timestamp='soon'" in bad["value"][2] and "item='zz'" in bad["value"][4]
    assert set(bad["file"]) == {str(path)}
    assert data.bad_rows == {"missing user or item": 2, "missing or non-numeric timestamp": 2,
                             "item not in the items table": 1}
    assert data.catalogue.genres[0] == ("fiction", "romance")
    assert sorted((e.user, e.history, e.target) for e in _all(data, "test")) == [("u1", (0, 1, 0), 1), ("u2", (0, 1), 0)]
    with pytest.raises(DataError, match=r"log.csv: row 1: missing user or item"):
        prepare_dataset(DataConfig(**{**vars(cfg), "strict": True}), tmp_path / "strict", tmp_path)
    missing = tmp_path / "nostamp.csv"
    missing.write_text("user,item\nu,a\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['timestamp'\]"):
        prepare_dataset(DataConfig(path=str(missing), format="interactions"), tmp_path / "m", tmp_path)


def _k_core(rows: list[tuple[str, str]], k: int) -> list[tuple[str, str]]:
    while True:
        users, items = {}, {}
        for u, i in rows:
            users[u] = users.get(u, 0) + 1
            items[i] = items.get(i, 0) + 1
        kept = [(u, i) for u, i in rows if users[u] >= k and items[i] >= k]
        if len(kept) == len(rows):
            return kept
        rows = kept


@pytest.mark.timeout(180)
def test_k_core_keeps_what_a_plain_k_core_keeps(tmp_path, ray_session):
    table = _log(800, 120, 90, seed=7)
    pacsv.write_csv(table, tmp_path / "log.csv")
    data = prepare_dataset(DataConfig(path=str(tmp_path / "log.csv"), format="interactions", k_core=4),
                           tmp_path / "prep", tmp_path)
    kept = _k_core(list(zip(table.column("user").to_pylist(), table.column("item").to_pylist(), strict=True)), 4)
    assert data.catalogue.titles == tuple(sorted({i for _, i in kept}))
    assert data.manifest["kcore_dropped_rows"] == 800 - len(kept) and data.manifest["kcore_rounds"] >= 2
    users = {u for u, _ in kept}
    assert {e.user for e in _all(data, "test")} == users  # every surviving user has >= 4 items


@pytest.mark.timeout(180)
def test_json_formats_go_through_the_same_shards_and_samples_are_seeded(tiny_data_dir, tmp_path, ray_session):
    cfg = DataConfig(path=str(tiny_data_dir), train_samples=50, valid_samples=10)
    data = prepare_dataset(cfg, tmp_path / "prep", tmp_path, seed=3)
    full = load_dataset(DataConfig(path=str(tiny_data_dir)), tmp_path)
    rows = data.rows("train")
    assert len(rows) == 50 == data.counts["train"] and set(rows) <= set(full.train)
    assert data.catalogue.popularity.sum() == sum(len(e.history) + 1 for e in rows)
    valid = data.rows("valid")
    assert len(valid) == 10 and set(valid) < set(full.valid)
    # another seed trains on other rows but is scored on the same ones
    other = prepare_dataset(cfg, tmp_path / "prep4", tmp_path, seed=4)
    assert other.rows("train") != rows and other.rows("valid") == valid
    picked = data.rows("train", 20, seed=1)
    assert len(picked) == 20 and picked == sample_examples(data.split_dir("train"), 20, 1) and set(picked) <= set(rows)
    assert picked != data.rows("train", 20, seed=2)
    assert data.head("train", 7) == examples_from_table(pq.read_table(sorted(data.split_dir("train").glob("*.parquet"))[0]))[:7]


@pytest.mark.timeout(180)
def test_a_json_test_file_is_the_test_split_and_a_missing_one_none(tiny_data_dir, tmp_path, ray_session):
    src = shutil.copytree(tiny_data_dir, tmp_path / "src")
    assert not prepare_dataset(DataConfig(path=str(src)), tmp_path / "none", tmp_path).counts["test"]
    (src / "test.json").write_text(json.dumps(json.loads((src / "train.json").read_text())[:9]))
    want, _ = read_sprec_json(src / "test.json", load_sprec_catalogue(src))
    data = prepare_dataset(DataConfig(path=str(src)), tmp_path / "prep", tmp_path)
    assert data.counts["test"] == 9 and data.rows("test") == want and str(src / "test.json") in data.source_hashes
    sampled = prepare_dataset(DataConfig(path=str(src), test_samples=4), tmp_path / "sampled", tmp_path)
    assert sampled.counts["test"] == 4 and set(sampled.rows("test")) < set(want)
    assert open_prepared(tmp_path / "sampled").counts == sampled.counts  # reopened as it is, reading only


@pytest.mark.timeout(180)
def test_prompts_from_the_prepared_shards(tmp_path, ray_session):
    pq.write_table(_log(2000, 100, 40, seed=2), tmp_path / "log.parquet")
    data = prepare_dataset(DataConfig(path=str(tmp_path / "log.parquet"), format="interactions", num_shards=4),
                           tmp_path / "prep", tmp_path)
    rows = PromptShards(str(data.split_dir("train")), data.catalogue.titles, "books").table().to_pylist()
    assert sorted(r["row_id"] for r in rows) == [e.row_id for e in _all(data, "train")]
    assert all(r["prompt"].endswith("### Response:\n") for r in rows)


@pytest.mark.timeout(120)
def test_cli_prepare_prints_counts_and_train_reuses_the_shards(tiny_data_dir, tmp_path, ray_session, capsys):
    import json

    from sprec_ray.cli import main

    assert main(["prepare", f"output_dir={tmp_path / 'run'}", f"data.path={tiny_data_dir}", "data.train_samples=30"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"] == 30 and printed["bad_rows"] == {} and printed["items"] == 84
    manifest = json.loads((tmp_path / "run" / "data" / "prepared" / "manifest.json").read_text())
    assert manifest["counts"]["train"] == 30 and manifest["source_hashes"]
