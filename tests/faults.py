"""Faults injected from outside the code under test, as a crash or a lost machine would come.

`KillAfterCheckpoints` watches a Ray Train run's storage folder and, once the run's controller has
registered `after` checkpoints, SIGKILLs one process the test picks (a training worker, or its
node's raylet). A checkpoint folder appears when a worker uploads it, but the controller registers it
later (it polls the workers), and only a registered one is resumed from: counting folders let a
node die before any checkpoint was registered, and the run restarted from step 0. The controller
records what it registered in `checkpoint_manager_snapshot.json`.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil


def train_workers() -> list[int]:
    """Ray Train worker processes on this host (Ray titles them ray::RayTrainWorker), oldest first."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::RayTrainWorker"):
            found.append((proc.info["create_time"], proc.info["pid"]))
    return [pid for _, pid in sorted(found)]


class KillAfterCheckpoints(threading.Thread):
    def __init__(self, run_storage: Path, victim: Callable[[], int | None], after: int = 1, timeout_s: float = 600):
        super().__init__(daemon=True)
        self.run_storage, self.victim, self.after, self.timeout_s = Path(run_storage), victim, after, timeout_s
        self.killed: int | None = None
        self.seen: set[str] = set()
        self._done = threading.Event()

    def run(self) -> None:
        deadline = time.time() + self.timeout_s
        while not self._done.is_set() and time.time() < deadline:
            # the run keeps one checkpoint (num_to_keep=1): count every registered name ever seen
            self.seen.update(self._registered())
            if len(self.seen) >= self.after:
                pid = self.victim()
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    self.killed = pid
                    return
            time.sleep(0.02)

    def _registered(self) -> set[str]:
        try:
            snapshot = json.loads((self.run_storage / "checkpoint_manager_snapshot.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
            return set()
        return {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}

    def __enter__(self) -> KillAfterCheckpoints:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join(timeout=5)
