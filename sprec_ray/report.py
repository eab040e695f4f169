"""Per-round report in the run directory: report.md (table + PNG plots + phase timings) and the same
as one self-contained page, report.html (plots embedded as base64 PNG, so it can be mailed or
attached as a single file). Test-split results, when there are any, get their own section after
the validation tables, and the candidate task's HR@1 / ValidRatio and the log-prob ranking of
candidate lists their own tables."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

TABLE_KEYS = ("NDCG", "HR", "DivRatio", "ORRatio", "MGU", "DGU")
CANDIDATE_KEYS = ("cand_HR@1", "cand_ValidRatio")  # eval/candidates.py
Rows = Sequence[tuple[str, dict[str, float]]]


def _cells(rows: Rows, keys: Sequence[str]) -> list[list[str]]:
    return [[label] + [f"{m[k]:.4f}" if k in m else "-" for k in keys] for label, m in rows]


def _md_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def _tables(rows: Rows, ks: Sequence[int]) -> list[tuple[str, int | None, list[str], list[list[str]]]]:
    """(heading, k or None, header, cells) of each metric table: one per k, then the candidate task's
    if any row has it."""
    tables: list[tuple[str, int | None, list[str], list[list[str]]]] = []
    for k in ks:
        keys = [f"{n}@{k}" for n in TABLE_KEYS]
        tables.append((f"@{k}", k, ["run", *keys], _cells(rows, keys)))
    if any(k in m for _, m in rows for k in CANDIDATE_KEYS):
        tables.append(("candidate task", None, ["run", "HR@1", "ValidRatio"], _cells(rows, CANDIDATE_KEYS)))
    rank_keys = [f"rank_{n}@{k}" for k in ks for n in ("HR", "NDCG")]
    if any(k in m for _, m in rows for k in rank_keys):
        tables.append(("candidates ranked by log-prob", None, ["run", *(k[5:] for k in rank_keys)],
                       _cells(rows, rank_keys)))
    return tables


def metrics_table(rows: Rows, k: int) -> str:
    """Markdown table, one row per labelled metrics dict, columns <metric>@k."""
    return _md_table(*_tables(rows, [k])[0][2:])


def plot_rounds(rows: Rows, k: int, out_path: Path) -> Path:
    """Four panels: accuracy, over-recommendation, genre unfairness, popularity of recommendations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _ in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    panels = [("accuracy", ("NDCG", "HR")), ("over-recommendation", ("DivRatio", "ORRatio")),
              ("genre unfairness (lower is fairer)", ("MGU", "DGU"))]
    for ax, (title, names) in zip(axes, panels, strict=False):
        for name in names:
            ax.plot(x, [m.get(f"{name}@{k}", float("nan")) for _, m in rows], marker="o", label=f"{name}@{k}")
        ax.set_title(title)
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.legend()
    groups = sorted({key for _, m in rows for key in m if key.startswith("PopShare") and key.endswith(f"@{k}")})
    bottom = [0.0] * len(rows)
    for key in groups:
        share = [m.get(key, 0.0) for _, m in rows]
        axes[3].bar(x, share, bottom=bottom, label=key.replace(f"@{k}", "").replace("PopShare", "pop group "))
        bottom = [b + s for b, s in zip(bottom, share, strict=True)]
    axes[3].set_title(f"top-{k} items by popularity group (4 = most popular)")
    axes[3].set_xticks(x, labels, rotation=30, ha="right")
    axes[3].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def _timing_table(timings: Sequence[tuple[str, float]]) -> str:
    lines = ["| phase | seconds |", "|---|---|"] + [f"| {name} | {sec:.1f} |" for name, sec in timings]
    lines.append(f"| **total** | {sum(sec for _, sec in timings):.1f} |")
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html_report(path: Path, title: str, rows: Rows,
                      plots: dict[int, Path], timings: Sequence[tuple[str, float]],
                      test_rows: Rows = ()) -> Path:
    """One page: per k the metric table and its plot (inline PNG), the test split's tables, then
    the phase wall times."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for heading, k, header, cells in _tables(rows, list(plots)):
        parts += [f"<h2>{html.escape(heading)}</h2>", _html_table(header, cells)]
        if k is not None:
            data = base64.b64encode(plots[k].read_bytes()).decode()
            parts.append(f'<img alt="rounds at {k}" src="data:image/png;base64,{data}">')
    if test_rows:
        parts.append("<h2>Test split</h2>")
        for heading, _, header, cells in _tables(test_rows, list(plots)):
            parts += [f"<h3>test {html.escape(heading)}</h3>", _html_table(header, cells)]
    if timings:
        total = sum(sec for _, sec in timings)
        parts += ["<h2>Phase wall time</h2>",
                  _html_table(["phase", "seconds"], [[n, f"{sec:.1f}"] for n, sec in timings] + [["total", f"{total:.1f}"]])]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "img{max-width:100%}")
    path.write_text(f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                    f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    return path


def write_report(run_dir: Path, rows: Rows, ks: Sequence[int],
                 title: str, timings: Sequence[tuple[str, float]] = (),
                 test_rows: Rows = ()) -> Path:
    """report.md and report.html in run_dir (validation per round, then `test_rows`); returns the
    Markdown path."""
    sections = [f"# {title}\n"]
    plots = {k: plot_rounds(rows, k, run_dir / f"rounds_at{k}.png") for k in ks}
    for heading, k, header, cells in _tables(rows, ks):
        plot = f"\n![rounds at {k}]({plots[k].name})\n" if k is not None else ""
        sections += [f"## {heading}\n", _md_table(header, cells) + "\n" + plot]
    if test_rows:
        sections.append("## Test split\n")
        sections += [f"### test {heading}\n\n{_md_table(header, cells)}\n" for heading, _, header, cells in _tables(test_rows, ks)]
    if timings:
        sections.append("## Phase wall time\n\n" + _timing_table(timings) + "\n")
    path = run_dir / "report.md"
    path.write_text("\n".join(sections))
    write_html_report(run_dir / "report.html", title, rows, plots, timings, test_rows)
    return path
