// Operator schemas of marn_fast (the one place that declares them) and the Python module stub.
// Kernels live in cpu/*.cpp and cuda/*.cu, registered with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

#ifdef MARN_FAST_PYTHON_MODULE
#include <Python.h>
extern "C" {
// `import marn_fast._C` loads this library, whose static initialisers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(marn_fast, m) {
  // RAM output fusion: O = tanh(U ⊙ H), and its backward (dU, dH).
  m.def("mul_tanh(Tensor u, Tensor h) -> Tensor");
  m.def("mul_tanh_backward(Tensor grad, Tensor u, Tensor h) -> (Tensor, Tensor)");
}
