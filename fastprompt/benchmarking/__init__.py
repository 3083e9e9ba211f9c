"""Benchmarks shipped with the package: ``text`` (``fastprompt bench``: the text side of a step), ``step``
(``fastprompt bench --step``: a whole training step of any CLIP learner), ``selftest`` (``fastprompt selftest``)
and the shared ``timing`` helpers. Speed claims come from ``benchmarks/`` (pytest-benchmark) and these
commands, reference and fast path in the same run."""
