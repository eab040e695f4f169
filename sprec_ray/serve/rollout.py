"""Which adapter a running service answers with, and how it changes without dropping a request.

The gateway holds the live adapter and stamps it on every request it forwards; a model replica
loads whichever adapter a request names (switching is per batch, on the engine thread), so a replica
started later by the autoscaler, or one restarted after a crash, serves the live adapter too. A
switch is therefore one assignment in the gateway: requests forwarded before it finish on the old
adapter, later ones use the new one, and each client sees the `adapter` field change exactly once.

Before the switch the new adapter is checked on disk (describe_adapter: files, tensors, shapes
against the base model) and then loaded and scored on one replica (the probe); either failing
leaves the live adapter as it was. `previous` is a stack: a rollback returns to the adapter before
the live one and pops it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .adapters import AdapterError, AdapterRef, describe_adapter, newest_round

log = logging.getLogger("sprec_ray.serve")
PROBE_TIMEOUT_S = 120.0  # loading an adapter into a CPU replica's engine and scoring one answer
KEPT_REFUSALS = 10


class Rollout:
    def __init__(self, base_model: Path, live: AdapterRef, probe: Callable[[AdapterRef], Awaitable[float]]) -> None:
        self.base_model = base_model
        self.live = live
        self.previous: list[AdapterRef] = []
        self.refused: list[dict[str, Any]] = []  # the latest refusals, newest last, for GET /version
        self.followed = live.round if live.round is not None else -1  # newest round serve.follow has seen
        self._probe = probe
        self._lock = asyncio.Lock()  # one change at a time: a deploy racing a rollback would lose one

    async def deploy(self, path: str, round_id: int | None = None) -> AdapterRef:
        """Make `path` the live adapter, or raise AdapterError with the live one unchanged."""
        async with self._lock:
            try:
                ref = await asyncio.to_thread(describe_adapter, path, self.base_model, round_id)
                if ref == self.live:
                    return ref
                await self._checked_probe(ref)
            except AdapterError as err:
                self._refuse(path, str(err))
                raise
            self.previous.append(self.live)
            self._switch(ref, "deployed")
            return ref

    async def rollback(self) -> AdapterRef:
        """Back to the adapter that was live before this one; AdapterError when there is none, or
        when its files changed since it was served."""
        async with self._lock:
            if not self.previous:
                raise AdapterError("no previous adapter to roll back to: this service has served only "
                                   f"{self.live.path or 'the base model'}")
            ref = self.previous[-1]
            again = await asyncio.to_thread(describe_adapter, ref.path, self.base_model, ref.round)
            if again.sha256 != ref.sha256:
                raise AdapterError(f"{ref.path} changed since it was served (sha256 {ref.sha256} -> {again.sha256}); "
                                   f"deploy it explicitly if that is intended")
            await self._checked_probe(ref)
            self.previous.pop()
            self._switch(ref, "rolled back to")
            return ref

    async def follow(self, run_dir: Path, sft_only: bool) -> AdapterRef | None:
        """One poll of serve.follow: deploy the run's newest finished round if serve.follow has not
        seen it. A refused round is logged and kept in `refused`, and not tried again."""
        newest = await asyncio.to_thread(newest_round, run_dir, sft_only)
        if newest is None or newest[0] <= self.followed:
            return None
        self.followed = newest[0]
        try:
            return await self.deploy(str(newest[1]), newest[0])
        except AdapterError as err:
            log.error("serve.follow: round %d's adapter refused, still serving %s: %s", newest[0],
                      self.live.public(), err)
            return None

    def state(self) -> dict[str, Any]:
        return {"live": self.live.describe(), "previous": [r.describe() for r in reversed(self.previous)],
                "refused": self.refused}

    async def _checked_probe(self, ref: AdapterRef) -> None:
        try:
            await asyncio.wait_for(self._probe(ref), PROBE_TIMEOUT_S)
        except Exception as err:  # the replica's own error, wrapped by Ray with its trace: the last line says it
            text = [line for line in str(err).strip().splitlines() if line.strip()]
            raise AdapterError(f"a model replica could not load {ref.path}: "
                               f"{text[-1].strip() if text else type(err).__name__}"[:600]) from None

    def _refuse(self, path: str, reason: str) -> None:
        self.refused = [*self.refused, {"path": path, "reason": reason}][-KEPT_REFUSALS:]
        log.error("adapter %s refused; still serving %s: %s", path, self.live.public(), reason)

    def _switch(self, ref: AdapterRef, verb: str) -> None:
        log.info("%s adapter %s (round %s, sha256 %s)", verb, ref.path, ref.round, ref.sha256)
        self.live = ref
