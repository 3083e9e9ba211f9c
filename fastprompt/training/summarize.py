"""Spread over seeds: mean, standard deviation and 95% confidence interval of finished runs, per dataset.

The statistics are those of the official ``parse_test_res.py`` (CoOp / Dassl): ``mean = np.mean(acc)``,
``std = np.std(acc)`` (population, ddof = 0) and ``ci95 = 1.96 * std / sqrt(n)``.

Runs are found under the given paths: a training run (``results.json``, from ``fastprompt train`` or
``fastprompt zeroshot``) gives one "accuracy"; a base-to-new seed directory (``results_base.json`` and
``results_new.json``) gives "base" and "new", and the summary adds H = HM(mean base, mean new).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

from fastprompt.training.report import (
    has_matplotlib, markdown_table, pyplot, save_figure, write_csv, write_json, write_markdown,
)

COLUMNS = ["method", "dataset", "shots", "subsample", "metric", "n", "mean", "std", "ci95", "seeds"]


def spread(values: Sequence[float]) -> Dict[str, float]:
    """values [n] -> {"n", "mean", "std" (population), "ci95" = 1.96 std / sqrt(n)}, as parse_test_res.py."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarize")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return {"n": n, "mean": mean, "std": std, "ci95": 1.96 * std / math.sqrt(n)}


def _read(path: str) -> Optional[Dict[str, Any]]:
    """The JSON object in ``path``; None when it is missing, and a warning naming it when it is damaged."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return None
    except ValueError as exc:
        warnings.warn(f"summarize: {path} is damaged ({exc}); that run is left out", stacklevel=2)
        return None


def _run_config(directory: str) -> Dict[str, Any]:
    return _read(os.path.join(directory, "run_config.json")) or {}


def find_records(paths: Sequence[str]) -> List[Dict[str, Any]]:
    """One record per (finished run, metric): {method, dataset, shots, subsample, seed, metric, value, run}."""
    records = []
    for top in paths:
        if not os.path.exists(top):
            raise FileNotFoundError(f"summarize: {top!r} does not exist")
        for directory, _, files in sorted(os.walk(top)):
            cfg = _run_config(directory)
            if "results_base.json" in files and "results_new.json" in files:
                for part in ("base", "new"):
                    res = _read(os.path.join(directory, f"results_{part}.json"))
                    if res and "accuracy" in res:
                        records.append({"method": cfg.get("method", "?"), "dataset": res.get("dataset", cfg.get("dataset", "?")),
                                        "shots": cfg.get("shots"), "subsample": "base2new", "seed": cfg.get("seed"),
                                        "metric": part, "value": float(res["accuracy"]), "run": directory})
            elif "results.json" in files:
                res = _read(os.path.join(directory, "results.json"))
                if res and res.get("finished", True) and "accuracy" in res:
                    records.append({"method": res.get("method", cfg.get("method", "?")),
                                    "dataset": res.get("dataset", cfg.get("dataset", "?")),
                                    "shots": res.get("shots", cfg.get("shots")), "subsample": res.get("subsample", "all"),
                                    "seed": res.get("seed", cfg.get("seed")), "metric": "accuracy",
                                    "value": float(res["accuracy"]), "run": directory})
    return records


def summarize_records(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows of COLUMNS: one per (method, dataset, shots, subsample, metric), plus "hm" for base-to-new groups
    (the harmonic mean of the mean base and mean new accuracy; its n/std/ci95 are left empty)."""
    groups: "OrderedDict[tuple, List[Dict[str, Any]]]" = OrderedDict()
    for r in sorted(records, key=lambda r: (r["method"], r["dataset"], r["shots"] if r["shots"] is not None else -1,
                                            r["subsample"], r["metric"], r["seed"] if r["seed"] is not None else -1)):
        groups.setdefault((r["method"], r["dataset"], r["shots"], r["subsample"], r["metric"]), []).append(r)
    rows = []
    for (method, dataset, shots, subsample, metric), rs in groups.items():
        rows.append(dict(method=method, dataset=dataset, shots=shots, subsample=subsample, metric=metric,
                         seeds=[r["seed"] for r in rs], **spread([r["value"] for r in rs])))
        if metric == "new":
            base = next((x for x in rows if (x["method"], x["dataset"], x["shots"], x["subsample"], x["metric"])
                         == (method, dataset, shots, subsample, "base")), None)
            if base is not None:
                b, n = base["mean"], rows[-1]["mean"]
                rows.append(dict(method=method, dataset=dataset, shots=shots, subsample=subsample, metric="hm",
                                 n="", mean=0.0 if b + n == 0 else 2 * b * n / (b + n), std="", ci95="", seeds=[]))
    return rows


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown table: mean ± std and the 95% interval, in %."""
    shown = []
    for r in rows:
        spread_text = "" if r["std"] == "" else f"{r['mean']:.2f} ± {r['std']:.2f}"
        ci = "" if r["ci95"] == "" else f"± {r['ci95']:.2f}"
        shown.append(dict(r, mean_std=spread_text or f"{r['mean']:.2f}", ci=ci, shots="" if r["shots"] is None else r["shots"]))
    return markdown_table(shown, ["method", "dataset", "shots", "subsample", "metric", "n", "mean_std", "ci"],
                          ["method", "dataset", "shots", "subsample", "metric", "seeds", "mean ± std (%)", "95% CI"])


def plot(rows: Sequence[Dict[str, Any]], path: str, title: str = "") -> str:
    """Bars of the mean per (dataset, shots, metric), one colour per method, error bars = 95% interval."""
    plt = pyplot()
    rows = [r for r in rows if r["ci95"] != ""]
    cats = list(OrderedDict.fromkeys(
        f"{r['dataset']}" + (f"/{r['shots']}s" if r["shots"] not in (None, "") else "") + ("" if r["metric"] == "accuracy" else f"/{r['metric']}")
        for r in rows))
    methods = list(OrderedDict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(cats) * max(1, len(methods)) + 2), 3.8), dpi=100)
    width = 0.8 / max(1, len(methods))
    for k, method in enumerate(methods):
        xs, ys, es = [], [], []
        for r in rows:
            if r["method"] != method:
                continue
            cat = f"{r['dataset']}" + (f"/{r['shots']}s" if r["shots"] not in (None, "") else "") + ("" if r["metric"] == "accuracy" else f"/{r['metric']}")
            xs.append(cats.index(cat) + (k - (len(methods) - 1) / 2) * width)
            ys.append(r["mean"])
            es.append(r["ci95"])
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=method)
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=30 if len(cats) > 3 else 0, ha="right" if len(cats) > 3 else "center")
    ax.set_ylabel("accuracy (%), 95% CI")
    ax.set_ylim(0, 105)
    ax.set_title(title or "mean over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def summarize(paths: Sequence[str], output_dir: Optional[str] = None, stem: str = "summary",
              with_plot: bool = True) -> Dict[str, Any]:
    """Find the finished runs under ``paths``, summarize them, and (with ``output_dir``) write
    ``<stem>.json``, ``.csv``, ``.md`` and, when matplotlib is installed, ``.png``."""
    records = find_records(paths)
    if not records:
        raise FileNotFoundError(f"summarize: no finished run (results.json / results_base.json) under {list(paths)}")
    rows = summarize_records(records)
    out: Dict[str, Any] = {"rows": rows, "records": records, "paths": {}}
    if output_dir:
        p = out["paths"]
        p["json"] = write_json(os.path.join(output_dir, f"{stem}.json"), {"rows": rows, "records": records})
        p["csv"] = write_csv(os.path.join(output_dir, f"{stem}.csv"), rows, COLUMNS)
        p["markdown"] = write_markdown(os.path.join(output_dir, f"{stem}.md"), markdown(rows))
        if with_plot and has_matplotlib():
            p["png"] = plot(rows, os.path.join(output_dir, f"{stem}.png"))
    return out
