"""benchmarks/results/ holds only current outputs of the benchmark scripts, each reported in RESULTS.md.

Fast and Ray-free: it reads file names and JSON headers. A file belongs in benchmarks/results/ when a
script in benchmarks/ names it as an output (its name appears in the script) and
benchmarks/RESULTS.md names it; every JSON there records where, when and how it was measured
(benchmarks/provenance.py writes these fields).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCHMARKS / "results"
PROVENANCE = ("commit", "date", "machine", "command")
# Subfolders allowed for a long experiment's per-run files, and the script that writes them.
RUN_FOLDERS = {"quality_runs": "quality.py"}


def names(text: str, name: str) -> bool:
    """Whether `text` names the file `name` (not merely a longer name ending in it)."""
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", text) is not None


def scripts() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(BENCHMARKS.glob("*.py"))}


def result_files() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*") if p.is_file())


def test_results_folder_holds_only_known_outputs() -> None:
    texts = scripts()
    report = (BENCHMARKS / "RESULTS.md").read_text()
    problems = []
    for path in result_files():
        rel = path.relative_to(RESULTS)
        if len(rel.parts) > 1:
            folder = rel.parts[0]
            if len(rel.parts) > 2 or folder not in RUN_FOLDERS:
                problems.append(f"{rel}: only {sorted(RUN_FOLDERS)} may hold files below results/")
            elif not names(texts.get(RUN_FOLDERS[folder], ""), folder):
                problems.append(f"{rel}: {RUN_FOLDERS[folder]} does not write into {folder}/")
            elif not names(report, f"{folder}/"):
                problems.append(f"{rel}: RESULTS.md does not name {folder}/")
            continue
        writers = [name for name, text in texts.items() if names(text, rel.name)]
        if not writers:
            problems.append(f"{rel}: no benchmarks/*.py names it as an output")
        if not names(report, rel.name):
            problems.append(f"{rel}: benchmarks/RESULTS.md does not name it")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", [p for p in result_files() if p.suffix == ".json"],
                         ids=lambda p: str(p.relative_to(RESULTS)))
def test_result_json_records_provenance(path: Path) -> None:
    data = json.loads(path.read_text())
    missing = [k for k in PROVENANCE if not isinstance(data.get(k), str) or not data[k].strip()]
    assert not missing, f"{path.relative_to(RESULTS)} lacks {missing}"
