import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reference import load_dataset, read_interactions

from sprec_ray.config import DataConfig
from sprec_ray.data.catalogue import catalogue_from_titles, load_sprec_catalogue
from sprec_ray.data.prompts import names_several_titles, parse_response, render_prompt, render_response
from sprec_ray.data.readers import read_sdpo_json, read_sprec_json
from sprec_ray.data.records import DataError
from sprec_ray.data.sharding import PromptShards, write_examples_parquet

CAT = catalogue_from_titles(["Alpha", 'A Child Called "It" (Dave Pelzer #1)', "Gamma, Delta", "Beta"],
                            [["fiction"], ["history"], ["fiction", "romance"], []])


def _row(history, target):
    listed = ", ".join(f'"{t}"' for t in history)
    return {"instruction": "x", "input": f"The user has played the following books before: {listed}, please write",
            "output": f'"{target}"\n'}


def test_sprec_reader_parses_titles_with_quotes_and_commas(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([_row(["Alpha", 'A Child Called "It" (Dave Pelzer #1)', "Gamma, Delta"], "Beta")]))
    examples, bad = read_sprec_json(path, CAT)
    assert len(bad) == 0
    assert examples[0].history == (0, 1, 2) and examples[0].target == 3


def test_sprec_reader_reports_every_bad_row_by_number(tmp_path):
    rows = [_row(["Alpha"], "Beta"), {"input": "no quotes here", "output": '"Beta"'}, _row(["Nope"], "Beta"),
            _row(["Alpha"], "Unknown target"), {"output": '"Beta"'}, [1, 2], _row(["Beta"], "Alpha")]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows))
    examples, bad = read_sprec_json(path, CAT)
    assert [e.row_id for e in examples] == [0, 6]
    reasons = dict(bad.rows)
    assert sorted(reasons) == [1, 2, 3, 4, 5]
    assert "empty history" in reasons[1] and "'Nope'" in reasons[2] and "Unknown target" in reasons[3]
    assert "input" in reasons[4] and "object" in reasons[5]
    assert "5 bad rows" in bad.summary()


def test_strict_mode_names_file_and_row(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([_row(["Alpha"], "Beta"), _row(["Nope"], "Beta")]))
    with pytest.raises(DataError, match=r"train.json: row 1: unknown title in history: 'Nope'"):
        read_sprec_json(path, CAT, strict=True)


def test_malformed_json_lines_are_reported_and_broken_arrays_rejected(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(_row(["Alpha"], "Beta")) + "\n{not json\n" + json.dumps(_row(["Beta"], "Alpha")) + "\n")
    examples, bad = read_sprec_json(path, CAT)
    assert len(examples) == 2 and bad.rows[0][0] == 1 and "malformed JSON" in bad.rows[0][1]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"input": "x",\n  "output": }]')
    with pytest.raises(DataError, match="line 2 column"):
        read_sprec_json(broken, CAT)


def test_sdpo_reader_builds_catalogue_and_candidates(tmp_path):
    rows = [{"historyList": "A::B", "itemList": ["C", "D", "E"], "trueSelection": "D"},
            {"historyList": "", "itemList": ["C"], "trueSelection": "C"},
            {"historyList": "A", "itemList": ["C"], "trueSelection": "Z"},
            {"historyList": "A", "itemList": "C"}]
    path = tmp_path / "val.json"
    path.write_text(json.dumps(rows))
    catalogue, examples, bad = read_sdpo_json(path)
    assert catalogue.titles == ("A", "B", "C", "D", "E")
    assert examples[0].history == (0, 1) and examples[0].target == 3 and examples[0].candidates == (2, 3, 4)
    assert [r for r, _ in bad.rows] == [1, 2, 3]
    assert "empty history" in bad.rows[0][1] and "not in itemList" in bad.rows[1][1]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_interactions_leave_last_out_split(tmp_path, fmt):
    table = pa.table({"user": ["u1"] * 5 + ["u2"] * 3 + ["u3", None],
                      "item": ["a", "b", "c", "d", "e", "a", "c", "b", "a", "b"],
                      "timestamp": [5, 1, 2, 3, 4, 10, 30, 20, 1, 2]})
    path = tmp_path / f"log.{fmt}"
    if fmt == "csv":
        import pyarrow.csv as pacsv
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    items = tmp_path / "items.csv"
    items.write_text("item,title,genres\na,Book A,fiction|romance\nb,Book B,\nc,Book C,history\nd,Book D,\ne,Book E,\n")
    catalogue, splits, bad = read_interactions(path, items, max_history=2)
    assert catalogue.titles[:2] == ("Book A", "Book B") and catalogue.genres[0] == ("fiction", "romance")
    # u1 in time order: b c d e a; u2: a b c
    test = {e.user: e for e in splits["test"]}
    assert test["u1"].history == (3, 4) and test["u1"].target == 0
    assert test["u2"].history == (0, 1) and test["u2"].target == 2
    valid = {e.user: e for e in splits["valid"]}
    assert valid["u1"].target == 4 and valid["u1"].history == (2, 3)
    assert [(e.history, e.target) for e in splits["train"] if e.user == "u1"] == [((1,), 2), ((1, 2), 3)]
    assert bad.rows == [(9, "missing user or item")]


def test_interactions_missing_column_is_a_clear_error(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item\nu,a\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['timestamp'\]"):
        read_interactions(path)


def test_prompt_is_one_template_and_response_round_trips():
    prompt = render_prompt(["Alpha", "Beta"])
    assert prompt.endswith("### Response:\n") and '"Alpha", "Beta"' in prompt
    assert "### Input:" not in render_prompt([])
    assert parse_response(render_response("Alpha")) == "Alpha"


def test_parse_response_reads_the_first_quoted_title_or_the_whole_catalogue_title():
    quoted = 'A Child Called "It" (Dave Pelzer #1)'
    catalogue = {quoted, "Alpha", "Plain Title"}
    assert parse_response(render_response(quoted), catalogue) == quoted  # a title that holds quotes
    assert parse_response(render_response(quoted)) == "A Child Called"  # without the catalogue: first quoted text
    assert parse_response('"Alpha", "Beta", "Gamma"', catalogue) == "Alpha"  # several titles: the first
    assert parse_response('"New Book (Series, #1)"\nmore text', catalogue) == "New Book (Series, #1)"
    assert parse_response('Sure: "Beta" is next', catalogue) == "Beta"
    assert parse_response("Plain Title", catalogue) == "Plain Title"  # the whole answer is a catalogue title
    assert parse_response("no quotes\nsecond", catalogue) == "no quotes"  # SPRec's evaluation: the first line
    for unparsed in ('"Beta, the unfinished', '""', "", '"Alpha\n"'):
        assert parse_response(unparsed, catalogue) == "", unparsed
    assert names_several_titles('"Alpha", "Beta"', catalogue) and not names_several_titles(render_response(quoted), catalogue)
    assert not names_several_titles('"Alpha"\n"Beta"', catalogue)  # only the first line is the answer


def test_load_dataset_counts_popularity_and_hashes(tiny_data_dir, tmp_path):
    data = load_dataset(DataConfig(path=str(tiny_data_dir), train_samples=50), tmp_path, seed=3)
    assert len(data.train) == 50
    assert data.catalogue.popularity.sum() == sum(len(e.history) + 1 for e in data.train)
    assert all(len(h) == 64 for h in data.source_hashes.values())
    assert load_dataset(DataConfig(path=str(tiny_data_dir), train_samples=50), tmp_path, seed=3).train == data.train


def test_goodreads_sample_reads_cleanly(goodreads_dir, tmp_path):
    data = load_dataset(DataConfig(path=str(goodreads_dir)), tmp_path)
    assert len(data.catalogue) == 4058
    assert len(data.train) + len(data.bad[0]) == 3626 and len(data.valid) + len(data.bad[1]) == 400
    assert len(data.bad[0]) < 10  # the sample is clean; what is bad is reported, never silently lost
    child = load_sprec_catalogue(goodreads_dir).id_of('A Child Called "It" (Dave Pelzer #1)')
    assert child is None or any(child in e.history for e in data.train + data.valid)


def test_default_data_path_finds_the_shipped_sample_from_any_cwd(goodreads_dir, tmp_path, monkeypatch):
    from sprec_ray.config import load_config
    from sprec_ray.data.dataset import REPO_ROOT, resolve_data_path

    monkeypatch.chdir(tmp_path)  # a fresh clone run from elsewhere: no ../shared, no data/ in the cwd
    cfg = load_config(REPO_ROOT / "configs" / "default.yaml").data
    assert resolve_data_path(cfg, tmp_path) == goodreads_dir.resolve()
    assert resolve_data_path(DataConfig(path="bundled"), tmp_path) == goodreads_dir.resolve()
    generated = resolve_data_path(DataConfig(path="synthetic"), tmp_path)
    assert generated.is_relative_to(tmp_path) and (generated / "train.json").exists()
    with pytest.raises(DataError, match="no/such/dir"):
        resolve_data_path(DataConfig(path="no/such/dir"), tmp_path)


def test_default_run_starts_from_the_shipped_warm_start_from_any_cwd(tmp_path, monkeypatch):
    import json

    from sprec_ray.config import load_config
    from sprec_ray.data.dataset import REPO_ROOT, from_checkout

    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO_ROOT / "configs" / "default.yaml")
    adapter = from_checkout(cfg.selfplay.init_adapter)
    assert adapter == REPO_ROOT / "adapters" / "smollm2-goodreads-sft" and (adapter / "adapter_config.json").is_file()
    manifest = json.loads((adapter / "manifest.json").read_text())
    # trained by configs/warmstart.yaml, in the default config's prompt format and LoRA shape, on its data
    warm = load_config(REPO_ROOT / "configs" / "warmstart.yaml")
    assert (warm.lora, warm.model, warm.data.path) == (cfg.lora, cfg.model, cfg.data.path)
    trained = manifest["config"]
    assert trained["sft"]["lr"] == warm.sft.lr and trained["lora"]["r"] == cfg.lora.r and trained["data"]["path"] == cfg.data.path
    # all 400 validation rows but one, whose history holds a title missing from the catalogue
    assert trained["data"]["train_samples"] == 0 and manifest["validation"]["metrics"]["n_rows"] == 399


def test_prompts_are_built_from_sharded_parquet(tiny_data, tmp_path):
    examples = tiny_data.train[:40]
    paths = write_examples_parquet(examples, tmp_path / "shards", num_shards=4)
    assert len(paths) == 4
    rows = PromptShards(str(tmp_path / "shards"), tiny_data.catalogue.titles, "books").table().to_pylist()
    assert sorted(r["row_id"] for r in rows) == sorted(e.row_id for e in examples)
    by_id = {r["row_id"]: r for r in rows}
    titles = tiny_data.catalogue.titles
    for e in examples:
        assert by_id[e.row_id]["prompt"] == render_prompt([titles[i] for i in e.history])
        assert by_id[e.row_id]["response"] == render_response(titles[e.target])
