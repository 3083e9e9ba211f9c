"""Seed / shots sweeps, ``fastprompt summarize`` (mean ± std, 95% CI as the official parse_test_res.py) and the
zero-shot CLIP baseline, end to end on synthetic datasets with a tiny open_clip config."""
from __future__ import annotations

import json
import math

import pytest

from fastprompt.cli import main
from fastprompt.training.summarize import spread, summarize
from tests.training.test_cli_train import _common, env  # noqa: F401  (the module fixture)


def test_spread_is_parse_test_res():
    """np.mean, np.std (population) and 1.96 * std / sqrt(n), written out for 70, 72, 74."""
    s = spread([70.0, 72.0, 74.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(72.0)
    assert s["std"] == pytest.approx(math.sqrt(8.0 / 3.0))
    assert s["ci95"] == pytest.approx(1.96 * math.sqrt(8.0 / 3.0) / math.sqrt(3.0))
    assert spread([50.0])["std"] == 0.0
    with pytest.raises(ValueError):
        spread([])


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_summarize_tables(tmp_path):
    for seed, acc in ((1, 70.0), (2, 72.0), (3, 74.0)):
        _write(tmp_path / "coop" / f"seed{seed}" / "results.json",
               {"method": "coop", "dataset": "dtd", "seed": seed, "shots": 16, "subsample": "all", "accuracy": acc,
                "finished": True})
    _write(tmp_path / "coop" / "seed4" / "results.json",  # an unfinished run does not count
           {"method": "coop", "dataset": "dtd", "seed": 4, "shots": 16, "accuracy": 10.0, "finished": False})
    for seed, (b, n) in ((1, (80.0, 60.0)), (2, (82.0, 62.0))):
        run = tmp_path / "b2n" / "dtd" / f"seed{seed}"
        _write(run / "run_config.json", {"method": "cocoop", "dataset": "dtd", "seed": seed, "shots": 16})
        _write(run / "results_base.json", {"dataset": "dtd", "accuracy": b})
        _write(run / "results_new.json", {"dataset": "dtd", "accuracy": n})
    out = summarize([str(tmp_path)], output_dir=str(tmp_path / "summary"))
    rows = {(r["method"], r["metric"]): r for r in out["rows"]}
    acc = rows[("coop", "accuracy")]
    assert (acc["n"], acc["seeds"]) == (3, [1, 2, 3]) and acc["mean"] == pytest.approx(72.0)
    assert rows[("cocoop", "base")]["mean"] == pytest.approx(81.0) and rows[("cocoop", "new")]["std"] == pytest.approx(1.0)
    assert rows[("cocoop", "hm")]["mean"] == pytest.approx(2 * 81.0 * 61.0 / 142.0)
    md = (tmp_path / "summary" / "summary.md").read_text()
    assert "72.00 ± 1.63" in md and "± 1.85" in md  # mean ± std and the 95% interval
    assert (tmp_path / "summary" / "summary.csv").read_text().startswith("method,dataset,shots,subsample,metric,n,mean,std,ci95")
    assert json.loads((tmp_path / "summary" / "summary.json").read_text())["rows"][0]["method"] == "cocoop"
    assert (tmp_path / "summary" / "summary.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="no finished run"):
        summarize([str(tmp_path / "summary")])


def test_without_matplotlib_tables_still_written(tmp_path, monkeypatch, capsys):
    import importlib.util
    import sys

    from fastprompt.training import report

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    paths = report.write_report(str(tmp_path), "base2new", [{"dataset": "a", "base": 1.0, "new": 2.0, "hm": 1.3}],
                                ["dataset", "base", "new", "hm"], {}, plot=True)
    assert "png" not in paths and (tmp_path / "base2new.md").is_file()
    assert "fastprompt[plot]" in capsys.readouterr().out
    with pytest.raises(ImportError, match=r"fastprompt\[plot\]"):
        report.pyplot()


def test_sweep_reuses_finished_runs_and_zeroshot(env, tmp_path, capsys):  # noqa: F811
    base, model, root = env
    out = tmp_path / "sweep"
    argv = ["train", "--method", "coop", "--dataset", "caltech101", "--epochs", "1", "--batch-size", "2",
            "--output-dir", str(out), "--seeds", "1", "2"] + _common(model, root, shots=None) + ["--opts", "TRAINER.COOP.N_CTX", "2"]
    assert main(argv[:-3] + ["--shots", "1"] + argv[-3:]) == 0
    assert (out / "shots_1" / "seed2" / "results.json").is_file()
    capsys.readouterr()
    assert main(argv[:-3] + ["--shots", "1", "2"] + argv[-3:]) == 0  # seeds of 1 shot reused, 2 shots trained
    printed = capsys.readouterr().out
    assert printed.count("reused") == 2 and "run 4/4" in printed and "ETA of the rest" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert sorted((r["shots"], r["n"]) for r in summary["rows"]) == [(1, 2), (2, 2)]

    zs = tmp_path / "zs"
    assert main(["zeroshot", "--method", "kgcoop", "--dataset", "caltech101", "--subsample", "base", "new",
                 "--output-dir", str(zs)] + _common(model, root, shots=None)) == 0
    base_res = json.loads((zs / "caltech101" / "results_base.json").read_text())
    assert base_res["method"] == "zeroshot" and base_res["template"] == "a photo of a {}." and base_res["num_classes"] == 2
    assert main(["summarize", str(zs), str(out)]) == 0
    table = capsys.readouterr().out
    assert "| zeroshot | caltech101 |" in table and "| hm |" in table and "| coop | caltech101 | 2 |" in table
