"""Where, when and how a results file was measured, recorded by the script that writes it.

Every file a benchmark writes into benchmarks/results/ starts with the four fields this returns
(`tests/test_results.py` checks they are there):

    commit   `git rev-parse --short HEAD` of the checkout the script ran from ("unknown" outside git)
    date     UTC, "YYYY-MM-DD HH:MM UTC"
    machine  the CPU model and core count (`sprec_ray.manifest.machine_name`), and the fp32 matmul
             peak in GFLOP/s per thread count when the script measured one
    command  the exact command line, the script's path relative to the repository

    from provenance import provenance
    report = {**provenance(sys.argv, peak_gflops={1: 96.0, 2: 189.2}), "results": ...}
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def git_commit(repo: Path = REPO) -> str:
    """The short hash of HEAD, or "unknown" where git or the repository is missing."""
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=False, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"


def command_line(argv: Sequence[str]) -> str:
    """`python <script relative to the repository> <arguments>`, quoted so that it can be pasted back."""
    if not argv:
        return "unknown"
    script = Path(argv[0])
    with contextlib.suppress(ValueError):  # a script outside the repository keeps its own path
        script = script.resolve().relative_to(REPO)
    return shlex.join(["python", str(script), *argv[1:]])


def provenance(argv: Sequence[str] | None = None,
               peak_gflops: Mapping[int | str, float] | None = None) -> dict[str, str]:
    """The four fields every results file carries: commit, date (UTC), machine and command.

    `argv` defaults to `sys.argv`; `peak_gflops` maps a thread count to the fp32 matmul peak the script
    measured in the same run (GFLOP/s), and is appended to the machine's name."""
    from sprec_ray.manifest import machine_name

    machine = machine_name()
    if peak_gflops:
        threads = " / ".join(str(t) for t in peak_gflops)
        values = " / ".join(f"{v:.0f}" for v in peak_gflops.values())
        machine += f"; fp32 matmul peak {values} GFLOP/s ({threads} threads)"
    return {"commit": git_commit(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine, "command": command_line(sys.argv if argv is None else argv)}
