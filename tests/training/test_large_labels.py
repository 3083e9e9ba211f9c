"""Chunked top-k over large label spaces: exactly the unchunked top-1/top-5, ties included."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastprompt.training.large_labels import (
    RunningTopK, chunk_unsupported_reason, chunked_topk, learner_chunked_topk, stable_topk, topk_accuracy,
)


def _brute_topk(scores: torch.Tensor, k: int):
    """Python reference: per row, classes ordered by (score descending, class index ascending)."""
    rows = [sorted(range(scores.shape[1]), key=lambda c: (-float(row[c]), c))[:k] for row in scores]
    return torch.tensor(rows)


@pytest.mark.parametrize("chunk", [1, 7, 64, 333, 1000, 1500])
def test_running_topk_equals_full_sort_with_ties(chunk):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (12, 1000), generator=g).double()  # many exact ties, across chunk borders
    top = RunningTopK(5)
    for start in range(0, scores.shape[1], chunk):
        top.update(scores[:, start : start + chunk], start)
    values, indices = stable_topk(scores, 5)
    assert torch.equal(top.indices, indices) and torch.equal(top.values, values)
    assert torch.equal(indices, _brute_topk(scores, 5))


def test_chunks_out_of_order_are_refused():
    top = RunningTopK(2)
    top.update(torch.zeros(1, 4), 4)
    with pytest.raises(ValueError, match="increasing class order"):
        top.update(torch.zeros(1, 4), 0)


def test_21k_classes_streamed_text_gives_unchunked_top1_top5():
    C, E, B = 21_000, 512, 32
    g = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(C, E, generator=g), dim=-1)
    text[5000] = text[100]  # exact duplicates in different chunks: a tie the merge must break by class index
    text[20999] = text[100]
    image = F.normalize(torch.randn(B, E, generator=g), dim=-1)
    image[0] = text[100]  # row 0's best score is a three-way tie
    scale = torch.tensor(100.0)
    full_values, full_indices = stable_topk(scale * image @ text.t(), 5)

    def chunks(size):
        for s in range(0, C, size):
            yield text[s : s + size]

    for size in (2048, 3000):
        values, indices = chunked_topk(image, chunks(size), scale, k=5)
        assert torch.equal(indices, full_indices) and torch.equal(values, full_values)
    assert indices[0, :3].tolist() == [100, 5000, 20999]
    labels = full_indices[:, 2]
    assert topk_accuracy(indices, labels) == {"top1": 0.0, "top5": 100.0}


@pytest.fixture(scope="module")
def clip_and_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    from tests.conftest import tiny_clip

    return tiny_clip(dtype=torch.float64), SimpleTokenizer()


def _coop(clip_and_tokenizer, names, csc=False):
    import fastprompt

    clip, tokenizer = clip_and_tokenizer
    torch.manual_seed(0)
    learner = fastprompt.create_learner("coop", clip, names, tokenizer=tokenizer, n_ctx=2, csc=csc)
    learner.backend = "torch"
    return learner.eval()


def test_learner_chunks_match_the_full_class_list(clip_and_tokenizer):
    from fastprompt.datasets.classlists import load_classnames

    names = load_classnames("imagenet")[:24]
    learner = _coop(clip_and_tokenizer, names)
    feats = torch.randn(7, learner.clip.visual.output_dim, dtype=torch.float64)
    with torch.no_grad():
        full = learner.logits_from_image_features(feats)
    values, indices = learner_chunked_topk(learner, feats, names, chunk_classes=10, k=5, batch_size=4)
    assert torch.equal(indices, stable_topk(full, 5)[1])
    # a chunk's class features come from a differently packed text batch: equal up to float64 rounding
    torch.testing.assert_close(values, full.gather(1, indices), rtol=1e-12, atol=1e-12)
    assert learner.classnames == list(names)  # the learner's class list is restored


def test_unchunkable_learners_say_why(clip_and_tokenizer):
    names = ["cat", "dog", "car"]
    csc = _coop(clip_and_tokenizer, names, csc=True)
    assert "csc" in chunk_unsupported_reason(csc)
    with pytest.raises(TypeError, match="chunked evaluation"):
        learner_chunked_topk(csc, torch.zeros(1, 48, dtype=torch.float64), names)
    assert chunk_unsupported_reason(_coop(clip_and_tokenizer, names)) is None
