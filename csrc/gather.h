// fusedwd._C.gather and check_views: each step's gradient addresses, read
// through the CPython API (csrc/gather.cpp; docs/design.md#gathering-gradients).
#pragma once

#include <pybind11/pybind11.h>

namespace fusedwd {

// Defines gather() and check_views() on the module.
void export_gather(pybind11::module_& m);

}  // namespace fusedwd
