"""Static layouts of the fast text engine: which (context, class) pairs are encoded and where their rows sit.

Everything here depends only on the class plan (each class's EOT position) and the pair pattern, never on
tensor values computed on the device. So a layout is built on the host, once per pattern, and its index
tensors are handed unchanged to every layer: the engine reads nothing back from the device (no host sync, no
data-dependent shape), which is what lets ``torch.compile(fullgraph=True)`` and CUDA graphs capture a step.

Packed rows: pair n contributes its suffix rows up to and including its own EOT (``lengths[n]`` rows); pair
n's rows are ``cu_seqlens[n] .. cu_seqlens[n+1]-1`` of a ``[T, D]`` buffer, T = sum(lengths) a Python int.
"""
from __future__ import annotations

from typing import Dict, Hashable, Sequence

import torch

__all__ = ["PairLayout", "LayoutCache", "PAIR_KINDS"]

# "shared": one context for every class (G = 1, pairs (0, c));  "diagonal": one context per class (G = C,
# pairs (c, c));  "all": G contexts times every class, context-major (pairs (g, c) for g < G, c < C).
PAIR_KINDS = ("shared", "diagonal", "all")


class PairLayout:
    """The pairs ``(g_idx[n], c_idx[n])`` and their packed-row layout, on one device.

    Attributes (tensors int64 on ``device``):
        g_idx, c_idx: [N] context group and class of each pair.
        rows:        [T] index into the padded ``[N * S]`` suffix rows (S = suffix width of the plan) of each
                     packed row, for ``index_select`` (replaces boolean-mask packing).
        cu_seqlens:  [N + 1] cumulative suffix lengths.
        eot_rows:    [N] packed row of each pair's EOT token.
        arange_g, zeros_g: [G] the prefix pairs (g, class 0) used to assemble the G shared prefixes.
    Python ints: ``num_groups`` G, ``num_pairs`` N, ``total_rows`` T, ``max_seqlen`` (longest suffix), ``width``
    S (suffix width of the plan).
    """

    def __init__(self, g: Sequence[int], c: Sequence[int], num_groups: int, eot: Sequence[int], prefix_len: int,
                 width: int, device: torch.device):
        lengths = [eot[ci] - prefix_len + 1 for ci in c]
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        rows = [n * width + j for n, length in enumerate(lengths) for j in range(length)]
        self.num_groups, self.num_pairs, self.total_rows, self.width = num_groups, len(c), cu[-1], width
        self.max_seqlen = max(lengths)

        def tensor(values):
            return torch.tensor(list(values), dtype=torch.long, device=device)

        self.g_idx, self.c_idx = tensor(g), tensor(c)
        self.rows, self.cu_seqlens = tensor(rows), tensor(cu)
        self.eot_rows = tensor(x - 1 for x in cu[1:])
        self.arange_g, self.zeros_g = tensor(range(num_groups)), tensor([0] * num_groups)


class LayoutCache:
    """Layouts of one class plan, built on the host and kept per (pattern, device).

    Args:
        eot: [C] EOT index of each class (a host tensor; read once).
        prefix_len: P, shared prefix length.  width: S, suffix width (max EOT + 1 - P).
    """

    def __init__(self, eot: torch.Tensor, prefix_len: int, width: int):
        self.eot = tuple(int(e) for e in eot.cpu().tolist())
        self.prefix_len, self.width = prefix_len, width
        self._cache: Dict[Hashable, PairLayout] = {}

    @property
    def num_classes(self) -> int:
        return len(self.eot)

    def get(self, kind: str, num_groups: int, device: torch.device) -> PairLayout:
        """The layout of a pair pattern (see PAIR_KINDS); ``num_groups`` is G (ignored for shared / diagonal)."""
        C = self.num_classes
        if kind == "shared":
            G = 1
        elif kind == "diagonal":
            G = C
        elif kind == "all":
            G = int(num_groups)
            if G < 1:
                raise ValueError(f"pair kind 'all' needs num_groups >= 1, got {num_groups}")
        else:
            raise ValueError(f"unknown pair kind {kind!r}; choose one of {', '.join(PAIR_KINDS)}")
        device = torch.device(device)
        key = (kind, G, device)
        layout = self._cache.get(key)
        if layout is None:
            if kind == "shared":
                g, c = [0] * C, list(range(C))
            elif kind == "diagonal":
                g, c = list(range(C)), list(range(C))
            else:
                g = [gi for gi in range(G) for _ in range(C)]
                c = list(range(C)) * G
            layout = PairLayout(g, c, G, self.eot, self.prefix_len, self.width, device)
            self._cache[key] = layout
        return layout

    def from_indices(self, g_idx: torch.Tensor, c_idx: torch.Tensor, num_groups: int) -> PairLayout:
        """The layout of arbitrary pairs given as tensors [N] (reads them to the host once: a sync on CUDA;
        the learners' per-step patterns use :meth:`get` instead). Not cached: the indices may change per call."""
        if g_idx.shape != c_idx.shape or g_idx.dim() != 1:
            raise ValueError(f"g_idx and c_idx must be 1-D of one length, got {tuple(g_idx.shape)}, {tuple(c_idx.shape)}")
        g, c = g_idx.tolist(), c_idx.tolist()
        if not c:
            raise ValueError("no pairs to encode (empty c_idx)")
        C = self.num_classes
        if min(c) < 0 or max(c) >= C:
            raise ValueError(f"c_idx must lie in [0, {C}), got values in [{min(c)}, {max(c)}]")
        if min(g) < 0 or max(g) >= num_groups:
            raise ValueError(f"g_idx must lie in [0, {num_groups}), got values in [{min(g)}, {max(g)}]")
        return PairLayout(g, c, num_groups, self.eot, self.prefix_len, self.width, g_idx.device)

