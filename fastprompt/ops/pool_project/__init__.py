# Provisional dispatch (reference only); replaced by the op's full dispatch module.
from fastprompt.ops._dispatch import OpBackends, reference_ok
from fastprompt.ops.pool_project.reference import pool_project_reference

BACKENDS = OpBackends("pool_project", {"reference": reference_ok}, {})


def pool_project(*args, backend=None, strict=True, **kwargs):
    BACKENDS.resolve(backend, args[0].device, strict)
    return pool_project_reference(*args, **kwargs)
