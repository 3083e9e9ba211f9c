"""``fastprompt.env_report()``: what is installed and which backend each op uses."""
from __future__ import annotations

import platform

import open_clip
import torch

from fastprompt._extension import extension_has_cuda, extension_loaded, load_error
from fastprompt._version import __version__
from fastprompt.ops._dispatch import default_backend, registered_ops, triton_interpreting


def env_report(print_report: bool = True) -> str:
    """Versions, devices, the compiled extension's state, and the backend each op resolves to per device."""
    lines = [
        f"fastprompt {__version__}",
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()})",
    ]
    if torch.cuda.is_available():
        lines.append(f"device: {torch.cuda.get_device_name(0)}")
    lines.append(f"open_clip {open_clip.__version__}")
    try:
        import triton  # optional dependency

        lines.append(f"triton {triton.__version__}")
    except Exception:
        lines.append("triton: not installed")
    if extension_loaded():
        lines.append(f"compiled extension fastprompt._C: loaded (CUDA kernels: {extension_has_cuda()})")
    else:
        lines.append(f"compiled extension fastprompt._C: not available ({load_error()})")
    lines.append(f"default backend (FASTPROMPT_BACKEND): {default_backend()}")
    if triton_interpreting():
        lines.append("TRITON_INTERPRET=1: Triton kernels run in the (slow) CPU interpreter")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name, table in registered_ops().items():  # an op package that fails to import is reported, not fatal
        if isinstance(table, Exception):
            lines.append(f"op {name}: not importable ({type(table).__name__}: {table})")
            continue
        for dev in devices:
            device = torch.device(dev)
            chosen = table.resolve("auto", device)
            detail = ", ".join(f"{b}={'yes' if ok else 'no (' + why + ')'}" for b, (ok, why) in table.table(device).items())
            lines.append(f"op {name} on {dev}: auto -> {chosen}; {detail}")
    report = "\n".join(lines)
    if print_report:
        print(report)
    return report
