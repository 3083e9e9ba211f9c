"""Benchmark helpers: reference and fast path timed in the same run; a summary table at the end."""
from __future__ import annotations

import json
import logging
import os
import platform
import time

import pytest
import torch

from fastprompt.benchmarking.timing import sync as _sync

logging.getLogger().setLevel(logging.ERROR)

_ROWS = []


_META = None


def record(row: dict) -> None:
    """Keep one result row for the end-of-session table, and rewrite $FASTPROMPT_BENCH_JSON with every row so
    far: a run killed by a time limit keeps what it measured."""
    _ROWS.append(row)
    _write_json()


def _write_json():
    global _META
    path = os.environ.get("FASTPROMPT_BENCH_JSON")
    if not path:
        return None
    if _META is None:
        _META = {
            "torch": torch.__version__,
            "triton": _version_of("triton"),
            "cuda": torch.version.cuda,
            "driver": _nvidia_driver(),
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}",
            "machine": platform.platform(),
        }
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": _META, "rows": _ROWS}, f, indent=2, default=str)
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous complete file
    return path


def median_ms(fn, device: torch.device, rounds: int) -> float:
    """Median wall time in ms of ``rounds`` calls of ``fn()``, each followed by a device sync (no warm-up)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def first_call_ms(fn, device: torch.device, gpu_rounds: int = 5):
    """(result of the first ``fn()`` call, reference time in ms). On a CPU that first call is the timing (seconds
    per step: no warm-up needed, and more rounds would not fit the time budget); elsewhere it is the warm-up
    and the time is the median of ``gpu_rounds`` further calls."""
    start = time.perf_counter()
    out = fn()
    _sync(device)
    ms = (time.perf_counter() - start) * 1e3
    if device.type != "cpu":
        ms = median_ms(fn, device, gpu_rounds)
    return out, ms


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _version_of(package: str):
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # not installed
        return None


def _nvidia_driver():
    """The NVIDIA driver version from nvidia-smi, or None without one."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    # The JSON first: a printing problem must never lose a long run's results.
    path = _write_json()
    if path:
        terminalreporter.write_line(f"wrote {path}")
    terminalreporter.write_sep("=", "fastprompt: reference vs fast (same run)")
    keys = None
    for row in _ROWS:  # files record different columns: a header line whenever they change
        if list(row) != keys:
            keys = list(row)
            terminalreporter.write_line(" | ".join(keys))
        terminalreporter.write_line(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
