"""Per-round report in the run directory: report.md (table + PNG plots + phase timings) and the same
as one self-contained page, report.html (plots embedded as base64 PNG, so it can be mailed or
attached as a single file)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

TABLE_KEYS = ("NDCG", "HR", "DivRatio", "ORRatio", "MGU", "DGU")


def metrics_table(rows: Sequence[tuple[str, dict[str, float]]], k: int) -> str:
    """Markdown table, one row per labelled metrics dict, columns <metric>@k."""
    header = "| run | " + " | ".join(f"{m}@{k}" for m in TABLE_KEYS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_KEYS) + 1)]
    for label, metrics in rows:
        cells = [f"{metrics[f'{m}@{k}']:.4f}" if f"{m}@{k}" in metrics else "-" for m in TABLE_KEYS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_rounds(rows: Sequence[tuple[str, dict[str, float]]], k: int, out_path: Path) -> Path:
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


def write_html_report(path: Path, title: str, rows: Sequence[tuple[str, dict[str, float]]],
                      plots: dict[int, Path], timings: Sequence[tuple[str, float]]) -> Path:
    """One page: per k the metric table and its plot (inline PNG), then the phase wall times."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for k, png in plots.items():
        cells = [[label] + [f"{m[f'{n}@{k}']:.4f}" if f"{n}@{k}" in m else "-" for n in TABLE_KEYS]
                 for label, m in rows]
        data = base64.b64encode(png.read_bytes()).decode()
        parts += [f"<h2>@{k}</h2>", _html_table(["run"] + [f"{n}@{k}" for n in TABLE_KEYS], cells),
                  f'<img alt="rounds at {k}" src="data:image/png;base64,{data}">']
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


def write_report(run_dir: Path, rows: Sequence[tuple[str, dict[str, float]]], ks: Sequence[int],
                 title: str, timings: Sequence[tuple[str, float]] = ()) -> Path:
    """report.md and report.html in run_dir; returns the Markdown path."""
    sections = [f"# {title}\n"]
    plots = {}
    for k in ks:
        plots[k] = plot_rounds(rows, k, run_dir / f"rounds_at{k}.png")
        sections += [f"## @{k}\n", metrics_table(rows, k), f"\n![rounds at {k}]({plots[k].name})\n"]
    if timings:
        sections.append("## Phase wall time\n\n" + _timing_table(timings) + "\n")
    path = run_dir / "report.md"
    path.write_text("\n".join(sections))
    write_html_report(run_dir / "report.html", title, rows, plots, timings)
    return path
