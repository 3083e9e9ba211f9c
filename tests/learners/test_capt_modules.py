"""CaPT's conditioning modules ``linear`` and ``attn`` (official ``ucp_base.Linear`` / ``ucp_base.Attention``):
the modules' formulas by hand, parameter counts, initialisation bounds,
class mixing on base -> new with eval caching, save/load, and the error on an unknown module. Their fast ==
reference tests (over CoOp and DeCaPT, float64, float32 and Triton) are in test_capt.py with the MLP's."""
from __future__ import annotations

import math

import pytest
import torch

import fastprompt
from fastprompt.learners.capt import ClassAttention
from tests.conftest import images_for, rel_err, tiny_clip, trainable
from tests.learners.test_capt import dead_gradients
from tests.learners.test_kgcoop import NAMES, assert_step_equivalent, perturb

E, D = 48, 64  # tiny_clip: projection (TCI) width, text width


def attn_by_hand(net: ClassAttention, x: torch.Tensor, scale: float) -> torch.Tensor:
    """Class by class: offset_c = sum_j softmax_j(q_c . k_j / sqrt(D)) v_j, with q, k, v of the scaled TCI."""
    z = scale * x
    q = [net.q_proj.weight @ zc + net.q_proj.bias for zc in z]
    k = [net.k_proj.weight @ zc + net.k_proj.bias for zc in z]
    v = [net.v_proj.weight @ zc + net.v_proj.bias for zc in z]
    rows = []
    for qc in q:
        s = torch.stack([torch.dot(qc, kj) for kj in k]) / math.sqrt(len(qc))
        w = torch.exp(s - s.max())
        rows.append(sum(wj * vj for wj, vj in zip(w / w.sum(), v)))
    return torch.stack(rows)


# ---------------------------------------------------------------------- the modules' functions
def test_class_attention_two_classes_by_hand():
    """Identity projections, no biases, x = I (2 classes): scores I / sqrt(2), out row 0 = [p, 1 - p]."""
    net = ClassAttention(2, 2, torch.float64, "cpu")
    with torch.no_grad():
        for lin in (net.q_proj, net.k_proj, net.v_proj):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    p = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)
    expected = torch.tensor([[p, 1 - p], [1 - p, p]], dtype=torch.float64)
    assert rel_err(net(torch.eye(2, dtype=torch.float64), 1.0), expected) < 1e-15
    # scale 2 doubles q and k: scores 4 I / sqrt(2).
    p2 = math.exp(4 / math.sqrt(2)) / (math.exp(4 / math.sqrt(2)) + 1)
    assert rel_err(net(torch.eye(2, dtype=torch.float64), 2.0), 2 * torch.tensor([[p2, 1 - p2], [1 - p2, p2]], dtype=torch.float64)) < 1e-15
    # One class attends only to itself: the offset is its value vector.
    x = torch.randn(1, 2, dtype=torch.float64)
    assert rel_err(net(x, 0.5), 0.5 * x) < 1e-15


@pytest.mark.parametrize("module", ["linear", "attn"])
def test_capt_module_offsets_match_formula(module):
    learner = fastprompt.create_learner("capt", tiny_clip(), NAMES, module=module, backend="reference")
    perturb(learner)
    net, tci, scale = learner.transfer, learner.class_info, 0.5  # CoOp's official SCALE
    assert learner.config.scale == scale
    if module == "linear":
        expected = (scale * tci) @ net.proj.weight.t() + net.proj.bias
    else:
        expected = attn_by_hand(net, tci, scale)
    assert rel_err(learner.class_offsets(), expected) < 1e-13
    learner.backend = "auto"  # linear: the condition op's one-layer form
    assert rel_err(learner.class_offsets(), expected) < 1e-13
    # The offsets go on every context token of their class (77-token reference prompts written out).
    text = learner.base.text
    ctx = learner.base.ctx[None] + expected[:, None]
    prompts = torch.cat([text.token_embeds[:, :1], ctx, text.token_embeds[:, 1 + ctx.shape[1]:]], dim=1)
    learner.backend = "reference"
    assert rel_err(learner.class_text_features(), text.reference_features(prompts, text.token_ids)) < 1e-13


# ---------------------------------------------------------------------- counts and initialisation
def test_capt_module_parameter_counts_on_vit_b16():
    model, _, tokenizer = fastprompt.load_clip("ViT-B-16", pretrained=None)
    counts = {}
    for module in ("mlp", "linear", "attn"):
        learner = fastprompt.create_learner("capt", model, ["dog", "cat"], tokenizer=tokenizer, module=module)
        counts[module] = sum(p.numel() for p in learner.transfer.parameters())
        assert learner.num_trainable_parameters() == 2_048 + counts[module]  # + CoOp's 4 x 512 context
    assert counts == {"mlp": 33_312, "linear": 512 * 512 + 512, "attn": 3 * (512 * 512 + 512)}
    assert counts["linear"] == 262_656 and counts["attn"] == 787_968


def test_capt_module_parameter_counts_and_init_bounds():
    """Tiny CLIP (E = 48 in, D = 64 out) tells the two inits apart: linear U(+-1/sqrt(out)) = +-0.125 (CaPT's
    own Linear), attn U(+-1/sqrt(in)) = +-0.144 (torch.nn.Linear's default)."""
    model = tiny_clip()
    lin = fastprompt.create_learner("capt", model, NAMES, module="linear").transfer
    att = fastprompt.create_learner("capt", model, NAMES, module="attn").transfer
    assert sum(p.numel() for p in lin.parameters()) == E * D + D
    assert sum(p.numel() for p in att.parameters()) == 3 * (E * D + D)
    assert lin.proj.weight.shape == (D, E) and att.q_proj.weight.shape == (D, E)
    out_bound, in_bound = 1 / math.sqrt(D), 1 / math.sqrt(E)
    w = lin.proj.weight.detach()
    assert float(w.abs().max()) <= out_bound and float(w.abs().max()) > 0.98 * out_bound
    assert abs(float(w.std()) - out_bound / math.sqrt(3)) < 0.05 * out_bound / math.sqrt(3)  # uniform's std
    assert abs(float(w.mean())) < 0.05 * out_bound and float(lin.proj.bias.detach().abs().max()) <= out_bound
    for proj in (att.q_proj, att.k_proj, att.v_proj):  # each one, so a single wrongly initialised one fails
        aw, ab = proj.weight.detach(), proj.bias.detach()
        assert float(aw.abs().max()) <= in_bound and float(aw.abs().max()) > 0.98 * in_bound  # > out_bound too
        assert abs(float(aw.std()) - in_bound / math.sqrt(3)) < 0.05 * in_bound / math.sqrt(3)
        assert float(ab.abs().max()) <= in_bound
    ab = torch.cat([m.bias.detach() for m in (att.q_proj, att.k_proj, att.v_proj)])
    assert float(ab.abs().max()) > out_bound
    # Three independent projections (share_kv=False): k and v are different tensors.
    assert att.k_proj.weight is not att.v_proj.weight and not torch.equal(att.k_proj.weight, att.v_proj.weight)
    # hidden_dim / dropout belong to the MLP only, as officially.
    assert not any(isinstance(m, torch.nn.Dropout) for m in att.modules())


# ---------------------------------------------------------------------- base -> new, eval caching
def test_capt_attn_mixes_classes_and_base_to_new():
    model = tiny_clip()
    base_names, new_names = ["dog", "cat", "red panda"], ["dog", "cat", "golden retriever"]
    attn = fastprompt.create_learner("capt", model, base_names, module="attn")
    linear = fastprompt.create_learner("capt", model, base_names, module="linear")
    perturb(attn)
    x = images_for(model, 2, torch.float64)
    before = {}
    for learner in (attn, linear):
        learner.eval()
        with torch.no_grad():
            before[learner] = (learner.class_offsets(), learner(x))
            assert learner._text_cache is not None  # eval text features are cached: the switch must drop them
        learner.set_classnames(new_names)
    with torch.no_grad():
        # attn: the offset of "dog" depends on the other classes; linear: it does not.
        assert rel_err(attn.class_offsets()[0], before[attn][0][0]) > 1e-3
        assert torch.equal(linear.class_offsets()[:2], before[linear][0][:2])
        assert rel_err(attn.class_offsets(), attn_by_hand(attn.transfer, attn.class_info, 0.5)) < 1e-13
        # Cached eval logits after the switch are those of the new list, not the stale cache.
        got = attn(x)
        attn.backend = "reference"  # recomputes from scratch on the 77-token path
        expected = attn(x)
        assert rel_err(got, expected) < 1e-10
        assert rel_err(got[:, 0], before[attn][1][:, 0]) > 1e-6  # "dog"'s logits moved with the class list
    # Training on the new list: fast == reference (the attention over the new classes).
    assert_step_equivalent(attn, x, torch.tensor([2, 0]), "auto", 1e-10, dead_gradients({"module": "attn"}))
    assert attn.class_info.shape == (3, E)


# ---------------------------------------------------------------------- save / load, errors
def test_capt_module_round_trip_and_legacy_names(tmp_path):
    model = tiny_clip()
    learner = fastprompt.create_learner("decapt", model, NAMES, module="attn")
    perturb(learner)
    x = images_for(model, 2, torch.float64)
    learner.eval()
    with torch.no_grad():
        before = learner(x)
    learner.save_pretrained(str(tmp_path))
    loaded = fastprompt.from_pretrained(str(tmp_path), clip_model=tiny_clip()).eval()
    assert loaded.config.module == "attn" and isinstance(loaded.transfer, ClassAttention)
    with torch.no_grad():
        assert torch.equal(loaded(x), before)
    # Adapters written before the module option named the MLP "mlp.*"; they still load.
    mlp = fastprompt.create_learner("capt", model, NAMES)
    perturb(mlp)
    legacy = {("mlp." + k[len("transfer."):] if k.startswith("transfer.") else k): v.clone() for k, v in mlp.trainable_state_dict().items()}
    assert any(k.startswith("mlp.down") for k in legacy)
    fresh = fastprompt.create_learner("capt", model, NAMES)
    fresh.load_trainable_state_dict(legacy)
    assert all(torch.equal(a, b) for a, b in zip(trainable(fresh), trainable(mlp)))


def test_capt_unknown_module_is_a_clear_error():
    model = tiny_clip()
    with pytest.raises(ValueError, match=r"'transformer'.*mlp, linear, attn"):
        fastprompt.create_learner("capt", model, NAMES, module="transformer")
    with pytest.raises(ValueError, match="mlp, linear, attn"):
        fastprompt.create_learner("decapt", model, NAMES, module="MLP")  # names are exact
