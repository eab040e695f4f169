"""Validation of `POST /recommend` bodies: every bad request becomes a RequestError (4xx + message).

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


def parse_request(body: bytes, catalogue: Catalogue, max_history: int, max_k: int) -> RecommendRequest:
    """JSON bytes -> RecommendRequest, or RequestError naming the field and what is wrong with it."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"body is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(ALLOWED_FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown}; allowed: {list(ALLOWED_FIELDS)}", unknown[0])

    if "history" not in raw:
        raise RequestError(422, "missing required field 'history' (a list of item ids or titles)", "history")
    history = raw["history"]
    if not isinstance(history, list):
        raise RequestError(422, f"'history' must be a list of item ids or titles, got {type(history).__name__}",
                           "history")
    if not history:
        raise RequestError(422, "'history' is empty; give at least one item id or title", "history")
    if len(history) > max_history:
        raise RequestError(422, f"'history' has {len(history)} items; the limit is {max_history}", "history")
    ids = _resolve_items(history, catalogue)

    k = raw.get("k", min(DEFAULT_K, max_k))
    if not _is_int(k):
        raise RequestError(422, f"'k' must be an integer, got {json.dumps(k)}", "k")
    if not 1 <= k <= max_k:
        raise RequestError(422, f"'k' = {k} is out of range; allowed 1..{max_k}", "k")

    exclude = raw.get("exclude_history", True)
    if not isinstance(exclude, bool):
        raise RequestError(422, f"'exclude_history' must be true or false, got {json.dumps(exclude)}",
                           "exclude_history")
    return RecommendRequest(tuple(ids), k, exclude)


def _resolve_items(history: list[Any], catalogue: Catalogue) -> list[int]:
    """Ints are item ids, strings exact titles; all unknown entries are named in one error."""
    ids: list[int] = []
    unknown: list[str] = []
    for pos, entry in enumerate(history):
        if _is_int(entry):
            if 0 <= entry < len(catalogue):
                ids.append(entry)
            else:
                unknown.append(f"history[{pos}]: id {entry} (ids are 0..{len(catalogue) - 1})")
        elif isinstance(entry, str):
            item_id = catalogue.id_of(entry.strip())
            if item_id is None:
                unknown.append(f"history[{pos}]: title {entry!r}")
            else:
                ids.append(item_id)
        else:
            raise RequestError(422, f"history[{pos}] must be an item id (integer) or a title (string), "
                                    f"got {json.dumps(entry)}", f"history[{pos}]")
    if unknown:
        more = f" and {len(unknown) - _MAX_NAMED} more" if len(unknown) > _MAX_NAMED else ""
        raise RequestError(422, "unknown item(s) not in the catalogue: " + "; ".join(unknown[:_MAX_NAMED]) + more,
                           "history")
    return ids
