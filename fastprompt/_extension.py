"""Loading of the compiled extension ``fastprompt._C``.

The package must import without it (pure-Python installs, a wheel built for another torch): ops then fall
back to their reference. ``load_error()`` keeps the reason so ``env_report()`` can show it.
"""
from __future__ import annotations

import os
from typing import Optional

_loaded: Optional[bool] = None
_error: Optional[str] = None


def extension_loaded() -> bool:
    """True when ``fastprompt._C`` imported and registered its ops (``torch.ops.fastprompt.*``)."""
    global _loaded, _error
    if _loaded is None:
        if os.environ.get("FASTPROMPT_DISABLE_EXT", "0") == "1":
            _loaded, _error = False, "disabled by FASTPROMPT_DISABLE_EXT=1"
        else:
            try:
                import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)
                from fastprompt import _C  # noqa: F401  (import runs the TORCH_LIBRARY registrations)

                _loaded = True
            except Exception as exc:  # ImportError, or an undefined symbol from a torch ABI mismatch
                _loaded, _error = False, f"{type(exc).__name__}: {exc}"
    return _loaded


def load_error() -> Optional[str]:
    """Why the extension is not available, or None."""
    extension_loaded()
    return _error


def extension_has_cuda() -> bool:
    """True when the extension was built with CUDA kernels."""
    if not extension_loaded():
        return False
    import torch

    return bool(torch.ops.fastprompt.built_with_cuda())
