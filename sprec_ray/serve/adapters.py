"""The adapters a live service can switch to: what names one (its round and the sha256 of its weights),
the checks that it fits the served base model before any replica loads it, and a run's finished
rounds, which `serve.follow` deploys as the self-play driver finishes them.

A round is finished when its last training phase has a manifest (`r<N>_dpo`, or `r<N>_sft` for
round 0 and `selfplay.method: sft_only`): the driver writes a manifest only after the phase's adapter
is saved, so an adapter named by one is complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..artefacts import FINAL_FILE, in_run
from ..manifest import Phase, sha256_file

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
INIT_ADAPTER_DIR = "init_adapter"  # where the driver stages selfplay.init_adapter (round 0 without r0_sft)


class AdapterError(ValueError):
    """The adapter cannot be served; the message says which file and why. The live one stays."""


@dataclass(frozen=True)
class AdapterRef:
    """One servable adapter. `path` None is the bare base model."""

    path: str | None
    sha256: str | None  # of adapter_model.safetensors, as `sprec-ray export`'s manifest records it
    round: int | None  # self-play round, when known

    @property
    def engine_id(self) -> int:
        """The engine's LoRA id: vLLM caches adapters by id, so the id follows the path and the weights."""
        if self.path is None:
            return 1
        digest = hashlib.sha256(f"{self.path}\0{self.sha256}".encode()).hexdigest()
        return int(digest[:7], 16) + 2

    def public(self) -> dict[str, Any]:
        """What every response says about the adapter that produced it."""
        return {"round": self.round, "sha256": self.sha256}

    def describe(self) -> dict[str, Any]:
        return {**self.public(), "path": self.path}


def describe_adapter(path: str | Path | None, base_model: Path, round_id: int | None = None) -> AdapterRef:
    """Check that `path` is a LoRA adapter for `base_model` and name it; AdapterError otherwise.

    Reads every tensor (a truncated or corrupt file fails here, not in a replica) and compares each
    LoRA matrix with the base weight it adapts: a module the base lacks, or a shape that does not fit,
    means an adapter for another base model."""
    if path is None:
        return AdapterRef(None, None, round_id)
    adapter = Path(path).expanduser().resolve()
    if not adapter.is_dir():
        raise AdapterError(f"{adapter} is not a directory")
    config = _json_object(adapter / CONFIG_FILE)
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{adapter / CONFIG_FILE}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
    weights = adapter / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{weights} is missing (a PEFT adapter saved with safe_serialization)")
    tensors = _tensors(weights)
    _check_fits(tensors, _base_shapes(base_model), adapter, base_model)
    if round_id is None:
        round_id = _manifest_round(adapter)
    return AdapterRef(str(adapter), sha256_file(weights), round_id)


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path} is missing: not a PEFT adapter directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise AdapterError(f"{path} must hold a JSON object")
    return value


def _tensors(weights: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, after reading all of them: LoRA weights are small, and only a full read
    finds a truncated file or non-finite values."""
    import torch
    from safetensors.torch import load_file

    try:
        loaded = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for every kind of corruption
        raise AdapterError(f"{weights} cannot be read as safetensors ({type(err).__name__}: {err})") from None
    if not loaded:
        raise AdapterError(f"{weights} holds no tensors")
    for name, tensor in loaded.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{weights}: tensor {name} holds NaN or infinite values")
    return {name: tuple(tensor.shape) for name, tensor in loaded.items()}


@lru_cache(maxsize=4)
def _base_shapes(base_model: Path) -> dict[str, tuple[int, ...]]:
    """The base model's weight shapes from its safetensors headers (no weights read)."""
    from safetensors import safe_open

    files = sorted(Path(base_model).glob("*.safetensors"))
    if not files:
        raise AdapterError(f"base model {base_model} has no .safetensors weights to check adapters against")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _check_fits(tensors: dict[str, tuple[int, ...]], base: dict[str, tuple[int, ...]], adapter: Path,
                base_model: Path) -> None:
    other = f"{adapter} is not an adapter for the served base model {base_model}"
    for name, shape in tensors.items():
        module, sep, part = _split_lora(name)
        if not sep:
            continue  # modules_to_save and the like: PEFT checks them on load
        target = base.get(f"{module}.weight")
        if target is None:
            raise AdapterError(f"{other}: it adapts {module!r}, which the base model does not have")
        if len(shape) != 2 or len(target) != 2:
            raise AdapterError(f"{other}: {name} has shape {list(shape)} for a base weight of shape {list(target)}")
        out_f, in_f = target
        fits = shape[1] == in_f if part == "lora_A" else shape[0] == out_f
        if not fits:
            raise AdapterError(f"{other}: {name} has shape {list(shape)}, the base weight {module}.weight "
                               f"{list(target)}")


def _split_lora(name: str) -> tuple[str, bool, str]:
    """'base_model.model.<module>.lora_A.weight' -> ('<module>', True, 'lora_A')."""
    for part in ("lora_A", "lora_B"):
        head, sep, _ = name.partition(f".{part}.")
        if sep:
            return head.removeprefix("base_model.model."), True, part
    return name, False, ""


def _manifest_round(adapter: Path) -> int | None:
    """The round of an exported adapter, from its manifest's `trained_by` phase (r2_dpo -> 2)."""
    try:
        phase = Phase.parse(str(json.loads((adapter / "manifest.json").read_text()).get("trained_by", "")))
    except (OSError, ValueError, AttributeError):
        return None
    return phase.round if phase else None


def finished_rounds(run_dir: Path, sft_only: bool) -> dict[int, Path]:
    """Round -> its final adapter, for every round whose training has finished so far."""
    rounds: dict[int, Path] = {}
    init = run_dir / INIT_ADAPTER_DIR
    if (init / CONFIG_FILE).is_file():
        rounds[0] = init
    try:  # the finished run's last round, which final.json names
        final = json.loads((run_dir / FINAL_FILE).read_text())
        if isinstance(final.get("round"), int) and final.get("adapter"):
            rounds[final["round"]] = Path(in_run(final["adapter"], run_dir))
    except (OSError, ValueError, AttributeError):
        pass
    for manifest in (run_dir / "manifests").glob("r*_*.json"):
        phase = Phase.parse(manifest.stem)
        last_stage = "sft" if phase is None or phase.round == 0 or sft_only else "dpo"
        if phase is None or phase.stage != last_stage:
            continue
        try:
            ref = json.loads(manifest.read_text())["outputs"]["adapter"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced (the driver writes manifests atomically) or not a training phase's
        rounds[phase.round] = Path(in_run(ref, run_dir))
    return rounds


def newest_round(run_dir: Path, sft_only: bool) -> tuple[int, Path] | None:
    rounds = finished_rounds(run_dir, sft_only)
    return max(rounds.items()) if rounds else None
