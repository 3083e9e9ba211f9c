"""The shared harness (``tests/ops/harness.py``) on the registered ops: every usable backend here (compiled CPU
kernels; Triton under TRITON_INTERPRET=1; CUDA when present) against the op's reference, with the inputs of the
op's own tests. The op-specific tests (odd shapes, bad inputs, determinism, torch.compile) stay in their files."""
from __future__ import annotations

import pytest
import torch

from fastprompt.ops.assemble import OP as ASSEMBLE
from fastprompt.ops.pool_project import OP as POOL_PROJECT
from tests.ops import assemble_cases
from tests.ops import test_pool_project as pool_cases
from tests.ops.harness import OpCase, check_op, usable_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FLOATS = (torch.float64, torch.float32)


def _seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen))


def _dtypes(op):
    """Compiled kernels: float64 and float32; Triton: float32 (the interpreter's) or float32 + float16 on CUDA."""
    triton = (torch.float32,) if DEVICE.type == "cpu" else (torch.float32, torch.float16)
    return {b: (triton if b == "triton" else FLOATS) for b in usable_backends(op, DEVICE)}


ASSEMBLE_CASES = [
    assemble_cases.Case("coop_end", G=1, M=4, D=16, C=7, L=12, N=None, layout="end", shift=False),
    assemble_cases.Case("random_repeats_suffix", G=4, M=5, D=32, C=6, L=8, N=50, layout="random", shift=True,
                        pos_offset=9),
]


@pytest.mark.parametrize("case", ASSEMBLE_CASES, ids=lambda c: c.name)
def test_assemble_every_backend(case):
    def make(dtype, device, gen):
        return assemble_cases.make_inputs(case, dtype=dtype, device=device, seed=_seed(gen))

    checked = check_op(OpCase(ASSEMBLE, make, dtypes=_dtypes(ASSEMBLE)), DEVICE)
    assert checked == usable_backends(ASSEMBLE, DEVICE) and checked  # the compiled CPU kernels at least


@pytest.mark.parametrize("case", [c for c in pool_cases.CASES if c.name in ("repeats", "no_proj_norm")],
                         ids=lambda c: c.name)
def test_pool_project_every_backend(case):
    def make(dtype, device, gen):
        return pool_cases.make_inputs(case, dtype=dtype, device=device, seed=_seed(gen))

    checked = check_op(OpCase(POOL_PROJECT, make, dtypes=_dtypes(POOL_PROJECT)), DEVICE)
    assert checked == usable_backends(POOL_PROJECT, DEVICE) and checked
