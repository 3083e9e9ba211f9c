"""``fastprompt convert`` / ``summarize`` / ``zeroshot``: the commands that meet the official repositories' users.

Registered on the main parser by ``add_commands(subparsers)`` (``fastprompt/cli.py``); each calls the library.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import Any, Dict, List

import torch

import fastprompt
from fastprompt.official import convert
from fastprompt.training.runner import build_clip
from fastprompt.training.summarize import markdown, summarize
from fastprompt.training.sweep import sweep_run, zeroshot_run


def _parse_options(items: List[str]) -> Dict[str, Any]:
    """["n_ctx=16", "csc=true", "base_config={\"n_ctx\": 4}"] -> {name: value} (JSON values, else strings)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--option {item!r}: expected NAME=VALUE, e.g. n_ctx=16")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _classnames(args) -> List[str]:
    if args.classnames_file:
        try:  # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first name
            with open(args.classnames_file, encoding="utf-8-sig") as f:
                names = [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as exc:
            raise ValueError(f"--classnames-file {args.classnames_file} is not UTF-8 text ({exc})") from None
        if not names:
            raise ValueError(f"--classnames-file {args.classnames_file} lists no class names (one name per line)")
    elif args.dataset:
        names = fastprompt.load_classnames(args.dataset)
    else:
        raise ValueError("give the classes the checkpoint was trained on: --dataset NAME or --classnames-file FILE")
    if args.subsample != "all":  # Dassl's base/new split: the first half of the labels is "base"
        half = (len(names) + 1) // 2
        names = names[:half] if args.subsample == "base" else names[half:]
    return names


def _convert(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" warning
    model, _, tokenizer = build_clip(args.model, args.pretrained, torch.device("cpu"))
    learner = convert(args.method, args.checkpoint, args.output_dir, clip_model=model, classnames=_classnames(args),
                      tokenizer=tokenizer, epoch=args.epoch, trust_checkpoint=args.trust, **_parse_options(args.option))
    print(f"wrote {args.method} adapter ({learner.num_trainable_parameters():,} values) -> {args.output_dir}")
    return 0


def run_sweep(cfg, seeds, shots, resume: bool, feature_store=None) -> int:
    """``fastprompt train --seeds ... --shots ...``: every run, then the summary table. ``feature_store`` is shared
    by every run's final test (the same test images each time)."""
    out = sweep_run(cfg, seeds, shots, resume=resume, feature_store=feature_store)
    _print_summary(out)
    return 0


def _print_summary(out) -> None:
    print(markdown(out["rows"]), end="")
    if out["paths"]:
        print("wrote " + ", ".join(out["paths"].values()))


def _summarize(args: argparse.Namespace) -> int:
    out = summarize(args.runs, output_dir=args.output_dir, with_plot=not args.no_plot)
    _print_summary(out)
    return 0


def _zeroshot(args: argparse.Namespace) -> int:
    from fastprompt.cli import _train_config  # cycle: fastprompt.cli imports this module

    cfg = _train_config(args)
    if args.output_dir is None:
        raise ValueError("fastprompt zeroshot needs --output-dir")
    cfg = dataclasses.replace(cfg, output_dir=args.output_dir)
    out = zeroshot_run(cfg, args.dataset, args.subsets)
    _print_summary(out)
    return 0


def add_commands(sub, add_run_options) -> None:
    """Add ``convert``, ``summarize`` and ``zeroshot`` to the ``fastprompt`` subparsers (``add_run_options``:
    the shared model / data / device options of ``fastprompt train``)."""
    summ = sub.add_parser("summarize", help="mean ± std and 95%% CI over seeds of finished runs (Markdown/CSV/JSON/plot)")
    summ.add_argument("runs", nargs="+", help="run directories or folders holding them (searched recursively)")
    summ.add_argument("--output-dir", default=None, help="write summary.{json,csv,md,png} here")
    summ.add_argument("--no-plot", action="store_true", help="no summary.png (it needs fastprompt[plot])")
    summ.set_defaults(func=_summarize)

    zs = sub.add_parser("zeroshot", help="zero-shot CLIP with a method's template, in the same tables")
    add_run_options(zs, multi_dataset=True)
    zs.set_defaults(func=_zeroshot, shots=-1)
    zs.add_argument("--subsample", dest="subsets", nargs="+", choices=["all", "base", "new"], default=["all"],
                    help="class subsets to test ('base new' gives the base-to-new table)")

    conv = sub.add_parser("convert", help="an official (Dassl) checkpoint -> a fastprompt adapter directory")
    conv.add_argument("--method", required=True, help="fastprompt method name (coop, cocoop, maple, promptsrc, ...)")
    conv.add_argument("--checkpoint", required=True,
                      help="Dassl file (model.pth.tar-N), Dassl output dir (<model>/model.pth.tar-N), or a state dict file")
    conv.add_argument("--output-dir", required=True, help="where the adapter (save_pretrained) is written")
    conv.add_argument("--dataset", default=None, help="shipped class list of the dataset it was trained on")
    conv.add_argument("--classnames-file", default=None, help="or: a text file, one class name per line")
    conv.add_argument("--subsample", choices=["all", "base", "new"], default="all",
                      help="base-to-new checkpoints: 'base' = the first half of the classes")
    conv.add_argument("--model", default="ViT-B-16", help="open_clip architecture or model-config JSON (default ViT-B-16)")
    conv.add_argument("--pretrained", default="openai", help="open_clip tag or 'none' (default openai)")
    conv.add_argument("--epoch", type=int, default=None, help="model.pth.tar-<epoch> (default: the highest)")
    conv.add_argument("--trust", action="store_true", help="unpickle a checkpoint that holds non-tensor objects")
    conv.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                      help="learner option matching the checkpoint, repeatable (e.g. n_ctx=16, prompt_depth=9)")
    conv.set_defaults(func=_convert)
