"""Per-round report: a Markdown table plus PNG plots in the run directory."""

from __future__ import annotations

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


def write_report(run_dir: Path, rows: Sequence[tuple[str, dict[str, float]]], ks: Sequence[int],
                 title: str, extra: str = "") -> Path:
    sections = [f"# {title}\n"]
    for k in ks:
        png = plot_rounds(rows, k, run_dir / f"rounds_at{k}.png")
        sections += [f"## @{k}\n", metrics_table(rows, k), f"\n![rounds at {k}]({png.name})\n"]
    if extra:
        sections.append(extra)
    path = run_dir / "report.md"
    path.write_text("\n".join(sections))
    return path
