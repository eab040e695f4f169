"""Validation of `POST /recommend` and `POST /rank` bodies: every bad request becomes a RequestError
(4xx + message).

Kept free of Ray and HTTP so the rules are plain functions: the endpoint maps RequestError to a JSON
response with its status code, and nothing a client sends can reach the model unchecked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..data.catalogue import Catalogue

MAX_BODY_BYTES = 64 * 1024  # a 50-item history of long titles is ~5 KiB; anything near this is abuse
DEFAULT_K = 10
ALLOWED_FIELDS = ("history", "k", "exclude_history")
RANK_FIELDS = ("history", "candidates", "k", "drop_history")
_MAX_NAMED = 10  # unknown items listed in one error message


class RequestError(ValueError):
    """A client error: `status` is the HTTP code, `field` the offending JSON field (if any)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            out["field"] = self.field
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


def check_body_size(content_length: str | None, body: bytes | None = None,
                    limit: int = MAX_BODY_BYTES) -> None:
    """413 before reading when the declared length is too big, and again on the bytes received."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestError(400, f"invalid Content-Length header {content_length!r}") from None
        if declared > limit:
            raise RequestError(413, f"request body is {declared} bytes; the limit is {limit}")
    if body is not None and len(body) > limit:
        raise RequestError(413, f"request body is {len(body)} bytes; the limit is {limit}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load_object(body: bytes, allowed: tuple[str, ...]) -> dict[str, Any]:
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"body is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown}; allowed: {list(allowed)}", unknown[0])
    return raw


def _items(raw: dict[str, Any], name: str, catalogue: Catalogue, limit: int) -> list[int]:
    """A required, non-empty list of item ids or titles, at most `limit` long, as catalogue ids."""
    if name not in raw:
        raise RequestError(422, f"missing required field '{name}' (a list of item ids or titles)", name)
    items = raw[name]
    if not isinstance(items, list):
        raise RequestError(422, f"'{name}' must be a list of item ids or titles, got {type(items).__name__}", name)
    if not items:
        raise RequestError(422, f"'{name}' is empty; give at least one item id or title", name)
    if len(items) > limit:
        raise RequestError(422, f"'{name}' has {len(items)} items; the limit is {limit}", name)
    return _resolve_items(items, catalogue, name)


def _bool(raw: dict[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(422, f"'{name}' must be true or false, got {json.dumps(value)}", name)
    return value


def _k(raw: dict[str, Any], default: int, max_k: int) -> int:
    k = raw.get("k", default)
    if not _is_int(k):
        raise RequestError(422, f"'k' must be an integer, got {json.dumps(k)}", "k")
    if not 1 <= k <= max_k:
        raise RequestError(422, f"'k' = {k} is out of range; allowed 1..{max_k}", "k")
    return k


def parse_request(body: bytes, catalogue: Catalogue, max_history: int, max_k: int) -> RecommendRequest:
    """JSON bytes -> RecommendRequest, or RequestError naming the field and what is wrong with it."""
    raw = _load_object(body, ALLOWED_FIELDS)
    ids = _items(raw, "history", catalogue, max_history)
    return RecommendRequest(tuple(ids), _k(raw, min(DEFAULT_K, max_k), max_k), _bool(raw, "exclude_history", True))


def parse_rank_request(body: bytes, catalogue: Catalogue, max_history: int, max_candidates: int) -> RankRequest:
    """JSON bytes -> RankRequest. Candidates must be distinct and outside the history, unless
    `drop_history` is true, which leaves history items out of the ranking (and reports them)."""
    raw = _load_object(body, RANK_FIELDS)
    history = _items(raw, "history", catalogue, max_history)
    candidates = _items(raw, "candidates", catalogue, max_candidates)
    drop = _bool(raw, "drop_history", False)
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
    if in_history and not drop:
        raise RequestError(422, f"candidate(s) {in_history[:_MAX_NAMED]} are in the history; remove them or send "
                                f"\"drop_history\": true to leave them out of the ranking", "candidates")
    kept = [c for c in candidates if c not in seen]
    if not kept:
        raise RequestError(422, "every candidate is in the history: nothing left to rank", "candidates")
    return RankRequest(tuple(history), tuple(kept), _k(raw, min(DEFAULT_K, len(kept)), max_candidates),
                       tuple(in_history))


def _resolve_items(entries: list[Any], catalogue: Catalogue, name: str) -> list[int]:
    """Ints are item ids, strings exact titles; all unknown entries are named in one error."""
    ids: list[int] = []
    unknown: list[str] = []
    for pos, entry in enumerate(entries):
        if _is_int(entry):
            if 0 <= entry < len(catalogue):
                ids.append(entry)
            else:
                unknown.append(f"{name}[{pos}]: id {entry} (ids are 0..{len(catalogue) - 1})")
        elif isinstance(entry, str):
            item_id = catalogue.id_of(entry.strip())
            if item_id is None:
                unknown.append(f"{name}[{pos}]: title {entry!r}")
            else:
                ids.append(item_id)
        else:
            raise RequestError(422, f"{name}[{pos}] must be an item id (integer) or a title (string), "
                                    f"got {json.dumps(entry)}", f"{name}[{pos}]")
    if unknown:
        more = f" and {len(unknown) - _MAX_NAMED} more" if len(unknown) > _MAX_NAMED else ""
        raise RequestError(422, "unknown item(s) not in the catalogue: " + "; ".join(unknown[:_MAX_NAMED]) + more,
                           name)
    return ids
