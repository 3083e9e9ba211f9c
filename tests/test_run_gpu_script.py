"""``benchmarks/run_gpu.sh`` dry run on the CPU: every stage runs (toy sizes, GPU tests only collected) and writes
its files under $OUT before the next starts, so the one GPU call it is made for does not fail on plumbing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_run_gpu_dry_run(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHONPATH=ROOT)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "run_gpu.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["build", "ops", "learners", "profile", "floor"]
    assert all(r[1] == "0" for r in rows), rows
    for stage in ("build", "ops", "learners", "profile", "floor"):
        assert (tmp_path / f"{stage}.log").is_file()
    profile = json.loads((tmp_path / "profile_coop-N1000.json").read_text())
    assert set(profile["paths"]) == {"reference", "fast", "compiled"}
    for row in profile["paths"].values():
        assert row["median_ms"] > 0 and row["top_kernels"]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["rows"] and bench["rows"][0]["bench"].startswith("text floor")
