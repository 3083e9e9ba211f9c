"""Fault sweep: every fault and bad input of the reliability issue, and the other mistakes a new user makes, each
tried once and classified automatically. Not a pytest module (it writes a report; the pass/fail tests of the
same behaviour are the ``test_*.py`` files beside it).

    python3 -m tests.reliability.fault_sweep --out DIR [--only SUBSTRING] [--md REPORT.md]

Everything runs on the CPU with a tiny open_clip CLIP (random weights, ``--model`` JSON) and synthetic image
datasets written under ``DIR``. Most cases call the CLI's ``main(argv)`` in this process (what a user sees on
stderr is captured; an exception escaping ``main`` is the traceback a user would see); the kill -9 loops, the
two-process race, SIGINT and the offline download run real processes.

Each case declares the right behaviour (``expect``) and the words the message must contain (``names``: the
option, file or value at fault), and lands in exactly one class:

* **clear**: refused (non-zero exit / exception) with one message line naming the culprit, no traceback; for an
  ``expect="warn"`` case, a warning naming it.
* **ok**: the right behaviour is not an error (a valid input accepted with the right result, an adapter whole
  after every kill) and that is what happened.
* **unclear**: a traceback, a message that does not name the culprit, more than one error line, a Python API
  error raised from inside torch/open_clip rather than by a check, a wrong refusal, or a fail-fast case that
  took longer than its time limit.
* **silent**: accepted when it should have been refused, or a wrong result found by the case's own check.
* **data loss**: a previous good artifact (run directory, adapter) was changed or damaged.
* **crash**: the process died from a signal, hung past its timeout, or a child writer failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import List, Optional, Sequence

from tests.reliability.fault_harness import CASES, CLASSES, REPO, Case, Outcome

# ---------------------------------------------------------------------------------------------- classification
def _error_lines(c: Case, o: Outcome) -> List[str]:
    if c.api:
        return [line for line in o.err.splitlines() if line.strip() and not line.startswith("warning: ")]
    if c.report:
        return [line for line in (o.err + "\n" + o.out).splitlines() if line.strip()]
    return [line for line in o.err.splitlines() if line.startswith(("error:", "error ")) or ": error: " in line]


def _names_in(line: str, names: Sequence[str]) -> bool:
    return all(n.lower() in line.lower() for n in names)


def message_line(c: Case, o: Outcome) -> str:
    """The line of the output that the report shows for this try."""
    if "Traceback (most recent call last)" in o.err:
        last = [line for line in o.err.splitlines() if line.strip() and not line.startswith("warning: ")]
        return "TRACEBACK " + (last[-1] if last else "")
    lines = _error_lines(c, o)
    named = [line for line in lines if _names_in(line, c.names)]
    if named or lines:
        return (named or lines)[0].strip()
    warned = [line for line in o.err.splitlines() if line.startswith("warning: ")]
    if warned:
        return warned[0]
    text = [line for line in (o.err + "\n" + o.out).splitlines() if line.strip()]
    return text[-1].strip() if text else ""


def _clear_refusal(c: Case, o: Outcome) -> bool:
    if "Traceback (most recent call last)" in o.err or (c.api and not o.from_check):
        return False
    if c.limit_s is not None and o.seconds > c.limit_s:
        return False
    lines = _error_lines(c, o)
    if not c.report and len(lines) != 1:  # one line, not a cascade of errors
        return False
    return any(_names_in(line, c.names) for line in lines)


def classify(c: Case, o: Outcome) -> str:
    if o.lost:
        return "data loss"
    if o.crashed:
        return "crash"
    if o.wrong:
        return "silent"
    if c.expect == "accept":
        return "ok" if o.code == 0 else "unclear"  # refusing a valid input is a misleading error
    if o.code != 0:
        return "clear" if _clear_refusal(c, o) else "unclear"
    if c.expect == "warn":
        warned = [line for line in o.err.splitlines() if line.startswith("warning: ")]
        return "clear" if any(_names_in(line, c.names) for line in warned) else "silent"
    return "silent"


# ---------------------------------------------------------------------------------------------- report
def _cell(text: str, width: int = 150) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("|", "\\|")


def _totals(rows) -> dict:
    return {k: sum(1 for r in rows if r["class"] == k) for k in CLASSES}


def _comparison(rows, baseline) -> List[str]:
    """Report lines: the totals of an earlier run (``--baseline``) beside these, and every case whose class changed."""
    before = {r["name"]: r for r in baseline["rows"]}
    changed = [(before[r["name"]], r) for r in rows if r["name"] in before and before[r["name"]]["class"] != r["class"]]
    lines = ["## Before and after", "",
             f"The same cases run against the library of {baseline['label']} (these sweep files copied beside it, "
             "run with `--json BEFORE.json`):", "",
             "| run | tried | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 2) + "|"]
    for label, rs in ((baseline["label"], baseline["rows"]), ("this run", rows)):
        lines.append(f"| {label} | {len(rs)} | " + " | ".join(str(_totals(rs)[k]) for k in CLASSES) + " |")
    lines += ["", "Cases whose class changed:", "", "| case | before | message before | now |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {b['class']} | {_cell(b['message'], 110)} | {r['class']} |" for b, r in changed]
    return lines + [""]


def write_report(path: str, rows, command: str, seconds: float, baseline=None) -> None:
    totals = _totals(rows)
    lines = [
        "# Fault sweep: results",
        "",
        "Every fault and bad input of the reliability issue, plus other mistakes a new user makes, tried once on",
        "a tiny CLIP (random weights) with synthetic datasets, on the CPU (`$WORK` = DIR/work). Produced by:",
        "",
        f"    {command}",
        "",
        f"Run time {seconds / 60:.1f} min. Classes (decided by `tests/reliability/fault_sweep.py`, see its docstring):",
        "**clear** = refused with one line naming the option/file (or a warning naming it, where a warning is the",
        "right behaviour); **ok** = the right behaviour is not an error and happened; **unclear** = traceback,",
        "message not naming the culprit, or a wrong refusal; **silent** = accepted when it should be refused, or a",
        "wrong result; **data loss** = a previous good artifact damaged; **crash** = killed by a signal or hung.",
        "",
        "## Totals",
        "",
        "| tried | " + " | ".join(CLASSES) + " |",
        "|---" * (len(CLASSES) + 1) + "|",
        f"| {len(rows)} | " + " | ".join(str(totals[k]) for k in CLASSES) + " |",
        "",
    ] + (_comparison(rows, baseline) if baseline else []) + [
        "## Cases",
        "",
        "| # | group | case | expected | observed | s | message (first line) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['group']} | {_cell(r['what'], 90)} | {r['expected']} | **{r['class']}** | "
                     f"{r['seconds']:.1f} | {_cell(r['message'])} |")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _expected(c: Case) -> str:
    names = ", ".join(f"`{n}`" for n in c.names)
    if c.expect == "refuse":
        return f"refuse naming {names}" if names else "refuse"
    if c.expect == "warn":
        return f"warn naming {names}"
    return "accept, right result"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="working folder (synthetic data, runs, adapters)")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    parser.add_argument("--md", default=None, help="write the Markdown report here")
    parser.add_argument("--json", default=None, help="write the rows as JSON here (a later run's --baseline)")
    parser.add_argument("--baseline", default=None, help="--json of an earlier run, compared in the report")
    parser.add_argument("--label", default="an earlier run", help="what the --json run was (e.g. a commit)")
    args = parser.parse_args(argv)

    import tests.conftest  # noqa: F401 - the tests' environment (Triton in the CPU interpreter without a GPU)
    import tests.reliability.fault_cases  # noqa: F401 - each registers its cases, in this order
    import tests.reliability.fault_cases_unclear  # noqa: F401
    import tests.reliability.fault_cases_inputs  # noqa: F401
    from tests.reliability.fault_harness import Sweep

    start = time.perf_counter()
    sweep = Sweep(os.path.abspath(args.out))
    rows = []
    for c in CASES:
        if args.only and args.only not in c.name:
            continue
        t0 = time.perf_counter()
        try:
            o = c.run(sweep)
        except BaseException as exc:  # noqa: BLE001 - a bug of the case itself: shown, never hidden
            if isinstance(exc, KeyboardInterrupt):
                raise
            o = Outcome(None, "", "Traceback (most recent call last)\nSWEEP-HARNESS " + traceback.format_exc())
        o.seconds = o.seconds or (time.perf_counter() - t0)
        verdict = classify(c, o)
        msg = message_line(c, o)
        for extra in (o.lost, o.crashed, o.wrong, o.note):
            if extra:
                msg = f"{extra} :: {msg}" if msg else extra
        msg = msg.replace(sweep.base, "$WORK").replace(REPO, "$REPO")  # machine-independent paths
        rows.append({"name": c.name, "group": c.group, "what": c.what, "expected": _expected(c), "class": verdict,
                     "seconds": time.perf_counter() - t0, "message": msg})
        print(f"[{len(rows):3d}] {verdict:9s} {c.name}: {_cell(msg, 160)}", flush=True)
    totals = {k: sum(1 for r in rows if r["class"] == k) for k in CLASSES}
    seconds = time.perf_counter() - start
    print(f"tried {len(rows)}: " + ", ".join(f"{k} {v}" for k, v in totals.items()) + f" ({seconds / 60:.1f} min)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"label": args.label, "rows": rows}, f, indent=1)
    if args.md:
        baseline = None
        if args.baseline:
            with open(args.baseline, encoding="utf-8") as f:
                baseline = json.load(f)
        command = "python3 -m tests.reliability.fault_sweep --out DIR --md " + os.path.relpath(args.md, REPO)
        command += f" --only {args.only}" if args.only else ""
        command += " --baseline BEFORE.json" if baseline else ""
        write_report(args.md, rows, command, seconds, baseline)
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
