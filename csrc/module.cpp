// The janus_fast._C Python module. Importing it loads this shared library, whose static
// initialisers register the ops of every csrc/<family>/*_binding.cpp in the janus_fast_C
// namespace (torch.ops.janus_fast_C.<name>); the module itself exports nothing.
#include <Python.h>

static PyModuleDef janus_fast_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&janus_fast_c_module); }
