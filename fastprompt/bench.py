"""Moved to :mod:`fastprompt.benchmarking.text`; this alias warns and will be removed."""
import warnings

from fastprompt.benchmarking.text import *  # noqa: F401,F403
from fastprompt.benchmarking.text import __all__, markdown_table  # noqa: F401
from fastprompt.benchmarking.timing import rel_err as _rel, sync as _sync  # noqa: F401

warnings.warn("fastprompt.bench moved to fastprompt.benchmarking.text", DeprecationWarning, stacklevel=2)
