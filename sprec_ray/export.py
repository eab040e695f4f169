"""`sprec-ray export`: a finished run's final adapter as a self-describing artefact to ship or start from.

The folder holds the PEFT adapter and `manifest.json`: the base model and the sha256 of its weights,
the data files' hashes, the run's config and digest, the training phase's steps and losses, the
final adapter's validation metrics, package versions and the machine. `selfplay.init_adapter` starts
self-play from such a folder, as SPRec starts its rounds from a separately trained SFT model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from .artefacts import FINAL_FILE, in_run
from .config import load_config
from .manifest import Phase, machine_name, phase_order, sha256_file, write_json_atomic

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAIN_KEYS = ("steps", "first_loss", "final_loss", "loss", "tokens_per_s", "fit_s")


def export_run(run: str | Path, dest: str | Path) -> dict[str, Any]:
    """Copy the run's final adapter to `dest` and write its manifest there; returns the manifest."""
    run_dir = Path(run).resolve()
    final_path = run_dir / FINAL_FILE
    if not final_path.is_file():
        raise FileNotFoundError(f"{final_path} is missing: export needs a finished run (`sprec-ray train` writes it last)")
    final = json.loads(final_path.read_text())
    adapter = Path(in_run(final["adapter"], run_dir))
    base = Path(in_run(final["base_model"], run_dir))
    manifests = {p.stem: json.loads(p.read_text()) for p in (run_dir / "manifests").glob("*.json")}
    phases = {n: Phase.parse(n) for n in manifests}
    trained = sorted((n for n, p in phases.items() if p and p.stage in ("sft", "dpo")), key=phase_order)
    scored = sorted((n for n, p in phases.items() if p and p.stage == "eval"), key=phase_order)
    if not trained or not scored:
        raise FileNotFoundError(f"{run_dir}/manifests holds no training or validation phase to describe the adapter")
    last, evaluated = manifests[trained[-1]], manifests[scored[-1]]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copyfile(adapter / name, dest / name)
    cfg = load_config(run_dir / "config.yaml")
    manifest = {
        "adapter": {name: sha256_file(dest / name) for name in ADAPTER_FILES},
        "base_model": {"name": cfg.model.name, "revision": cfg.model.revision,
                       "weights_sha256": {p.name: sha256_file(p) for p in sorted(base.glob("*.safetensors"))}},
        "data": {"path": cfg.data.path, "sha256": last["data_hashes"]},
        "config": cfg.to_dict(), "config_digest": cfg.digest(), "seed": cfg.seed,
        "trained_by": trained[-1], "training": {k: last["metrics"][k] for k in TRAIN_KEYS if k in last["metrics"]},
        "training_seconds": sum(manifests[n]["seconds"] for n in trained),
        "validation": {"phase": scored[-1], "metrics": evaluated["metrics"]},
        "versions": last["versions"], "machine": machine_name(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json_atomic(dest / "manifest.json", manifest)
    return manifest
