"""Self-play negatives: the previous round's own completions as DPO rejected responses, K per prompt.

Per example, each completion (n samples or beams) is parsed (`parse_response`, then `normalise_title`)
and grounded (exact title, else the nearest title by embedding). Grounding only classifies it:
* empty text: skipped (SPRec skips rows with no quoted title);
* equal to the positive (exact or nearest item == target): `on_equal` decides. "drop" discards it
  (SPRec's effect: such a pair has zero gradient, docs/method.md#self-play-negatives); "popular_random" puts a
  popularity-weighted random item in its place;
* a repeat of a completion already taken for the row, or beyond K: skipped;
* otherwise it is a negative. `source="generated"` (SPRec) keeps the model's own text: a catalogue
  title when it matched one exactly, else the new text verbatim. `source="grounded"` uses the nearest
  catalogue item instead. Distinct means distinct text (generated) or distinct item (grounded).

Fewer than K negatives: a row with none is dropped, since there is nothing of the model's own to push
down; a row with some is filled with popularity-weighted random items (weight = popularity + 1, never
the target or the history when avoidable). Samples repeat exactly on the rows where the model is most
confident, so dropping those rows would bias the data set; S-DPO needs exactly K per row.

A predicted history item is kept as a negative, as in SPRec: recommending an item the user already
consumed is a real mistake (counted in `in_history`). Random fills skip the history, which would be
false negatives. The target's embedding neighbours are never used: on Goodreads they are often
sequels of the positive, i.e. likely false negatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

import numpy as np

from ..data.catalogue import Catalogue
from ..data.prompts import names_several_titles, parse_response
from ..data.records import Example
from ..eval.grounding import normalise_title

NegativeSource = Literal["generated", "grounded"]
OnEqualPositive = Literal["drop", "popular_random"]


class GrounderLike(Protocol):
    def ground(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def exact_ids(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class RowNegatives:
    """One row's rejected titles (rendered with `render_response` like positives), or none if dropped."""

    texts: tuple[str, ...] = ()
    ids: tuple[int, ...] = ()  # catalogue id per text; -1 = new text that is no catalogue title

    @property
    def dropped(self) -> bool:
        return not self.texts


@dataclass
class NegativeStats:
    """Counts per round. Every completion lands in exactly one of unparsed / equal_to_positive /
    duplicates / surplus / exact / new_text; every kept negative is one of exact / new_text /
    replaced_equal / topped_up, so negatives == (exact + new_text + replaced_equal + topped_up) == K * rows_kept."""

    rows: int = 0
    rows_kept: int = 0
    rows_dropped: int = 0  # no usable completion (and nothing to replace)
    completions: int = 0
    unparsed: int = 0  # no title text after parse_response (e.g. no closing quote)
    several_titles: int = 0  # completions listing several quoted titles (the first is used)
    equal_to_positive: int = 0  # exact or nearest item == target
    duplicates: int = 0  # same text (generated) / item (grounded) as a negative already taken for the row
    surplus: int = 0  # usable, but the row already had K
    exact: int = 0  # negatives that are an exact catalogue title
    new_text: int = 0  # negatives whose text is no catalogue title (grounded: its nearest item is used)
    replaced_equal: int = 0  # popularity-weighted random items standing in for equal_to_positive
    topped_up: int = 0  # popularity-weighted random items filling rows with 1..K-1 model negatives
    negatives: int = 0
    in_history: int = 0  # model negatives whose item is in the user's history (kept)
    top_popular: int = 0  # negatives whose item (nearest item for new text) is a top-10 training item (SPRec's target)

    def metrics(self) -> dict[str, float]:
        share = self.top_popular / self.negatives if self.negatives else 0.0
        return {**{k: float(v) for k, v in asdict(self).items()}, "top_popular_share": share}


def _check_inputs(examples: Sequence[Example], completions: Sequence[Sequence[str]], num_items: int, k: int) -> None:
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completion lists")
    if not 1 <= k < num_items:
        raise ValueError(f"k={k} negatives need 1 <= k < catalogue size {num_items}")
    for e, texts in zip(examples, completions, strict=True):
        if not 0 <= e.target < num_items:
            raise ValueError(f"row {e.row_id}: target id {e.target} is outside the catalogue 0..{num_items - 1}")
        bad = [h for h in e.history if not 0 <= h < num_items]
        if bad:
            raise ValueError(f"row {e.row_id}: history ids {bad} are outside the catalogue 0..{num_items - 1}")
        if isinstance(texts, str) or any(not isinstance(t, str) for t in texts):
            raise ValueError(f"row {e.row_id}: completions must be a list of str, got {texts!r}")


def build_negatives(examples: Sequence[Example], completions: Sequence[Sequence[str]], catalogue: Catalogue,
                    grounder: GrounderLike, k: int, seed: int, source: NegativeSource = "generated",
                    on_equal: OnEqualPositive = "drop") -> tuple[list[RowNegatives], NegativeStats]:
    """Per example (same order) its K rejected titles, or an empty RowNegatives when dropped."""
    if source not in ("generated", "grounded"):
        raise ValueError(f"negative source {source!r} must be 'generated' or 'grounded'")
    if on_equal not in ("drop", "popular_random"):
        raise ValueError(f"on_equal {on_equal!r} must be 'drop' or 'popular_random'")
    num_items = len(catalogue)
    _check_inputs(examples, completions, num_items, k)
    stats = NegativeStats(rows=len(examples))
    parsed = [[normalise_title(parse_response(t, catalogue)) for t in texts] for texts in completions]
    stats.completions = sum(len(p) for p in parsed)
    stats.several_titles = sum(names_several_titles(t, catalogue) for texts in completions for t in texts)
    texts = [t for p in parsed for t in p if t]
    if texts:
        nearest = grounder.ground(texts, 1)[0][:, 0]
        exact = grounder.exact_ids(texts)
    else:
        nearest = exact = np.zeros(0, dtype=np.int64)
    popularity = np.asarray(catalogue.popularity)
    weights = popularity.astype(np.float64) + 1.0
    top = catalogue.most_popular()
    out, j = [], 0
    for e, row in zip(examples, parsed, strict=True):
        grounded = []
        for text in row:
            grounded.append((text, int(exact[j]), int(nearest[j])) if text else (text, -1, -1))
            j += bool(text)
        out.append(_negatives_for(e, grounded, catalogue.titles, k, weights, top, seed, source, on_equal, stats))
    return out, stats


def _negatives_for(example: Example, grounded: list[tuple[str, int, int]], titles: Sequence[str], k: int,
                   weights: np.ndarray, top: set[int], seed: int, source: NegativeSource,
                   on_equal: OnEqualPositive, stats: NegativeStats) -> RowNegatives:
    history = set(example.history)
    texts: list[str] = []
    ids: list[int] = []
    items: list[int] = []  # the item each negative stands for (nearest item for new text)
    keys: set[object] = set()
    equal = 0
    for text, exact_id, item in grounded:
        if not text:
            stats.unparsed += 1
            continue
        if item == example.target:
            stats.equal_to_positive += 1
            equal += 1
            continue
        key = item if source == "grounded" or exact_id >= 0 else text
        if key in keys:
            stats.duplicates += 1
        elif len(texts) >= k:
            stats.surplus += 1
        else:
            keys.add(key)
            if exact_id >= 0:
                stats.exact += 1
            else:
                stats.new_text += 1
            # an exact match is written as the catalogue title, so it tokenises like that item as a positive
            own = source == "generated" and exact_id < 0
            texts.append(text if own else titles[item])
            ids.append(-1 if own else item)
            items.append(item)
            stats.in_history += item in history
    replace = min(equal, k - len(texts)) if on_equal == "popular_random" else 0
    if not texts and not replace:
        stats.rows_dropped += 1
        return RowNegatives()
    stats.rows_kept += 1
    need = k - len(texts)
    stats.replaced_equal += replace
    stats.topped_up += need - replace
    # seeded per row, so row order and sharding don't change the draw
    rng = np.random.default_rng([seed, example.row_id])
    taken = {example.target, *items}
    for pool in (_pool(weights.size, taken | history), _pool(weights.size, taken)):
        want = min(k - len(texts), pool.size)
        if want <= 0:
            continue
        picks = [int(x) for x in rng.choice(pool, size=want, replace=False, p=weights[pool] / weights[pool].sum())]
        texts += [titles[x] for x in picks]
        ids += picks
        items += picks
        taken.update(picks)
    stats.negatives += len(texts)
    stats.top_popular += sum(x in top for x in items)
    return RowNegatives(tuple(texts), tuple(ids))


def _pool(num_items: int, excluded: set[int]) -> np.ndarray:
    mask = np.ones(num_items, dtype=bool)
    mask[list(excluded)] = False
    return np.flatnonzero(mask)
