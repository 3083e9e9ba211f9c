"""The ``fastprompt`` command line. Thin: every subcommand calls the library."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

DTYPES = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16"}


def _bench(args: argparse.Namespace) -> int:
    import logging

    import torch

    from fastprompt.benchmarking.text import DEFAULT_CASES, BenchCase, format_table, results_json, run_cases

    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" warning
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
        cases = [BenchCase(m, args.classes, args.batch if m == "cocoop" else 1, args.dataset, args.n_ctx) for m in args.method]
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
    from fastprompt.env import env_report

    env_report()
    return 0


def _selftest(_: argparse.Namespace) -> int:
    from fastprompt.env import env_report
    from fastprompt.benchmarking.selftest import selftest

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
    from fastprompt.training.config import TrainConfig, apply_mapping, apply_opts, load_config_file

    cfg = TrainConfig(method=args.method)
    if args.config:
        cfg = apply_mapping(cfg, load_config_file(args.config))
    flags = {
        "method": args.method, "model": args.model, "pretrained": args.pretrained, "root": args.root,
        "shots": args.shots, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "precision": args.precision, "device": args.device, "output_dir": args.output_dir,
        "num_workers": args.num_workers, "test_batch_size": args.test_batch_size,
    }
    if getattr(args, "subsample", None) is not None:
        flags["subsample"] = args.subsample
    import dataclasses

    set_flags = {k: v for k, v in flags.items() if v is not None}
    if "pretrained" in set_flags and str(set_flags["pretrained"]).lower() == "none":
        set_flags["pretrained"] = None
    cfg = dataclasses.replace(cfg, **set_flags)
    if args.no_progress:
        cfg = dataclasses.replace(cfg, progress=False)
    if getattr(args, "class_sharding", False):
        cfg = dataclasses.replace(cfg, class_sharding=True)
    cfg = apply_opts(cfg, args.opts or [])
    return cfg.validate()


def _add_run_options(p: argparse.ArgumentParser, multi_dataset: bool) -> None:
    from fastprompt.learners import list_learners

    p.add_argument("--method", default="coop", help="prompt-tuning method: " + ", ".join(list_learners()))
    p.add_argument("--config", default=None, help="YAML or JSON config (Dassl-style keys or TrainConfig fields)")
    p.add_argument("--model", default=None, help="open_clip architecture or a path to an open_clip model-config JSON (default ViT-B-16)")
    p.add_argument("--pretrained", default=None, help="open_clip tag (e.g. openai), checkpoint path, or 'none' (default openai)")
    p.add_argument("--root", default=None, help="datasets root (CoOp layout)")
    if multi_dataset:
        p.add_argument("--dataset", nargs="+", required=True, help="one or more dataset names")
        p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    else:
        p.add_argument("--dataset", required=True)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--subsample", choices=["all", "base", "new"], default=None)
    p.add_argument("--shots", type=int, default=None, help="images per class (default 16; -1 = all)")
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
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="yacs-style KEY VALUE overrides, e.g. OPTIM.LR 0.002 TRAINER.COOP.N_CTX 4")


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from fastprompt.training.runner import train_run

    cfg = _train_config(args)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    cfg = dataclasses.replace(cfg, dataset=args.dataset)
    results, _, _ = train_run(cfg, resume=args.resume)
    if "accuracy" in results:
        print(f"{cfg.method} on {cfg.dataset} ({cfg.subsample} classes, seed {cfg.seed}): "
              f"test accuracy {results['accuracy']:.2f}%  -> {cfg.output_dir}")
    return 0


def _base2new(args: argparse.Namespace) -> int:
    import dataclasses

    from fastprompt.training.config import base2new_protocol
    from fastprompt.training.runner import base2new_run

    cfg = _train_config(args)
    if args.shots is None and "DATASET.NUM_SHOTS" not in (args.opts or []):
        cfg = dataclasses.replace(cfg, shots=base2new_protocol(cfg.method)["shots"])
    out = base2new_run(cfg, args.dataset, args.seeds, resume=args.resume)
    if out:
        from fastprompt.training.report import markdown_table

        print(markdown_table(out["rows"], ["dataset", "base", "new", "hm"], ["dataset", "base", "new", "HM"]))
        print("wrote " + ", ".join(out["paths"].values()))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from fastprompt.training.report import markdown_table
    from fastprompt.training.runner import eval_run

    out = eval_run(args.run, args.dataset, args.root, subsample=args.subsample, output_dir=args.output_dir,
                   device=args.device, precision=args.precision, batch_size=args.batch_size,
                   num_workers=args.num_workers, progress=not args.no_progress)
    print(markdown_table(out["rows"], ["dataset", "accuracy"]))
    print("wrote " + ", ".join(out["paths"].values()))
    return 0


def _datasets(args: argparse.Namespace) -> int:
    try:
        import fastprompt.datasets as ds

        check = ds.check_dataset
    except (ImportError, AttributeError) as exc:
        raise CLIError(f"the dataset layer is unavailable: {exc}")
    names = args.dataset or (ds.list_datasets() if hasattr(ds, "list_datasets") else [])
    bad = 0
    for name in names:
        problems = check(name, args.root)
        status = "ok" if not problems else "MISSING"
        print(f"{name}: {status}")
        for problem in problems:
            print(f"  - {problem}")
        bad += bool(problems)
    return 1 if bad else 0


def _bench_steps(args: argparse.Namespace, device: str) -> int:
    """``fastprompt bench --step``: whole training steps of any CLIP learner, reference vs fast, same run."""
    import fastprompt
    from fastprompt.benchmarking.step import format_step_table, run_step_case, step_results_json

    if args.preset != "default":
        print("error: --preset applies to the text-side bench, not to --step", file=sys.stderr)
        return 2
    if args.dtype not in ("fp32", "bf16", "fp16"):
        print(f"error: --step runs an fp32 model, with autocast for bf16/fp16; --dtype {args.dtype} is not a step "
              "precision", file=sys.stderr)
        return 2
    methods = args.method or ["coop", "cocoop"]
    names = fastprompt.load_classnames(args.dataset)
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
    from fastprompt.benchmarking.step import STEP_METHODS

    parser = argparse.ArgumentParser(prog="fastprompt", description="Exact, fast prompt tuning for CLIP models.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="reference vs fast text side, same run (default: ~1 min on a 2-core CPU)")
    bench.add_argument("--method", action="append", choices=list(STEP_METHODS),
                       help="repeatable; default: coop and cocoop. Methods other than coop/cocoop need --step")
    bench.add_argument("--step", action="store_true",
                       help="time a whole training step (image tower, text side, loss, backward, SGD step) of any "
                            "CLIP learner instead of the text side alone")
    bench.add_argument("--classes", type=int, default=100, help="number of classes (first C names of --dataset)")
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
    ev.set_defaults(func=_eval)

    dsets = sub.add_parser("datasets", help="check a datasets root: report what is missing")
    dsets.add_argument("--root", required=True)
    dsets.add_argument("--dataset", nargs="*", default=None, help="default: every known dataset")
    dsets.set_defaults(func=_datasets)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("bench", "env", "selftest"):
        return args.func(args)
    from fastprompt.training.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (CLIError, CheckpointError, FileNotFoundError, FileExistsError, ValueError, TypeError) as exc:
        # User errors: one clear line, no traceback; nothing was overwritten (runs check before writing).
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
