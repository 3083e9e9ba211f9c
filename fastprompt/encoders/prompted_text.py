"""PromptedTextEncoder: class prompts with learnable context through a frozen CLIP text tower.

Two paths over the same parameters:

* ``reference_features`` is the official computation (CoOp's ``TextEncoder``): full context-length prompts,
  the tower's causal mask, ``ln_final`` and the projection at the EOT row. Slow on purpose; never optimise it.
* ``fast_features`` computes the same function with far fewer tokens (``docs/design.md``, "The engine"):
    - truncation: positions after a prompt's EOT never influence it (causal tower, EOT pooling);
    - shared prefix: the first ``P`` positions (SOS + context for the "end" position) are the same for every
      class of one context, so their hidden states are computed once per distinct context and every class
      suffix attends to that prefix's keys/values plus its own causal past;
    - last layer: only the EOT row is pooled, so only it needs the query, output projection and MLP there.
  A prompt batch is G distinct contexts ``ctx[G, M, D]`` (+ an optional per-context shift) and pairs
  ``(g_idx[n], c_idx[n])`` to encode; this covers CoOp (G=1), CoCoOp (G=B, all pairs), class-specific
  contexts (G=C, diagonal) and task groups.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.backbone import TextTower
from fastprompt.classplan import ClassPlan
from fastprompt.encoders.layout import LayoutCache, PairLayout
from fastprompt.ops.assemble import assemble
from fastprompt.ops.pool_project import pool_project
from fastprompt.ops.prefix_attention import prefix_attention

__all__ = ["PromptedTextEncoder"]


class PromptedTextEncoder(nn.Module):
    """Encodes prompts of one class plan. Holds only frozen, non-persistent buffers (rebuilt from names).

    Args:
        clip_model: an open_clip CLIP / CustomTextCLIP (its weights are used, never copied).
        plan: the :class:`~fastprompt.classplan.ClassPlan` of the class list.
    """

    def __init__(self, clip_model: nn.Module, plan: ClassPlan):
        super().__init__()
        self.tower = TextTower(clip_model)
        self.plan = plan
        self.fast_unsupported = self.tower.unsupported_reason()
        emb = self.tower.token_embedding
        P, L = plan.prefix_len, plan.max_len
        with torch.no_grad():
            # Official buffers: the frozen word embeddings of the tokenised "<X...X> <name>." prompts.
            self.register_buffer("token_ids", plan.token_ids.clone(), persistent=False)
            self.register_buffer("token_embeds", emb(plan.token_ids.to(emb.weight.device)), persistent=False)
            fixed = emb(plan.src[:, :L].to(emb.weight.device))
        self.register_buffer("eot", plan.eot.clone(), persistent=False)
        self.register_buffer("slot_prefix", plan.slot[:, :P].contiguous(), persistent=False)
        self.register_buffer("slot_suffix", plan.slot[:, P:L].contiguous(), persistent=False)
        self.register_buffer("fixed_prefix", fixed[:, :P].contiguous(), persistent=False)
        self.register_buffer("fixed_suffix", fixed[:, P:L].contiguous(), persistent=False)
        # Context positions inside the shared prefix (where deep prompts go), same for every class.
        self.prefix_ctx_positions = [t for t in range(P) if int(plan.slot[0, t]) >= 0]
        self.suffix_has_ctx = bool((plan.slot[:, P:L] >= 0).any())
        # Pair layouts (packed-row indices, cu_seqlens, EOT rows), built on the host once per pair pattern.
        self._layouts = LayoutCache(plan.eot, P, L - P)
        self.compile_options: Optional[Dict] = None  # see compile_fast()

    def compile_fast(self, options: Optional[Dict] = None) -> None:
        """Run the fast path through ``torch.compile(fullgraph=True, dynamic=False, **options)`` from now on
        (e.g. ``{"mode": "reduce-overhead"}`` for CUDA graphs, ``{"backend": "aot_eager"}``); None: eager again.

        Shapes are static per pair layout, so each layout (class list x batch size) compiles once.
        """
        self.compile_options = None if options is None else dict(options)

    # ------------------------------------------------------------------ reference (official) path
    def reference_features(
        self,
        prompts: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: Optional[Dict[int, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Official text encoder: prompts [N, T, D] (word embeddings), token_ids [N, T] -> features [N, E].

        ``deep_prompts[i]`` ([M, D]) replaces positions 1..M of the hidden states before block i (MaPLe).
        """
        tower = self.tower
        x = prompts + tower.positional_embedding.to(prompts.dtype)
        mask = tower.attn_mask
        if deep_prompts:
            M = self.plan.n_ctx
            batch_first = getattr(tower.transformer, "batch_first", True)
            for i, blk in enumerate(tower.blocks):
                if i in deep_prompts:
                    deep = deep_prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
                    x = torch.cat([x[:, :1], deep, x[:, 1 + M :]], dim=1)
                if not batch_first:
                    x = blk(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
                else:
                    x = blk(x, attn_mask=mask)
        else:
            x = tower.transformer(x, attn_mask=mask)
        x = tower.ln_final(x)
        if tower.pool_type == "eos":
            eot = (token_ids == tower.eos_id).int().argmax(dim=-1)
        else:
            eot = token_ids.argmax(dim=-1)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return tower.project(x)

    # ------------------------------------------------------------------ fast path
    def layout(self, kind: str, num_groups: int = 1, device=None) -> PairLayout:
        """The cached :class:`~fastprompt.encoders.layout.PairLayout` of a pair pattern ("shared": G = 1, every
        class; "diagonal": class c with context c; "all": G contexts x every class, context-major)."""
        return self._layouts.get(kind, num_groups, self.eot.device if device is None else device)

    def fast_pairs(
        self,
        ctx: torch.Tensor,
        shift: Optional[torch.Tensor],
        kind: str,
        deep_prompts: Optional[Dict[int, torch.Tensor]] = None,
        backend: Optional[str] = None,
        normalize: bool = False,
    ) -> torch.Tensor:
        """:meth:`fast_features` of a standard pair pattern (``kind`` as in :meth:`layout`, G = ctx.shape[0]),
        with its layout built once on the host and reused: no host sync, static shapes -> [N, E]."""
        layout = self._layouts.get(kind, ctx.shape[0], ctx.device)
        return self._fast(ctx, shift, layout, deep_prompts, backend, normalize)

    def fast_features(
        self,
        ctx: torch.Tensor,
        shift: Optional[torch.Tensor],
        g_idx: torch.Tensor,
        c_idx: torch.Tensor,
        deep_prompts: Optional[Dict[int, torch.Tensor]] = None,
        backend: Optional[str] = None,
        normalize: bool = False,
    ) -> torch.Tensor:
        """Features of prompt pairs, exactly equal to the reference.

        Args:
            ctx: [G, M, D] contexts (G distinct ones).
            shift: [G, D] or None, added to every context token of its group.
            g_idx, c_idx: [N] int64, the (context, class) pair to encode at each row. Their layout is built on
                the host from their values (a device sync on CUDA); per-step patterns use :meth:`fast_pairs`.
            deep_prompts: {layer i: [M, D] or [G, M, D]} hidden states that replace the context positions
                before block i (needs the context inside the shared prefix, i.e. position "end").
            backend: op backend ("auto", "reference", "triton", "compiled", ...); an op without a kernel of
                that kind runs its reference.
            normalize: L2-normalise the features (fused into the pooling op).

        Returns:
            [N, E] text features.
        """
        layout = self._layouts.from_indices(g_idx, c_idx, ctx.shape[0])
        return self._fast(ctx, shift, layout, deep_prompts, backend, normalize)

    def _fast(self, ctx, shift, layout: PairLayout, deep_prompts, backend, normalize) -> torch.Tensor:
        if self.fast_unsupported:
            raise RuntimeError(f"the fast text engine cannot run this model: {self.fast_unsupported}")
        if deep_prompts and self.suffix_has_ctx:
            raise ValueError("deep prompts need the context inside the shared prefix (class_token_position='end')")
        if self.compile_options is not None and not torch.compiler.is_compiling():
            return _compiled_body(self.compile_options, ctx.device)(self, ctx, shift, layout, deep_prompts, backend, normalize)
        return _fast_body(self, ctx, shift, layout, deep_prompts, backend, normalize)

    def _pool(self, rows: torch.Tensor, normalize: bool, backend, strict) -> torch.Tensor:
        tower = self.tower
        ln, proj = tower.ln_final, tower.text_projection
        if isinstance(ln, nn.LayerNorm) and (proj is None or isinstance(proj, torch.Tensor)):
            return pool_project(rows, None, ln.weight, ln.bias, ln.eps, proj, normalize, backend=backend, strict=strict)
        feats = tower.project(ln(rows))  # an unusual head (e.g. a Linear projection with bias): as the tower does
        return F.normalize(feats, dim=-1) if normalize else feats

    def _replace_context(self, x: torch.Tensor, G: int, deep: torch.Tensor) -> torch.Tensor:
        """x [G*P + T, D] packed rows -> the same with the context positions of every prefix replaced by
        ``deep`` ([M, D] or [G, M, D])."""
        P, D = self.plan.prefix_len, x.shape[1]
        pos = self.prefix_ctx_positions
        deep = deep.to(x.dtype)
        if deep.dim() == 2:
            deep = deep.unsqueeze(0).expand(G, -1, -1)
        start, end = pos[0], pos[-1] + 1
        # The context occupies a contiguous run in the prefix ("end" position).
        xp = x[: G * P].view(G, P, D)
        xp = torch.cat([xp[:, :start], deep, xp[:, end:]], dim=1)
        return torch.cat([xp.reshape(G * P, D), x[G * P :]])


# ---------------------------------------------------------------------- the fast body (eager or compiled)
def _fast_body(self: PromptedTextEncoder, ctx, shift, layout: PairLayout, deep_prompts, backend, normalize):
    """The engine over one pair layout: ctx [G, M, D], shift [G, D] | None -> [N, E] (see fast_features)."""
    tower, P = self.tower, self.plan.prefix_len
    G = ctx.shape[0]
    pos = tower.positional_embedding
    # Ops take the learner-wide backend non-strictly: an op without that kind of kernel uses its reference.
    opts = {"backend": backend, "strict": False}
    xp = assemble(ctx, shift, self.fixed_prefix, self.slot_prefix, pos, 0, layout.arange_g, layout.zeros_g, **opts)
    xs = assemble(ctx, shift, self.fixed_suffix, self.slot_suffix, pos, P, layout.g_idx, layout.c_idx, **opts)
    # One packed row buffer [G*P + T, D]: the G prefixes, then each pair's suffix rows up to its own EOT
    # (no padding). The token-wise GEMMs, LayerNorms and MLP run once per layer over both kinds of rows.
    N, S, D = xs.shape
    x = torch.cat([xp.reshape(G * P, D), xs.reshape(N * S, D).index_select(0, layout.rows)])
    blocks = tower.blocks
    for i, blk in enumerate(blocks):
        if deep_prompts and i in deep_prompts:
            x = self._replace_context(x, G, deep_prompts[i])
        # Last block: only the EOT rows are pooled, so only they go on past attention.
        x = _block(blk, x, G, P, layout, last=i == len(blocks) - 1, **opts)
    return self._pool(x, normalize, **opts)


_COMPILED: Dict[tuple, Callable] = {}


def _compiled_body(options: Dict, device: torch.device) -> Callable:
    """``_fast_body`` through torch.compile with these options, one compiled function per option set (the
    encoder is an argument, so dynamo guards on it: encoders never share a graph). Mode "auto": CUDA graphs
    ("reduce-overhead") on CUDA, inductor's default elsewhere."""
    options = dict(options)
    if options.get("mode") == "auto":
        options["mode"] = "reduce-overhead" if device.type == "cuda" else None
    options = {k: v for k, v in options.items() if v is not None}
    key = tuple(sorted((k, repr(v)) for k, v in options.items()))
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = torch.compile(_fast_body, fullgraph=True, dynamic=False, **options)
    return fn


# ---------------------------------------------------------------------- exact layer math
def _block(blk: nn.Module, x: torch.Tensor, G: int, P: int, layout: PairLayout, last: bool, backend, strict):
    """One open_clip ResidualAttentionBlock over packed rows x [G*P + T, D]: the G prefixes (P rows each),
    then the T suffix rows of ``layout``.

    Row-wise work (LayerNorms, the QKV / output GEMMs, the MLP) runs once over all rows; attention runs per
    kind: causal self-attention inside each prefix, and shared-prefix attention for the suffixes. In the last
    block the prefix only contributes keys/values, and only the N EOT rows [N, D] are returned (its output
    projection and MLP run on N rows).
    """
    attn = blk.attn
    H = attn.num_heads
    R, D = x.shape
    GP = G * P
    qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # [R, 3D]
    qp, kp, vp = qkv[:GP].view(G, P, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # [G, H, P, dh] each
    qs, ks, vs = qkv[GP:].view(R - GP, 3, H, D // H).unbind(1)  # [T, H, dh] each
    o = prefix_attention(qs, ks, vs, kp, vp, layout.cu_seqlens, layout.g_idx, layout.max_seqlen,
                         backend=backend, strict=strict).reshape(R - GP, D)
    if last:
        x, o = x[GP:].index_select(0, layout.eot_rows), o.index_select(0, layout.eot_rows)
    else:
        op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)  # [G, H, P, dh]
        o = torch.cat([op.transpose(1, 2).reshape(GP, D), o])
    x = x + blk.ls_1(F.linear(o, attn.out_proj.weight, attn.out_proj.bias))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))
