"""SoftCPT, soft context sharing for multi-task prompt tuning (Ding et al., Neurocomputing'24).

A frozen-text-encoder meta network turns each task into its class context: task feature
f_t = text("[SOS] U <task name>.") (U: learnable task context, unnormalised feature), then a bias-free linear
map W: ctx_t = reshape(f_t W, [n_ctx, D]). Class prompts "[SOS] ctx_t <class>." of every task go through the same
frozen text tower. Variants (``variant``, two letters for the class feature, two for the task context):

* NA / CA / CS: no class feature / class feature with a shared / per-class class context S; with a class
  feature, W maps [class feature ; task feature] (2E) to one context per class;
* TA / TS: one task context U shared by all tasks / one per task.

Loss: per task, cross-entropy (sum) of its samples over its own class columns; summed over tasks and divided
by the batch size. Optional class sampling (CA/CS only, as the official code asserts): per task, the classes
present in the batch plus ceil(rate * #others) random ones; selected features get the official +1e-6 and the
CE runs over the selected columns.

Exactness: classes of tasks absent from a batch receive no gradient and do not enter the loss, so the fast
path encodes only the present tasks' (selected) classes, as G task contexts x (g, c) pairs (NA) or diagonal
pairs (CA/CS), and only the needed task / class-feature prompts. The reference is the official loop over all
tasks at 77 tokens. Logits returned by ``compute_loss`` are [B, sum C] with -inf outside each sample's own task
(and its unselected columns): both paths return exactly these, and argmax is the per-task prediction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.classplan import build_class_plan, clean_classnames
from fastprompt.encoders.prompted_text import PromptedTextEncoder
from fastprompt.learners._common import plan_kwargs
from fastprompt.learners.base import LearnerConfig, PromptLearner
from fastprompt.learners.registry import register_learner

VARIANTS = ("NATA", "NATS", "CATA", "CSTA", "CATS", "CSTS")
PG_TYPES = ("lin", "linmean", "lincls")


@dataclass
class SoftCPTConfig(LearnerConfig):
    """``TRAINER.MTCOOP.*`` as the README commands set them (N_CTX 16, TASK_N_CTX 4, CLASS_N_CTX 4, lin)."""

    tasknames: List[str] = field(default_factory=list)  # one name per task, in task order
    variant: str = "NATA"
    n_ctx: int = 16  # class-prompt context length produced by the meta network
    task_n_ctx: int = 4  # M of the task context U (0: no task context, constant task features)
    class_n_ctx: int = 4  # M of the class context S (CA/CS variants; 0: constant class features)
    pg_type: str = "lin"  # meta network: "lin" | "linmean" | "lincls" (the last two need CA/CS)
    cls_sample_rate: float = 0.0  # CLS_SAMPLE_RATE (CA/CS only)
    freeze_cls_prompt: bool = False  # FREEZE_CLS_PROMPT
    init_std: float = 0.02
    seed: Optional[int] = None  # class-sampling generator seed (None: the global torch RNG, as official)


@register_learner("softcpt")
class SoftCPT(PromptLearner):
    """SoftCPT learner over T tasks. ``classnames``: one list of class names per task.

    ``forward(images, task_ids=None) -> logits [B, sum C]`` (with ``task_ids``, other tasks' columns are -inf);
    ``compute_loss(images, labels, task_ids=None) -> (loss, logits [B, sum C])`` where ``labels`` are local
    to each task with ``task_ids``, or global column indices without. Trainable: ``task_ctx``, ``proj`` and
    (CA/CS) ``class_ctx``.
    """

    method = "softcpt"
    config_class = SoftCPTConfig
    image_features_frozen = True  # logits see images only through encode_images (feature store)
    training_defaults = {"epochs": 50, "batch_size": 32, "lr": 0.002}
    tiny_setup = {"tasknames": ["animals", "things"], "n_ctx": 2, "task_n_ctx": 2}

    @classmethod
    def tiny_classnames(cls, names):
        """2 tasks of consecutive classes: the trainer feeds global labels, column c = class c."""
        half = len(names) // 2
        return [list(names[:half]), list(names[half:])]

    @classmethod
    def bench_setup(cls, classnames, dataset="imagenet", tasks=2):
        names = list(classnames)
        if tasks < 1 or len(names) < tasks:
            raise ValueError(f"softcpt needs at least one class per task ({len(names)} classes, {tasks} tasks)")
        per = len(names) // tasks
        return [names[t * per: (t + 1) * per] for t in range(tasks)], {"tasknames": [f"task {t}" for t in range(tasks)]}

    def __init__(self, clip_model: nn.Module, classnames: Sequence[Sequence[str]], config=None, tokenizer=None, **kwargs):
        super().__init__(clip_model, classnames, config, tokenizer, **kwargs)
        config = self.config
        tasks = _check(config, classnames)
        self.tasknames = clean_classnames(list(config.tasknames))
        self.classnames = [clean_classnames(list(names)) for names in tasks]
        sizes = [len(n) for n in self.classnames]
        self.offsets = [0] + list(torch.tensor(sizes).cumsum(0).tolist())
        self.class_csc = config.variant[:2] != "NA"
        dev, dtype, D = self.tower.token_embedding.weight.device, self.dtype, self.tower.width
        E = int(self.tower.text_projection.shape[1]) if isinstance(self.tower.text_projection, torch.Tensor) else None
        E = E or int(self.clip.visual.output_dim)
        self.register_buffer("task_of_class", torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(dev),
                             persistent=False)

        # Task prompts "[SOS] U <task>." (U shared: TA, per task: TS).
        self.task_text, self.task_ctx = self._named_prompts(
            self.tasknames, config.task_n_ctx, config.variant[2:] == "TS", "task_constant")
        flat = [n for names in self.classnames for n in names]
        self.class_text = self.class_ctx = None
        if self.class_csc:  # class-feature prompts "[SOS] S <class>." (S shared: CA, per class: CS)
            self.class_text, self.class_ctx = self._named_prompts(
                flat, config.class_n_ctx, config.variant[:2] == "CS", "class_constant")
            if config.freeze_cls_prompt and self.class_ctx is not None:
                self.class_ctx.requires_grad_(False)
        # The meta network: one bias-free matrix, created in fp32 (fp64 for a fp64 model) as the official
        # PromptGen, and cast to the feature dtype in the forward.
        width = 2 * E if (self.class_csc and config.pg_type == "lin") else E
        proj = torch.empty(width, config.n_ctx * D, dtype=torch.promote_types(torch.float32, dtype), device=dev)
        nn.init.normal_(proj, std=config.init_std)
        self.proj = nn.Parameter(proj)
        plan = build_class_plan(flat, self.tokenizer, config.n_ctx, None, "end", **plan_kwargs(self.tower))
        self.text = PromptedTextEncoder(self.clip, plan).to(dev)
        self.sample_generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None

    def _named_prompts(self, names, n_ctx, per_name, constant_name):
        """(encoder, context parameter) of "[SOS] ctx <name>." prompts; n_ctx=0: constant features buffer."""
        if n_ctx == 0:
            with torch.no_grad():  # official: prefix "" -> " <name>." whose tokens are those of "<name>."
                self.register_buffer(constant_name, self.frozen_text_features([f"{n}." for n in names]), persistent=False)
            return None, None
        plan = build_class_plan(names, self.tokenizer, n_ctx, None, "end", **plan_kwargs(self.tower))
        emb = self.tower.token_embedding.weight
        ctx = torch.empty((len(names), n_ctx, self.tower.width) if per_name else (n_ctx, self.tower.width),
                          dtype=emb.dtype, device=emb.device)
        nn.init.normal_(ctx, std=self.config.init_std)
        return PromptedTextEncoder(self.clip, plan).to(emb.device), nn.Parameter(ctx)

    # ------------------------------------------------------------------ the meta network
    def _encode_names(self, enc, ctx, idx: Optional[torch.Tensor]) -> torch.Tensor:
        """Unnormalised features of "[SOS] ctx <name>." for names idx [n] (None: all)."""
        if self.uses_reference:  # official: every name at full length, then the rows asked for
            N, M = enc.plan.num_classes, enc.plan.n_ctx
            full = ctx.unsqueeze(0).expand(N, -1, -1) if ctx.dim() == 2 else ctx
            prompts = torch.cat([enc.token_embeds[:, :1], full, enc.token_embeds[:, 1 + M :]], dim=1)
            feats = enc.reference_features(prompts, enc.token_ids)
            return feats if idx is None else feats[idx]
        idx = torch.arange(enc.plan.num_classes, device=ctx.device) if idx is None else idx
        n = idx.shape[0]
        if ctx.dim() == 2:
            return enc.fast_features(ctx.unsqueeze(0), None, idx.new_zeros(n), idx, backend=self.op_backend)
        return enc.fast_features(ctx[idx], None, torch.arange(n, device=idx.device), idx, backend=self.op_backend)

    def task_features(self, tasks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[T or n, E] unnormalised task features (tasks [n]: a subset)."""
        if self.task_ctx is None:
            feats = self.task_constant
            return feats if tasks is None else feats[tasks]
        return self._encode_names(self.task_text, self.task_ctx, tasks)

    def class_contexts(self, tasks: torch.Tensor, classes: Optional[torch.Tensor]) -> torch.Tensor:
        """Meta-network output. NA: contexts of ``tasks`` [n] -> [n, n_ctx, D]. CA/CS: contexts of the global
        ``classes`` [m] (their tasks' features concatenated) -> [m, n_ctx, D]."""
        cfg, D = self.config, self.tower.width
        if not self.class_csc:
            x = self.task_features(tasks).to(self.dtype)
        else:
            if self.class_ctx is None:
                cls = self.class_constant[classes]
            else:
                cls = self._encode_names(self.class_text, self.class_ctx, classes)
            # Task features of the classes' tasks: encode each needed task once, then gather.
            need, where = torch.unique(self.task_of_class[classes], return_inverse=True)
            task = self.task_features(need)[where]
            x = torch.cat([cls, task], dim=1).to(self.dtype)
        if cfg.pg_type == "linmean":
            d = x.shape[-1]
            x = (x[..., : d // 2] + x[..., d // 2 :]) / 2.0
        elif cfg.pg_type == "lincls":
            x = x[..., : x.shape[-1] // 2]
        return (x @ self.proj.to(x.dtype)).reshape(x.shape[0], cfg.n_ctx, D)

    # ------------------------------------------------------------------ class sampling
    def select_classes(self, global_labels: torch.Tensor) -> List[torch.Tensor]:
        """Per task, the local class indices to score: the ones present in the batch (sorted) followed by
        ceil(rate * #others) random others (``torch.randperm``, drawn for every task in order, as official)."""
        out = []
        for t in range(len(self.tasknames)):
            st, ed = self.offsets[t], self.offsets[t + 1]
            mask = torch.zeros(ed - st, dtype=torch.bool)
            inside = global_labels[(global_labels >= st) & (global_labels < ed)].cpu() - st
            mask[inside] = True
            pos, neg = torch.where(mask)[0], torch.where(~mask)[0]
            k = math.ceil(len(neg) * self.config.cls_sample_rate)
            neg = neg[torch.randperm(len(neg), generator=self.sample_generator)[:k]]
            out.append(torch.cat([pos, neg]).to(self.task_of_class.device))
        return out

    # ------------------------------------------------------------------ text features
    def _reference_text(self, selected: Optional[List[torch.Tensor]]) -> torch.Tensor:
        """Official CustomCLIP: contexts of all tasks, then per task its class prompts at 77 tokens.
        Returns [sum C, E] normalised features (unselected classes: the official constant 1e-6 vector)."""
        text, M = self.text, self.config.n_ctx
        T = len(self.tasknames)
        if self.class_csc:
            ctx = self.class_contexts(None, torch.arange(self.offsets[-1], device=self.task_of_class.device))
        else:
            ctx = self.class_contexts(torch.arange(T, device=self.task_of_class.device), None)
        feats = []
        for t in range(T):
            st, ed = self.offsets[t], self.offsets[t + 1]
            rows = torch.arange(st, ed, device=ctx.device)
            ctx_t = ctx[st:ed] if self.class_csc else ctx[t].unsqueeze(0).expand(ed - st, -1, -1)
            if selected is not None:
                rows, ctx_t = rows[selected[t]], ctx_t[selected[t]]
            prompts = torch.cat([text.token_embeds[rows, :1], ctx_t, text.token_embeds[rows, 1 + M :]], dim=1)
            f = text.reference_features(prompts, text.token_ids[rows])
            if selected is not None:
                f0 = torch.full((ed - st, f.shape[1]), 1e-6, dtype=f.dtype, device=f.device)
                f0[selected[t]] = f0[selected[t]] + f
                f = f0
            feats.append(f)
        return F.normalize(torch.cat(feats), dim=-1)

    def _fast_text(self, classes: torch.Tensor, sampled: bool) -> torch.Tensor:
        """[m, E] normalised features of the global ``classes`` [m] (grouped by task) through the engine."""
        if self.class_csc:  # one context per class: diagonal pairs
            ctx = self.class_contexts(None, classes)
            feats = self.text.fast_features(ctx, None, torch.arange(len(classes), device=classes.device), classes,
                                            backend=self.op_backend)
        else:  # G = the tasks present, each shared by its classes
            tasks, g_idx = torch.unique(self.task_of_class[classes], return_inverse=True)
            ctx = self.class_contexts(tasks, None)
            feats = self.text.fast_features(ctx, None, g_idx, classes, backend=self.op_backend)
        if sampled:
            feats = 1e-6 + feats  # the official f0[idx] = 1e-6 + f before normalising
        return F.normalize(feats, dim=-1)

    def encode_text(self) -> torch.Tensor:
        """[sum C, E] normalised features of every class of every task (cached in eval under no_grad)."""
        def compute():
            if self.uses_reference:
                return self._reference_text(None)
            return self._fast_text(torch.arange(self.offsets[-1], device=self.task_of_class.device), False)

        return self.cached_text_features(compute)

    # ------------------------------------------------------------------ forward and loss
    def global_labels(self, labels: torch.Tensor, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Local labels + task ids (or already global labels) -> [B] global class columns."""
        labels = torch.as_tensor(labels).long().to(self.task_of_class.device)
        if task_ids is None:
            if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < self.offsets[-1]):
                raise ValueError(f"global labels must lie in 0..{self.offsets[-1] - 1}, got {labels.tolist()}")
            return labels
        task_ids = torch.as_tensor(task_ids).long().to(labels.device)
        if task_ids.shape != labels.shape:
            raise ValueError(f"task_ids {tuple(task_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
        if task_ids.numel() and not (0 <= int(task_ids.min()) and int(task_ids.max()) < len(self.tasknames)):
            raise ValueError(f"task ids must lie in 0..{len(self.tasknames) - 1}, got {task_ids.tolist()}")
        sizes = torch.tensor([len(n) for n in self.classnames], device=labels.device)[task_ids]
        if ((labels < 0) | (labels >= sizes)).any():
            raise ValueError(f"labels {labels.tolist()} exceed their tasks' class counts {sizes.tolist()}")
        return torch.tensor(self.offsets[:-1], device=labels.device)[task_ids] + labels

    def _own_task_mask(self, global_labels: torch.Tensor) -> torch.Tensor:
        return self.task_of_class.unsqueeze(0) == self.task_of_class[global_labels].unsqueeze(1)  # [B, sum C]

    def forward(self, images: torch.Tensor, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """images [B, 3, H, W] (+ task ids [B]) -> logits [B, sum C]."""
        return self.logits_from_image_features(self.encode_images(images), task_ids)

    def logits_from_image_features(self, image_features: torch.Tensor,
                                   task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, E] as ``encode_images`` returns them (+ task ids [B]) -> logits [B, sum C] (``forward``'s rest)."""
        image_features = F.normalize(image_features, dim=-1)
        text = self.encode_text()
        logits = self.logit_scale * image_features.to(text.dtype) @ text.t()
        if task_ids is not None:
            task_ids = torch.as_tensor(task_ids, device=logits.device).long()
            own = self.task_of_class.unsqueeze(0) == task_ids.unsqueeze(1)
            logits = logits.masked_fill(~own, float("-inf"))
        return logits

    # ------------------------------------------------------------------ resume state
    def training_state_dict(self):
        """With ``seed`` set, class sampling draws from its own generator across epochs; a resumed run continues it."""
        return None if self.sample_generator is None else {"sample_generator": self.sample_generator.get_state()}

    def load_training_state_dict(self, state) -> None:
        if self.sample_generator is None or state is None:
            return
        if not isinstance(state, dict) or "sample_generator" not in state:
            raise ValueError("SoftCPT training state must hold the class-sampling generator state")
        self.sample_generator.set_state(state["sample_generator"])

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor, task_ids: Optional[torch.Tensor] = None):
        """Multi-task step: (sum over tasks of CE(sum) over the task's columns) / B, and the masked logits."""
        y = self.global_labels(labels, task_ids)
        B = y.shape[0]
        image_features = F.normalize(self.encode_images(images), dim=-1)
        sampled = self.config.cls_sample_rate > 0
        selected = self.select_classes(y) if sampled else None
        keep = self._own_task_mask(y)
        if selected is not None:
            chosen = torch.zeros(self.offsets[-1], dtype=torch.bool, device=y.device)
            chosen[torch.cat([s + self.offsets[t] for t, s in enumerate(selected)])] = True
            keep = keep & chosen.unsqueeze(0)
        if self.uses_reference:
            text = self._reference_text(selected)
            logits = self.logit_scale * image_features.to(text.dtype) @ text.t()
            loss = logits.new_zeros(())
            for t in range(len(self.tasknames)):  # the official mutitask_loss(2)
                st, ed = self.offsets[t], self.offsets[t + 1]
                rows = (y >= st) & (y < ed)
                if not rows.any():
                    continue
                cols = torch.ones(ed - st, dtype=torch.bool, device=y.device) if selected is None else chosen[st:ed]
                target = torch.searchsorted(torch.where(cols)[0], y[rows] - st)  # position among kept columns
                loss = loss + F.cross_entropy(logits[rows][:, st:ed][:, cols], target, reduction="sum")
            return loss / B, logits.masked_fill(~keep, float("-inf"))
        # Fast: only the (selected) classes of the tasks present in the batch.
        tasks = torch.unique(self.task_of_class[y]).tolist()
        if selected is None:
            classes = torch.cat([torch.arange(self.offsets[t], self.offsets[t + 1], device=y.device) for t in tasks])
        else:
            classes = torch.cat([selected[t] + self.offsets[t] for t in tasks])
        text = self._fast_text(classes, sampled)
        part = self.logit_scale * image_features.to(text.dtype) @ text.t()
        logits = part.new_full((B, self.offsets[-1]), float("-inf"))
        logits = logits.index_copy(1, classes, part).masked_fill(~keep, float("-inf"))
        # -inf columns add exp(-inf) = 0 to the log-sum-exp: the same CE as over the task's kept columns.
        return F.cross_entropy(logits, y, reduction="sum") / B, logits


def _check(config: SoftCPTConfig, classnames) -> List[List[str]]:
    if config.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {config.variant!r}")
    if config.pg_type not in PG_TYPES:
        raise ValueError(f"pg_type must be one of {PG_TYPES}, got {config.pg_type!r}")
    if config.pg_type != "lin" and config.variant[:2] == "NA":
        raise ValueError(f"pg_type {config.pg_type!r} needs a class feature (a CA/CS variant), got {config.variant}")
    if not 0.0 <= float(config.cls_sample_rate) <= 1.0:
        raise ValueError(f"cls_sample_rate must be in [0, 1], got {config.cls_sample_rate!r}")
    if config.cls_sample_rate > 0 and config.variant[:2] == "NA":
        raise ValueError(f"class sampling needs a CA/CS variant (the official code asserts it), got {config.variant}")
    for name in ("n_ctx",):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("task_n_ctx", "class_n_ctx"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if isinstance(classnames, str) or not isinstance(classnames, Sequence) or not classnames:
        raise TypeError("classnames must be a non-empty list with one list of class names per task")
    tasks = []
    for t, names in enumerate(classnames):
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise TypeError(f"classnames[{t}] must be the list of task {t}'s class names, got {type(names).__name__}")
        tasks.append(list(names))
    if len(config.tasknames) != len(tasks):
        raise ValueError(f"tasknames has {len(config.tasknames)} names for {len(tasks)} tasks of classnames")
    return tasks
