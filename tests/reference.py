"""In-memory reference implementations that the tests hold the distributed paths to.

`load_dataset` reads a whole dataset into lists (runs use the Ray Data pipeline, `data/prepared.py`),
`read_interactions` is the leave-last-out split of raw logs that `data/pipeline.py` computes at scale,
and `run_sft` / `run_dpo` are one-stage fits. `benchmarks/data_pipeline.py` times the pipeline
against `read_interactions`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from sprec_ray.config import DataConfig, RunConfig
from sprec_ray.data.catalogue import Catalogue, catalogue_from_titles, load_sprec_catalogue
from sprec_ray.data.dataset import resolve_data_path
from sprec_ray.data.readers import read_sdpo_json, read_sprec_json, reject_row
from sprec_ray.data.records import BadRows, DataError, Example
from sprec_ray.manifest import sha256_file
from sprec_ray.train.phases import PhaseResult, Stage, run_fit

if TYPE_CHECKING:
    import ray.data


@dataclass(frozen=True)
class RecDataset:
    catalogue: Catalogue  # popularity counted on train (histories and targets)
    train: list[Example]
    valid: list[Example]
    bad: tuple[BadRows, ...]
    source_hashes: dict[str, str]  # file -> sha256, for manifests


def _random_rows(examples: list[Example], n: int, seed: int) -> list[Example]:
    if n <= 0 or n >= len(examples):
        return examples
    picked = random.Random(seed).sample(range(len(examples)), n)
    return [examples[i] for i in sorted(picked)]


def load_dataset(cfg: DataConfig, scratch_dir: str | Path, seed: int = 0) -> RecDataset:
    path = resolve_data_path(cfg, scratch_dir)
    if cfg.format == "sprec_json":
        catalogue = load_sprec_catalogue(path)
        train, bad_train = read_sprec_json(path / cfg.train_file, catalogue, cfg.strict)
        valid, bad_valid = read_sprec_json(path / cfg.valid_file, catalogue, cfg.strict)
        files = [path / cfg.train_file, path / cfg.valid_file, path / "id2name.json"]
    elif cfg.format == "sdpo_json":
        catalogue, train, bad_train = read_sdpo_json(path / cfg.train_file, None, cfg.strict)
        _, valid, bad_valid = read_sdpo_json(path / cfg.valid_file, catalogue, cfg.strict)
        files = [path / cfg.train_file, path / cfg.valid_file]
    else:
        items = Path(cfg.items_file) if cfg.items_file else None
        catalogue, splits, bad_train = read_interactions(path, items, cfg.max_history, cfg.strict)
        train, valid, bad_valid = splits["train"], splits["valid"], BadRows(f"{path} (valid)")
        files = [path] + ([items] if items else [])
    if cfg.format != "interactions":
        train = [e.last(cfg.max_history) for e in train]
        valid = [e.last(cfg.max_history) for e in valid]
    if not train:
        raise DataError(f"{path}: no usable training rows ({bad_train.summary()})")
    train = _random_rows(train, cfg.train_samples, seed)
    valid = _random_rows(valid, cfg.valid_samples, seed + 1)
    catalogue = catalogue.with_popularity(i for e in train for i in (*e.history, e.target))
    hashes = {str(f): sha256_file(f) for f in files if f.is_file()}
    return RecDataset(catalogue, train, valid, (bad_train, bad_valid), hashes)


def _read_table(path: Path) -> pa.Table:
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.suffix == ".parquet" or path.is_dir():
        return pq.read_table(path)
    if path.suffix in (".csv", ".tsv"):
        opts = pacsv.ParseOptions(delimiter="\t" if path.suffix == ".tsv" else ",")
        convert = pacsv.ConvertOptions(strings_can_be_null=True)
        return pacsv.read_csv(path, parse_options=opts, convert_options=convert)
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv or .parquet")


def read_interactions(
    path: str | Path,
    items_path: str | Path | None = None,
    max_history: int = 10,
    strict: bool = False,
) -> tuple[Catalogue, dict[str, list[Example]], BadRows]:
    """Raw (user, item, timestamp) logs -> leave-last-out sequences.

    Per user, time-ordered: the last interaction is the test target, the one before it the valid
    target, and every earlier position (with at least one item before it) a train example. Items
    are titled from the optional items table (item, title[, genres as "a|b"]), else by their id.
    """
    path = Path(path)
    table = _read_table(path)
    bad = BadRows(str(path))
    needed = ["user", "item", "timestamp"]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {table.column_names}")
    users = table.column("user").cast(pa.string()).to_pylist()
    items = table.column("item").cast(pa.string()).to_pylist()
    try:
        stamps = pc.cast(table.column("timestamp"), pa.float64(), safe=False).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        stamps = []
        for row_no, value in enumerate(table.column("timestamp").to_pylist()):
            try:
                stamps.append(float(value))
            except (TypeError, ValueError):
                stamps.append(None)
                if strict:
                    raise DataError(f"{path}: row {row_no}: timestamp {value!r} is not a number") from None

    titles_by_item: dict[str, str] = {}
    genres_by_item: dict[str, tuple[str, ...]] = {}
    if items_path:
        items_table = _read_table(Path(items_path))
        if "item" not in items_table.column_names or "title" not in items_table.column_names:
            raise DataError(f"{items_path}: needs columns item and title; found {items_table.column_names}")
        genre_col = items_table.column("genres").to_pylist() if "genres" in items_table.column_names else None
        for i, (item, title) in enumerate(zip(items_table.column("item").cast(pa.string()).to_pylist(),
                                             items_table.column("title").to_pylist(), strict=True)):
            titles_by_item[item] = str(title)
            genres_by_item[item] = tuple(g for g in (genre_col[i] or "").split("|") if g) if genre_col else ()

    events: dict[str, list[tuple[float, int, str]]] = {}
    for row_no, (user, item, stamp) in enumerate(zip(users, items, stamps, strict=True)):
        if user is None or item is None:
            reject_row(bad, strict, row_no, "missing user or item")
            continue
        if stamp is None or np.isnan(stamp):
            reject_row(bad, strict, row_no, "missing or non-numeric timestamp")
            continue
        if titles_by_item and item not in titles_by_item:
            reject_row(bad, strict, row_no, f"item {item!r} is not in the items table")
            continue
        events.setdefault(user, []).append((stamp, row_no, item))

    item_keys = sorted(titles_by_item) if titles_by_item else sorted({e[2] for ev in events.values() for e in ev})
    key_to_id = {k: i for i, k in enumerate(item_keys)}
    catalogue = catalogue_from_titles(
        [titles_by_item.get(k, k) for k in item_keys], [genres_by_item.get(k, ()) for k in item_keys]
    )
    splits: dict[str, list[Example]] = {"train": [], "valid": [], "test": []}
    for user in sorted(events):
        seq = sorted(events[user])  # time, then file order for ties
        ids = [key_to_id[item] for _, _, item in seq]
        rows = [row for _, row, _ in seq]
        for pos in range(1, len(ids)):
            split = "test" if pos == len(ids) - 1 else "valid" if pos == len(ids) - 2 else "train"
            history = tuple(ids[max(0, pos - max_history) : pos])
            splits[split].append(Example(rows[pos], history, ids[pos], user=user))
    return catalogue, splits, bad


def run_sft(cfg: RunConfig, base_model: Path, train_ds: ray.data.Dataset, out_dir: Path,
            init_adapter: Path | None, name: str) -> PhaseResult:
    """SFT (or CFT when cfg.sft.cft.enabled) on columns prompt, response (+ cf_prompt, optional row_id).
    `init_adapter=None` starts a fresh LoRA from cfg.lora; otherwise that adapter keeps training."""
    return run_fit(cfg, base_model, [Stage("sft", name, train_ds, Path(out_dir))], init_adapter, name)[name]


def run_dpo(cfg: RunConfig, base_model: Path, pairs_ds: ray.data.Dataset, out_dir: Path,
            sft_adapter: Path, name: str) -> PhaseResult:
    """DPO / S-DPO (cfg.dpo.loss) on columns row_id, prompt, response (chosen), rejected (K strings).
    The policy starts from `sft_adapter`, which is also the reference model."""
    return run_fit(cfg, base_model, [Stage("dpo", name, pairs_ds, Path(out_dir))], sft_adapter, name)[name]
