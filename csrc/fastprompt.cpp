// Entry point of the `fastprompt._C` extension.
//
// The ops are registered with the dispatcher by the TORCH_LIBRARY / TORCH_LIBRARY_IMPL blocks of the
// csrc/**/*.cpp and *.cu files (static initialisers that run when the shared object is loaded), so the
// Python module itself is empty: `import fastprompt._C` (after `import torch`) is all that is needed,
// and the ops are then reachable as `torch.ops.fastprompt.*`.
#include <Python.h>

#include <torch/library.h>

namespace fastprompt {

// True when the extension was compiled with its CUDA kernels (setup.py passes -DWITH_CUDA).
bool built_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace fastprompt

// The one TORCH_LIBRARY block of the namespace; every op file adds its schemas with
// TORCH_LIBRARY_FRAGMENT(fastprompt, m) (a namespace may have only one TORCH_LIBRARY).
TORCH_LIBRARY(fastprompt, m) {
  m.def("built_with_cuda() -> bool", &fastprompt::built_with_cuda);
}

extern "C" {
// A plain, empty module: importing it loads the library and runs the op registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                        // m_name
      "fastprompt compiled ops, registered as torch.ops.fastprompt.*",  // m_doc
      -1,                                                          // m_size
      nullptr,                                                     // m_methods
  };
  return PyModule_Create(&module_def);
}
}
