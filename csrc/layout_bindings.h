// The table layouts and dtype codes, exported the same way by fusedwd._C and
// fusedwd._C_cuda: both modules read the tables fusedwd/_buckets.py fills, so
// Python sees one definition (tests/test_layout.py holds all three together).
#pragma once

#include <pybind11/pybind11.h>

#include "fusedwd/common.h"
#include "fusedwd/layout.h"

namespace fusedwd {

inline void export_layout(pybind11::module_& m) {
  m.attr("SEG_P") = static_cast<int>(SEG_P);
  m.attr("SEG_G") = static_cast<int>(SEG_G);
  m.attr("SEG_S0") = static_cast<int>(SEG_S0);
  m.attr("SEG_S1") = static_cast<int>(SEG_S1);
  m.attr("SEG_S2") = static_cast<int>(SEG_S2);
  m.attr("SEG_STEP") = static_cast<int>(SEG_STEP);
  m.attr("SEG_N") = static_cast<int>(SEG_N);
  m.attr("SEG_HP") = static_cast<int>(SEG_HP);
  m.attr("SEG_INDEX") = static_cast<int>(SEG_INDEX);
  m.attr("SEG_MASTER") = static_cast<int>(SEG_MASTER);
  m.attr("SEG_SALT") = static_cast<int>(SEG_SALT);
  m.attr("SEG_COLS") = static_cast<int>(SEG_COLS);
  m.attr("CTL_INV_SCALE") = static_cast<int>(CTL_INV_SCALE);
  m.attr("CTL_FOUND_INF") = static_cast<int>(CTL_FOUND_INF);
  m.attr("CTL_CLIP") = static_cast<int>(CTL_CLIP);
  m.attr("CTL_SIZE") = static_cast<int>(CTL_SIZE);
  m.attr("ADAMW_HP_COLS") = static_cast<int>(ADAMW_HP_COLS);
  m.attr("SGDW_HP_COLS") = static_cast<int>(SGDW_HP_COLS);
  m.attr("RMSPROPW_HP_COLS") = static_cast<int>(RMSPROPW_HP_COLS);

  pybind11::dict dtypes;
  dtypes["float32"] = static_cast<int>(DType::F32);
  dtypes["float16"] = static_cast<int>(DType::F16);
  dtypes["bfloat16"] = static_cast<int>(DType::BF16);
  dtypes["float64"] = static_cast<int>(DType::F64);
  m.attr("DTYPES") = dtypes;
}

}  // namespace fusedwd
