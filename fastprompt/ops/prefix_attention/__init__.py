# Provisional dispatch (reference only); replaced by the op's full dispatch module.
from fastprompt.ops._dispatch import OpBackends, reference_ok
from fastprompt.ops.prefix_attention.reference import prefix_attention_reference

BACKENDS = OpBackends("prefix_attention", {"reference": reference_ok}, {})


def prefix_attention(*args, backend=None, strict=True, **kwargs):
    BACKENDS.resolve(backend, args[0].device, strict)
    return prefix_attention_reference(*args, **kwargs)
