"""The ``fastprompt`` command line. Thin: every subcommand calls the library."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

DTYPES = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16"}


def _bench(args: argparse.Namespace) -> int:
    import logging

    import torch

    from fastprompt.bench import DEFAULT_CASES, BenchCase, format_table, results_json, run_cases

    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" warning
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
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
    from fastprompt.selftest import selftest

    env_report()
    try:
        selftest()
    except AssertionError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print("selftest passed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastprompt", description="Exact, fast prompt tuning for CLIP models.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="reference vs fast text side, same run (default: ~1 min on a 2-core CPU)")
    bench.add_argument("--method", action="append", choices=["coop", "cocoop"], help="repeatable; default: both")
    bench.add_argument("--classes", type=int, default=100, help="number of classes (first C names of --dataset)")
    bench.add_argument("--batch", type=int, default=8, help="images per batch (CoCoOp)")
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
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
