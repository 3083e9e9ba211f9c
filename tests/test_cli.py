"""The command line: ``fastprompt bench`` on a small configuration, and ``fastprompt env``."""
from __future__ import annotations

import json

from fastprompt.cli import main


def test_bench_small(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--method", "coop", "--classes", "2", "--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| coop" in text and "speed-up" in text
    rows = json.loads(out.read_text())
    assert rows[0]["classes"] == 2 and rows[0]["max_rel_err"] < 1e-5 and rows[0]["fast_ms"] > 0


def test_env(capsys):
    assert main(["env"]) == 0
    assert "op assemble on cpu" in capsys.readouterr().out


def test_training_commands_are_listed(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("train", "eval", "base2new", "datasets"):
        assert command in text
