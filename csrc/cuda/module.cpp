// Python module stub of marn_fast._C_cuda: importing it registers the CUDA kernels of the ops
// declared in ../ops.cpp (so marn_fast._C must be imported first).
#include <Python.h>
extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
