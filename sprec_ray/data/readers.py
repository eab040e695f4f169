"""Readers for the SPRec and S-DPO JSON formats (interaction logs go through `data/pipeline.py`).
Each returns examples plus a `BadRows` report.

strict=True turns the first bad row into a `DataError` naming file and row; strict=False skips
the row and records it, so nothing is lost without a trace.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .catalogue import Catalogue, catalogue_from_titles
from .records import BadRows, DataError, Example


class _RowError(Exception):
    pass


def _iter_json_rows(path: Path, bad: BadRows, strict: bool) -> Iterator[tuple[int, Any]]:
    """A JSON array, or JSON Lines where each bad line is reported on its own."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
        yield from enumerate(rows)
        return
    for line_no, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as err:
            reject_row(bad, strict, line_no, f"malformed JSON ({err.msg})")


def reject_row(bad: BadRows, strict: bool, row: int, reason: str) -> None:
    if strict:
        raise DataError(f"{bad.source}: row {row}: {reason}")
    bad.add(row, reason)


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return text[1:-1]
    return text


def parse_history_titles(text: str, catalogue: Catalogue) -> list[str]:
    """Titles from an SPRec `input`: "T1", "T2", ... between the first and last quote.

    Splitting on '", "' (not a quote regex) keeps titles with inner quotes intact; pieces that
    are not catalogue titles are re-joined greedily, for titles that contain '", "' themselves.
    """
    first, last = text.find('"'), text.rfind('"')
    if first < 0 or last <= first:
        return []
    pieces = text[first + 1 : last].split('", "')
    titles: list[str] = []
    pending: list[str] = []
    for piece in pieces:
        pending.append(piece)
        if catalogue.id_of('", "'.join(pending)) is not None:
            titles.append('", "'.join(pending))
            pending = []
    if pending:
        raise _RowError(f"unknown title in history: {pending[0]!r}")
    return titles


def read_sprec_json(path: str | Path, catalogue: Catalogue, strict: bool = False) -> tuple[list[Example], BadRows]:
    """SPRec/BIGRec rows: {"instruction", "input": '... "T1", "T2" ...', "output": '"Title"\\n'}."""
    path = Path(path)
    bad = BadRows(str(path))
    examples: list[Example] = []
    for row_no, row in _iter_json_rows(path, bad, strict):
        try:
            if not isinstance(row, dict):
                raise _RowError(f"expected an object, got {type(row).__name__}")
            missing = [k for k in ("input", "output") if not isinstance(row.get(k), str)]
            if missing:
                raise _RowError(f"missing or non-string field(s) {missing}")
            history = parse_history_titles(row["input"], catalogue)
            if not history:
                raise _RowError("empty history: no quoted titles in 'input'")
            target_title = _unquote(row["output"])
            target = catalogue.id_of(target_title)
            if target is None:
                raise _RowError(f"unknown target title in 'output': {target_title!r}")
            ids = tuple(catalogue.id_of(t) for t in history)
            examples.append(Example(row_no, ids, target))  # type: ignore[arg-type]
        except _RowError as err:
            reject_row(bad, strict, row_no, str(err))
    return examples, bad


def read_sdpo_json(path: str | Path, catalogue: Catalogue | None = None, strict: bool = False) -> tuple[Catalogue, list[Example], BadRows]:
    """S-DPO rows: {"historyList": "A::B::C", "itemList": [20 names], "trueSelection": name}.

    Without a catalogue one is built from every name in the file (sorted, so ids are stable).
    """
    path = Path(path)
    bad = BadRows(str(path))
    raw: list[tuple[int, list[str], list[str], str]] = []
    for row_no, row in _iter_json_rows(path, bad, strict):
        try:
            if not isinstance(row, dict):
                raise _RowError(f"expected an object, got {type(row).__name__}")
            history, items, target = row.get("historyList"), row.get("itemList"), row.get("trueSelection")
            if not isinstance(history, str) or not isinstance(items, list) or not isinstance(target, str):
                raise _RowError("needs historyList (str), itemList (list) and trueSelection (str)")
            names = [h for h in history.split("::") if h]
            if not names:
                raise _RowError("empty history: historyList has no items")
            if target not in items:
                raise _RowError(f"trueSelection {target!r} is not in itemList")
            raw.append((row_no, names, [str(i) for i in items], target))
        except _RowError as err:
            reject_row(bad, strict, row_no, str(err))
    if catalogue is None:
        catalogue = catalogue_from_titles(sorted({n for _, h, c, t in raw for n in (*h, *c, t)}))
    examples = []
    for row_no, names, items, target in raw:
        ids = [catalogue.id_of(n) for n in (*names, *items, target)]
        if any(i is None for i in ids):
            unknown = next(n for n, i in zip((*names, *items, target), ids, strict=True) if i is None)
            reject_row(bad, strict, row_no, f"unknown item {unknown!r}")
            continue
        h, c = ids[: len(names)], ids[len(names) : len(names) + len(items)]
        examples.append(Example(row_no, tuple(h), ids[-1], tuple(c)))  # type: ignore[arg-type]
    return catalogue, examples, bad


def read_eval_file(path: str | Path, catalogue: Catalogue, max_history: int) -> list[Example]:
    """Rows to evaluate a run on, from an SPRec or S-DPO JSON file (told apart by its first row's
    fields), against the run's catalogue. Strict: the first bad row or unknown title raises, naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    first = next((row for _, row in _iter_json_rows(path, BadRows(str(path)), strict=True)), None)
    if isinstance(first, dict) and "historyList" in first:
        rows = read_sdpo_json(path, catalogue, strict=True)[1]
    elif isinstance(first, dict) and "input" in first:
        rows = read_sprec_json(path, catalogue, strict=True)[0]
    else:
        raise DataError(f"{path}: the first row has neither SPRec fields (input, output) nor S-DPO fields "
                        f"(historyList, itemList, trueSelection)" if first is not None else f"{path}: no rows")
    return [e.last(max_history) for e in rows]
