// Python module stub of marn_fast._C_cuda: importing it registers the CUDA kernels of the ops
// declared in ../ops.cpp (so marn_fast._C must be imported first). Its BUILD_IDENTITY says what it
// was built from (../build_identity.h), as the op marn_fast::build_identity does for marn_fast._C.
#include <Python.h>

#include "../build_identity.h"

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddStringConstant(module, "BUILD_IDENTITY", MARN_FAST_BUILD_IDENTITY) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
