// Storage layouts of a step: how the parameters, their fp32 master copies and
// the states are stored. One list, for the CPU loops (csrc/cpu/loops.h), the
// CUDA kernels (csrc/cuda/launch.cuh) and both bindings, which validate a
// launch's layout with check_layout (check_q8_layout) before dispatching on it
// with with_layout (with_q8_layout).
#pragma once

#include <stdexcept>
#include <string>

#include "fusedwd/common.h"

FUSEDWD_NS_BEGIN

// One storage layout as a type. Gradients are stored like the parameters (P);
// the math runs in math_t<P>.
template <DType P_, DType S_, bool MASTER_, bool SR_>
struct Layout {
  static constexpr DType P = P_;       // parameters and gradients
  static constexpr DType S = S_;       // every state
  static constexpr bool MASTER = MASTER_;  // fp32 master copy of each 16-bit p at SEG_MASTER
  static constexpr bool SR = SR_;      // bf16 p rounded stochastically (no master)
};

// The combinations the kernels instantiate: P == S for every dtype; fp32
// parameters with 16-bit states; 16-bit parameters with fp32 states; 16-bit
// parameters with an fp32 master and fp32 or 16-bit states; bf16 parameters
// rounded stochastically with bf16 or fp32 states.
FUSEDWD_HD constexpr bool layout_supported(int dtype, int state_dtype, bool master, bool stochastic) {
  const int F32 = static_cast<int>(DType::F32), F16 = static_cast<int>(DType::F16);
  const int BF16 = static_cast<int>(DType::BF16), F64 = static_cast<int>(DType::F64);
  const bool known = dtype >= F32 && dtype <= F64 && state_dtype >= F32 && state_dtype <= F64;
  const bool half_p = dtype == F16 || dtype == BF16;
  const bool half_s = state_dtype == F16 || state_dtype == BF16;
  if (!known) return false;
  if (master) return half_p && !stochastic && (state_dtype == F32 || half_s);
  if (stochastic) return dtype == BF16 && (state_dtype == BF16 || state_dtype == F32);
  return state_dtype == dtype || (dtype == F32 && half_s) || (half_p && state_dtype == F32);
}

inline std::string dtype_name(int d) {
  static const char* names[] = {"float32", "float16", "bfloat16", "float64"};
  return d >= 0 && d <= 3 ? names[d] : std::to_string(d);
}

// std::invalid_argument reaches Python as a ValueError (pybind11's translation).
inline void check_layout(int dtype, int state_dtype, bool master, bool stochastic) {
  if (!layout_supported(dtype, state_dtype, master, stochastic)) {
    throw std::invalid_argument("unsupported storage layout: params " + dtype_name(dtype) +
                                ", states " + dtype_name(state_dtype) +
                                (master ? ", fp32 master weights" : "") +
                                (stochastic ? ", stochastic rounding" : ""));
  }
}

// 8-bit blockwise states (quant.h): fp32 p; 16-bit
// p with an fp32 master; bf16 p rounded stochastically; 16-bit p rounded to nearest.
FUSEDWD_HD constexpr bool q8_layout_supported(int dtype, bool master, bool stochastic) {
  const int F32 = static_cast<int>(DType::F32), F16 = static_cast<int>(DType::F16);
  const int BF16 = static_cast<int>(DType::BF16);
  const bool half_p = dtype == F16 || dtype == BF16;
  if (master) return half_p && !stochastic;
  if (stochastic) return dtype == BF16;
  return dtype == F32 || half_p;
}

inline void check_q8_layout(int dtype, bool master, bool stochastic) {
  if (!q8_layout_supported(dtype, master, stochastic)) {
    throw std::invalid_argument("unsupported storage layout: params " + dtype_name(dtype) + ", 8-bit states" +
                                (master ? ", fp32 master weights" : "") +
                                (stochastic ? ", stochastic rounding" : ""));
  }
}

// Runtime layout -> f(Layout<...>{}), for a layout check_layout accepted.
template <typename F>
decltype(auto) with_layout(int dtype, int state_dtype, bool master, bool stochastic, F&& f) {
  using D = DType;
  const D p = static_cast<D>(dtype);
  const D s = static_cast<D>(state_dtype);
  if (master) {  // 16-bit p, fp32 master, fp32 / bf16 / fp16 states
    if (p == D::BF16) {
      if (s == D::F32) return f(Layout<D::BF16, D::F32, true, false>{});
      if (s == D::BF16) return f(Layout<D::BF16, D::BF16, true, false>{});
      return f(Layout<D::BF16, D::F16, true, false>{});
    }
    if (s == D::F32) return f(Layout<D::F16, D::F32, true, false>{});
    if (s == D::BF16) return f(Layout<D::F16, D::BF16, true, false>{});
    return f(Layout<D::F16, D::F16, true, false>{});
  }
  if (stochastic) {  // bf16 p rounded stochastically, bf16 or fp32 states
    if (s == D::F32) return f(Layout<D::BF16, D::F32, false, true>{});
    return f(Layout<D::BF16, D::BF16, false, true>{});
  }
  if (p == s) {
    switch (p) {
      case D::F32: return f(Layout<D::F32, D::F32, false, false>{});
      case D::F16: return f(Layout<D::F16, D::F16, false, false>{});
      case D::BF16: return f(Layout<D::BF16, D::BF16, false, false>{});
      case D::F64: break;
    }
    return f(Layout<D::F64, D::F64, false, false>{});
  }
  if (p == D::F32) {  // fp32 p, 16-bit states
    if (s == D::BF16) return f(Layout<D::F32, D::BF16, false, false>{});
    return f(Layout<D::F32, D::F16, false, false>{});
  }
  // 16-bit p, fp32 states
  if (p == D::BF16) return f(Layout<D::BF16, D::F32, false, false>{});
  return f(Layout<D::F16, D::F32, false, false>{});
}

// Runtime 8-bit layout -> f(Layout<P, P, MASTER, SR>{}), for a layout check_q8_layout
// accepted: fp32 p; 16-bit p with an fp32 master; bf16 p rounded stochastically; 16-bit p
// rounded to nearest. The states are uint8 codes; S is unused.
template <typename F>
decltype(auto) with_q8_layout(int dtype, bool master, bool stochastic, F&& f) {
  using D = DType;
  const D p = static_cast<D>(dtype);
  if (p == D::F32) return f(Layout<D::F32, D::F32, false, false>{});
  if (master) {
    if (p == D::BF16) return f(Layout<D::BF16, D::BF16, true, false>{});
    return f(Layout<D::F16, D::F16, true, false>{});
  }
  if (stochastic) return f(Layout<D::BF16, D::BF16, false, true>{});
  if (p == D::BF16) return f(Layout<D::BF16, D::BF16, false, false>{});
  return f(Layout<D::F16, D::F16, false, false>{});
}

FUSEDWD_NS_END
