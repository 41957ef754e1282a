// Python module stub for unet._C: importing it runs the TORCH_LIBRARY(unet, ...) registrations
// of the post-processing ops defined in this folder.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
