"""Where a config's paths point: the data folder (or the generated test set) and files such as
`selfplay.init_adapter`, from the cwd or else from the checkout."""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from .records import DataError
from .synthetic import write_synthetic_sprec

# The checkout that holds this package. scripts/install.sh installs editable (and jobs ship the repo
# as working_dir), so the repo's data/ sits here; relative data paths fall back to it, which makes a
# config work from any cwd.
REPO_ROOT = Path(__file__).resolve().parents[2]
GOODREADS_SAMPLE = REPO_ROOT / "data" / "goodreads"


def from_checkout(raw: str) -> Path:
    """A config path: absolute or from the cwd when it exists there, else from the checkout root."""
    path = Path(raw).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path


def resolve_data_path(cfg: DataConfig, scratch_dir: str | Path) -> Path:
    """'synthetic' -> a generated Goodreads-like set in scratch_dir (tests); 'bundled' -> the
    shipped Goodreads sample; a relative path -> from the cwd, else from the checkout root."""
    if cfg.path == "synthetic":
        target = Path(scratch_dir) / "synthetic_goodreads"
        if not (target / "train.json").exists():
            write_synthetic_sprec(target)
        return target
    path = GOODREADS_SAMPLE if cfg.path == "bundled" else from_checkout(cfg.path)
    if not path.exists():
        raise DataError(f"data.path {cfg.path!r} does not exist (looked in {Path.cwd()} and {REPO_ROOT})")
    return path.resolve()
