"""Moved to :mod:`fastprompt.benchmarking.selftest`; this alias warns and will be removed."""
import warnings

from fastprompt.benchmarking.selftest import *  # noqa: F401,F403
from fastprompt.benchmarking.selftest import __all__  # noqa: F401

warnings.warn("fastprompt.selftest moved to fastprompt.benchmarking.selftest", DeprecationWarning, stacklevel=2)
