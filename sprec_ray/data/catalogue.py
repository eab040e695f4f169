"""The item catalogue: ids, titles, genres and popularity counts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Catalogue:
    """Items indexed 0..n-1. `counted_genres` are the genres fairness metrics look at."""

    titles: tuple[str, ...]
    genres: tuple[tuple[str, ...], ...]
    counted_genres: tuple[str, ...]
    popularity: np.ndarray = field(compare=False)  # interactions per item in the training data
    _title_to_id: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.titles) != len(self.genres) or len(self.titles) != len(self.popularity):
            raise ValueError(
                f"catalogue columns differ in length: titles {len(self.titles)}, "
                f"genres {len(self.genres)}, popularity {len(self.popularity)}"
            )
        index: dict[str, int] = {}
        for item_id, title in enumerate(self.titles):
            if title in index:
                raise ValueError(f"duplicate title {title!r} for item ids {index[title]} and {item_id}")
            index[title] = item_id
        object.__setattr__(self, "_title_to_id", index)

    def __len__(self) -> int:
        return len(self.titles)

    def __contains__(self, title: object) -> bool:
        return title in self._title_to_id

    def most_popular(self, n: int = 10) -> set[int]:
        """The n items with most training interactions (ties by id): the head SPRec means to push down."""
        return set(np.argsort(-self.popularity, kind="stable")[:n].tolist())

    def id_of(self, title: str) -> int | None:
        return self._title_to_id.get(title)

    def counted_genres_of(self, item_id: int) -> tuple[str, ...]:
        counted = set(self.counted_genres)
        return tuple(g for g in self.genres[item_id] if g in counted)

    def with_popularity(self, item_ids: Iterable[int]) -> Catalogue:
        """A copy whose popularity counts the given interactions (targets and histories of train)."""
        counts = np.bincount(np.fromiter(item_ids, dtype=np.int64), minlength=len(self.titles))
        return Catalogue(self.titles, self.genres, self.counted_genres, counts.astype(np.int64))

    def popularity_groups(self, num_groups: int = 5) -> np.ndarray:
        """Group 0 (least popular) .. num_groups-1 (most), equal-sized by popularity rank."""
        order = np.argsort(self.popularity, kind="stable")
        groups = np.empty(len(order), dtype=np.int64)
        groups[order] = np.arange(len(order)) * num_groups // max(len(order), 1)
        return groups


def catalogue_from_titles(
    titles: Sequence[str],
    genres: Sequence[Sequence[str]] | None = None,
    counted_genres: Sequence[str] | None = None,
) -> Catalogue:
    genre_rows = tuple(tuple(g) for g in genres) if genres is not None else tuple(() for _ in titles)
    if counted_genres is None:
        counted_genres = sorted({g for row in genre_rows for g in row})
    return Catalogue(tuple(titles), genre_rows, tuple(counted_genres), np.zeros(len(titles), dtype=np.int64))


def load_sprec_catalogue(directory: str | Path) -> Catalogue:
    """Read id2name.json, name2genre.json (optional) and genre_dict.json (optional) of an SPRec dataset."""
    directory = Path(directory)
    id2name_path = directory / "id2name.json"
    if not id2name_path.exists():
        raise FileNotFoundError(f"{id2name_path} is missing: an SPRec dataset needs an id -> title map")
    id2name = json.loads(id2name_path.read_text())
    try:
        ids = sorted(int(k) for k in id2name)
    except ValueError as err:
        raise ValueError(f"{id2name_path}: keys must be integer item ids ({err})") from None
    if ids != list(range(len(ids))):
        raise ValueError(f"{id2name_path}: item ids must be contiguous 0..{len(ids) - 1}")
    titles = [id2name[str(i)] for i in ids]
    name2genre_path = directory / "name2genre.json"
    name2genre = json.loads(name2genre_path.read_text()) if name2genre_path.exists() else {}
    genres = [name2genre.get(t, []) for t in titles]
    genre_dict_path = directory / "genre_dict.json"
    counted = list(json.loads(genre_dict_path.read_text())) if genre_dict_path.exists() else None
    return catalogue_from_titles(titles, genres, counted)


def save_catalogue_parquet(catalogue: Catalogue, path: str | Path) -> None:
    """Items in id order (title, genres, popularity); the counted genres ride in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"title": pa.array(catalogue.titles, pa.string()),
                      "genres": pa.array([list(g) for g in catalogue.genres], pa.list_(pa.string())),
                      "popularity": pa.array(catalogue.popularity, pa.int64())})
    pq.write_table(table.replace_schema_metadata({"counted_genres": json.dumps(list(catalogue.counted_genres))}), path)


def load_catalogue_parquet(path: str | Path) -> Catalogue:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    counted = json.loads((table.schema.metadata or {}).get(b"counted_genres", b"[]"))
    return Catalogue(tuple(table.column("title").to_pylist()), tuple(tuple(g) for g in table.column("genres").to_pylist()),
                     tuple(counted), table.column("popularity").to_numpy().astype(np.int64))
