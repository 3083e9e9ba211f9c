"""PromptedVisionEncoder: visual prompt tokens through a frozen ViT (VPT, VAPT, MaPLe, IVLP, PromptSRC).

One API over open_clip's ``VisionTransformer`` (``clip_model.visual``) and timm's ``VisionTransformer``::

    enc = PromptedVisionEncoder(clip_model.visual, insert="append")      # or "after_cls"
    feats = enc(images, prompts={0: P0, 1: P1, ...}, fast=True)          # [B, E]
    dapt = PromptedVisionEncoder(clip_model.visual, "after_cls", after_ln_pre=True)  # DAPT

Where the prompts go (``insert``):

* ``"append"`` (MaPLe / IVLP / PromptSRC): after every patch token. As in the official MaPLe code, the prompts
  are appended *after* the positional embedding was added and *before* ``ln_pre``, so they pass through
  ``ln_pre`` like every token; deep prompts overwrite the last n rows before block i (no ``ln_pre``).
* ``"after_cls"`` (VPT): right after the CLS token (after all prefix tokens of a timm ViT with register
  tokens), again after the positional embedding (prompts get none) and before ``ln_pre`` / timm's
  ``norm_pre`` (an identity in the supervised ViTs VPT uses). Deep prompts overwrite rows 1..n.

``after_ln_pre=True`` (DAPT, with ``"after_cls"``) inserts the block-0 prompts at the same position but
*after* ``ln_pre`` / ``norm_pre``: the tower's tokens are normalised, the prompts enter block 0 as they are
(the official DAPT ``ImageEncoder`` runs ``ln_pre`` and then concatenates [CLS, prompts, patches]). Deep
prompts are unaffected (they never pass ``ln_pre``). Default False: the two conventions above.

``prompts`` is None, a dict ``{block i: [n, Dv] or [B, n, Dv]}`` (key 0 inserts n tokens before block 0; key
i > 0 overwrites the n prompt rows' hidden states before block i and needs key 0), or a callable
``prompts(i, x) -> tensor | None`` called before every block with ``x`` = the hidden states of the tower's own
tokens ``[B, T, Dv]`` (T = prefix tokens + patches, in the tower's order, prompt rows removed). Call 0 gets the
tokens where the prompts go in (after the positional embedding; before ``ln_pre``, or after it with
``after_ln_pre``) and decides n (None: no prompts, no more
calls); later calls return the prompts that overwrite the prompt rows, or None to keep them.

Pooling sees the tower's own tokens only (prompt rows removed), so the output is exactly what the tower's own
head gives: open_clip ``visual(images)`` (``_pool`` with its ``pool_type`` / ``final_ln_after_pool`` /
attentional pooling, then ``proj``), timm ``forward_head(forward_features(images), pre_logits=True)``.

Two paths over the same weights:

* ``fast=False`` (reference) is the official loop: the sequence is re-concatenated around the prompts at
  every deep layer and the tower's own blocks run it (in the tower's LND / NLD layout).
* ``fast=True`` computes the same function with less work and no per-layer re-concatenation:
    - layout: the buffer is ``[tower tokens | prompts]`` in both modes. Attention without a mask is
      permutation-equivariant over the sequence and every other op is per token, so moving the prompt rows
      to the end changes nothing but the order of the softmax / value sums (rounding only). The tower rows are
      then a plain slice, and prompts enter with one concatenation in total;
    - a block whose prompt rows are overwritten before the next block computes queries, attention, output
      projection and MLP for the tower rows only (the prompt rows still give keys and values); its residual
      add writes straight into the next layer's buffer, and the next prompts are copied into their rows;
    - the last block computes only the CLS row when the head pools the CLS token (keys/values of all rows);
    - attention is ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where they apply).
  With callable prompts the next prompts depend on the block's output, so the next buffer is built by one
  ``torch.cat`` of [tower rows, prompts] per layer (the official VAPT code does two).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer as OpenClipViT

__all__ = ["PromptedVisionEncoder", "INSERT_MODES"]

INSERT_MODES = ("append", "after_cls")
PromptSpec = Union[None, Dict[int, torch.Tensor], Callable[[int, torch.Tensor], Optional[torch.Tensor]]]


def _tower_kind(visual: nn.Module) -> str:
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT  # optional dependency
    except Exception:  # pragma: no cover - timm is optional
        TimmViT = ()
    if isinstance(visual, OpenClipViT):
        for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "_pool"):
            if not hasattr(visual, name):
                raise TypeError(f"open_clip VisionTransformer without {name!r}: unsupported open_clip version")
        return "open_clip"
    if TimmViT and isinstance(visual, TimmViT):
        return "timm"
    raise TypeError(
        f"PromptedVisionEncoder needs an open_clip or timm VisionTransformer, got {type(visual).__name__} "
        "(ResNet towers and other non-ViT visuals cannot take prompt tokens)"
    )


class _AddInto(torch.autograd.Function):
    """``a + b`` [B, T, D] written into rows :T of a new [B, total, D] buffer whose other rows are zero, so the
    next layer's prompts can be copied into rows T: in place (no concatenation of the whole sequence)."""

    @staticmethod
    def forward(ctx, a, b, total: int):
        B, T, D = a.shape
        ctx.T = T
        out = a.new_empty(B, total, D)
        torch.add(a, b, out=out[:, :T])
        out[:, T:].zero_()
        return out

    @staticmethod
    def backward(ctx, g):
        ga = g[:, : ctx.T]
        return ga, ga, None


class _BlockMath:
    """The exact pieces of one pre-norm block, so the fast path can restrict queries to some rows.

    Known layouts: open_clip ``ResidualAttentionBlock`` (``nn.MultiheadAttention`` with packed in-projection)
    and timm ``Block`` with timm ``Attention``. Anything else (``known`` False) is run as a whole block.
    """

    def __init__(self, blk: nn.Module, kind: str):
        self.blk = blk
        self.known = False
        if kind == "open_clip":
            attn = getattr(blk, "attn", None)
            self.known = (
                isinstance(attn, nn.MultiheadAttention)
                and attn._qkv_same_embed_dim
                and attn.in_proj_weight is not None
                and attn.bias_k is None
                and not attn.add_zero_attn
                and not hasattr(blk, "ln_1_kv")
                and all(hasattr(blk, n) for n in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2"))
            )
        else:
            from timm.layers import Attention  # optional dependency
            from timm.models.vision_transformer import Block  # optional dependency

            self.known = type(blk) is Block and type(blk.attn) is Attention and blk.attn.gate is None

    # every method below maps [B, rows, D] -> [B, rows, D] (q/k/v: [B, H, rows, dh])
    def norm1(self, x):
        return self.blk.ln_1(x) if hasattr(self.blk, "ln_1") else self.blk.norm1(x)

    def norm2(self, x):
        return self.blk.ln_2(x) if hasattr(self.blk, "ln_2") else self.blk.norm2(x)

    def res1(self, t):
        b = self.blk
        return b.ls_1(t) if hasattr(b, "ls_1") else b.drop_path1(b.ls1(t))

    def mlp_res(self, x):
        b = self.blk
        if hasattr(b, "ls_2"):
            return b.ls_2(b.mlp(b.ln_2(x)))
        return b.drop_path2(b.ls2(b.mlp(b.norm2(x))))

    def qkv(self, h):
        B, L, _ = h.shape
        attn = self.blk.attn
        if isinstance(attn, nn.MultiheadAttention):
            H = attn.num_heads
            qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).view(B, L, 3, H, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        qkv = attn.qkv(h).view(B, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def attend(self, q, k, v):
        attn = self.blk.attn
        if isinstance(attn, nn.MultiheadAttention):
            p = attn.dropout if attn.training else 0.0
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            B, H, R, dh = o.shape
            return F.linear(o.transpose(1, 2).reshape(B, R, H * dh), attn.out_proj.weight, attn.out_proj.bias)
        p = attn.attn_drop.p if attn.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=attn.scale)
        B, H, R, dh = o.shape
        o = attn.norm(o.transpose(1, 2).reshape(B, R, H * dh))
        return attn.proj_drop(attn.proj(o))


class PromptedVisionEncoder(nn.Module):
    """Prompt tokens through a frozen ViT; holds no parameters of its own (the tower's weights are used).

    Args:
        visual: ``clip_model.visual`` (open_clip ``VisionTransformer``) or a timm ``VisionTransformer``.
        insert: ``"append"`` (after the patches) or ``"after_cls"`` (after the CLS / prefix tokens).
        after_ln_pre: insert the block-0 prompts after ``ln_pre`` / ``norm_pre`` instead of before it, so
            they are not normalised (DAPT). Default False.
    """

    def __init__(self, visual: nn.Module, insert: str = "append", after_ln_pre: bool = False):
        super().__init__()
        if insert not in INSERT_MODES:
            raise ValueError(f"insert must be one of {INSERT_MODES}, got {insert!r}")
        if not isinstance(after_ln_pre, bool):
            raise TypeError(f"after_ln_pre must be a bool, got {after_ln_pre!r}")
        self.kind = _tower_kind(visual)
        self.visual = visual
        self.insert = insert
        self.after_ln_pre = after_ln_pre
        self._math = [_BlockMath(b, self.kind) for b in self.blocks]

    # ------------------------------------------------------------------ tower facts
    @property
    def blocks(self):
        return self.visual.transformer.resblocks if self.kind == "open_clip" else self.visual.blocks

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self.visual.transformer.width if self.kind == "open_clip" else self.visual.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: 1 (CLS) for open_clip; CLS + registers for timm."""
        return 1 if self.kind == "open_clip" else int(self.visual.num_prefix_tokens)

    @property
    def grid_size(self):
        """(rows, cols) of the patch grid."""
        g = self.visual.grid_size if self.kind == "open_clip" else self.visual.patch_embed.grid_size
        return tuple(int(v) for v in g)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    @property
    def _batch_first(self) -> bool:
        return self.kind == "timm" or getattr(self.visual.transformer, "batch_first", True)

    @property
    def _cls_only(self) -> bool:
        """The head reads only row 0 of the last block's output (per-token final norm, CLS pooling)."""
        v = self.visual
        if self.kind == "open_clip":
            return v.attn_pool is None and v.pool_type == "tok"
        return v.attn_pool is None and v.global_pool == "token" and v.cls_token is not None

    # ------------------------------------------------------------------ shared pieces
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> the tower's tokens [B, T, D] after the positional embedding (and patch dropout),
        before ``ln_pre`` / ``norm_pre``: where the prompts are inserted."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a [B, 3, H, W] tensor, got {getattr(images, 'shape', type(images))}")
        v = self.visual
        if self.kind == "timm":
            return v.patch_drop(v._pos_embed(v.patch_embed(images)))
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.patch_dropout(x)

    def _norm_pre(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.norm_pre(x) if self.kind == "timm" else self.visual.ln_pre(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's own head on its tokens [B, T, D] (or [B, 1, D] = CLS only, when ``_cls_only``)."""
        v = self.visual
        if self.kind == "timm":
            return v.forward_head(v.norm(x), pre_logits=True)
        pooled, _ = v._pool(x)
        return pooled @ v.proj if v.proj is not None else pooled

    def _run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The tower's own block on batch-first x (transposed to LND around it for LND towers)."""
        if self._batch_first:
            return blk(x)
        return blk(x.transpose(0, 1)).transpose(0, 1)

    def _prompt(self, p, i: int, B: int, D: int, dtype, n: Optional[int]) -> Optional[torch.Tensor]:
        """Check one layer's prompts and broadcast them to [B, n, D] in the hidden dtype."""
        if p is None:
            return None
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"prompts for block {i} must be a tensor, got {type(p).__name__}")
        if p.dim() == 2:
            p = p.unsqueeze(0).expand(B, -1, -1)
        if p.dim() != 3 or p.shape[0] != B or p.shape[2] != D:
            raise ValueError(f"prompts for block {i} must be [n, {D}] or [{B}, n, {D}], got {tuple(p.shape)}")
        if n is not None and p.shape[1] != n:
            raise ValueError(f"prompts for block {i} have {p.shape[1]} tokens, block 0 inserted {n}")
        return p.to(dtype)

    def _source(self, prompts: PromptSpec):
        """(getter(i, tower_rows) -> raw prompts | None, known: set of keys or None for a callable)."""
        if prompts is None:
            return (lambda i, x: None), set()
        if callable(prompts) and not isinstance(prompts, dict):
            return prompts, None
        if not isinstance(prompts, dict):
            raise TypeError(f"prompts must be None, a dict {{block: tensor}} or a callable, got {type(prompts).__name__}")
        for k in prompts:
            if not isinstance(k, int) or not 0 <= k < self.depth:
                raise ValueError(f"prompt keys must be block indices in [0, {self.depth}), got {k!r}")
        if prompts and 0 not in prompts:
            raise ValueError(f"deep prompts (keys {sorted(prompts)}) need the shallow prompts of key 0")
        return (lambda i, x: prompts.get(i)), set(prompts)

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, prompts: PromptSpec = None, fast: bool = True) -> torch.Tensor:
        """images [B, 3, H, W] -> features [B, E] (open_clip: ``visual(images)``'s pooled output; timm: the
        pre-logits features). ``prompts``: None | {block: [n, Dv] | [B, n, Dv]} | callable(i, x [B, T, Dv]).
        Differentiable w.r.t. the prompts (and whatever a callable builds them from)."""
        if fast:
            return self._forward_fast(images, prompts)
        return self._forward_reference(images, prompts)

    def _forward_reference(self, images: torch.Tensor, prompts: PromptSpec) -> torch.Tensor:
        get, _ = self._source(prompts)
        x = self._embed(images)
        if self.after_ln_pre:  # DAPT: the tower's tokens are normalised before the prompts join them
            x = self._norm_pre(x)
        B, T, D = x.shape
        s = self.num_prefix_tokens if self.insert == "after_cls" else T  # first prompt row
        p = self._prompt(get(0, x), 0, B, D, x.dtype, None)
        n = 0 if p is None else p.shape[1]
        if n:
            x = torch.cat([x[:, :s], p, x[:, s:]], dim=1)

        def tower_rows(h):  # the official code drops the prompt rows by concatenating the rest
            return torch.cat([h[:, :s], h[:, s + n:]], dim=1) if n else h

        if not self.after_ln_pre:
            x = self._norm_pre(x)
        for i, blk in enumerate(self.blocks):
            if i > 0 and n:
                p = self._prompt(get(i, tower_rows(x)), i, B, D, x.dtype, n)
                if p is not None:
                    x = torch.cat([x[:, :s], p, x[:, s + n:]], dim=1)
            x = self._run_block(blk, x)
        return self._head(tower_rows(x))

    def _forward_fast(self, images: torch.Tensor, prompts: PromptSpec) -> torch.Tensor:
        get, keys = self._source(prompts)
        x = self._embed(images)
        if self.after_ln_pre:
            x = self._norm_pre(x)
        B, T, D = x.shape
        p = self._prompt(get(0, x), 0, B, D, x.dtype, None)
        n = 0 if p is None else p.shape[1]
        x = torch.cat([x, p], dim=1) if n else x  # the only concatenation (dict prompts)
        if not self.after_ln_pre:
            x = self._norm_pre(x)
        last = self.depth - 1
        for i, (blk, m) in enumerate(zip(self.blocks, self._math)):
            if i == last:
                if not m.known:
                    x = self._run_block(blk, x)[:, :T]
                    break
                rows = 1 if self._cls_only else T
                x = self._rows(m, x, rows)[0]
                break
            if not m.known:
                y = self._run_block(blk, x)
                if n:
                    nxt = self._prompt(get(i + 1, y[:, :T]), i + 1, B, D, x.dtype, n)
                    if nxt is not None:
                        y = torch.cat([y[:, :T], nxt], dim=1)
                x = y
                continue
            if n == 0:
                x = self._rows(m, x, x.shape[1])[0]
            elif keys is not None and (i + 1) not in keys:  # dict, prompt rows carried on: all rows
                x = self._rows(m, x, x.shape[1])[0]
            elif keys is not None:  # dict, prompt rows overwritten next: tower rows only, written in place
                x1, delta, _ = self._rows(m, x, T, split=True)
                y = _AddInto.apply(x1, delta, T + n)
                y[:, T:] = self._prompt(get(i + 1, None), i + 1, B, D, x.dtype, n)
                x = y
            else:  # callable: the next prompts depend on this block's output
                y, lazy = self._rows(m, x, T)
                nxt = self._prompt(get(i + 1, y), i + 1, B, D, x.dtype, n)
                x = torch.cat([y, nxt if nxt is not None else lazy()], dim=1)
        return self._head(x)

    def _rows(self, m: _BlockMath, x: torch.Tensor, rows: int, split: bool = False):
        """Block output for the first ``rows`` rows of x [B, L, D] (every row gives keys and values).

        Returns (out [B, rows, D], lazy) where ``lazy()`` computes the remaining rows' output from the same
        keys / values; with ``split`` returns (x1, mlp delta, None) so the caller adds them where it wants.
        """
        h = m.norm1(x)
        q, k, v = m.qkv(h)
        x1 = x[:, :rows] + m.res1(m.attend(q[:, :, :rows], k, v))
        delta = m.mlp_res(x1)
        if split:
            return x1, delta, None

        def lazy():
            r1 = x[:, rows:] + m.res1(m.attend(q[:, :, rows:], k, v))
            return r1 + m.mlp_res(r1)

        return x1 + delta, lazy
