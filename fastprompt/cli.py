"""The ``fastprompt`` command line. Thin: every subcommand calls the library."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import List, Optional

import torch

import fastprompt
import fastprompt.datasets as ds
from fastprompt.benchmarking.selftest import selftest
from fastprompt.benchmarking.step import STEP_METHODS, format_step_table, run_step_case, step_results_json
from fastprompt.benchmarking.text import DEFAULT_CASES, BenchCase, format_table, results_json, run_cases
from fastprompt.cli_checks import check_bench_args, check_dataset_images, interrupted_hint, one_line
from fastprompt.cli_ecosystem import add_commands, run_sweep
from fastprompt.env import env_report
from fastprompt.learners import list_learners
from fastprompt.training import console, runner
from fastprompt.training.checkpoint import CheckpointError
from fastprompt.training.config import TrainConfig, apply_mapping, apply_opts, base2new_protocol, load_config_file
from fastprompt.training.dassl_config import apply_official_files
from fastprompt.training.feature_store import FeatureStore
from fastprompt.training.guards import TrainingDiverged
from fastprompt.training.report import markdown_table

DTYPES = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16"}


def _bench(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" warning
    problem = check_bench_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.step:
        return _bench_steps(args, device)
    text_methods = ("coop", "cocoop")
    if args.method and any(m not in text_methods for m in args.method):
        other = [m for m in args.method if m not in text_methods]
        print(f"error: the text-side bench covers coop and cocoop; time {', '.join(other)} with --step "
              "(a whole training step)", file=sys.stderr)
        return 2
    if args.preset == "issue":
        cases = [BenchCase("coop", 1000), BenchCase("cocoop", 100, batch=8, dataset="caltech101")]
    elif args.method:
        classes = args.classes or 100
        cases = [BenchCase(m, classes, args.batch if m == "cocoop" else 1, args.dataset, args.n_ctx) for m in args.method]
    else:
        cases = DEFAULT_CASES
    dtype = getattr(torch, DTYPES[args.dtype])
    print(f"fastprompt bench: ViT-B-16 text tower (random weights), text side forward+backward, {device}, {args.dtype}")
    results = run_cases(cases, device, dtype, args.repeats, args.warmup)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            f.write(results_json(results))
        print(f"wrote {args.json}")
    return 0


def _env(_: argparse.Namespace) -> int:
    env_report()
    return 0


def _selftest(_: argparse.Namespace) -> int:
    env_report()
    try:
        selftest()
    except AssertionError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print("selftest passed")
    return 0


# ---------------------------------------------------------------------- training commands
class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _train_config(args: argparse.Namespace):
    """TrainConfig from: official defaults < --config file < command-line flags < --opts."""
    cfg = TrainConfig(method=args.method)
    if getattr(args, "config_file", None) or getattr(args, "dataset_config_file", None):
        cfg = apply_official_files(cfg, args.dataset_config_file, args.config_file)  # as Dassl's train.py
    if args.config:
        cfg = apply_mapping(cfg, load_config_file(args.config))
    flags = {
        "method": args.method, "model": args.model, "pretrained": args.pretrained, "root": args.root,
        "shots": args.shots, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "precision": args.precision, "device": args.device, "output_dir": args.output_dir,
        "num_workers": args.num_workers, "test_batch_size": args.test_batch_size,
        "tensorboard": getattr(args, "tensorboard", None),
    }
    if getattr(args, "subsample", None) is not None:
        flags["subsample"] = args.subsample
    set_flags = {k: v for k, v in flags.items() if v is not None}
    if "pretrained" in set_flags and str(set_flags["pretrained"]).lower() == "none":
        set_flags["pretrained"] = None
    cfg = dataclasses.replace(cfg, **set_flags)
    if args.no_progress:
        cfg = dataclasses.replace(cfg, progress=False)
    if getattr(args, "class_sharding", False):
        cfg = dataclasses.replace(cfg, class_sharding=True)
    cfg = apply_opts(cfg, args.opts or [])
    if cfg.tensorboard:
        try:
            console.require_tensorboard()
        except ImportError as exc:
            raise CLIError(str(exc)) from None
    return console.absolute_paths(cfg.validate())  # run_config.json then resolves from any directory


def _add_run_options(p: argparse.ArgumentParser, multi_dataset: bool) -> None:
    p.add_argument("--method", default="coop", help="prompt-tuning method: " + ", ".join(list_learners()))
    p.add_argument("--config", default=None, help="YAML or JSON config (Dassl-style keys or TrainConfig fields)")
    p.add_argument("--config-file", default=None, help="an official trainer YAML as it is (unused keys: one warning)")
    p.add_argument("--dataset-config-file", default=None, help="an official dataset YAML as it is (DATASET.NAME, ...)")
    p.add_argument("--model", default=None, help="open_clip architecture or a path to an open_clip model-config JSON (default ViT-B-16)")
    p.add_argument("--pretrained", default=None, help="open_clip tag (e.g. openai), checkpoint path, or 'none' (default openai)")
    p.add_argument("--root", default=None, help="datasets root (CoOp layout)")
    if multi_dataset:
        p.add_argument("--dataset", nargs="+", required=True, help="one or more dataset names")
        p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    else:
        p.add_argument("--dataset", default=None, help="dataset name (or DATASET.NAME of --dataset-config-file)")
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--seeds", type=int, nargs="+", default=None,
                       help="sweep: one run per seed (and per --shots value) into OUTPUT_DIR/shots_<k>/seed<s>")
        p.add_argument("--subsample", choices=["all", "base", "new"], default=None)
    p.add_argument("--shots", type=int, default=None, nargs=None if multi_dataset else "+",
                   help="images per class (default 16; -1 = all)" + ("" if multi_dataset else "; several values: a sweep"))
    p.add_argument("--epochs", type=int, default=None, help="default: the method's official value")
    p.add_argument("--batch-size", type=int, default=None, help="default: the method's official value")
    p.add_argument("--test-batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="default: the method's official value")
    p.add_argument("--precision", default=None, choices=["fp32", "fp64", "bf16", "fp16", "amp"])
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--class-sharding", action="store_true", help="under torchrun: split the classes' text encoding over the ranks")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tensorboard", default=None, metavar="DIR", help="TensorBoard scalars per epoch (pip install tensorboard)")
    _add_store_options(p)
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="yacs-style KEY VALUE overrides, e.g. OPTIM.LR 0.002 TRAINER.COOP.N_CTX 4")


def _add_store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--feature-store", default=None, metavar="DIR",
                   help="where test-set image features of frozen-image-tower learners are kept and reused "
                        "(default: $FASTPROMPT_FEATURE_STORE or ~/.cache/fastprompt/features)")
    p.add_argument("--no-feature-store", action="store_true", help="encode every test image again")


def _feature_store(args: argparse.Namespace):
    """The FeatureStore the flags ask for, or None (--no-feature-store)."""
    if args.no_feature_store:
        if args.feature_store is not None:
            raise CLIError("--feature-store and --no-feature-store contradict each other; give one")
        return None
    return FeatureStore(args.feature_store)


def _train(args: argparse.Namespace) -> int:
    shots_list = args.shots
    args.shots = shots_list[0] if shots_list else None
    cfg = _train_config(args)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    cfg = dataclasses.replace(cfg, dataset=args.dataset or cfg.dataset)
    if args.seeds or (shots_list and len(shots_list) > 1):  # a sweep (fastprompt/training/sweep.py)
        return run_sweep(cfg, args.seeds or [cfg.seed], shots_list or [cfg.shots], args.resume,
                         feature_store=_feature_store(args))
    results, _, _ = runner.train_run(cfg, resume=args.resume, feature_store=_feature_store(args))
    if "accuracy" in results:
        print(f"{cfg.method} on {cfg.dataset} ({cfg.subsample} classes, seed {cfg.seed}): "
              f"test accuracy {results['accuracy']:.2f}%  -> {cfg.output_dir}")
    return 0


def _base2new(args: argparse.Namespace) -> int:
    cfg = _train_config(args)
    if args.shots is None and "DATASET.NUM_SHOTS" not in (args.opts or []):
        cfg = dataclasses.replace(cfg, shots=base2new_protocol(cfg.method)["shots"])
    out = runner.base2new_run(cfg, args.dataset, args.seeds, resume=args.resume, feature_store=_feature_store(args))
    if out:
        print(markdown_table(out["rows"], ["dataset", "base", "new", "hm"], ["dataset", "base", "new", "HM"]))
        print("wrote " + ", ".join(out["paths"].values()))
    return 0


def _eval(args: argparse.Namespace) -> int:
    out = runner.eval_run(args.run, args.dataset, args.root, subsample=args.subsample, output_dir=args.output_dir,
                          device=args.device, precision=args.precision, batch_size=args.batch_size,
                          num_workers=args.num_workers, progress=not args.no_progress,
                          strict_backbone=not args.allow_backbone_mismatch, feature_store=_feature_store(args))
    print(markdown_table(out["rows"], ["dataset", "accuracy"]))
    print("wrote " + ", ".join(out["paths"].values()))
    return 0


def _datasets(args: argparse.Namespace) -> int:
    try:
        check = ds.check_dataset
    except (ImportError, AttributeError) as exc:
        raise CLIError(f"the dataset layer is unavailable: {exc}")
    names = args.dataset or (ds.list_datasets() if hasattr(ds, "list_datasets") else [])
    bad = 0
    for name in names:
        problems = check(name, args.root)
        status = "ok" if not problems else "MISSING"
        if not problems:
            bad_images = check_dataset_images(name, args.root, decode=not args.no_decode, progress=not args.no_progress)
            problems = [f"unreadable image {path}: {why}" for path, why in bad_images]
            status = "ok" if not problems else "BAD IMAGES"
        print(f"{name}: {status}")
        for problem in problems:
            print(f"  - {problem}")
        bad += bool(problems)
    return 1 if bad else 0


def _bench_steps(args: argparse.Namespace, device: str) -> int:
    """``fastprompt bench --step``: whole training steps of any CLIP learner, reference vs fast, same run."""
    if args.preset != "default":
        print("error: --preset applies to the text-side bench, not to --step", file=sys.stderr)
        return 2
    if args.dtype not in ("fp32", "bf16", "fp16"):
        print(f"error: --step runs an fp32 model, with autocast for bf16/fp16; --dtype {args.dtype} is not a step "
              "precision", file=sys.stderr)
        return 2
    methods = args.method or ["coop", "cocoop"]
    names = fastprompt.load_classnames(args.dataset)
    args.classes = args.classes or 100
    if args.classes > len(names):
        print(f"error: {args.dataset} has {len(names)} classes, asked for {args.classes}", file=sys.stderr)
        return 2
    model, _, tokenizer = fastprompt.load_clip("ViT-B-16", pretrained=None)
    print(f"fastprompt bench --step: ViT-B-16 (random weights), whole training step (loss, backward, SGD step), "
          f"{device}, {args.dtype}")
    results = []
    for method in methods:
        print(f"running {method} C={args.classes} B={args.batch} ...", flush=True)
        results.append(run_step_case(method, model, tokenizer, names[: args.classes], args.batch, device,
                                     args.dtype, args.repeats, args.warmup, tasks=args.tasks, dataset=args.dataset))
    print(format_step_table(results))
    if args.json:
        with open(args.json, "w") as f:
            f.write(step_results_json(results))
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastprompt", description="Exact, fast prompt tuning for CLIP models.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="reference vs fast text side, same run (default: ~1 min on a 2-core CPU)")
    bench.add_argument("--method", action="append", choices=list(STEP_METHODS),
                       help="repeatable; default: coop and cocoop. Methods other than coop/cocoop need --step")
    bench.add_argument("--step", action="store_true",
                       help="time a whole training step (image tower, text side, loss, backward, SGD step) of any "
                            "CLIP learner instead of the text side alone")
    bench.add_argument("--classes", type=int, default=None,
                       help="number of classes (first C names of --dataset; default 100); with --method or --step")
    bench.add_argument("--batch", type=int, default=8, help="images per batch (CoCoOp; every method with --step)")
    bench.add_argument("--tasks", type=int, default=2, help="softcpt --step: the classes read as this many tasks")
    bench.add_argument("--dataset", default="imagenet", help="shipped class list to take names from")
    bench.add_argument("--n-ctx", type=int, default=None, help="context length M (default: the method's)")
    bench.add_argument("--preset", choices=["default", "issue"], default="default",
                       help="'issue': CoOp C=1000 and CoCoOp B=8 x C=100 (several minutes on a CPU)")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    bench.add_argument("--repeats", type=int, default=1)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--json", default=None, help="also write the results as JSON to this path")
    bench.set_defaults(func=_bench)

    env = sub.add_parser("env", help="print versions and which backend each op uses")
    env.set_defaults(func=_env)

    check = sub.add_parser("selftest", help="check this installation: fast == reference on every backend (seconds)")
    check.set_defaults(func=_selftest)

    train = sub.add_parser("train", help="train a learner on one dataset (few-shot, Dassl protocol)")
    _add_run_options(train, multi_dataset=False)
    train.set_defaults(func=_train)

    b2n = sub.add_parser("base2new", help="base-to-new protocol: train on base classes, test base and new, all seeds")
    _add_run_options(b2n, multi_dataset=True)
    b2n.set_defaults(func=_base2new)

    ev = sub.add_parser("eval", help="evaluate a trained run on datasets (new classes, cross-dataset, DG)")
    ev.add_argument("--run", required=True, help="a training run directory (its --output-dir)")
    ev.add_argument("--dataset", nargs="+", required=True)
    ev.add_argument("--root", default=None, help="datasets root (default: the run's)")
    ev.add_argument("--subsample", choices=["all", "base", "new"], default="all")
    ev.add_argument("--output-dir", default=None, help="where eval_<subsample>.{json,csv,md} go (default: the run)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--precision", default=None, choices=["fp32", "fp64", "bf16", "fp16", "amp"])
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument("--num-workers", type=int, default=None)
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument("--allow-backbone-mismatch", action="store_true",
                    help="load the run's adapter even if this CLIP's text tower differs from the one it was trained on")
    _add_store_options(ev)
    ev.set_defaults(func=_eval)

    dsets = sub.add_parser("datasets", help="check a datasets root: report what is missing and every unreadable image")
    dsets.add_argument("--root", required=True)
    dsets.add_argument("--dataset", nargs="*", default=None, help="default: every known dataset")
    dsets.add_argument("--no-decode", action="store_true",
                       help="check image headers only (fast) instead of decoding every image")
    dsets.add_argument("--no-progress", action="store_true")
    dsets.set_defaults(func=_datasets)

    add_commands(sub, _add_run_options)  # convert, summarize, zeroshot
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("bench", "env", "selftest"):
        return args.func(args)
    try:
        return args.func(args)
    except (CLIError, CheckpointError, FileNotFoundError, FileExistsError, ValueError, TypeError) as exc:
        # User errors: one clear line, no traceback; nothing was overwritten (runs check before writing).
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted_hint(args, argv)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
