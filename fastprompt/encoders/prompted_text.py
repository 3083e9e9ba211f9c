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

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.backbone import TextTower
from fastprompt.classplan import ClassPlan
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
            g_idx, c_idx: [N] int64, the (context, class) pair to encode at each row.
            deep_prompts: {layer i: [M, D] or [G, M, D]} hidden states that replace the context positions
                before block i (needs the context inside the shared prefix, i.e. position "end").
            backend: op backend ("auto", "reference", "triton", "compiled", ...); an op without a kernel of
                that kind runs its reference.
            normalize: L2-normalise the features (fused into the pooling op).

        Returns:
            [N, E] text features.
        """
        if self.fast_unsupported:
            raise RuntimeError(f"the fast text engine cannot run this model: {self.fast_unsupported}")
        if deep_prompts and self.suffix_has_ctx:
            raise ValueError("deep prompts need the context inside the shared prefix (class_token_position='end')")
        tower, P = self.tower, self.plan.prefix_len
        G = ctx.shape[0]
        dev = ctx.device
        pos = tower.positional_embedding
        # Ops take the learner-wide backend non-strictly: an op without that kind of kernel uses its reference.
        opts = {"backend": backend, "strict": False}
        zeros_g = torch.zeros(G, dtype=torch.long, device=dev)
        arange_g = torch.arange(G, device=dev)
        xp = assemble(ctx, shift, self.fixed_prefix, self.slot_prefix, pos, 0, arange_g, zeros_g, **opts)
        xs = assemble(ctx, shift, self.fixed_suffix, self.slot_suffix, pos, P, g_idx, c_idx, **opts)
        # Pack the suffixes: each pair keeps only its rows up to its own EOT (no padding in the token-wise
        # GEMMs). Rows of pair n are cu_seqlens[n] .. cu_seqlens[n+1]-1.
        N, S, D = xs.shape
        lengths = self.eot[c_idx] - P + 1  # [N]
        valid = torch.arange(S, device=dev).unsqueeze(0) < lengths.unsqueeze(1)
        xs = xs.reshape(N * S, D)[valid.view(-1)]  # [T, D]
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0))
        seqs = _Suffixes(cu_seqlens, g_idx, S, cu_seqlens[1:] - 1)
        blocks = tower.blocks
        for i, blk in enumerate(blocks):
            if deep_prompts and i in deep_prompts:
                xp = self._replace_context(xp, deep_prompts[i])
            # Last block: only the EOT rows are pooled, so only they go on past attention.
            xp, xs = _block(blk, xp, xs, seqs, last=i == len(blocks) - 1, **opts)
        return self._pool(xs, normalize, **opts)

    def _pool(self, rows: torch.Tensor, normalize: bool, backend, strict) -> torch.Tensor:
        tower = self.tower
        ln, proj = tower.ln_final, tower.text_projection
        if isinstance(ln, nn.LayerNorm) and (proj is None or isinstance(proj, torch.Tensor)):
            return pool_project(rows, None, ln.weight, ln.bias, ln.eps, proj, normalize, backend=backend, strict=strict)
        feats = tower.project(ln(rows))  # an unusual head (e.g. a Linear projection with bias): as the tower does
        return F.normalize(feats, dim=-1) if normalize else feats

    def _replace_context(self, xp: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        pos = self.prefix_ctx_positions
        deep = deep.to(xp.dtype)
        if deep.dim() == 2:
            deep = deep.unsqueeze(0).expand(xp.shape[0], -1, -1)
        start, end = pos[0], pos[-1] + 1
        # The context occupies a contiguous run in the prefix ("end" position).
        return torch.cat([xp[:, :start], deep, xp[:, end:]], dim=1)


# ---------------------------------------------------------------------- exact layer math
def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    # [B, L, D] -> [B, H, L, D/H]
    B, L, D = x.shape
    return x.view(B, L, heads, D // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, L, dh = x.shape
    return x.transpose(1, 2).reshape(B, L, H * dh)


def _qkv(attn: nn.MultiheadAttention, h: torch.Tensor):
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.chunk(3, dim=-1)
    H = attn.num_heads
    return _split_heads(q, H), _split_heads(k, H), _split_heads(v, H)


class _Suffixes:
    """Layout of the packed class suffixes: pair n owns rows cu_seqlens[n] .. cu_seqlens[n+1]-1 and reads
    prefix g_idx[n]; eot_rows[n] is its last (EOT) row; max_seqlen bounds every suffix length."""

    def __init__(self, cu_seqlens: torch.Tensor, g_idx: torch.Tensor, max_seqlen: int, eot_rows: torch.Tensor):
        self.cu_seqlens, self.g_idx, self.max_seqlen, self.eot_rows = cu_seqlens, g_idx, max_seqlen, eot_rows


def _block(blk: nn.Module, xp, xs, seqs: _Suffixes, last: bool, backend, strict):
    """One open_clip ResidualAttentionBlock over the prefixes xp [G, P, D] and packed suffixes xs [T, D].

    In the last block the prefix only contributes keys/values, and only the EOT rows [N, D] are returned
    (the MLP runs on N rows instead of T + G*P).
    """
    attn = blk.attn
    H = attn.num_heads
    T, D = xs.shape
    qp, kp, vp = _qkv(attn, blk.ln_1(xp))
    qs, ks, vs = F.linear(blk.ln_1(xs), attn.in_proj_weight, attn.in_proj_bias).view(T, 3, H, D // H).unbind(1)
    o = prefix_attention(qs, ks, vs, kp, vp, seqs.cu_seqlens, seqs.g_idx, seqs.max_seqlen, backend=backend, strict=strict)
    o = o.reshape(T, D)
    out_w, out_b = attn.out_proj.weight, attn.out_proj.bias
    if last:
        xs, o = xs.index_select(0, seqs.eot_rows), o.index_select(0, seqs.eot_rows)
    else:
        op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
        xp = xp + blk.ls_1(F.linear(_merge_heads(op), out_w, out_b))
        xp = xp + blk.ls_2(blk.mlp(blk.ln_2(xp)))
    xs = xs + blk.ls_1(F.linear(o, out_w, out_b))
    xs = xs + blk.ls_2(blk.mlp(blk.ln_2(xs)))
    return xp, xs
