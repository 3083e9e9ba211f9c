# Provisional dispatch (reference only); replaced by the op's full dispatch module.
from fastprompt.ops._dispatch import OpBackends, reference_ok
from fastprompt.ops.condition.reference import condition_reference

BACKENDS = OpBackends("condition", {"reference": reference_ok}, {})


def condition(*args, backend=None, strict=True, **kwargs):
    BACKENDS.resolve(backend, args[0].device, strict)
    return condition_reference(*args, **kwargs)
