"""What a run keeps in its storage for the other nodes: the catalogue, its item embeddings, final.json.

The driver writes them once (the catalogue at prepare time, final.json at the end); generation
actors, `sprec-ray eval` and serve replicas on any node read them back instead of re-reading the
dataset and re-embedding the catalogue. Paths stored in these files are relative to the run
directory, so a run moved or mounted elsewhere (a RayService's volume) still resolves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data.catalogue import Catalogue, load_catalogue_parquet, save_catalogue_parquet
from .manifest import write_json_atomic
from .models.base import HUB_PREFIX

CATALOGUE_DIR = "catalogue"
ITEMS_FILE = f"{CATALOGUE_DIR}/items.parquet"
FINAL_FILE = "final.json"


def embeddings_file(embedder: str) -> str:
    return f"{CATALOGUE_DIR}/embeddings-{embedder}.npy"


def write_catalogue(run_dir: str | Path, catalogue: Catalogue, embedder: str) -> dict[str, str]:
    """Items (title, genres, popularity, in id order) as Parquet and the embedder's item embeddings as .npy."""
    from .eval.embedders import make_embedder

    run_dir = Path(run_dir)
    (run_dir / CATALOGUE_DIR).mkdir(parents=True, exist_ok=True)
    save_catalogue_parquet(catalogue, run_dir / ITEMS_FILE)
    np.save(run_dir / embeddings_file(embedder), make_embedder(embedder).encode(catalogue.titles))  # type: ignore[arg-type]
    return {"catalogue": ITEMS_FILE, "embeddings": embeddings_file(embedder)}


def read_catalogue(run_dir: str | Path) -> Catalogue:
    path = Path(run_dir) / ITEMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run's prepare phase writes it (re-run `sprec-ray train --resume`)")
    return load_catalogue_parquet(path)


def load_grounder(run_dir: str | Path, catalogue: Catalogue, embedder: str):
    """A Grounder over the catalogue with the stored item embeddings (embedded afresh only when the
    run was prepared with another embedder)."""
    from .eval.embedders import make_embedder
    from .eval.grounding import Grounder

    stored = Path(run_dir) / embeddings_file(embedder)
    items = np.load(stored) if stored.is_file() else None
    return Grounder(catalogue.titles, make_embedder(embedder), item_embeddings=items)  # type: ignore[arg-type]


def write_final(run_dir: str | Path, base_model: str, adapter: str | None, round_id: int) -> None:
    """The finished run for eval / serve: base-model reference and adapter, run-relative where they
    are inside the run."""
    write_json_atomic(Path(run_dir) / FINAL_FILE, {"base_model": run_relative(base_model, run_dir),
                                                   "adapter": run_relative(adapter, run_dir) if adapter else None,
                                                   "round": round_id})


def run_relative(path: str, run_dir: str | Path) -> str:
    """`path` relative to the run dir when it lies inside it; anything else (a Hub reference, an
    outside adapter) unchanged."""
    if path.startswith(HUB_PREFIX):  # not a path: resolving it from a cwd inside the run would mangle it
        return path
    try:
        return str(Path(path).resolve().relative_to(Path(run_dir).resolve()))
    except ValueError:
        return path


def in_run(ref: str, run_dir: str | Path) -> str:
    """The inverse for this node: a run-relative path joined to the run dir; absolute paths and Hub
    references as they are."""
    if ref.startswith(HUB_PREFIX) or Path(ref).is_absolute():
        return ref
    return str(Path(run_dir) / ref)
