"""Response bodies, declared for openapi.json (`/docs`). The replicas build them as plain dicts
(recommender.py); these models are their documentation, so a field added there belongs here too."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

_CUT = "how many of the oldest history items the prompt left out (the model sees the last data.max_history)"


class AdapterInfo(BaseModel):
    round: int | None = Field(description="self-play round of the adapter, when known")
    sha256: str | None = Field(description="sha256 of adapter_model.safetensors; null for the bare base model")


class Item(BaseModel):
    id: int = Field(description="catalogue item id")
    title: str
    genres: list[str]
    score: float = Field(description="grounding similarity (/recommend) or answer log-prob (/rank)")


class RecommendResponse(BaseModel):
    items: list[Item] = Field(description="best first")
    generated: list[str] = Field(description="the model's raw answers, before grounding to the catalogue")
    source: Literal["model", "popularity"] = Field(
        description="popularity: the model named no title, so these are the most popular unseen items")
    history_cut: int = Field(description=_CUT)
    round: int | None = Field(description="self-play round of the adapter that answered")
    adapter: AdapterInfo = Field(description="the adapter that answered")


class RankedItem(Item):
    logprob: float = Field(description="summed log-prob of the answer's tokens")
    tokens: int = Field(description="tokens in the answer")


class RankResponse(BaseModel):
    items: list[RankedItem] = Field(description="best first, the top k")
    scoring: str = Field(description="logprob-mean or logprob-sum (eval.logprob_norm)")
    dropped: list[int] = Field(description="candidates left out because they are in the history (drop_history)")
    history_cut: int = Field(description=_CUT)
    round: int | None
    adapter: AdapterInfo


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="position of the document in the request")
    relevance_score: float = Field(description="exp(score): the probability of answering the document, 0..1")
    logprob: float = Field(description="the score itself (log-prob, eval.logprob_norm)")
    document: RerankDocument | None = Field(None, description="only with return_documents")


class RerankResponse(BaseModel):
    id: str
    model: str = Field(description="the served run and adapter: '<run dir name>/round-<n>'")
    results: list[RerankResult] = Field(description="best first, the top n")
    not_in_catalogue: list[int] = Field(description="indices of documents that are not catalogue titles, scored "
                                                    "as free text")
    scoring: str
    history_cut: int = Field(description=_CUT)
    round: int | None
    adapter: AdapterInfo
    meta: dict = Field(description="Cohere's meta: api_version and billed_units")


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong, in JSON terms")
    field: str | None = Field(None, description="the offending field, e.g. history or documents[2]")


class ReadyResponse(BaseModel):
    ready: bool = Field(description="a model replica answered a ping within 2 s")
    round: int | None
    reason: str | None = Field(None, description="why not: no replica answered, replica lost, shutting down")


class AdapterState(AdapterInfo):
    path: str | None = Field(description="the adapter directory; null for the bare base model")


class Refusal(BaseModel):
    path: str
    reason: str


class VersionResponse(BaseModel):
    run: str
    base_model: str
    live: AdapterState = Field(description="the adapter every new request is answered with")
    previous: list[AdapterState] = Field(description="what `sprec-ray deploy --rollback` returns to, newest first")
    refused: list[Refusal] = Field(description="the latest adapters refused (wrong base model, corrupt, missing)")
    follow: bool = Field(description="serve.follow: each finished self-play round is deployed")


class AdapterStats(AdapterInfo):
    responses_total: int = Field(description="/recommend answers by this adapter since the gateway started")
    metrics: dict[str, float] = Field(description="over the window: responses, DivRatio@k, DivCount@k, ORRatio@k, "
                                                  "rows@k, top10_share@1, not_in_catalogue_share, distinct_answers, "
                                                  "popularity_fallback_share")


class StatsResponse(BaseModel):
    live: AdapterInfo
    window: int = Field(description="serve.stats_window: the last this many /recommend answers per adapter")
    ks: list[int] = Field(description="the k of the @k metrics (eval.ks)")
    endpoint: str
    adapters: dict[str, AdapterStats] = Field(description="per adapter, keyed by the first 12 hex digits of its sha256")
