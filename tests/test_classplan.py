"""Class plans: tokenisation, context placement, shared prefix, and errors."""
from __future__ import annotations

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from fastprompt.classplan import build_class_plan, clean_classnames

TOK = SimpleTokenizer()
SOT, EOT = 49406, 49407


def test_end_layout_matches_official_tokens():
    plan = build_class_plan(["red_panda", "dog"], TOK, n_ctx=4)
    assert plan.classnames == ["red panda", "dog"]
    ids = TOK(["X X X X red panda.", "X X X X dog."])
    assert torch.equal(plan.token_ids, ids)
    assert plan.eot.tolist() == [8, 7]  # SOT + 4 ctx + name + "." -> EOT
    assert plan.slot[0, 1:5].tolist() == [0, 1, 2, 3] and (plan.slot[:, 5:] == -1).all() and (plan.slot[:, 0] == -1).all()
    assert plan.prefix_len == 5  # SOT + 4 context tokens
    assert plan.name_lens == [2, 1]
    assert plan.max_len == 9


def test_middle_and_front_permute_but_keep_eot():
    names = ["red panda", "dog"]
    mid = build_class_plan(names, TOK, n_ctx=4, position="middle")
    # [SOT, ctx0, ctx1, red, panda, ctx2, ctx3, ., EOT]
    assert mid.slot[0, :9].tolist() == [-1, 0, 1, -1, -1, 2, 3, -1, -1]
    assert mid.src[0, 3:5].tolist() == TOK.encode("red panda")
    assert mid.prefix_len == 3 and mid.eot.tolist() == [8, 7]
    front = build_class_plan(names, TOK, n_ctx=4, position="front")
    assert front.slot[1, :8].tolist() == [-1, -1, 0, 1, 2, 3, -1, -1]
    assert front.prefix_len == 1


def test_shared_words_extend_the_prefix_but_never_swallow_eot():
    plan = build_class_plan(["red panda", "red fox"], TOK, n_ctx=2)
    assert plan.prefix_len == 4  # SOT, ctx, ctx, "red"
    one = build_class_plan(["dog"], TOK, n_ctx=2)
    assert one.prefix_len == int(one.eot[0])  # a single class: everything but EOT is "shared"


def test_word_init_phrase_must_match_n_ctx():
    plan = build_class_plan(["dog"], TOK, n_ctx=4, prompt_prefix="a photo of a")
    assert plan.token_ids[0, :6].tolist() == [SOT] + TOK.encode("a photo of a") + TOK.encode("dog")
    with pytest.raises(ValueError, match="BPE tokens"):
        build_class_plan(["dog"], TOK, n_ctx=3, prompt_prefix="a photo of a")


@pytest.mark.parametrize(
    "names,error,match",
    [([], ValueError, "empty"), ("dog", TypeError, "list of strings"), (["dog", 3], TypeError, "class 1"),
     (["dog", "  "], ValueError, "class 1 has an empty name")],
)
def test_bad_class_lists(names, error, match):
    with pytest.raises(error, match=match):
        clean_classnames(names)


def test_too_long_name_is_named():
    with pytest.raises(ValueError, match="'x x x.*does not fit.*context length is 77"):
        build_class_plan(["cat", " ".join(["x"] * 70)], TOK, n_ctx=8)
    with pytest.raises(ValueError, match="class_token_position"):
        build_class_plan(["cat"], TOK, n_ctx=8, position="left")
