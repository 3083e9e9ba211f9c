"""Results as JSON, CSV, a Markdown table and a PNG bar plot (matplotlib, Agg backend)."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from fastprompt.io.atomic import atomic_write, atomic_write_bytes

__all__ = ["write_json", "write_csv", "markdown_table", "write_markdown", "plot_base2new", "write_report"]


def _atomic_write(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(fig, path: str) -> str:
    """A matplotlib figure written to ``path`` as PNG, atomically, then closed."""
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    pyplot().close(fig)
    return path


def write_json(path: str, obj: Any) -> str:
    _atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def write_csv(path: str, rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(row.get(c, "")) if not isinstance(row.get(c), float) else repr(row[c]) for c in columns])
    _atomic_write(path, buf.getvalue())
    return path


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Sequence[str], headers: Optional[Sequence[str]] = None) -> str:
    """A GitHub Markdown table; floats with 2 decimals (accuracies in %)."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: str, text: str) -> str:
    _atomic_write(path, text)
    return path


def has_matplotlib() -> bool:
    """True when matplotlib (the optional ``fastprompt[plot]`` extra) can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def pyplot():
    """matplotlib.pyplot on the Agg backend; ImportError with the install line when the extra is absent."""
    try:
        import matplotlib  # optional dependency (fastprompt[plot])
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'fastprompt[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)  # no display needed; safe in worker processes and CI
    import matplotlib.pyplot as plt  # optional dependency; after matplotlib.use("Agg")

    return plt


def plot_base2new(rows: Sequence[Dict[str, Any]], path: str, title: str = "base-to-new") -> str:
    """Grouped bars of base / new / HM accuracy per dataset (and the average) as a PNG."""
    plt = pyplot()

    names = [r["dataset"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.6), dpi=100)
    width = 0.27
    for k, (key, label) in enumerate((("base", "Base"), ("new", "New"), ("hm", "HM"))):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        bars = ax.bar(xs, [r[key] for r in rows], width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=30 if len(rows) > 4 else 0, ha="right" if len(rows) > 4 else "center")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(directory: str, stem: str, rows: List[Dict[str, Any]], columns: Sequence[str], extra: Dict[str, Any],
                 plot: bool = False, title: str = "") -> Dict[str, str]:
    """``stem``.json (rows + extra), .csv, .md (and .png for base-to-new rows) in ``directory``."""
    paths = {
        "json": write_json(os.path.join(directory, f"{stem}.json"), dict(extra, rows=rows)),
        "csv": write_csv(os.path.join(directory, f"{stem}.csv"), rows, columns),
        "markdown": write_markdown(os.path.join(directory, f"{stem}.md"),
                                   (f"### {title}\n\n" if title else "") + markdown_table(rows, columns)),
    }
    if plot and has_matplotlib():  # the plot is optional (fastprompt[plot]); tables are always written
        paths["png"] = plot_base2new(rows, os.path.join(directory, f"{stem}.png"), title=title or stem)
    elif plot:
        print(f"[fastprompt] no {stem}.png: matplotlib is not installed (pip install 'fastprompt[plot]')")
    return paths
