"""Ahead-of-time compilation of every Triton kernel of the package for sm_80 and sm_90, on the CPU.

No GPU is needed: each op's host wrapper runs on CPU tensors with its kernels' launches captured instead of
run (``JITFunction.run`` replaced on the kernel object); every captured launch is then specialised exactly as
Triton's launcher would (same binder, same options) for ``GPUTarget("cuda", 80 | 90, 32)`` and compiled to a
cubin with the ptxas Triton uses (``TRITON_PTXAS_PATH`` or its bundled copy). Checks:

* the bfloat16 / float16 attention kernels multiply on tensor cores: their PTX holds ``mma.sync`` (sm_80) or
  ``wgmma`` (sm_90); float32 ones must not (TF32 would break float32 exactness);
* no kernel spills: ptxas's own report (Triton runs it with ``-v``) shows 0 bytes of spill stores and loads, and
  ``cuobjdump -res-usage`` LOCAL:0, for the benchmark grid's shapes
  (head dim 64 / 128, prefix up to 77 tokens, suffixes up to 64, float32 / bfloat16 / float16).

The compiles run in a subprocess without ``TRITON_INTERPRET`` (tests/conftest.py sets it on machines without
CUDA, and the interpreter's kernels cannot be compiled). Skips where ptxas or cuobjdump is absent.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHS = (80, 90)


def _tools():
    """(ptxas, cuobjdump) paths Triton would use, or None where either is missing."""
    try:
        from triton import knobs

        tools = (knobs.nvidia.ptxas.path, knobs.nvidia.cuobjdump.path)
    except Exception:  # no Triton, or no NVIDIA backend
        return None
    return tools if all(t and shutil.which(t) for t in tools) else None


needs_ptxas = pytest.mark.skipif(_tools() is None, reason="ptxas / cuobjdump not found (Triton's NVIDIA backend tools)")


def compile_in_subprocess(jobs):
    """Run the jobs (see ``_capture``) in a clean interpreter; returns one record per compiled kernel."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(jobs)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(records, want_mma):
    assert records, "no kernel launch was captured"
    problems = []
    for r in records:
        where = f"{r['kernel']} sm_{r['arch']} {r['case']}"
        if r["spill_stores"] or r["spill_loads"] or r["local"]:
            problems.append(f"{where}: spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded, local "
                            f"{r['local']} B, {r['regs']} registers, {r['num_warps']} warps")
        if want_mma(r) is not None and r["mma"] != want_mma(r):
            problems.append(f"{where}: tensor-core MMA {'missing' if want_mma(r) else 'present'}")
    assert not problems, "\n".join(problems)


def _attention_mma(r):
    if r["kernel"] == "_reduce_kernel":
        return None
    return r["dtype"] != "float32"


# ---------------------------------------------------------------------------------------------- tests
@needs_ptxas
def test_prefix_attention_clip_shape_tensor_cores():
    """The common CLIP case (prefix 17, suffixes <= 16, dh 64) in bfloat16 and float32, both archs."""
    jobs = [{"op": "prefix_attention", "dtype": dt, "S": 16, "dh": 64, "P": 17, "arch": a}
            for dt in ("bfloat16", "float32") for a in ARCHS]
    _check(compile_in_subprocess(jobs), _attention_mma)


@pytest.mark.slow
@needs_ptxas
@pytest.mark.parametrize("dh", [64, 128])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_prefix_attention_grid_no_spills(dtype, dh):
    """16-bit operands over the benchmark grid: the largest tiles (suffix 64, prefix 77), a mid one (suffix 32,
    prefix 5) and the common one (suffix 16, prefix 17)."""
    jobs = [{"op": "prefix_attention", "dtype": dtype, "S": S, "dh": dh, "P": P, "arch": a}
            for S, P in ((64, 77), (32, 5), (16, 17)) for a in ARCHS]
    _check(compile_in_subprocess(jobs), _attention_mma)


@pytest.mark.slow
@needs_ptxas
@pytest.mark.parametrize("S, P", [
    # measured: _bwd_prefix_kernel spills 4 B stored / 4 B loaded on sm_80 (64 registers, 8 warps); strict, so a
    # fix shows up as an unexpected pass
    pytest.param(32, 5, marks=pytest.mark.xfail(strict=True, reason="float32 prefix backward spills 4 B on sm_80")),
    (16, 17),
])
def test_prefix_attention_float32_no_spills(S, P):
    """float32 (IEEE dots, no tensor cores) at CLIP's head dim 64 and suffixes up to 32. Larger float32 tiles
    (suffix 64 or dh 128) do spill: float32 on a GPU is for tests, training runs bf16 / fp16."""
    jobs = [{"op": "prefix_attention", "dtype": "float32", "S": S, "dh": 64, "P": P, "arch": a} for a in ARCHS]
    _check(compile_in_subprocess(jobs), _attention_mma)


@pytest.mark.slow
@needs_ptxas
@pytest.mark.parametrize("op", [
    # measured: assemble's _bwd_partial_kernel spills 8 B stored / 4 B loaded in bfloat16 on sm_80 (40 registers)
    pytest.param("assemble", marks=pytest.mark.xfail(strict=True, reason="assemble backward spills 8 B on sm_80")),
    "condition", "pool_project",
    # measured: its backward spills 216 B stored / 264 B loaded (255 registers) in float32 on sm_90 at ViT-B/16's
    # D = 768; strict, so a fix shows up as an unexpected pass
    pytest.param("vapt_prompts", marks=pytest.mark.xfail(strict=True, reason="vapt_prompts backward spills")),
])
def test_other_kernels_compile_without_spills(op):
    jobs = [{"op": op, "dtype": dt, "arch": a} for dt in ("float32", "bfloat16") for a in ARCHS]
    _check(compile_in_subprocess(jobs), lambda r: None)


# ---------------------------------------------------------------------------------------------- worker
def _run_op(job, torch):
    """Run one op's Triton path forward + backward on CPU tensors (launches are captured, not run)."""
    dt = getattr(torch, job["dtype"])
    op = job["op"]

    def cast(t):
        return t.detach().to(dt).requires_grad_(True) if torch.is_tensor(t) and t.is_floating_point() else t

    def backward(out):
        out.backward(torch.ones_like(out))

    if op == "prefix_attention":
        from fastprompt.ops.prefix_attention import triton_impl as mod
        from tests.ops.test_prefix_attention import Case, make_inputs

        S, P, dh = job["S"], job["P"], job["dh"]
        args = [cast(a) for a in make_inputs(Case("aot", G=2, P=P, H=2, dh=dh, lengths=[S, 1, 3]), cu_dtype=job.get("cu", torch.int64))]
        backward(mod.prefix_attention_triton(*args))
    elif op == "assemble":
        from fastprompt.ops.assemble import assemble
        from tests.ops.assemble_cases import Case, make_inputs

        # CoCoOp-like: 4 contexts x 100 classes, M = 4, D = 512, suffix length 20
        args = [cast(a) for a in make_inputs(Case("aot", G=4, M=4, D=512, C=100, L=20, N=None, layout="end", shift=True))]
        backward(assemble(*args, backend="triton"))
    elif op == "condition":
        from fastprompt.ops.condition import condition
        from tests.ops.test_condition import Case, make_inputs

        args = [cast(a) for a in make_inputs(Case("aot", B=32, Din=512, Dh=32, Dout=512))]
        backward(condition(*args, backend="triton"))
    elif op == "pool_project":
        from fastprompt.ops.pool_project import pool_project
        from tests.ops.test_pool_project import Case, make_inputs

        args = [cast(a) for a in make_inputs(Case("aot", T=400, W=512, E=512, rows="repeats", affine="both", normalize=True))]
        backward(pool_project(*args, backend="triton"))
    elif op == "vapt_prompts":
        from fastprompt.ops.vapt_prompts import vapt_prompts
        from tests.ops.test_vapt_prompts import Case, make_inputs

        case = Case("aot", B=4, H=14, W=14, D=768, N=10, Dh=64, masks=True)
        (x, lw, lb, k, tw, tb, w1, w2), cm, hm = make_inputs(case)
        x, lw, lb, k, tw, tb, w1, w2 = (cast(t) for t in (x, lw, lb, k, tw, tb, w1, w2))
        cm, hm = (t.to(dt) if t is not None else None for t in (cm, hm))
        backward(vapt_prompts(x, lw, lb, 1e-5, k, tw, tb, w1, w2, (case.H, case.W), cm, hm, backend="triton"))
    else:
        raise ValueError(f"unknown op {op!r}")
    return op


def _capture(jobs):
    import importlib

    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    launches = []
    for op in ("prefix_attention", "assemble", "condition", "pool_project", "vapt_prompts"):
        module = importlib.import_module(f"fastprompt.ops.{op}.triton_impl")
        for name, kernel in vars(module).items():
            if isinstance(kernel, JITFunction):
                kernel.run = (lambda k: lambda *a, grid, warmup, **kw: launches.append((k, a, kw)))(kernel)
    os.environ["TRITON_INTERPRET"] = "1"  # lets the dispatchers pick "triton" for CPU tensors (kernels stay JIT)
    cuobjdump = knobs.nvidia.cuobjdump.path
    records, seen = [], set()
    for job in jobs:
        launches.clear()
        _run_op(job, torch)
        case = ",".join(f"{k}={v}" for k, v in job.items() if k not in ("op", "arch"))
        for kernel, args, kwargs in launches:
            target = GPUTarget("cuda", job["arch"], 32)
            backend = make_backend(target)
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, spec, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
            key = (kernel.__name__, job["arch"], str(sorted(signature.items())), str(sorted(constexprs.items())), str(options))
            if key in seen:
                continue
            seen.add(key)
            knobs.nvidia.dump_ptxas_log = True  # Triton prints the log of its `ptxas -v` run: spills, registers
            knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
            log = log.getvalue()
            stores = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
            loads = [int(x) for x in re.findall(r"(\d+) bytes spill loads", log)]
            assert stores and loads, f"no ptxas -v report for {kernel.__name__}: {log[-500:]}"
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "k.cubin")
                with open(path, "wb") as f:
                    f.write(compiled.asm["cubin"])
                usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
            found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
            ptx = compiled.asm["ptx"]
            records.append({
                "kernel": kernel.__name__, "op": job["op"], "arch": job["arch"], "dtype": job["dtype"], "case": case,
                "regs": int(found.group(1)), "stack": int(found.group(2)), "shared": int(found.group(3)),
                "local": int(found.group(4)), "num_warps": options.num_warps,
                "spill_stores": sum(stores), "spill_loads": sum(loads),
                "mma": bool(re.search(r"\bwgmma\.|\bmma\.sync", ptx)),
            })
    return records


if __name__ == "__main__":
    print(json.dumps(_capture(json.loads(sys.argv[1]))))
