"""The fast text side traces as one graph: its layout is static (built on the host per class list and batch
size), so nothing reads device values back. ``torch._dynamo.explain`` of each learner's text side on the
engine must report zero graph breaks (a break is where a host sync or a data-dependent shape would sit)."""
from __future__ import annotations

import pytest
import torch

import fastprompt
from tests.conftest import tiny_clip
from tests.learner_setups import SETUPS

NAMES = ["cat", "dog", "big red fish", "a rather long class name"]
# Learners whose class text side runs on the fast engine through ``class_text_features``.
ENGINE_LEARNERS = ["coop", "cocoop", "kgcoop", "prograd", "dept", "capt", "decapt", "maple", "ivlp", "promptsrc"]


@pytest.fixture(scope="module")
def clip32():
    return tiny_clip(dtype=torch.float32, text_layers=2)


def _explain(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


@pytest.mark.parametrize("method", ENGINE_LEARNERS)
def test_class_text_features_has_no_graph_break(method, clip32):
    options = dict(SETUPS[method][0])
    torch.manual_seed(0)
    learner = fastprompt.create_learner(method, clip32, NAMES, config=options).train()
    assert not learner.uses_reference
    v = torch.randn(2, int(clip32.visual.output_dim))
    out = learner.class_text_features(v)  # eager run first: the same function, for comparison below
    report = _explain(learner.class_text_features, v)
    assert report.graph_count >= 1
    assert report.graph_break_count == 0, [str(b.reason) for b in report.break_reasons]
    assert out.shape[-2] == len(NAMES)


def test_layout_is_built_once_per_pattern(clip32):
    learner = fastprompt.create_learner("cocoop", clip32, NAMES, n_ctx=2).train()
    v = torch.randn(3, int(clip32.visual.output_dim))
    learner.class_text_features(v)
    first = learner.text.layout("all", 3, v.device)
    learner.class_text_features(v)
    assert learner.text.layout("all", 3, v.device) is first  # cached: the same tensors reach every layer and step
    assert first.num_pairs == 3 * len(NAMES) and first.total_rows == int(first.cu_seqlens[-1])
    assert learner.text.layout("all", 2, v.device) is not first
