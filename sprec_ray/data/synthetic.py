"""A small generated dataset in SPRec format, so a clone with no data still runs end to end.

Users have a favourite genre and a popularity-skewed (Zipf) taste, so there is signal to learn
and a popularity bias for self-play to reduce. Deterministic in the seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .prompts import instruction_text

GENRES = ("fiction", "romance", "young-adult", "fantasy, paranormal", "mystery, thriller, crime",
          "history, historical fiction, biography", "children")
_ADJ = ("Silent", "Crimson", "Hidden", "Last", "Golden", "Broken", "Secret", "Winter", "Lost", "Burning",
        "Distant", "Paper", "Glass", "Wild", "Midnight", "Iron")
_NOUN = ("Harbor", "Garden", "Kingdom", "Letters", "River", "Crown", "Orchard", "Lighthouse", "Library",
         "Forest", "Promise", "Station", "Storm", "Mirror", "Road", "Clockmaker")


def write_synthetic_sprec(directory: str | Path, num_items: int = 400, num_users: int = 600,
                          history_len: int = 10, valid_fraction: float = 0.1, seed: int = 0) -> Path:
    if num_items // len(GENRES) < history_len + 1:
        raise ValueError(f"num_items must be >= {len(GENRES) * (history_len + 1)} for history_len {history_len}")
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    titles, genres = [], []
    for i in range(num_items):
        series = f"{_ADJ[i % len(_ADJ)]} {_NOUN[(i // len(_ADJ)) % len(_NOUN)]}"
        titles.append(f"The {series} ({series}, #{i // (len(_ADJ) * len(_NOUN)) + 1})")
        main = GENRES[i % len(GENRES)]
        extra = GENRES[int(rng.integers(len(GENRES)))]
        genres.append(sorted({main, extra}))
    by_genre = {g: [i for i in range(num_items) if GENRES[i % len(GENRES)] == g] for g in GENRES}
    rows = []
    instruction = instruction_text("books")
    for _ in range(num_users):
        favourite = GENRES[int(rng.integers(len(GENRES)))]
        pool = np.array(by_genre[favourite])
        weights = 1.0 / np.arange(1, len(pool) + 1) ** 1.1
        seq = rng.choice(pool, size=history_len + 1, replace=False, p=weights / weights.sum())
        history = ", ".join(f'"{titles[i]}"' for i in seq[:-1])
        rows.append({"instruction": instruction,
                     "input": f"The user has enjoyed the following books before: {history}",
                     "output": f'"{titles[seq[-1]]}"\n'})
    n_valid = max(1, int(len(rows) * valid_fraction))
    (directory / "train.json").write_text(json.dumps(rows[n_valid:], indent=1))
    (directory / "valid.json").write_text(json.dumps(rows[:n_valid], indent=1))
    (directory / "id2name.json").write_text(json.dumps({str(i): t for i, t in enumerate(titles)}))
    (directory / "name2id.json").write_text(json.dumps({t: i for i, t in enumerate(titles)}))
    (directory / "name2genre.json").write_text(json.dumps(dict(zip(titles, genres, strict=True))))
    (directory / "genre_dict.json").write_text(json.dumps({g: 0 for g in GENRES}))
    return directory
