"""Load a run's data from its config: catalogue, train/valid examples and the bad-row reports."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig
from .catalogue import Catalogue, load_sprec_catalogue
from .readers import read_interactions, read_sdpo_json, read_sprec_json
from .records import BadRows, DataError, Example
from .synthetic import write_synthetic_sprec

# The checkout that holds this package. scripts/install.sh installs editable (and jobs ship the repo
# as working_dir), so the repo's data/ sits here; relative data paths fall back to it, which makes a
# config work from any cwd.
REPO_ROOT = Path(__file__).resolve().parents[2]
GOODREADS_SAMPLE = REPO_ROOT / "data" / "goodreads"


@dataclass(frozen=True)
class RecDataset:
    catalogue: Catalogue  # popularity counted on train (histories and targets)
    train: list[Example]
    valid: list[Example]
    bad: tuple[BadRows, ...]
    source_hashes: dict[str, str]  # file -> sha256, for manifests


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resolve_data_path(cfg: DataConfig, scratch_dir: str | Path) -> Path:
    """'synthetic' -> a generated Goodreads-like set in scratch_dir (tests); 'bundled' -> the
    shipped Goodreads sample; a relative path -> from the cwd, else from the checkout root."""
    if cfg.path == "synthetic":
        target = Path(scratch_dir) / "synthetic_goodreads"
        if not (target / "train.json").exists():
            write_synthetic_sprec(target)
        return target
    path = GOODREADS_SAMPLE if cfg.path == "bundled" else Path(cfg.path).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.exists():
        raise DataError(f"data.path {cfg.path!r} does not exist (looked in {Path.cwd()} and {REPO_ROOT})")
    return path.resolve()


def _subsample(examples: list[Example], n: int, seed: int) -> list[Example]:
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
    train = _subsample(train, cfg.train_samples, seed)
    valid = _subsample(valid, cfg.valid_samples, seed + 1)
    catalogue = catalogue.with_popularity(i for e in train for i in (*e.history, e.target))
    hashes = {str(f): _sha256(f) for f in files if f.is_file()}
    return RecDataset(catalogue, train, valid, (bad_train, bad_valid), hashes)
