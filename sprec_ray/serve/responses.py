"""Response bodies, declared for openapi.json (`/docs`). The replicas build them as plain dicts
(recommender.py); these models are their documentation, so a field added there belongs here too."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

_CUT = "how many of the oldest history items the prompt left out (the model sees the last data.max_history)"


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
    round: int = Field(description="self-play round of the served adapter")


class RankedItem(Item):
    logprob: float = Field(description="summed log-prob of the answer's tokens")
    tokens: int = Field(description="tokens in the answer")


class RankResponse(BaseModel):
    items: list[RankedItem] = Field(description="best first, the top k")
    scoring: str = Field(description="logprob-mean or logprob-sum (eval.logprob_norm)")
    dropped: list[int] = Field(description="candidates left out because they are in the history (drop_history)")
    history_cut: int = Field(description=_CUT)
    round: int


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="position of the document in the request")
    relevance_score: float = Field(description="exp(score): the probability of answering the document, 0..1")
    logprob: float = Field(description="the score itself (log-prob, eval.logprob_norm)")
    document: RerankDocument | None = Field(None, description="only with return_documents")


class RerankResponse(BaseModel):
    id: str
    model: str = Field(description="the served run: '<run dir name>/round-<n>'")
    results: list[RerankResult] = Field(description="best first, the top n")
    not_in_catalogue: list[int] = Field(description="indices of documents that are not catalogue titles, scored "
                                                    "as free text")
    scoring: str
    history_cut: int = Field(description=_CUT)
    round: int
    meta: dict = Field(description="Cohere's meta: api_version and billed_units")


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong, in JSON terms")
    field: str | None = Field(None, description="the offending field, e.g. history or documents[2]")


class ReadyResponse(BaseModel):
    ready: bool = Field(description="a model replica answered a ping within 2 s")
    round: int
    reason: str | None = Field(None, description="why not: no replica answered, replica lost, shutting down")
