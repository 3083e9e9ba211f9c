"""Timing and comparison helpers shared by the benchmarks (``fastprompt bench``, ``fastprompt bench --step``,
``fastprompt selftest`` and ``benchmarks/``)."""
from __future__ import annotations

from typing import List

import torch

__all__ = ["sync", "rel_err", "markdown_table"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius, in float64)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def markdown_table(head: List[str], rows: List[List[str]]) -> str:
    """A Markdown table with padded columns (readable as plain text too)."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(head), sep] + [fmt(r) for r in rows])
