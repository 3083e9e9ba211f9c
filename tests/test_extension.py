"""Import-time behaviour of the compiled extension: fall back with a reason when it cannot be used."""
from __future__ import annotations

import os

import pytest
import torch

import fastprompt
from fastprompt import _extension


def test_extension_required_in_ci():
    """FASTPROMPT_REQUIRE_EXT=1 (CI) turns a missing / broken extension into a failure instead of skips."""
    if os.environ.get("FASTPROMPT_REQUIRE_EXT", "0") != "1":
        pytest.skip("FASTPROMPT_REQUIRE_EXT is not 1")
    assert _extension.extension_loaded(), f"fastprompt._C is required but did not load: {_extension.load_error()}"


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_error", None)
    yield
    _extension._loaded, _extension._error = None, None


def test_mismatched_torch_is_refused_before_loading(monkeypatch, fresh_state):
    monkeypatch.setattr(_extension, "build_info", lambda: {"torch": "1.13.0+cu117", "cuda": "11.7", "with_cuda": True})
    assert not _extension.extension_loaded()
    assert "built for torch 1.13.0+cu117" in _extension.load_error()
    report = fastprompt.env_report(print_report=False)
    assert "built for torch 1.13.0" in report and "op assemble on cpu: auto -> reference" in report


def test_mismatched_cuda_major_is_refused(monkeypatch, fresh_state):
    if torch.version.cuda is None:
        pytest.skip("this torch has no CUDA")
    other = str(int(torch.version.cuda.split(".")[0]) - 1) + ".8"
    monkeypatch.setattr(_extension, "build_info", lambda: {"torch": torch.__version__, "cuda": other, "with_cuda": True})
    assert not _extension.extension_loaded()
    assert f"built for CUDA {other}" in _extension.load_error()


def test_disable_switch(monkeypatch, fresh_state):
    monkeypatch.setenv("FASTPROMPT_DISABLE_EXT", "1")
    assert not _extension.extension_loaded()
    assert "FASTPROMPT_DISABLE_EXT" in _extension.load_error()
    # The learners still work, on the reference ops.
    from tests.conftest import tiny_clip

    learner = fastprompt.create_learner("coop", tiny_clip(), ["dog", "cat"], n_ctx=2)
    assert learner(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 2)


def test_selftest_passes_on_this_install():
    from fastprompt.benchmarking.selftest import selftest

    results = selftest(verbose=False)
    assert {r[1] for r in results} >= {"torch", "auto"} and all(r[2] <= 1e-10 for r in results)
