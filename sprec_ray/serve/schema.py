"""Request bodies of `POST /recommend`, `POST /rank` and `POST /v1/rerank`: declared once as pydantic
models (the bounds on their fields come from the run's serve config), so the same declaration
validates a body and documents it in openapi.json. Every bad body becomes a RequestError (4xx +
a message in JSON terms naming the field); messages quote client input only shortened and escaped.

Kept free of Ray and HTTP so the rules are plain functions: the endpoint maps RequestError to a JSON
response with its status code, and nothing a client sends can reach the model unchecked.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    create_model,
)

from ..data.catalogue import Catalogue

MAX_BODY_BYTES = 64 * 1024  # a 50-item history of long titles is ~5 KiB; anything near this is abuse
DEFAULT_K = 10
_MAX_NAMED = 10  # unknown items listed in one error message
_MAX_SHOWN = 40  # characters of a client's value quoted in an error message

# What each field holds: its OpenAPI description, and what an error message says it must be.
FIELD_WHAT = {
    "history": "a list of item ids (integers) or titles (strings), oldest first",
    "candidates": "a list of distinct item ids (integers) or titles (strings) to rank",
    "k": "an integer (how many items to return)",
    "exclude_history": "true or false (leave the history's items out of the answer)",
    "drop_history": "true or false (leave candidates that are in the history out of the ranking)",
    "query": "a string: the user's history, item titles one per line or a JSON array of titles or ids",
    "documents": 'a list of item titles: strings or {"text": string} objects',
    "top_n": "an integer (how many ranked documents to return; all by default)",
    "return_documents": "true or false (echo each document's text in its result)",
    "model": "a string (accepted for client compatibility; the served run answers)",
    "max_tokens_per_doc": "an integer (accepted for client compatibility; documents are titles, never cut)",
}
_ITEM_WHAT = {
    "history": "an item id (integer) or a title (string)",
    "candidates": "an item id (integer) or a title (string)",
    "documents": 'a string or an object {"text": string}',
}


class RequestError(ValueError):
    """A client error: `status` is the HTTP code, `field` the offending JSON field (if any)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, Any]:
        # A lone surrogate from the client must not make the error itself unencodable (a 500).
        out: dict[str, Any] = {"error": _encodable(self.message)}
        if self.field is not None:
            out["field"] = _encodable(self.field)
        return out


@dataclass(frozen=True)
class RecommendRequest:
    history: tuple[int, ...]  # catalogue item ids, oldest first
    k: int
    exclude_history: bool


@dataclass(frozen=True)
class RankRequest:
    history: tuple[int, ...]  # catalogue item ids, oldest first
    candidates: tuple[int, ...]  # distinct ids, in the client's order (the candidate prompt lists them so)
    k: int  # how many ranked candidates to return (at most all of them)
    dropped: tuple[int, ...] = ()  # candidates left out because they are in the history (drop_history)


@dataclass(frozen=True)
class RerankRequest:
    history: tuple[int, ...]  # catalogue item ids, oldest first (from the query)
    documents: tuple[str, ...]  # the texts scored as answers: catalogue titles, or the client's free text
    item_ids: tuple[int | None, ...]  # each document's catalogue id; None = not a catalogue item
    top_n: int
    return_documents: bool


class DocumentObject(BaseModel):
    """A rerank document in object form; only `text` is read."""
    model_config = ConfigDict(strict=True, extra="ignore")
    text: StrictStr = Field(min_length=1, max_length=MAX_BODY_BYTES)


def _field(name: str, **bounds: Any) -> Any:
    return Field(description=FIELD_WHAT[name], **bounds)


_STRICT = ConfigDict(strict=True, extra="forbid")
_Item = StrictInt | StrictStr


@functools.lru_cache(maxsize=32)
def recommend_body(max_history: int, max_k: int) -> type[BaseModel]:
    return create_model(
        "RecommendBody", __config__=_STRICT,
        history=(list[_Item], _field("history", min_length=1, max_length=max_history)),
        k=(StrictInt, _field("k", default=min(DEFAULT_K, max_k), ge=1, le=max_k)),
        exclude_history=(StrictBool, _field("exclude_history", default=True)))


@functools.lru_cache(maxsize=32)
def rank_body(max_history: int, max_candidates: int) -> type[BaseModel]:
    return create_model(
        "RankBody", __config__=_STRICT,
        history=(list[_Item], _field("history", min_length=1, max_length=max_history)),
        candidates=(list[_Item], _field("candidates", min_length=1, max_length=max_candidates)),
        # absent = all candidates (at most 10); an explicit null is refused like any non-integer
        k=(StrictInt, _field("k", default=None, ge=1, le=max_candidates)),
        drop_history=(StrictBool, _field("drop_history", default=False)))


@functools.lru_cache(maxsize=32)
def rerank_body(max_candidates: int) -> type[BaseModel]:
    # Cohere's optional fields may come as null (clients that pass None through).
    return create_model(
        "RerankBody", __config__=_STRICT,
        model=(StrictStr | None, _field("model", default=None, max_length=200)),
        query=(StrictStr, _field("query", min_length=1, max_length=MAX_BODY_BYTES)),
        documents=(list[StrictStr | DocumentObject], _field("documents", min_length=1, max_length=max_candidates)),
        top_n=(StrictInt | None, _field("top_n", default=None, ge=1)),
        return_documents=(StrictBool | None, _field("return_documents", default=False)),
        max_tokens_per_doc=(StrictInt | None, _field("max_tokens_per_doc", default=None, ge=1)))


def check_body_size(content_length: str | None, body: bytes | None = None,
                    limit: int = MAX_BODY_BYTES) -> None:
    """413 before reading when the declared length is too big, and again on the bytes received."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestError(400, f"invalid Content-Length header {_show(content_length)}") from None
        if declared > limit:
            raise RequestError(413, f"request body is {declared} bytes; the limit is {limit}")
    if body is not None and len(body) > limit:
        raise RequestError(413, f"request body is {len(body)} bytes; the limit is {limit}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def load_json(body: bytes | str) -> Any:
    """JSON -> Python, with every way the parser can fail as a 400: syntax, numbers past Python's
    4,300-digit int limit, NaN/Infinity, and nesting past the interpreter's recursion limit."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise RequestError(400, f"body is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except UnicodeDecodeError:
        raise RequestError(400, "body is not valid JSON: it is not UTF-8 text") from None
    except RecursionError:
        raise RequestError(400, "body is not valid JSON: it is nested too deeply for this parser") from None
    except ValueError as err:  # int(): "Exceeds the limit (4300 digits)", or NaN/Infinity above
        reason = str(err) if "JSON value" in str(err) else "a number has more than 4300 digits"
        raise RequestError(400, f"body is not valid JSON: {reason}") from None


def _validate(model: type[BaseModel], body: bytes) -> BaseModel:
    raw = load_json(body)
    if not isinstance(raw, dict):
        raise RequestError(400, f"body must be a JSON object, got {_kind(raw)}")
    unknown = [key for key in raw if key not in model.model_fields]
    if unknown:
        names = ", ".join(_show(key) for key in sorted(unknown)[:_MAX_NAMED])
        raise RequestError(422, f"unknown field(s) {names}; allowed: {', '.join(map(json.dumps, model.model_fields))}",
                           _show(unknown[0], quote=False))
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise _request_error(model, err.errors(include_url=False)[0]) from None


def _request_error(model: type[BaseModel], error: dict[str, Any]) -> RequestError:
    """pydantic's first error -> a 422 in JSON terms (null, array), naming the field."""
    loc, kind, value, ctx = error["loc"], error["type"], error.get("input"), error.get("ctx", {})
    name = str(loc[0]) if loc else "body"
    if len(loc) >= 2 and isinstance(loc[1], int):
        where = f"{name}[{loc[1]}]"
        return RequestError(422, f"{where} must be {_ITEM_WHAT.get(name, 'valid')}, got {_show(value)}", where)
    if kind == "missing":
        return RequestError(422, f"missing required field '{name}' ({FIELD_WHAT[name]})", name)
    if kind in ("too_short", "string_too_short"):
        return RequestError(422, f"'{name}' is empty; it must be {FIELD_WHAT[name]}", name)
    if kind in ("too_long", "string_too_long"):
        unit = "items" if ctx.get("field_type") == "List" else "characters"
        actual = ctx.get("actual_length")
        size = f"has {actual} {unit}" if actual is not None else f"is too long ({unit})"
        return RequestError(422, f"'{name}' {size}; the limit is {ctx.get('max_length')}", name)
    if kind in ("greater_than_equal", "less_than_equal"):
        lo, hi = _bounds(model, name)
        allowed = f"allowed {lo}..{hi}" if hi is not None else f"it must be at least {lo}"
        return RequestError(422, f"'{name}' = {_show(value)} is out of range; {allowed}", name)
    return RequestError(422, f"'{name}' must be {FIELD_WHAT.get(name, 'valid')}, got {_show(value)}", name)


def _bounds(model: type[BaseModel], name: str) -> tuple[Any, Any]:
    lo = hi = None
    for meta in model.model_fields[name].metadata:
        lo = getattr(meta, "ge", lo)
        hi = getattr(meta, "le", hi)
    return lo, hi


def _kind(value: Any) -> str:
    """A value's JSON type, as a client wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _show(value: Any, quote: bool = True) -> str:
    """A client's scalar as JSON, shortened and ASCII-escaped; containers by their JSON type only."""
    if isinstance(value, list | dict):
        return _kind(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** _MAX_SHOWN:
        return f"a {len(str(abs(value)))}-digit number"
    text = json.dumps(value) if quote or not isinstance(value, str) else json.dumps(value)[1:-1]
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 1] + "…"


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _title(text: str) -> str:
    """A client's title in an error message: Python-quoted (as the messages always did), shortened."""
    short = text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 1] + "…"
    return _encodable(repr(short))


def parse_request(body: bytes, catalogue: Catalogue, max_history: int, max_k: int) -> RecommendRequest:
    """JSON bytes -> RecommendRequest, or RequestError naming the field and what is wrong with it."""
    raw = _validate(recommend_body(max_history, max_k), body)
    ids = _resolve_items(raw.history, catalogue, "history")
    return RecommendRequest(tuple(ids), raw.k, raw.exclude_history)


def parse_rank_request(body: bytes, catalogue: Catalogue, max_history: int, max_candidates: int) -> RankRequest:
    """JSON bytes -> RankRequest. Candidates must be distinct and outside the history, unless
    `drop_history` is true, which leaves history items out of the ranking (and reports them)."""
    raw = _validate(rank_body(max_history, max_candidates), body)
    history = _resolve_items(raw.history, catalogue, "history")
    candidates = _resolve_items(raw.candidates, catalogue, "candidates")
    first: dict[int, int] = {}
    repeats = []
    for pos, item in enumerate(candidates):
        if item in first:
            repeats.append(f"candidates[{pos}] repeats candidates[{first[item]}] (id {item})")
        first.setdefault(item, pos)
    if repeats:
        raise RequestError(422, "duplicate candidates: " + "; ".join(repeats[:_MAX_NAMED]), "candidates")
    seen = set(history)
    in_history = [c for c in candidates if c in seen]
    if in_history and not raw.drop_history:
        raise RequestError(422, f"candidate(s) {in_history[:_MAX_NAMED]} are in the history; remove them or send "
                                f"\"drop_history\": true to leave them out of the ranking", "candidates")
    kept = [c for c in candidates if c not in seen]
    if not kept:
        raise RequestError(422, "every candidate is in the history: nothing left to rank", "candidates")
    k = raw.k if raw.k is not None else min(DEFAULT_K, len(kept))
    return RankRequest(tuple(history), tuple(kept), k, tuple(in_history))


def parse_rerank_request(body: bytes, catalogue: Catalogue, max_history: int, max_candidates: int) -> RerankRequest:
    """A Cohere-style rerank body -> RerankRequest. The query is the history (catalogue items); a
    document that is not a catalogue title is kept as free text, since scoring needs only its text."""
    raw = _validate(rerank_body(max_candidates), body)
    history = _resolve_items(_query_items(raw.query, max_history), catalogue, "query")
    texts = [(d if isinstance(d, str) else d.text).strip() for d in raw.documents]
    for pos, text in enumerate(texts):
        if not text:
            raise RequestError(422, f"documents[{pos}] is blank; every document needs a title", f"documents[{pos}]")
    ids = tuple(catalogue.id_of(text) for text in texts)
    documents = tuple(text if item is None else catalogue.titles[item] for text, item in zip(texts, ids, strict=True))
    top_n = raw.top_n if raw.top_n is not None else len(documents)
    return RerankRequest(tuple(history), documents, ids, min(top_n, len(documents)), bool(raw.return_documents))


def _query_items(query: str, max_history: int) -> list[Any]:
    """The query's items: a JSON array of titles or ids, else one title per non-blank line."""
    text = query.strip()
    if text.startswith("["):
        try:
            items = load_json(text)
        except RequestError as err:
            raise RequestError(422, f"'query' starts with '[' but {err.message.replace('body', 'it')}", "query") from None
        if not isinstance(items, list):
            raise RequestError(422, "'query' must be a JSON array of titles or ids, or titles one per line", "query")
    else:
        items = [line.strip() for line in text.splitlines() if line.strip()]
    if not items:
        raise RequestError(422, f"'query' is empty; it must be {FIELD_WHAT['query']}", "query")
    if len(items) > max_history:
        raise RequestError(422, f"'query' names {len(items)} items; the limit is {max_history}", "query")
    return items


def _resolve_items(entries: list[Any], catalogue: Catalogue, name: str) -> list[int]:
    """Ints are item ids, strings exact titles; all unknown entries are named in one error."""
    ids: list[int] = []
    unknown: list[str] = []
    for pos, entry in enumerate(entries):
        if isinstance(entry, int) and not isinstance(entry, bool):
            if 0 <= entry < len(catalogue):
                ids.append(entry)
            else:
                unknown.append(f"{name}[{pos}]: id {_show(entry)} (ids are 0..{len(catalogue) - 1})")
        elif isinstance(entry, str):
            item_id = catalogue.id_of(entry.strip())
            if item_id is None:
                unknown.append(f"{name}[{pos}]: title {_title(entry)}")
            else:
                ids.append(item_id)
        else:  # only a query's JSON array gets here unchecked by the models
            raise RequestError(422, f"{name}[{pos}] must be an item id (integer) or a title (string), "
                                    f"got {_show(entry)}", f"{name}[{pos}]")
    if unknown:
        more = f" and {len(unknown) - _MAX_NAMED} more" if len(unknown) > _MAX_NAMED else ""
        raise RequestError(422, "unknown item(s) not in the catalogue: " + "; ".join(unknown[:_MAX_NAMED]) + more,
                           name)
    return ids
