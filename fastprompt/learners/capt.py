"""CaPT / DeCaPT (Zhang et al., arXiv 2506.23856; code "UCP" in Koorye/CaPT): class-conditioned prompts.

A plug-in over a base learner (coop, kgcoop, prograd, or dept = KgCoOp + DePT, which is DeCaPT):

* **Textual class information (TCI):** per class, the frozen CLIP ``encode_text`` of the dataset's hand-crafted
  template (CoOp's ``CUSTOM_TEMPLATES``, "{} texture." for DTD), *not* normalised. Computed once per class list
  (``set_classnames`` recomputes it for new classes, as the official per-subsample cache does).
* **Conditioning network** (``TRAINER.UCP.MODULE``, official ``UnifiedClassSpecificPromptLearner.unified_transfer``
  in ``trainers/ucp_trainers/ucp_base.py``), applied to ``x = scale * TCI`` [C, E] -> offsets [C, D]; the offset of
  class c is added to every context token of class c (one context per class). Three choices:

  - ``"mlp"`` (default; ``MultiLayerPerceptron``): ``up(dropout(leaky_relu(down(x))))``, E -> H -> D, LeakyReLU
    slope 0.01, dropout only in training. Both layers are the repository's own ``Linear`` (weight stored [in, out],
    ``x @ W + b``), initialised U(-1/sqrt(out), 1/sqrt(out)) for weight *and* bias (not PyTorch's default).
    Parameters: E*H + H + H*D + D (ViT-B/16, H = 32: 33,312; H = 64: 66,112).
  - ``"linear"`` (``Linear``): one layer ``x @ W + b``, E -> D, the same U(+-1/sqrt(out)) init; no activation,
    no dropout (DROPOUT and HIDDEN_DIM are ignored, as officially). Parameters: E*D + D (ViT-B/16: 262,656).
  - ``"attn"`` (``Attention``, ``share_kv=False``): single-head self-attention *across the classes*: every class's
    TCI is one token, ``q, k, v = x Wq^T + bq, x Wk^T + bk, x Wv^T + bv`` (three ``torch.nn.Linear`` E -> D with
    PyTorch's default init, i.e. U(+-1/sqrt(in)) for weight and bias), ``offsets = softmax(q k^T / sqrt(D)) v``
    with the softmax over the C classes of the current class list. No residual, no normalisation, no output
    projection, no mask, no dropout. Parameters: 3 (E*D + D) (ViT-B/16: 787,968). The offset of class c depends
    on every class in the list, so ``set_classnames`` (base -> new) gives new offsets even for a class in both
    lists, as the official code does by building its model on the new class list.
* **Margin-ITM loss** (``fastprompt.losses.margin_itm_loss``) replaces the base's cross-entropy on the ITM
  logits, with S = cos-similarity of the TCI vectors; the base's other terms stay (KgCoOp's knowledge guidance,
  DePT's CAT head, ProGrad's projection over all trainable tensors including the conditioning network).

Fast path: the C per-class contexts run through the engine's diagonal pairs (c, c) with the offsets as the
per-group shift (packed, truncated; no 77-token padding). The MLP runs on the fused ``condition`` op (its CaPT
form) whenever dropout is inactive (eval, or dropout = 0; with active dropout it runs eagerly), the linear module on
the op's one-layer form; the attention (C x C scores, a few MFLOP even for 1000 classes) stays plain torch.

Official defaults differ per base (``CAPT_DEFAULTS``, from Koorye/CaPT's configs; ``docs/methods/capt.md``); options left at None take them.

Deliberate differences: the module's output width is the context width D (the official code uses the projection
width, equal to D for every CLIP it supports); weights are stored in ``nn.Linear``'s [out, in] layout (the official
``Linear`` stores [in, out]; same function, same init bounds); only the "clip" TCI mode is implemented, and
``scale <= 0`` (the official learnable gate, broken by a typo there) is not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.classplan import clean_classnames
from fastprompt.learners._family import PROTOCOL, Plugin, resolved_config, with_dataset
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.registry import register_learner
from fastprompt.losses import MarginITMLoss, class_similarity
from fastprompt.ops.condition import condition
from fastprompt.templates import CUSTOM_TEMPLATES, format_prompts, template_for

MODULES = ("mlp", "linear", "attn")  # TRAINER.UCP.MODULE

# Official per-baseline settings (Koorye/CaPT configs/trainers/UCP*/ and train.py defaults). Another base (any
# learner whose class text takes a class shift) gets CoOp's settings: CaPT publishes none for it.
CAPT_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "coop": {"scale": 0.5, "hidden_dim": 32, "dropout": 0.1, "smooth": 0.0031},
    "kgcoop": {"scale": 1.0, "hidden_dim": 32, "dropout": 0.0, "smooth": 0.001},
    "prograd": {"scale": 1.0, "hidden_dim": 32, "dropout": 0.1, "smooth": 0.0031},
    # UCPDAPT: the offset goes on DAPT's 16 text tokens; its loss is plain CE (margin epsilon 0) + regularisers.
    "dapt": {"scale": 1.0, "hidden_dim": 32, "dropout": 0.1, "smooth": 0.0},
    "dept": {"scale": 0.9, "hidden_dim": 64, "dropout": 0.1, "smooth": 0.0008},
}
BASE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "coop": {"n_ctx": 4, "ctx_init": "a photo of a"},
    "kgcoop": {"w": 1.5},
    "prograd": {},
    "dapt": {},
    # DeCaPT: DePT over KgCoOp (W = 1.5), head and FiLM at lr x 18.
    "dept": {"base": "kgcoop", "cls_weight": 0.7, "head_lr_mult": 18.0, "base_config": {"w": 1.5}},
}


def _merge(defaults: Dict[str, Any], given: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(defaults)
    for k, v in given.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class CaPTConfig(LearnerConfig):
    """CaPT options (``TRAINER.UCP.*``); None takes the official value for the chosen base."""

    base: str = "coop"
    base_config: Dict[str, Any] = field(default_factory=dict)  # over BASE_DEFAULTS[base]
    dataset: str = ""  # picks the TCI template (CUSTOM_TEMPLATES); passed down to bases that take a dataset
    template: Optional[str] = None  # overrides the TCI template
    module: str = "mlp"  # MODULE: "mlp" | "linear" | "attn" (the conditioning network, see the module docstring)
    hidden_dim: Optional[int] = None  # HIDDEN_DIM (32; DeCaPT 64); "mlp" only
    dropout: Optional[float] = None  # DROPOUT (0.1; with KgCoOp 0.0); "mlp" only
    scale: Optional[float] = None  # SCALE on the TCI before the module (CoOp 0.5, DeCaPT 0.9, else 1.0)
    smooth: Optional[float] = None  # LOSS.SMOOTH, the margin epsilon (0.0031; KgCoOp 0.001; DeCaPT 0.0008)
    use_sim: bool = True  # LOSS.USE_SIM: S = TCI cosine similarities (False: all ones)


@dataclass
class DeCaPTConfig(CaPTConfig):
    """DeCaPT = CaPT over KgCoOp + DePT (the CaPT repository's "DePT")."""

    base: str = "dept"


def _official_linear(in_dim: int, out_dim: int, dtype, device) -> nn.Linear:
    """[out, in] ``nn.Linear`` initialised as CaPT's own ``ucp_base.Linear``: weight and bias ~ U(+-1/sqrt(out))."""
    lin = nn.Linear(in_dim, out_dim, device=device, dtype=dtype)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(out_dim)  # official: 1/sqrt(weight.size(1)) with the weight stored [in, out]
        lin.weight.uniform_(-bound, bound)
        lin.bias.uniform_(-bound, bound)
    return lin


class ConditionMLP(nn.Module):
    """MODULE "mlp" (``ucp_base.MultiLayerPerceptron``): x [C, E] -> ``up(dropout(leaky_relu(down(scale * x))))``
    [C, D]. ``down`` [H, E] + [H], ``up`` [D, H] + [D], official U(+-1/sqrt(out)) init; E*H + H + H*D + D params."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float, dtype, device):
        super().__init__()
        self.down = _official_linear(in_dim, hidden, dtype, device)
        self.up = _official_linear(hidden, out_dim, dtype, device)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        h = F.leaky_relu(self.down(x * scale), 0.01)
        h = F.dropout(h, self.dropout, self.training)
        return self.up(h)

    def fast(self, x: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
        """Same function on the fused ``condition`` op; eager while dropout is active (its mask is torch's RNG)."""
        if self.training and self.dropout > 0:
            return self(x, scale)
        d, u = self.down, self.up
        return condition(x, d.weight, d.bias, u.weight, u.bias, "leaky_relu", 0.01, scale, backend=backend, strict=False)


class ConditionLinear(nn.Module):
    """MODULE "linear" (``ucp_base.Linear``): x [C, E] -> ``proj(scale * x)`` [C, D]. ``proj`` [D, E] + [D],
    official U(+-1/sqrt(out)) init; E*D + D params. No activation, no dropout."""

    def __init__(self, in_dim: int, out_dim: int, dtype, device):
        super().__init__()
        self.proj = _official_linear(in_dim, out_dim, dtype, device)

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return self.proj(x * scale)

    def fast(self, x: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
        """The ``condition`` op's one-layer form ``(scale * x) @ W^T + b`` (scale fused into the matmul)."""
        return condition(x, self.proj.weight, self.proj.bias, None, None, "none", 0.01, scale, backend=backend, strict=False)


class ClassAttention(nn.Module):
    """MODULE "attn" (``ucp_base.Attention``, ``share_kv=False``): single-head self-attention whose tokens are
    the C classes. x [C, E] -> [C, D]::

        z = scale * x;  q, k, v = q_proj(z), k_proj(z), v_proj(z)        # each [C, D]
        out = softmax(q @ k^T / sqrt(D), dim=-1) @ v                       # softmax over the C classes

    ``q_proj``, ``k_proj``, ``v_proj``: ``nn.Linear(E, D)`` with PyTorch's default init (U(+-1/sqrt(E)) for
    weight and bias; the official module uses ``nn.Linear`` here, not its custom ``Linear``); 3 (E*D + D) params.
    No residual, norm, output projection, mask or dropout. ``k_proj.bias`` is a dead parameter, as officially: it
    adds ``q_c . b_k`` to every score of row c, which the softmax cancels, so its gradient is exactly zero.
    """

    def __init__(self, in_dim: int, out_dim: int, dtype, device):
        super().__init__()
        self.q_proj = nn.Linear(in_dim, out_dim, device=device, dtype=dtype)
        self.k_proj = nn.Linear(in_dim, out_dim, device=device, dtype=dtype)
        self.v_proj = nn.Linear(in_dim, out_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        z = x * scale
        q, k, v = self.q_proj(z), self.k_proj(z), self.v_proj(z)
        attn = torch.softmax((q @ k.t()) / math.sqrt(k.shape[1]), dim=-1)  # [C, C]: class c attends to all classes
        return attn @ v

    def fast(self, x: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
        # A [C, C] score matrix of a few MFLOP (C = 1000, D = 512) does not pay for a kernel: plain torch.
        return self(x, scale)


@register_learner("capt")
class CaPT(Plugin, PromptLearner):
    """CaPT over ``config.base``. ``forward(images) -> logits [B, C]``; ``compute_loss`` uses margin-ITM.

    Trainable: the base's tensors (``base.*``) and the conditioning network ``transfer``: "mlp": ``down`` [H, E] +
    [H], ``up`` [D, H] + [D]; "linear": ``proj`` [D, E] + [D]; "attn": ``q_proj``, ``k_proj``, ``v_proj`` [D, E] + [D].
    Buffers: ``class_info`` [C, E] (TCI, unnormalised), ``class_sim`` [C, C].
    """

    config_class = CaPTConfig
    training_defaults = {"epochs": 10, "batch_size": 4, "lr": 0.0035}
    tiny_setup = {}

    @classmethod
    def bench_setup(cls, classnames, dataset="imagenet", tasks=2):
        return list(classnames), {"dataset": dataset}  # its hand-crafted template

    @classmethod
    def base_unsupported(cls, base_class: type):
        """A base with the plug-in hooks whose class text takes a per-class shift and does not depend on the
        image (CaPT's offsets go on each class's context)."""
        missing = [m for m in PROTOCOL + ("image_conditional",) if not hasattr(base_class, m)]
        if missing:
            return f"it lacks the plug-in hooks {missing}"
        if not base_class.accepts_class_shift:
            return "it does not declare accepts_class_shift (a class_text_features that takes a class shift)"
        if base_class.image_conditional is True:  # a plug-in's depends on its own base: checked once built
            return "its prompts depend on the image"
        return None

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], config=None, tokenizer=None, **kwargs):
        config = self.config_class.build(config, kwargs)
        if not isinstance(config.base_config, dict):
            raise TypeError(f"base_config must be a dict of the base learner's options, got {type(config.base_config).__name__}")
        if config.module not in MODULES:
            raise ValueError(f"unknown CaPT module {config.module!r}; choose one of {', '.join(MODULES)}")
        if config.template is not None and "{}" not in config.template:
            raise ValueError(f"template {config.template!r} has no '{{}}' slot for the class name")
        resolved = {k: (getattr(config, k) if getattr(config, k) is not None else v) for k, v in CAPT_DEFAULTS.get(config.base, CAPT_DEFAULTS["coop"]).items()}
        config = replace(config, **resolved)  # saved resolved, so a reload does not depend on these tables
        if config.hidden_dim < 1 or not 0.0 <= config.dropout < 1.0 or config.smooth < 0:
            raise ValueError(f"need hidden_dim >= 1, 0 <= dropout < 1, smooth >= 0; got {config.hidden_dim}, {config.dropout}, {config.smooth}")
        names = clean_classnames(classnames)
        super().__init__(clip_model, names, config, tokenizer)
        base_cfg = with_dataset(config.base, _merge(BASE_DEFAULTS.get(config.base, {}), config.base_config), config.dataset)
        base_cfg["backend"] = config.backend  # one backend for the whole learner
        self.base = self.build_base(config.base, clip_model, names, base_cfg)
        if self.base.image_conditional:
            raise ValueError(f"CaPT does not support base learner {config.base!r}: its prompts depend on the image")
        self.backend = self.base.backend
        # Record the base's resolved options (e.g. DePT's head classes), so a reload rebuilds the same base.
        self.config = replace(self.config, base_config=resolved_config(self.base))
        device = self.tower.token_embedding.weight.device
        in_dim = int(self.clip.visual.output_dim)
        out_dim = self.tower.width  # the context width (the official clip_dim; equal for every official CLIP)
        if config.module == "mlp":
            self.transfer = ConditionMLP(in_dim, config.hidden_dim, out_dim, config.dropout, self.dtype, device)
        elif config.module == "linear":
            self.transfer = ConditionLinear(in_dim, out_dim, self.dtype, device)
        else:
            self.transfer = ClassAttention(in_dim, out_dim, self.dtype, device)
        self.set_classnames(names)

    @property
    def template(self) -> str:
        return self.config.template or template_for(self.config.dataset or "", CUSTOM_TEMPLATES)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Switch the class list: the base's class parts, the TCI and the similarity matrix are rebuilt."""
        names = clean_classnames(classnames)
        if names != list(self.base.classnames):
            self.base.set_classnames(names)
        self.classnames = list(self.base.classnames)
        tci = self.frozen_text_features(format_prompts(self.template, self.classnames))
        self.register_buffer("class_info", tci.to(self.tower.token_embedding.weight.device), persistent=False)
        self.register_buffer("class_sim", class_similarity(tci), persistent=False)
        self.margin_loss = MarginITMLoss(self.class_sim if self.config.use_sim else None, self.config.smooth)
        self._text_cache = None

    # ------------------------------------------------------------------ the class offsets
    def class_offsets(self) -> torch.Tensor:
        """[C, D] per-class context offsets ``transfer(scale * TCI)`` over the current class list (for "attn"
        every offset depends on all C classes)."""
        net, scale = self.transfer, float(self.config.scale)
        x = self.class_info.to(next(net.parameters()).dtype)
        if self.uses_reference:
            return net(x, scale)
        return net.fast(x, scale, self.op_backend)

    # ------------------------------------------------------------------ plug-in protocol (see _family.py)
    image_conditional = False

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.image_features(images)

    def class_text_features(self, image_features=None, class_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-> [C, E] unnormalised features of the class-conditioned prompts."""
        shift = self.class_offsets()
        if class_shift is not None:
            shift = shift + class_shift
        return self.base.class_text_features(image_features, shift)

    def logits_from_features(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.base.logits_from_features(v, t)

    def loss_from_features(self, v, t, labels, itm_loss=None, params=None):
        """The base's objective with the margin-ITM loss on its ITM logits."""
        params = [p for p in self.parameters() if p.requires_grad] if params is None else params
        return self.base.loss_from_features(v, t, labels, itm_loss=itm_loss or self.margin_loss, params=params)

    # ------------------------------------------------------------------ learner interface
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> logits [B, C] (the base's prediction with class-conditioned prompts)."""
        return self.logits_from_image_features(self.image_features(images))

    def logits_from_image_features(self, v: torch.Tensor) -> torch.Tensor:
        """[B, E] as ``image_features(images)`` returns them -> logits [B, C] (the rest of ``forward``)."""
        return self.logits_from_features(v, self.cached_text_features(self.class_text_features))

    @property
    def image_features_frozen(self) -> bool:
        """The base's: True when its image tower is the frozen, unprompted CLIP encoder (feature store)."""
        return bool(getattr(self.base, "image_features_frozen", False))

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor):
        """images [B, 3, H, W], labels [B] -> (loss [], logits [B, C])."""
        v = self.image_features(images)
        return self.loss_from_features(v, self.class_text_features(v), labels)

    def param_groups(self, lr: float):
        """The base's groups (DeCaPT: head and FiLM at lr x 18) plus the conditioning network at ``lr`` (it is part of the
        official prompt learner, outside the staged "new layers")."""
        return self.base.param_groups(lr) + [{"params": list(self.transfer.parameters()), "lr": lr}]

    def load_trainable_state_dict(self, tensors: Dict[str, torch.Tensor]) -> None:
        """As the base class; adapters saved before the modules were added name the MLP ``mlp.*``."""
        tensors = {("transfer." + k[4:] if k.startswith("mlp.") else k): v for k, v in tensors.items()}
        super().load_trainable_state_dict(tensors)


@register_learner("decapt")
class DeCaPT(CaPT):
    """DeCaPT: CaPT over KgCoOp + DePT with the official DeCaPT settings (scale 0.9, hidden 64, smooth 0.0008,
    W 1.5, head lr x 18). Same class as CaPT with ``base="dept"``; registered under its own name."""

    config_class = DeCaPTConfig
    # CaPT's configs; the head / FiLM learning-rate multiplier (x18) is in the learner
    training_defaults = {"epochs": 10, "batch_size": 4, "lr": 0.0035}
