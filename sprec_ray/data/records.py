"""The row every stage shares: one user's history and the next item, as catalogue ids."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Example:
    """Ids, never titles re-parsed from prompt text, travel between stages."""

    row_id: int  # position in the source file (0-based), kept for error reports and determinism
    history: tuple[int, ...]
    target: int
    candidates: tuple[int, ...] = ()  # S-DPO candidate list, empty otherwise
    user: str = ""

    def last(self, max_history: int) -> Example:
        """This row with only its `max_history` most recent history items (data.max_history)."""
        return replace(self, history=self.history[-max_history:])


@dataclass
class BadRows:
    """Rows a reader skipped, with the 0-based row number and why. Never dropped silently."""

    source: str
    rows: list[tuple[int, str]] = field(default_factory=list)

    def add(self, row: int, reason: str) -> None:
        self.rows.append((row, reason))

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self, limit: int = 5) -> str:
        if not self.rows:
            return f"{self.source}: no bad rows"
        shown = "; ".join(f"row {r}: {why}" for r, why in self.rows[:limit])
        more = f" (+{len(self.rows) - limit} more)" if len(self.rows) > limit else ""
        return f"{self.source}: {len(self.rows)} bad rows skipped: {shown}{more}"


class DataError(ValueError):
    """Bad input in strict mode (or a file that cannot be read at all); names the file and row."""
