"""Sweeps over seeds and shots (``fastprompt train --seeds 1 2 3 --shots 1 2 4 8 16``), and the zero-shot CLIP
baseline (``fastprompt zeroshot``), both summarized as mean ± std / 95% CI per dataset.

A sweep writes each run to ``<output dir>/shots_<k>/seed<s>`` and skips a run that already finished with the
same settings, so running the same command again after an interruption trains only what is missing (runs that
stopped half-way continue with ``--resume``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt.templates import CUSTOM_TEMPLATES, KGCOOP_TEMPLATES, PROGRAD_TEMPLATES, template_for
from fastprompt.training.checkpoint import RUN_SETTING_KEYS
from fastprompt.training.config import TrainConfig, resolve_defaults
from fastprompt.training.console import RunsETA
from fastprompt.training.report import write_json
from fastprompt.training.runner import (
    RESULTS, build_clip, evaluate_split, load_splits, read_run_config, resolve_device, train_run,
)
from fastprompt.training.summarize import summarize

ZEROSHOT_METHOD = "zeroshot"


def _finished(run_cfg: TrainConfig) -> Optional[Dict[str, Any]]:
    """results.json of a run that finished with the same settings, else None."""
    path = os.path.join(run_cfg.output_dir, RESULTS)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            results = json.load(f)
        stored = read_run_config(run_cfg.output_dir).to_dict()
    except (OSError, ValueError, TypeError, FileNotFoundError):
        return None
    wanted = resolve_defaults(run_cfg.validate()).to_dict()
    if not results.get("finished") or any(stored.get(k) != wanted.get(k) for k in RUN_SETTING_KEYS):
        return None
    return results


def sweep_run(cfg: TrainConfig, seeds: Sequence[int], shots: Sequence[int], resume: bool = False,
              feature_store=None) -> Dict[str, Any]:
    """Train ``cfg`` for every (shots, seed) into ``cfg.output_dir/shots_<k>/seed<s>``; finished runs with the
    same settings are reused. Returns the summary (rows, per-run records, written paths)."""
    if not seeds or not shots:
        raise ValueError("a sweep needs at least one seed and one shots value")
    root = cfg.output_dir
    plan = [(int(k), int(s)) for k in shots for s in seeds]
    eta = RunsETA(len(plan))
    for i, (k, s) in enumerate(plan, 1):
        run_cfg = dataclasses.replace(cfg, shots=k, seed=s, output_dir=os.path.join(root, f"shots_{k}", f"seed{s}"))
        head = f"[fastprompt] run {i}/{len(plan)}: {cfg.method} on {cfg.dataset}, {k} shots, seed {s}"
        if _finished(run_cfg) is not None:
            print(f"{head}: finished before, reused ({run_cfg.output_dir})", flush=True)
            continue
        print(head + eta.text(len(plan) - i + 1), flush=True)
        t0 = time.perf_counter()
        train_run(run_cfg, resume=resume, feature_store=feature_store)
        eta.add(time.perf_counter() - t0)
    return summarize([root], output_dir=root)


class ZeroShotCLIP(nn.Module):
    """Zero-shot CLIP: ``logits = logit_scale * cos(image, text(template.format(class)))``. No trainable tensor;
    ``set_classnames`` re-encodes the class prompts (the same evaluation interface as a learner)."""

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], template: str, tokenizer):
        super().__init__()
        self.clip, self.template, self.tokenizer = clip_model, template, tokenizer
        self.set_classnames(classnames)

    @torch.no_grad()
    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = [c.replace("_", " ") for c in classnames]
        ids = torch.as_tensor(self.tokenizer([self.template.format(c) for c in self.classnames]), dtype=torch.long)
        device = next(self.clip.parameters()).device
        self.register_buffer("text_features", F.normalize(self.clip.encode_text(ids.to(device)), dim=-1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> logits [B, C]."""
        dtype = next(self.clip.visual.parameters()).dtype
        v = F.normalize(self.clip.encode_image(images.to(dtype)), dim=-1)
        return self.clip.logit_scale.exp() * v.to(self.text_features.dtype) @ self.text_features.t()


def method_template(method: str, dataset: str) -> str:
    """The hand-crafted template of ``method``'s code for ``dataset`` (KgCoOp's and ProGrad's own tables; CoOp's
    otherwise)."""
    table = {"kgcoop": KGCOOP_TEMPLATES, "prograd": PROGRAD_TEMPLATES}.get(method, CUSTOM_TEMPLATES)
    return template_for(dataset, table)


def zeroshot_run(cfg: TrainConfig, datasets: Sequence[str], subsamples: Sequence[str] = ("all",)) -> Dict[str, Any]:
    """Zero-shot CLIP with ``cfg.method``'s template on each dataset's test split, for each class subset.

    Writes ``<output>/<dataset>/results.json`` ("all") or ``results_base.json`` + ``results_new.json`` (the
    base-to-new tables), with a ``run_config.json``, then the summary of ``<output>``.
    """
    cfg = cfg.validate()
    device = resolve_device(cfg.device)
    clip, preprocess, tokenizer = build_clip(cfg.model, cfg.pretrained, device, cfg.precision)
    for name in datasets:
        template = method_template(cfg.method, name)
        out = os.path.join(cfg.output_dir, name)
        run_cfg = dataclasses.replace(cfg, dataset=name, output_dir=out)
        model = None
        for part in subsamples:
            splits = load_splits(name, cfg.root, -1, cfg.seed, part)
            model = model or ZeroShotCLIP(clip, splits.classnames, template, tokenizer)
            tested = evaluate_split(model, splits, run_cfg, preprocess, "test")
            record = dict(tested, method=ZEROSHOT_METHOD, template=template, template_of=cfg.method, seed=cfg.seed,
                          shots=0, subsample=part, finished=True)
            write_json(os.path.join(out, "results.json" if part == "all" else f"results_{part}.json"), record)
            print(f"[fastprompt] zero-shot CLIP ({cfg.method}'s template {template!r}) on {name} ({part}): "
                  f"{tested['accuracy']:.2f}%", flush=True)
        write_json(os.path.join(out, "run_config.json"), dict(run_cfg.to_dict(), method=ZEROSHOT_METHOD, shots=0))
    return summarize([cfg.output_dir], output_dir=cfg.output_dir)
