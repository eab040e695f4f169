"""`sprec-ray deploy`: change the adapter a running service answers with, from any machine attached to
its Ray cluster. The command asks the service's gateway (a Serve deployment handle), which checks the
adapter and switches in place (rollout.py); nothing is restarted and no request is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import load_config
from .adapters import AdapterError, finished_rounds

CALL_TIMEOUT_S = 300.0  # checking the files, then loading and probing the adapter on a replica


def change_adapter(run_dir: str | Path, overrides: Sequence[str] = (), *, adapter: str | None = None,
                   round_id: int | None = None, rollback: bool = False, app: str = "sprec") -> dict[str, Any]:
    """Deploy `adapter` or the run's round `round_id`, roll back, or (none given) report the live one.
    Returns the service's state after the change; AdapterError when the service refused it."""
    from ray import serve

    from ..runtime import init_ray

    run_dir = Path(run_dir).expanduser().resolve()
    cfg = load_config(run_dir / "config.yaml", overrides)  # not load_run: the run may still be training
    if round_id is not None:
        rounds = finished_rounds(run_dir, cfg.selfplay.method == "sft_only")
        if round_id not in rounds:
            raise AdapterError(f"{run_dir} has no finished round {round_id}; finished: {sorted(rounds)}")
        adapter = str(rounds[round_id])
    init_ray(cfg.ray_address)
    try:
        gateway = serve.get_deployment_handle("Gateway", app)
    except Exception as err:  # Serve's own errors: no controller, no such app
        raise AdapterError(f"no running service (Serve app {app!r}) on this Ray cluster: {err}") from None
    if rollback:
        state = gateway.rollback.remote().result(timeout_s=CALL_TIMEOUT_S)
    elif adapter is not None:
        state = gateway.deploy.remote(str(Path(adapter).expanduser().resolve()), round_id).result(
            timeout_s=CALL_TIMEOUT_S)
    else:
        state = {"ok": True, **gateway.version.remote().result(timeout_s=CALL_TIMEOUT_S)}
    if not state.pop("ok"):
        raise AdapterError(f"refused: {state['error']}; still serving {state['live']}")
    return state
