"""Raw (user, item, timestamp) logs -> leave-last-out example shards, with Ray tasks that write to disk.

Stage 1, one task per file piece: read, validate (bad rows go to bad_rows/ with their reason),
hash-partition the good rows by user into bucket files. Stage 2 (only with k_core): tasks count
surviving items per bucket until the item set is stable. Stage 3, one task per bucket: map item
ids, sort by (user, timestamp, row), cut leave-last-out examples with max_history, write them and
return counts and popularity. A user's rows all land in one bucket, so no shuffle service is
needed; Ray Data's groupby starts shuffle actors whose fixed cost outweighed the work itself.
The driver only ever holds the catalogue keys, counts and per-item popularity.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .records import DataError

NEEDED = ("user", "item", "timestamp")
BAD_ROWS_SCHEMA = pa.schema([("file", pa.string()), ("row", pa.int64()), ("reason", pa.string()),
                             ("value", pa.string())])
EXAMPLE_SCHEMA = pa.schema([("row_id", pa.int64()), ("history", pa.list_(pa.int64())), ("target", pa.int64()),
                            ("candidates", pa.list_(pa.int64())), ("user", pa.string())])
SPLITS = ("train", "valid", "test")
ROWS_PER_PIECE = 500_000  # a big Parquet file is read by several tasks, split at row groups
ROWS_PER_BUCKET = 2_000_000  # bounds a stage-3 task's memory
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


@dataclass(frozen=True)
class Piece:
    path: str  # local path or URI
    file_index: int
    row_start: int  # first row of the piece within its file
    row_groups: tuple[int, ...] | None  # Parquet row groups; None = the whole file (CSV)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """Local paths, s3:// and gs:// (whatever pyarrow's filesystems support)."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def _fmt(path: str) -> str:
    for suffix, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv")):
        if path.endswith(suffix):
            return fmt
    raise DataError(f"{path}: unsupported file type; use .csv, .tsv or .parquet")


def list_files(path: str) -> list[str]:
    """A file, or every .parquet/.csv/.tsv file under a directory, in sorted order (= row order)."""
    fs, root = filesystem(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{path} does not exist")
    if info.type == pafs.FileType.File:
        _fmt(root)
        return [path if "://" in path else root]
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith((".parquet", ".csv", ".tsv")))
    if not files:
        raise DataError(f"{path}: no .parquet, .csv or .tsv files in the directory")
    prefix = path.split("://")[0] + "://" if "://" in path else ""
    return [prefix + f for f in files]


def plan_pieces(files: list[str]) -> list[Piece]:
    """Parquet files split at row groups into ~ROWS_PER_PIECE pieces; CSV files whole."""
    pieces = []
    for index, path in enumerate(files):
        if _fmt(path) != "parquet":
            pieces.append(Piece(path, index, 0, None))
            continue
        fs, local = filesystem(path)
        meta = pq.ParquetFile(local, filesystem=fs).metadata
        missing = [c for c in NEEDED if c not in meta.schema.to_arrow_schema().names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {meta.schema.to_arrow_schema().names}")
        start, groups, rows = 0, [], 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= ROWS_PER_PIECE or g == meta.num_row_groups - 1:
                pieces.append(Piece(path, index, start, tuple(groups)))
                start, groups, rows = start + rows, [], 0
        if meta.num_row_groups == 0:
            pieces.append(Piece(path, index, 0, ()))
    return pieces


def _read_piece(piece: Piece) -> pa.Table:
    fs, local = filesystem(piece.path)
    if piece.row_groups is not None:
        return pq.ParquetFile(local, filesystem=fs).read_row_groups(list(piece.row_groups), columns=list(NEEDED))
    opts = pacsv.ParseOptions(delimiter="\t" if _fmt(piece.path) == "tsv" else ",")
    convert = pacsv.ConvertOptions(strings_can_be_null=True, column_types={"user": pa.string(), "item": pa.string()})
    with fs.open_input_stream(local) as stream:
        try:
            table = pacsv.read_csv(stream, parse_options=opts, convert_options=convert)
        except pa.ArrowInvalid as err:  # e.g. a line with the wrong number of fields: pyarrow names it
            raise DataError(f"{piece.path}: {err}") from None
    missing = [c for c in NEEDED if c not in table.column_names]
    if missing:
        raise DataError(f"{piece.path}: missing column(s) {missing}; found {table.column_names}")
    return table.select(list(NEEDED))


def _timestamps(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """float64 seconds; null where the value is missing or not a number (NaN included)."""
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        column = pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64())
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = pc.if_else(pc.match_substring_regex(column, _NUMBER), column, pa.scalar(None, column.type))
    try:
        stamps = pc.cast(column, pa.float64(), safe=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise DataError(f"timestamp column of type {column.type} is not numeric: {err}") from None
    return pc.if_else(pc.is_nan(stamps), pa.scalar(None, pa.float64()), stamps)


def _user_buckets(users: pa.ChunkedArray, num_buckets: int) -> np.ndarray:
    """Bucket of each row: a stable 64-bit hash of the user id, hashed once per distinct user."""
    encoded = pc.dictionary_encode(users).combine_chunks()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    uniques = np.asarray(encoded.dictionary.to_pylist(), dtype=object)
    hashes = pd.util.hash_array(uniques, categorize=False) if len(uniques) else np.zeros(0, np.uint64)
    return (hashes % np.uint64(num_buckets)).astype(np.int32)[codes]


def _bad_value(table: pa.Table, i: int) -> str:
    return ", ".join(f"{c}={table.column(c)[i].as_py()!r}" for c in NEEDED)


def partition_piece(piece_index: int, piece: Piece, item_keys: pa.Array | None, num_buckets: int,
                    out: str) -> dict:
    """Stage 1: validate one piece, write its bad rows, write its good rows into per-bucket files."""
    table = _read_piece(piece)
    n = table.num_rows
    users, items = table.column("user").cast(pa.string()), table.column("item").cast(pa.string())
    stamps = _timestamps(table.column("timestamp"))
    missing_id = pc.or_(pc.is_null(users), pc.is_null(items)).to_numpy(zero_copy_only=False)
    bad_stamp = ~missing_id & pc.is_null(stamps).to_numpy(zero_copy_only=False)
    reasons = {"missing user or item": missing_id, "missing or non-numeric timestamp": bad_stamp}
    if item_keys is not None:
        unknown = pc.invert(pc.is_in(items, value_set=item_keys)).to_numpy(zero_copy_only=False)
        reasons["item not in the items table"] = unknown & ~missing_id & ~bad_stamp
    bad = np.zeros(n, dtype=bool)
    for mask in reasons.values():
        bad |= mask
    rows = np.arange(piece.row_start, piece.row_start + n, dtype=np.int64)
    first_bad = None
    if bad.any():
        why = np.empty(n, dtype=object)
        for reason, mask in reasons.items():
            why[mask] = reason
        idx = np.flatnonzero(bad)
        values = [_bad_value(table, i) for i in idx.tolist()]  # bad rows are the exception: Python is fine
        bad_table = pa.table({"file": [piece.path] * len(idx), "row": rows[idx], "reason": why[idx].tolist(),
                              "value": values}, schema=BAD_ROWS_SCHEMA)
        Path(out, "bad_rows").mkdir(parents=True, exist_ok=True)
        pq.write_table(bad_table, Path(out, "bad_rows", f"part-{piece_index:05d}.parquet"))
        first_bad = (int(rows[idx[0]]), str(why[idx[0]]), values[0])
    good = np.flatnonzero(~bad)
    kept = pa.table({"user": pc.take(users, good), "item": pc.take(items, good), "ts": pc.take(stamps, good),
                     "file": pa.array(np.full(len(good), piece.file_index, np.int32)), "row": rows[good]})
    buckets = _user_buckets(kept.column("user"), num_buckets)
    order = np.argsort(buckets, kind="stable")
    bounds = np.searchsorted(buckets[order], np.arange(num_buckets + 1))
    for b in range(num_buckets):
        if bounds[b + 1] > bounds[b]:
            part = kept.take(order[bounds[b]:bounds[b + 1]])
            Path(out, "_buckets", f"b{b:05d}").mkdir(parents=True, exist_ok=True)
            pq.write_table(part, Path(out, "_buckets", f"b{b:05d}", f"p{piece_index:05d}.parquet"))
    counts = {reason: int(mask.sum()) for reason, mask in reasons.items() if mask.any()}
    return {"file_index": piece.file_index, "rows": n, "end_row": piece.row_start + n, "bad": counts,
            "first_bad": first_bad, "items": pc.unique(kept.column("item")) if item_keys is None else None}


def _load_bucket(bucket_dir: str, item_keys: pa.Array, alive: np.ndarray | None, k_core: int) -> pa.Table:
    """A bucket's rows with `item` as an index into item_keys, k-core filtered when k_core > 0."""
    files = sorted(Path(bucket_dir).glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    if table is None:
        return pa.table({"user": pa.array([], pa.string()), "item": pa.array([], pa.int64()),
                         "ts": pa.array([], pa.float64()), "file": pa.array([], pa.int32()),
                         "row": pa.array([], pa.int64())})
    index = pc.index_in(table.column("item"), value_set=item_keys).to_numpy(zero_copy_only=False)
    table = table.set_column(1, "item", pa.array(index.astype(np.int64)))
    if k_core > 0 and alive is not None:
        table = table.filter(pa.array(alive[index]))
        codes = pc.dictionary_encode(table.column("user")).combine_chunks().indices.to_numpy(zero_copy_only=False)
        per_user = np.bincount(codes)
        table = table.filter(pa.array(per_user[codes] >= k_core))
    return table


def count_bucket_items(bucket_dir: str, item_keys: pa.Array, alive: np.ndarray, k_core: int) -> np.ndarray:
    """Stage 2: interactions per item that survive one k-core step in this bucket."""
    table = _load_bucket(bucket_dir, item_keys, alive, k_core)
    return np.bincount(table.column("item").to_numpy(), minlength=len(item_keys))


def sequence_bucket(bucket: int, bucket_dir: str, item_keys: pa.Array, alive: np.ndarray | None, k_core: int,
                    remap: np.ndarray, offsets: np.ndarray, max_history: int, num_items: int, out: str) -> dict:
    """Stage 3: one bucket's users -> time-ordered sequences -> leave-last-out example shards.

    Per user in (timestamp, file order) order: the last item is the test target, the one before it
    the valid target, every earlier position with an item before it a train example.
    """
    table = _load_bucket(bucket_dir, item_keys, alive, k_core)
    row_id = pa.array(offsets[table.column("file").to_numpy()] + table.column("row").to_numpy())
    table = pa.table({"user": table.column("user"), "ts": table.column("ts"), "row_id": row_id,
                      "item": pa.array(remap[table.column("item").to_numpy()])})
    table = table.sort_by([("user", "ascending"), ("ts", "ascending"), ("row_id", "ascending")])
    n = table.num_rows
    codes = pc.dictionary_encode(table.column("user")).combine_chunks().indices.to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if n else np.zeros(0, np.int64)
    lengths = np.diff(np.r_[starts, n])
    first = np.repeat(starts, lengths)  # each row's user start
    pos, length = np.arange(n) - first, np.repeat(lengths, lengths)
    ids, rows = table.column("item").to_numpy(), table.column("row_id").to_numpy()
    split = np.where(pos == length - 1, 2, np.where(pos == length - 2, 1, 0))
    out_counts, popularity = {}, np.zeros(num_items, np.int64)
    for code, name in enumerate(SPLITS):
        at = np.flatnonzero((pos >= 1) & (split == code))
        lo = np.maximum(first[at], at - max_history)
        sizes = at - lo
        list_offsets = np.r_[0, np.cumsum(sizes)]
        gather = np.repeat(lo - list_offsets[:-1], sizes) + np.arange(list_offsets[-1])
        history = pa.ListArray.from_arrays(pa.array(list_offsets, pa.int32()), pa.array(ids[gather]))
        part = pa.table({"row_id": rows[at], "history": history, "target": ids[at],
                         "candidates": pa.ListArray.from_arrays(pa.array(np.zeros(len(at) + 1, np.int32)),
                                                                pa.array([], pa.int64())),
                         "user": pc.take(table.column("user"), pa.array(at))}, schema=EXAMPLE_SCHEMA)
        Path(out, "examples", name).mkdir(parents=True, exist_ok=True)
        pq.write_table(part, Path(out, "examples", name, f"part-{bucket:05d}.parquet"))
        out_counts[name] = len(at)
        if name == "train":
            popularity += np.bincount(ids[gather], minlength=num_items) + np.bincount(ids[at], minlength=num_items)
    return {"counts": out_counts, "users": len(starts), "rows": n, "popularity": popularity}


def _k_core(buckets: list[str], keys_ref: Any, num_items: int, k_core: int) -> tuple[np.ndarray, int]:
    """The items alive in the k-core, and the rounds it took: drop items (and then users) under k
    interactions until nothing changes."""
    import ray

    alive, rounds = np.ones(num_items, bool), 0
    count = ray.remote(num_cpus=0.5)(count_bucket_items)
    while True:
        rounds += 1
        counts = sum(ray.get([count.remote(b, keys_ref, alive, k_core) for b in buckets]))
        now = counts >= k_core
        if np.array_equal(now, alive):
            return alive, rounds
        alive = now


def run_pipeline(path: str, out: str | Path, item_keys: pa.Array | None, max_history: int, k_core: int,
                 num_shards: int, strict: bool) -> dict:
    """Run the three stages on the current Ray cluster; returns the catalogue keys, counts and popularity.

    item_keys: sorted ids of an items table (rows with other items are bad), or None = the items
    seen in the log. `out` must be on storage every node sees (a shared or object-store path).
    """
    import ray

    out = str(out)
    pieces = plan_pieces(list_files(path))
    from_log = item_keys is None
    # one bucket per ~ROWS_PER_BUCKET rows at least; a piece holds up to ROWS_PER_PIECE rows
    num_buckets = max(num_shards, math.ceil(len(pieces) * ROWS_PER_PIECE / ROWS_PER_BUCKET))
    keys_ref = ray.put(item_keys) if item_keys is not None else None
    stage1 = ray.remote(num_cpus=0.5)(partition_piece)
    clock = time.perf_counter()
    parts = ray.get([stage1.remote(i, p, keys_ref, num_buckets, out) for i, p in enumerate(pieces)])
    bad: dict[str, int] = {}
    for p in parts:
        for reason, count in p["bad"].items():
            bad[reason] = bad.get(reason, 0) + count
    if strict and bad:
        piece, part = next((pieces[i], p) for i, p in enumerate(parts) if p["first_bad"])
        row, reason, value = part["first_bad"]
        raise DataError(f"{piece.path}: row {row}: {reason} ({value!r})")
    if from_log:
        item_keys = pc.unique(pa.chunked_array([p["items"] for p in parts], pa.string()))
        item_keys = pc.take(item_keys, pc.sort_indices(item_keys))
    # global row number of each file's row 0: files are numbered in sorted order
    file_rows = np.zeros(max(p.file_index for p in pieces) + 1, np.int64)
    for p in parts:
        file_rows[p["file_index"]] = max(file_rows[p["file_index"]], p["end_row"])
    offsets = np.r_[0, np.cumsum(file_rows)[:-1]]
    buckets = [str(Path(out, "_buckets", f"b{b:05d}")) for b in range(num_buckets)]
    seconds = {"partition_s": time.perf_counter() - clock}
    clock = time.perf_counter()
    keys_ref = ray.put(item_keys)
    alive, rounds = _k_core(buckets, keys_ref, len(item_keys), k_core) if k_core > 0 else (None, 0)
    seconds["kcore_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    kept = alive if alive is not None else np.ones(len(item_keys), bool)
    if from_log:  # the catalogue is the items that survive; ids follow their sorted keys
        remap = np.where(kept, np.cumsum(kept) - 1, -1)
        catalogue_keys = pc.filter(item_keys, pa.array(kept))
    else:
        remap, catalogue_keys = np.arange(len(item_keys)), item_keys
    stage3 = ray.remote(num_cpus=0.5)(sequence_bucket)
    done = ray.get([stage3.remote(b, d, keys_ref, alive, k_core, remap, offsets, max_history, len(catalogue_keys), out)
                    for b, d in enumerate(buckets)])
    seconds["sequence_s"] = time.perf_counter() - clock
    good = sum(p["rows"] for p in parts) - sum(bad.values())
    sequenced = sum(d["rows"] for d in done)
    return {"catalogue_keys": catalogue_keys,
            "popularity": sum(d["popularity"] for d in done) if done else np.zeros(len(catalogue_keys), np.int64),
            "counts": {s: sum(d["counts"][s] for d in done) for s in SPLITS},
            "rows": sum(p["rows"] for p in parts), "bad_rows": bad, "kcore_dropped_rows": good - sequenced,
            "kcore_rounds": rounds, "users": sum(d["users"] for d in done), "pieces": len(pieces),
            "buckets": num_buckets, "seconds": {k: round(v, 3) for k, v in seconds.items()}}

