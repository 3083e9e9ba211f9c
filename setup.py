"""Build of the compiled extension ``fastprompt._C`` (metadata lives in pyproject.toml).

Environment:
  FASTPROMPT_SKIP_EXT=1   build no extension (pure-Python install; ops use their reference backend).
  FORCE_CUDA=1 / 0        force the CUDA kernels on (even without a visible GPU) / off. By default they are
                          built when nvcc is found and torch sees a GPU.
  TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "8.0;9.0" (default with FORCE_CUDA=1: 8.0;8.6;8.9;9.0).
  CUDA_HOME               CUDA toolkit root (default /usr/local/cuda when it has bin/nvcc).
  MAX_JOBS                parallel compile jobs (read by torch's ninja build).
  NVCC_THREADS            nvcc --threads (parallel per-arch compilation; default 4).
  FASTPROMPT_LOCAL_VERSION  a PEP 440 local version appended to the version, e.g. "pt214cu130" for a wheel on
                          a per-CUDA index (never on PyPI, which rejects local versions). .ci/wheels.sh sets it.

The compiled extension is bound to the torch it is built against: that torch (and CUDA) is recorded in
fastprompt/_build_info.py, and fastprompt refuses to load a mismatched extension (falling back to its other
backends, with the reason in fastprompt.env_report()).
"""
import glob
import os
import re

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0"


def _log(msg):
    print(f"[fastprompt setup] {msg}", flush=True)


def _sources(pattern):
    # setuptools wants paths relative to setup.py
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _version():
    with open(os.path.join(ROOT, "fastprompt", "_version.py")) as f:
        version = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)
    local = os.environ.get("FASTPROMPT_LOCAL_VERSION", "").strip().lstrip("+")
    if local:
        if not re.fullmatch(r"[A-Za-z0-9]+(\.[A-Za-z0-9]+)*", local):
            raise ValueError(f"FASTPROMPT_LOCAL_VERSION={local!r} is not a PEP 440 local version label")
        version += "+" + local
    return version


def _write_build_info(path, info):
    # Read by fastprompt._extension before it loads _C (a mismatched torch must not load the binary).
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time: what fastprompt._C was compiled against.\n")
        f.write(f"BUILD_INFO = {info!r}\n")


def _extension_build():
    if os.environ.get("FASTPROMPT_SKIP_EXT", "0") == "1":
        _log("FASTPROMPT_SKIP_EXT=1: building no extension (pure Python)")
        info_path = os.path.join(ROOT, "fastprompt", "_build_info.py")
        if os.path.exists(info_path):
            os.remove(info_path)  # no extension: nothing to describe (a stale file must not ship)
        return [], {}

    # torch.utils.cpp_extension reads CUDA_HOME when imported. Without it, it takes the parent of the
    # `nvcc` on PATH, which is wrong where that nvcc is a wrapper script (/usr/local/bin/nvcc).
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists(
        "/usr/local/cuda/bin/nvcc"
    ):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force = os.environ.get("FORCE_CUDA", "").strip()
    nvcc_found = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if force == "0":
        with_cuda = False
    elif force == "1":
        if not nvcc_found or torch.version.cuda is None:
            raise RuntimeError(
                f"FORCE_CUDA=1 but CUDA kernels cannot be built: nvcc found={nvcc_found} (CUDA_HOME={CUDA_HOME}), "
                f"torch CUDA version={torch.version.cuda}"
            )
        with_cuda = True
    else:
        with_cuda = nvcc_found and torch.version.cuda is not None and torch.cuda.is_available()

    cpp_sources = _sources("csrc/**/*.cpp")
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++20 for torch >= 2.10,
    # whose headers do not compile as C++17).
    extra_compile_args = {"cxx": ["-O3"]}
    # One binary for every CPython >= 3.9 (abi3): the module only uses the limited C API (PyModule_Create);
    # the ops go through torch's dispatcher, not through Python bindings.
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    if with_cuda:
        if force == "1" and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
            _log(f"FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST unset: using TORCH_CUDA_ARCH_LIST={DEFAULT_ARCH_LIST}")
        extra_compile_args["nvcc"] = ["-O3", "--threads", os.environ.get("NVCC_THREADS", "4")]
        define_macros.append(("WITH_CUDA", None))
        ext_cls = CUDAExtension
        sources = cpp_sources + _sources("csrc/**/*.cu")
    else:
        ext_cls = CppExtension
        sources = cpp_sources
    _log(
        f"building fastprompt._C: {'CPU + CUDA' if with_cuda else 'CPU only'}, torch {torch.__version__}, "
        f"CUDA_HOME={CUDA_HOME}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)')}, "
        f"MAX_JOBS={os.environ.get('MAX_JOBS', '(torch default)')}, sources={sources}"
    )
    info = {"torch": torch.__version__, "cuda": torch.version.cuda if with_cuda else None, "with_cuda": with_cuda,
            "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None}

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def run(self):
            super().run()
            # Beside the built _C (the source tree for in-place / editable builds, build/lib for wheels), so
            # an out-of-tree build never relabels the in-place extension.
            for e in self.extensions:
                _write_build_info(os.path.join(os.path.dirname(self.get_ext_fullpath(e.name)), "_build_info.py"), info)

    ext = ext_cls(
        name="fastprompt._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extension_build()
setup(
    version=_version(),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
