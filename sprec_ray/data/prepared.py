"""A run's prepared data: example shards on storage, and on the driver only the catalogue and counts.

Layout under the prepare directory:
  examples/{train,valid,test}/part-*.parquet   every example (row_id, history, target, candidates, user)
  sampled/{train,valid,test}/part-*.parquet    the data.{train,valid,test}_samples subsets, if set
  bad_rows/part-*.parquet                      every skipped row: file, row, reason, value
  catalogue.parquet, manifest.json             items (title, genres, popularity) and the counts
Rows are picked by a seeded hash of row_id (the n smallest hashes), so a sample is exact in size,
the same on every re-run, and needs no list of the split on the driver.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import DataConfig
from ..manifest import sha256_file
from .catalogue import (
    Catalogue,
    catalogue_from_titles,
    load_catalogue_parquet,
    load_sprec_catalogue,
    save_catalogue_parquet,
)
from .dataset import resolve_data_path
from .pipeline import BAD_ROWS_SCHEMA, EXAMPLE_SCHEMA, SPLITS, filesystem, list_files, run_pipeline
from .readers import read_sdpo_json, read_sprec_json
from .records import BadRows, DataError, Example


@dataclass(frozen=True)
class PreparedData:
    root: Path
    catalogue: Catalogue  # popularity counted on the train examples used (histories and targets)
    counts: dict[str, int]  # examples per split as used (after sampling)
    bad_rows: dict[str, int]  # reason -> rows skipped
    source_hashes: dict[str, str]
    manifest: dict[str, Any]

    def split_dir(self, split: str) -> Path:
        sampled = self.root / "sampled" / split
        return sampled if sampled.exists() else self.root / "examples" / split

    def rows(self, split: str, n: int = 0, seed: int = 0) -> list[Example]:
        """Up to n examples of a split (all when n <= 0), picked by seed; for small sets only."""
        return sample_examples(self.split_dir(split), n, seed)

    def head(self, split: str, n: int) -> list[Example]:
        """The first n examples of a split, reading no more of the shards than that."""
        rows: list[Example] = []
        for f in _parts(self.split_dir(split)):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=max(1, n - len(rows))):
                rows += examples_from_table(pa.Table.from_batches([batch]))[: n - len(rows)]
                if len(rows) >= n:
                    return rows
        return rows


# ---- seeded row hashes ------------------------------------------------------------------------
def row_hash(row_ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (row_id, seed): a stable uniform 64-bit key per row."""
    with np.errstate(over="ignore"):
        z = row_ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _parts(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("*.parquet"))


def _smallest(path: str, n: int, seed: int) -> np.ndarray:
    h = row_hash(pq.read_table(path, columns=["row_id"]).column("row_id").to_numpy(), seed)
    return np.sort(h)[:n] if len(h) > n else h


def _pick(path: str, seed: int, threshold: int, out: str | None, num_items: int) -> Any:
    """The rows of one shard with hash <= threshold: returned, or written to `out` (then popularity)."""
    table = pq.read_table(path)
    keep = row_hash(table.column("row_id").to_numpy(), seed) <= np.uint64(threshold)
    table = table.filter(pa.array(keep))
    if out is None:
        return table
    pq.write_table(table, out)
    return _popularity(table, num_items)


def _popularity(table: pa.Table, num_items: int) -> np.ndarray:
    flat = table.column("history").combine_chunks().flatten().to_numpy()
    return np.bincount(flat, minlength=num_items) + np.bincount(table.column("target").to_numpy(), minlength=num_items)


def _threshold(files: list[Path], n: int, seed: int) -> int:
    import ray

    smallest = ray.remote(num_cpus=0.25)(_smallest)
    hashes = np.concatenate([np.zeros(0, np.uint64)] + ray.get([smallest.remote(str(f), n, seed) for f in files]))
    return int(np.sort(hashes)[n - 1]) if len(hashes) > n else 2**64 - 1


def sample_examples(directory: Path, n: int, seed: int) -> list[Example]:
    """Examples of the n smallest seeded hashes (all when n <= 0), in row_id order."""
    import ray

    files = _parts(directory)
    threshold = _threshold(files, n, seed) if n > 0 else 2**64 - 1
    pick = ray.remote(num_cpus=0.25)(_pick)
    tables = ray.get([pick.remote(str(f), seed, threshold, None, 0) for f in files])
    rows = [e for t in tables for e in examples_from_table(t)]
    return sorted(rows, key=lambda e: e.row_id)


# ---- examples <-> Parquet --------------------------------------------------------------------
def examples_from_table(table: pa.Table) -> list[Example]:
    cols = table.to_pydict()
    return [Example(r, tuple(h), t, tuple(c), u) for r, h, t, c, u in
            zip(cols["row_id"], cols["history"], cols["target"], cols["candidates"], cols["user"], strict=True)]


def write_example_shards(examples: list[Example], directory: Path, num_shards: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for shard, idx in enumerate(np.array_split(np.arange(len(examples)), max(1, num_shards))):
        rows = [examples[i] for i in idx]
        pq.write_table(pa.table({"row_id": [e.row_id for e in rows], "history": [list(e.history) for e in rows],
                                 "target": [e.target for e in rows], "candidates": [list(e.candidates) for e in rows],
                                 "user": [e.user for e in rows]}, schema=EXAMPLE_SCHEMA),
                       directory / f"part-{shard:05d}.parquet")


def _write_bad_rows(bad: BadRows, out: Path, index: int) -> dict[str, int]:
    """A JSON reader's bad rows as bad_rows/ Parquet; counted by reason without the row's own values."""
    if not len(bad):
        return {}
    (out / "bad_rows").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"file": [bad.source] * len(bad), "row": [r for r, _ in bad.rows],
                             "reason": [why for _, why in bad.rows], "value": [""] * len(bad)},
                            schema=BAD_ROWS_SCHEMA), out / "bad_rows" / f"part-{index:05d}.parquet")
    counts: dict[str, int] = {}
    for _, why in bad.rows:
        key = re.split(r"[:(\['{]", why)[0].strip()
        counts[key] = counts.get(key, 0) + 1
    return counts


# ---- prepare -----------------------------------------------------------------------------------
def _file_hashes(files: list[str]) -> dict[str, str]:
    """sha256 per local file, read in chunks (logs can be GBs); remote objects by size."""
    hashes = {}
    for f in files:
        if "://" in f:
            fs, local = filesystem(f)
            hashes[f] = f"size:{fs.get_file_info(local).size}"
            continue
        hashes[f] = sha256_file(Path(f))
    return hashes


def _items_table(path: str) -> tuple[pa.Array, list[str], list[tuple[str, ...]]]:
    """Sorted item keys, titles and genres of an items table (item, title[, genres as "a|b"])."""
    fs, local = filesystem(path)
    if path.endswith(".parquet"):
        table = pq.read_table(local, filesystem=fs)
    else:
        import pyarrow.csv as pacsv

        with fs.open_input_stream(local) as stream:
            table = pacsv.read_csv(stream, parse_options=pacsv.ParseOptions(delimiter="\t" if path.endswith(".tsv") else ","),
                                   convert_options=pacsv.ConvertOptions(strings_can_be_null=True,
                                                                        column_types={"item": pa.string()}))
    if "item" not in table.column_names or "title" not in table.column_names:
        raise DataError(f"{path}: needs columns item and title; found {table.column_names}")
    table = table.sort_by("item")
    keys = table.column("item").cast(pa.string()).combine_chunks()
    genres = table.column("genres").to_pylist() if "genres" in table.column_names else [None] * len(table)
    titles = [str(t) for t in table.column("title").to_pylist()]
    return keys, titles, [tuple(g for g in (text or "").split("|") if g) for text in genres]


def _from_log(cfg: DataConfig, path: str, out: Path) -> tuple[Catalogue, dict[str, Any]]:
    items = _items_table(cfg.items_file) if cfg.items_file else None
    result = run_pipeline(path, out, items[0] if items else None, cfg.max_history, cfg.k_core, cfg.num_shards,
                          cfg.strict)
    shutil.rmtree(out / "_buckets", ignore_errors=True)
    if items:
        catalogue = catalogue_from_titles(items[1], items[2])
    else:
        catalogue = catalogue_from_titles(result["catalogue_keys"].to_pylist())
    catalogue = Catalogue(catalogue.titles, catalogue.genres, catalogue.counted_genres, result.pop("popularity"))
    result.pop("catalogue_keys")
    return catalogue, result


def _from_json(cfg: DataConfig, path: Path, out: Path) -> tuple[Catalogue, dict[str, Any]]:
    files = [path / cfg.train_file, path / cfg.valid_file]
    if cfg.test_file and (path / cfg.test_file).is_file():  # optional (the bundled sample has none): no test split
        files.append(path / cfg.test_file)
    if cfg.format == "sprec_json":
        catalogue = load_sprec_catalogue(path)
        reads = [read_sprec_json(f, catalogue, cfg.strict) for f in files]
    else:  # the train file's names make the catalogue; the other splits are read against it
        catalogue, *train = read_sdpo_json(files[0], None, cfg.strict)
        reads = [tuple(train)] + [read_sdpo_json(f, catalogue, cfg.strict)[1:] for f in files[1:]]
    bad: dict[str, int] = {}
    for i, (_, b) in enumerate(reads):
        for reason, count in _write_bad_rows(b, out, i).items():
            bad[reason] = bad.get(reason, 0) + count
    counts = {}
    splits = [[e.last(cfg.max_history) for e in rows] for rows, _ in reads] + [[]] * (len(SPLITS) - len(reads))
    for name, rows in zip(SPLITS, splits, strict=True):
        write_example_shards(rows, out / "examples" / name, cfg.num_shards)
        counts[name] = len(rows)
    catalogue = catalogue.with_popularity(i for e in splits[0] for i in (*e.history, e.target))
    return catalogue, {"counts": counts, "bad_rows": bad, "rows": sum(map(len, splits)) + sum(bad.values())}


def _subsample(out: Path, split: str, n: int, seed: int, num_items: int) -> np.ndarray | None:
    """Writes sampled/<split>/ (the n rows of smallest hash); returns that subset's popularity."""
    import ray

    files = _parts(out / "examples" / split)
    threshold = _threshold(files, n, seed)
    (out / "sampled" / split).mkdir(parents=True, exist_ok=True)
    pick = ray.remote(num_cpus=0.25)(_pick)
    return sum(ray.get([pick.remote(str(f), seed, threshold, str(out / "sampled" / split / f.name), num_items)
                        for f in files]))


def open_prepared(out: str | Path) -> PreparedData:
    """A prepared directory as it is, reading only: how `sprec-ray eval` opens a finished run's data."""
    out = Path(out)
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out / 'manifest.json'} is missing: the run's data was never prepared")
    manifest = json.loads((out / "manifest.json").read_text())
    return PreparedData(out, load_catalogue_parquet(out / "catalogue.parquet"), manifest["counts"],
                        manifest["bad_rows"], manifest["source_hashes"], manifest)


def prepare_dataset(cfg: DataConfig, out: str | Path, scratch_dir: str | Path, seed: int = 0) -> PreparedData:
    """Build (or, when the same sources and settings are already prepared there, reopen) `out`.

    Needs a running Ray instance: the work runs in Ray tasks, and `out` must be a path every node
    of the cluster sees.
    """
    out = Path(out)
    path = str(resolve_data_path(cfg, scratch_dir)) if "://" not in cfg.path else cfg.path
    if cfg.format == "interactions":
        sources = list_files(path) + ([cfg.items_file] if cfg.items_file else [])
    else:
        names = [cfg.train_file, cfg.valid_file, cfg.test_file] + (["id2name.json"] if cfg.format == "sprec_json" else [])
        sources = [str(Path(path) / n) for n in names if n and (Path(path) / n).is_file()]
    hashes = _file_hashes(sources)
    key = hashlib.sha256(json.dumps([vars(cfg), seed, path, hashes], sort_keys=True, default=str).encode()).hexdigest()
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text()).get("key") == key:
        return open_prepared(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if cfg.format == "interactions":
        catalogue, result = _from_log(cfg, path, out)
    else:
        catalogue, result = _from_json(cfg, Path(path), out)
    counts = dict(result["counts"])
    if counts["train"] == 0:
        raise DataError(f"{path}: no usable training rows (bad rows by reason: {result['bad_rows']})")
    # The run's seed picks the training rows only: runs that differ in seed are scored on the same
    # valid / test rows (those a seed-0 run has), so their metrics compare row for row.
    for split, n, split_seed in (("train", cfg.train_samples, seed), ("valid", cfg.valid_samples, 1),
                                 ("test", cfg.test_samples, 2)):
        if 0 < n < counts[split]:
            popularity = _subsample(out, split, n, split_seed, len(catalogue))
            counts[split] = n
            if split == "train":  # popularity describes the rows trained on
                catalogue = Catalogue(catalogue.titles, catalogue.genres, catalogue.counted_genres, popularity)
    save_catalogue_parquet(catalogue, out / "catalogue.parquet")
    manifest = {**result, "key": key, "source": path, "format": cfg.format, "counts": counts,
                "examples": {s: result["counts"].get(s, 0) for s in SPLITS}, "items": len(catalogue),
                "counted_genres": list(catalogue.counted_genres), "source_hashes": hashes}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return PreparedData(out, catalogue, counts, result["bad_rows"], hashes, manifest)
