"""Build of the compiled extension ``fastprompt._C`` (metadata lives in pyproject.toml).

Environment:
  FASTPROMPT_SKIP_EXT=1   build no extension (pure-Python install; ops use their reference backend).
  FORCE_CUDA=1 / 0        force the CUDA kernels on (even without a visible GPU) / off. By default they are
                          built when nvcc is found and torch sees a GPU.
  TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "8.0;9.0" (default with FORCE_CUDA=1: 8.0;8.6;8.9;9.0).
  CUDA_HOME               CUDA toolkit root (default /usr/local/cuda when it has bin/nvcc).
  MAX_JOBS                parallel compile jobs (read by torch's ninja build).
  NVCC_THREADS            nvcc --threads (parallel per-arch compilation; default 4).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0"


def _log(msg):
    print(f"[fastprompt setup] {msg}", flush=True)


def _sources(pattern):
    # setuptools wants paths relative to setup.py
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extension_build():
    if os.environ.get("FASTPROMPT_SKIP_EXT", "0") == "1":
        _log("FASTPROMPT_SKIP_EXT=1: building no extension (pure Python)")
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
    define_macros = []
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
    ext = ext_cls(
        name="fastprompt._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
