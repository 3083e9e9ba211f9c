"""The official repositories' names for every learnable tensor, one table per method.

Each table maps a fastprompt trainable name (``learner.trainable_state_dict()``) to the key the official code
uses in its model's ``state_dict`` (relative to the *whole* official model, i.e. ``CustomCLIP``):

* CoOp / KgCoOp / ProGrad (KaiyangZhou/CoOp, htyao89/KgCoOp, BeierZhu/Prompt-align): ``prompt_learner.ctx``;
  CoCoOp adds ``prompt_learner.meta_net.linear{1,2}.{weight,bias}``. Dassl registers the prompt learner alone
  (model name ``prompt_learner``), so its checkpoint keys are relative to it (``ctx``).
* MaPLe (muzairkhattak/multimodal-prompt-learning): ``prompt_learner.{ctx, proj.*, compound_prompts_text.<i>,
  compound_prompt_projections.<i>.*}`` (fastprompt keeps the same names), whole model registered as
  ``MultiModalPromptLearner``.
* IVLP / PromptSRC (muzairkhattak/PromptSRC): text ``prompt_learner.ctx`` for block 0 and
  ``text_encoder.transformer.resblocks.<i>.VPT_shallow`` for blocks i >= 1; vision ``image_encoder.VPT`` for
  block 0 and ``image_encoder.transformer.resblocks.<i>.VPT_shallow`` for i >= 1. fastprompt's deep lists are
  0-based from block 1, so ``text_deep.<j>`` is block ``j + 1``. Whole model registered as ``VLPromptLearner``.
* DePT (Koorye/DePT): the base's names plus ``film_lp_text.*``, ``film_lp_img.*`` (FiLM ``scale``/``bias``) and
  ``linear_probe_proj.{weight,bias}`` (the CAT head), whole model registered as ``PromptLearner`` (MaPLe base:
  ``MultiModalPromptLearner``).
* CaPT (Koorye/CaPT): the prompt learner sits in ``learnable_params``: ``learnable_params.prompt_learner.ctx``
  and the conditioning network ``learnable_params.prompt_learner.ucp.unified_transfer.*``. Its own ``Linear``
  (MLP ``down``/``up`` and the "linear" module) stores the weight [in, out] (``y = x W + b``), the transpose of
  ``nn.Linear``'s [out, in]; the attention module uses ``nn.Linear`` (``q``, ``k``, ``v``), not transposed.
* SoftCPT (kding1225/softcpt): ``task_prompt_learner.ctx``, ``class_prompt_learner.ctx`` and
  ``prompt_gen.proj`` ([feature, n_ctx * D], ``x @ proj`` as fastprompt's ``proj``); each is registered as its
  own Dassl model, keys relative to it.
* DPC (JREion/DPC): the stage-2 checkpoint holds the backbone's names (e.g. ``prompt_learner.ctx``) for the
  trained prompt (``mixed.*`` / ``parallel.*`` here); the frozen stage-1 prompt comes from the backbone's own
  checkpoint.

Checked against the official trainers: CoCoOp (``prompt_learner`` registered alone), MaPLe, IVLP / PromptSRC,
DePT, CaPT (module names; its Dassl model name is not confirmed, so any folder name is read), SoftCPT. KgCoOp,
ProGrad and DPC follow the CoOp code they are built on (``prompt_learner.ctx``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

Target = Union[str, Callable[[re.Match], str]]


def _block(template: str) -> Callable[[re.Match], str]:
    """Deep prompt j (0-based, fastprompt) -> official block j + 1."""
    return lambda m: template.format(int(m.group(1)) + 1)


@dataclass(frozen=True)
class OfficialLayout:
    """How one method's official code names and stores its learnable tensors.

    rules: (regex on the fastprompt name, official name or function of the match, stored transposed?).
    models: Dassl registered model name -> the key prefix its checkpoint is relative to ("" = the whole model).
    base_prefix: for plug-ins over a base learner (DePT, CaPT, DPC): prefix put before the base's official names.
    """

    rules: Tuple[Tuple[str, Target, bool], ...]
    models: Dict[str, str]
    base_prefix: Optional[str] = None
    notes: str = ""


_COOP = OfficialLayout(rules=((r"ctx", "prompt_learner.ctx", False),), models={"prompt_learner": "prompt_learner."})
_INDEPENDENT = OfficialLayout(
    rules=(
        (r"prompts\.ctx", "prompt_learner.ctx", False),
        (r"prompts\.text_deep\.(\d+)", _block("text_encoder.transformer.resblocks.{}.VPT_shallow"), False),
        (r"prompts\.vpt", "image_encoder.VPT", False),
        (r"prompts\.vpt_deep\.(\d+)", _block("image_encoder.transformer.resblocks.{}.VPT_shallow"), False),
    ),
    models={"VLPromptLearner": ""},
)

OFFICIAL_LAYOUTS: Dict[str, OfficialLayout] = {
    "coop": _COOP,
    "kgcoop": _COOP,
    "prograd": _COOP,
    "cocoop": OfficialLayout(
        rules=((r"ctx", "prompt_learner.ctx", False),
               (r"meta_net\.(linear[12])\.(weight|bias)", r"prompt_learner.meta_net.\1.\2", False)),
        models={"prompt_learner": "prompt_learner."},
    ),
    "maple": OfficialLayout(
        rules=((r"ctx", "prompt_learner.ctx", False),
               (r"proj\.(weight|bias)", r"prompt_learner.proj.\1", False),
               (r"compound_prompts_text\.(\d+)", r"prompt_learner.compound_prompts_text.\1", False),
               (r"compound_prompt_projections\.(\d+)\.(weight|bias)", r"prompt_learner.compound_prompt_projections.\1.\2", False)),
        models={"MultiModalPromptLearner": ""},
    ),
    "ivlp": _INDEPENDENT,
    "promptsrc": _INDEPENDENT,
    "dept": OfficialLayout(
        rules=((r"film_text\.(scale|bias)", r"film_lp_text.\1", False),
               (r"film_img\.(scale|bias)", r"film_lp_img.\1", False),
               (r"head\.(weight|bias)", r"linear_probe_proj.\1", False)),
        models={"PromptLearner": "", "MultiModalPromptLearner": ""},
        base_prefix="",
    ),
    "capt": OfficialLayout(
        rules=((r"transfer\.(down|up)\.weight", r"learnable_params.prompt_learner.ucp.unified_transfer.\1.weight", True),
               (r"transfer\.(down|up)\.bias", r"learnable_params.prompt_learner.ucp.unified_transfer.\1.bias", False),
               (r"transfer\.proj\.weight", "learnable_params.prompt_learner.ucp.unified_transfer.weight", True),
               (r"transfer\.proj\.bias", "learnable_params.prompt_learner.ucp.unified_transfer.bias", False),
               (r"transfer\.(q|k|v)_proj\.(weight|bias)", r"learnable_params.prompt_learner.ucp.unified_transfer.\1.\2", False)),
        models={"model": ""},
        base_prefix="learnable_params.",
        notes="CaPT's Dassl model name is not confirmed here; directories are read whatever their sub-folder is named",
    ),
    "softcpt": OfficialLayout(
        rules=((r"task_ctx", "task_prompt_learner.ctx", False),
               (r"class_ctx", "class_prompt_learner.ctx", False),
               (r"proj", "prompt_gen.proj", False)),
        models={"task_prompt_learner": "task_prompt_learner.", "class_prompt_learner": "class_prompt_learner.",
                "prompt_gen": "prompt_gen.", "prompt_learner": "prompt_learner."},
    ),
    "dpc": OfficialLayout(rules=(), models={"prompt_learner": "prompt_learner.", "MultiModalPromptLearner": "",
                                            "VLPromptLearner": ""}, base_prefix=""),
}

# Keys the official state dicts carry that are not learned (or not learned by us) and are dropped on load:
# the class-name token embeddings, the frozen CLIP towers, the zero-shot copies and cached features.
FROZEN_KEYS = (
    r"(.*\.)?token_prefix", r"(.*\.)?token_suffix", r"(.*\.)?tokenized_prompts", r"(.*\.)?ZS_image_encoder\..*",
    r"image_encoder\..*", r"text_encoder\..*", r"logit_scale", r"(.*\.)?clip_model\..*", r"(.*\.)?fixed_embeddings",
    r"(.*\.)?text_features", r"(.*\.)?ori_embedding", r"(.*\.)?class_tokens", r"visual\..*", r"transformer\..*",
    r"token_embedding\..*", r"positional_embedding", r"ln_final\..*", r"text_projection",
)
_FROZEN_RE = re.compile("|".join(f"(?:{p})" for p in FROZEN_KEYS))


def is_frozen_key(key: str) -> bool:
    """True for an official key that holds no learned prompt tensor (dropped on load)."""
    return _FROZEN_RE.fullmatch(key) is not None


def layout_for(method: str) -> OfficialLayout:
    if method not in OFFICIAL_LAYOUTS:
        raise ValueError(f"no official checkpoint layout for method {method!r}; known: {', '.join(sorted(OFFICIAL_LAYOUTS))}")
    return OFFICIAL_LAYOUTS[method]


def _base_of(learner):
    for attr in ("base", "backbone"):
        sub = getattr(learner, attr, None)
        if sub is not None and hasattr(sub, "trainable_state_dict"):
            return sub
    return None


def official_names(learner, names=None) -> Dict[str, Tuple[str, bool]]:
    """{fastprompt trainable name: (official whole-model key, stored transposed?)} for ``learner``.

    ``names``: the fastprompt names to map (default: the learner's trainable tensors). Raises ValueError naming
    a tensor that the method's table does not cover.
    """
    method = learner.method
    layout = layout_for(method)
    if method == "capt" and learner.config.base not in ("coop", "kgcoop", "prograd"):
        raise ValueError(f"official CaPT layout is known for bases coop, kgcoop, prograd; got {learner.config.base!r}")
    base = _base_of(learner) if layout.base_prefix is not None else None
    base_names = {}
    if base is not None:
        # DPC freezes its backbone: its prompt tensors are the ones DPC cloned (``prompt_names``)
        inner = getattr(learner, "prompt_names", None) if method == "dpc" else None
        base_names = {k: (layout.base_prefix + v[0], v[1]) for k, v in official_names(base, inner).items()}
    out: Dict[str, Tuple[str, bool]] = {}
    for name in (learner.trainable_state_dict() if names is None else names):
        if method == "dpc":  # mixed.<backbone name with "__"> / parallel.<...>: the backbone's official name
            if name.startswith("tuned."):  # P, the stage-1 prompt: it comes from the backbone's checkpoint
                continue
            m = re.fullmatch(r"(?:mixed|parallel)\.(.+)", name)
            inner = m.group(1).replace("__", ".") if m else None
            if inner in base_names:
                out[name] = base_names[inner]
                continue
        elif name.startswith("base.") and name[5:] in base_names:
            out[name] = base_names[name[5:]]
            continue
        for pattern, target, transposed in layout.rules:
            m = re.fullmatch(pattern, name)
            if m:
                out[name] = (target(m) if callable(target) else m.expand(target), transposed)
                break
        else:
            raise ValueError(f"{method}: trainable tensor {name!r} has no official name in the table")
    return out
