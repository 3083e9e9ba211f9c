"""Reusable losses of the CoOp family: KgCoOp's knowledge guidance, ProGrad's distillation term and its
gradient projection, and CaPT's margin-ITM loss.

Every function here is the official formula written plainly (it is part of both the reference and the fast
path of a learner, so it is never "optimised").
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "knowledge_guidance_score", "distillation_ce", "project_gradient", "class_similarity", "margin_itm_loss",
    "MarginITMLoss",
]

# The CaPT code works on cosine similarities and multiplies by 100, CLIP's released logit scale, whatever the
# model's own scale is (losses.py `MarginLoss`).
MARGIN_LOGIT_SCALE = 100.0


def knowledge_guidance_score(text_features: torch.Tensor, template_features: torch.Tensor) -> torch.Tensor:
    """KgCoOp's regulariser ``1 - mean_c cos(t_c, w_c)``.

    Args:
        text_features: [C, E] learned-prompt class features (normalised or not: the cosine does not care).
        template_features: [C, E] hand-crafted template features of the same classes.

    Returns:
        [] scalar. Uses ``torch.nn.CosineSimilarity(dim=1, eps=1e-7)`` as the official code does.
    """
    if text_features.shape != template_features.shape:
        raise ValueError(
            f"text features {tuple(text_features.shape)} and template features {tuple(template_features.shape)} differ"
        )
    w = template_features.to(text_features.dtype)
    cos = F.cosine_similarity(text_features, w, dim=1, eps=1e-7)
    return 1.0 - cos.mean()


def distillation_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """ProGrad's "KL" term: ``mean_b sum_c -softmax(tea/T) * log_softmax(stu/T) * T^2``.

    It is the cross-entropy to the teacher's soft labels (the KL divergence plus the teacher entropy, a constant),
    exactly as ``ProGradLoss`` computes it. Shapes: [B, C], [B, C] -> [].
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits differ")
    tea = F.softmax(teacher_logits.to(student_logits.dtype) / T, dim=-1)
    return (-tea * F.log_softmax(student_logits / T, dim=-1) * T * T).sum(1).mean()


def project_gradient(grad_a: torch.Tensor, grad_b: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """ProGrad's per-tensor projection (``prograd_backward_and_update``).

    With ``b^ = b / |b|``: if ``cos(a, b) < 0`` return ``a - lambda * (a . b^) b^``, else ``a``. ``a`` is the
    gradient of the task loss, ``b`` the gradient of the distillation loss. A zero ``b`` (or ``a``) makes the
    official cosine NaN, which compares False: no projection; we return ``a`` then too.
    """
    if grad_a.shape != grad_b.shape:
        raise ValueError(f"gradients differ in shape: {tuple(grad_a.shape)} vs {tuple(grad_b.shape)}")
    na, nb = torch.linalg.norm(grad_a), torch.linalg.norm(grad_b)
    if float(na) == 0.0 or float(nb) == 0.0:
        return grad_a
    b_unit = grad_b / nb
    a_unit = grad_a / na
    if float(torch.dot(a_unit.flatten(), b_unit.flatten())) < 0:
        return grad_a - lambda_ * torch.dot(grad_a.flatten(), b_unit.flatten()) * b_unit
    return grad_a


def class_similarity(class_features: torch.Tensor) -> torch.Tensor:
    """[C, E] class text information -> [C, C] cosine-similarity matrix S (CaPT's ``USE_SIM``).

    Computed in float32 as the official code does (``wordvecs.float()``), or in float64 for a float64 model.
    """
    x = class_features.detach()
    x = x.double() if x.dtype == torch.float64 else x.float()
    return F.cosine_similarity(x.unsqueeze(1), x.unsqueeze(0), dim=-1)


def margin_itm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    sim: Optional[torch.Tensor],
    smooth: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """CaPT's margin-ITM loss (``MarginLoss``).

    For a sample with label y over C classes: ``m_j = smooth * S[y, j] / (C - 1)`` for j != y,
    ``m_y = -sum_{j != y} m_j``, and the loss is ``CE(100 * (logits / 100 - m), y)``.

    Args:
        logits: [B, C] ITM logits (logit scale x cosine).
        labels: [B] int64 in [0, C).
        sim: [C, C] class-similarity matrix, or None for all ones (``USE_SIM=False``).
        smooth: epsilon; 0 gives plain cross-entropy (as the official code short-circuits).
        reduction: passed to ``F.cross_entropy``.

    A single class (C = 1) has no non-target margin (the official code divides by zero): plain CE.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got {tuple(logits.shape)}")
    B, C = logits.shape
    if labels.shape != (B,):
        raise ValueError(f"labels must be [{B}], got {tuple(labels.shape)}")
    if smooth == 0.0 or C == 1:
        return F.cross_entropy(logits, labels, reduction=reduction)
    with torch.no_grad():
        if sim is None:
            margin = torch.ones_like(logits)
        else:
            if sim.shape != (C, C):
                raise ValueError(f"similarity matrix must be [{C}, {C}], got {tuple(sim.shape)}")
            margin = sim[labels].to(device=logits.device, dtype=torch.promote_types(sim.dtype, logits.dtype)).clone()
        margin = margin * (smooth / (C - 1))
        onehot = F.one_hot(labels, num_classes=C) > 0
        margin[onehot] = 0
        target = -margin.sum(1)
        margin[onehot] = target
    scaled = (logits / MARGIN_LOGIT_SCALE - margin) * MARGIN_LOGIT_SCALE
    return F.cross_entropy(scaled, labels, reduction=reduction)  # fp16 logits meet the fp32 margin: fp32 CE, as upstream


class MarginITMLoss:
    """``margin_itm_loss`` bound to one class list's similarity matrix: ``loss(logits [B, C], labels [B])``."""

    def __init__(self, sim: Optional[torch.Tensor], smooth: float):
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.sim, self.smooth = sim, float(smooth)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return margin_itm_loss(logits, labels, self.sim, self.smooth)
