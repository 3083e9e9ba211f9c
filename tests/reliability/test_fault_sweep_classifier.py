"""The fault sweep's classifier can give every class: a case is only as honest as the checker that judges it."""
from __future__ import annotations

import pytest

from tests.reliability.fault_harness import Case, Outcome
from tests.reliability.fault_sweep import classify


def _case(expect="refuse", names=("--lr",), **kw):
    return Case("c", "g", "what", expect, names, run=lambda s: None, **kw)


@pytest.mark.parametrize("case, outcome, expected", [
    (_case(), Outcome(2, err="error: --lr / OPTIM.LR must be finite, got inf\n"), "clear"),
    (_case(), Outcome(2, err="error: must be finite, got inf\n"), "unclear"),  # does not name the option
    (_case(), Outcome(2, err="error: --lr bad\nerror: --lr worse\n"), "unclear"),  # not one line
    (_case(), Outcome(None, err="Traceback (most recent call last):\n  ...\nValueError: --lr\n"), "unclear"),
    (_case(), Outcome(0, out="test accuracy 25.00%"), "silent"),
    (_case(), Outcome(2, err="error: --lr x\n", lost="adapter changed"), "data loss"),
    (_case(), Outcome(None, crashed="killed by signal 11"), "crash"),
    (_case(limit_s=30), Outcome(2, err="error: --lr x\n", seconds=55), "unclear"),  # too slow to fail
    (_case("accept"), Outcome(0), "ok"),
    (_case("accept"), Outcome(2, err="error: --lr refused\n"), "unclear"),  # a valid input refused
    (_case("accept"), Outcome(0, wrong="stale logits"), "silent"),
    (_case("warn", ("anchor",)), Outcome(0, err="warning: class 'anchor' has no image\n"), "clear"),
    (_case("warn", ("anchor",)), Outcome(0), "silent"),
    (_case(api=True), Outcome(1, err="ValueError: --lr must be > 0\n"), "clear"),
    (_case(api=True), Outcome(1, err="RuntimeError: --lr shapes\n", from_check=False), "unclear"),  # from torch
    (_case(report=True, names=("a.jpg",)), Outcome(1, out="x: BAD IMAGES\n  - unreadable image a.jpg\n"), "clear"),
])
def test_classify(case, outcome, expected):
    assert classify(case, outcome) == expected
