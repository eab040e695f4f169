"""report.md + report.html from per-round metrics and phase timings (no Ray, no training)."""

from __future__ import annotations

import base64
import re

from sprec_ray.report import write_report

ROWS = [("r0 (SFT)", {"NDCG@5": 0.0078, "HR@5": 0.0156, "DivRatio@5": 0.71, "NDCG@1": 0.0, "PopShare4@5": 0.4}),
        ("r1", {"NDCG@5": 0.0234, "HR@5": 0.0312, "DivRatio@5": 0.40, "NDCG@1": 0.01, "PopShare4@5": 0.3})]
TIMINGS = [("prepare", 21.0), ("r0_sft", 453.25), ("r0_eval", 117.0), ("r1_eval", 79.5)]


def test_html_report_has_table_rows_inline_plots_and_timings(tmp_path):
    md = write_report(tmp_path, ROWS, [1, 5], "sprec-ray run <test>", TIMINGS)
    assert md.name == "report.md" and "| r1 | 0.0234 | 0.0312 | 0.4000 |" in md.read_text()
    assert "| **total** | 670.8 |" in md.read_text()
    page = (tmp_path / "report.html").read_text()
    assert "<title>sprec-ray run &lt;test&gt;</title>" in page  # escaped, not markup
    row = "<tr><td>r1</td><td>0.0234</td><td>0.0312</td><td>0.4000</td><td>-</td><td>-</td><td>-</td></tr>"
    assert row in page and page.count("<td>r0 (SFT)</td>") == 2  # one table per K
    for name, sec in TIMINGS:
        assert f"<tr><td>{name}</td><td>{sec:.1f}</td></tr>" in page
    assert "<tr><td>total</td><td>670.8</td></tr>" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "rounds_at" not in page  # no link to a file next to it: the page stands alone


def test_test_split_and_candidate_task_get_their_own_tables(tmp_path):
    rows = [(label, {**m, "cand_HR@1": 0.25 * i, "cand_ValidRatio": 0.5}) for i, (label, m) in enumerate(ROWS)]
    tests = [("r1", {"NDCG@5": 0.125, "HR@5": 0.5, "cand_HR@1": 0.375, "cand_ValidRatio": 0.75})]
    md = write_report(tmp_path, rows, [5], "run", TIMINGS, tests).read_text()
    validation, test = md.split("## Test split")
    assert "| r1 | 0.2500 | 0.5000 |" in validation and "| r1 | 0.1250 | 0.5000 |" not in validation
    assert "### test @5" in test and "| r1 | 0.1250 | 0.5000 | - |" in test and "| r1 | 0.3750 | 0.7500 |" in test
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Test split</h2>" in page and "<tr><td>r1</td><td>0.3750</td><td>0.7500</td></tr>" in page
    assert "## Test split" not in write_report(tmp_path, ROWS, [5], "run").read_text()


def test_phases_order_by_round_then_stage_not_by_file_name(tmp_path):
    from sprec_ray.manifest import ManifestStore, PhaseRecord

    store = ManifestStore(tmp_path, "d", 0, {})
    names = ["prepare", "r0_sft", "r0_eval"] + [f"r{r}_{s}" for r in range(1, 12) for s in ("negatives", "sft", "dpo", "eval")] + ["r11_test"]
    for name in reversed(names):
        store.save(PhaseRecord(name, {}, {}, 1.0))
    assert store.completed() == names
