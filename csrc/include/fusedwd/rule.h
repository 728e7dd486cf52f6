// What a rule header (csrc/include/fusedwd/<rule>.h) defines: the contract the
// CPU loops (csrc/cpu/loops.h) and the CUDA kernel (csrc/cuda/step.cuh) are
// written against, so that both run every rule through one generic pass.
//
// A rule is a struct (the "family") holding
//
//   kName           its name, as fusedwd/rules/<rule>.py names it ("adamw")
//   Col             its hyperparameter columns: FUSEDWD_COLUMNS(...) below, in the
//                   Python spec's order (Col::lr, Col::beta1, ..., Col::kCount)
//   kSwitchNames    its structural switches, comma-separated, in the spec's order
//   Scalars<M>      its per-segment scalars, derived in double and rounded to M
//   Rule<D, ...>    per parameter dtype D and switch values: what a kernel runs
//   with_switches   the switch bits (bit k: switch k) -> f(Rule<D, ...>{}); FUSEDWD_HD
//                   (the CUDA kernel picks its path with it), after FUSEDWD_HD_CALLS_ANY
//
// and Rule<D, ...> holds
//
//   M, Scalars      the math type math_t<D> and Scalars<M>
//   kHpCols         Col::kCount
//   kS0, kS1, kS2   whether the rule reads and writes each state column
//   kSigned0..2     whether each state's 8-bit code is signed (m, momentum) or not (v)
//   scalars(hp, t, grad_mult)         the segment's Scalars from its hyper row and step t
//   update(p, g, s0, s1, s2, scalars) one element, in place (unused states untouched)
//
// both FUSEDWD_HD: the same helper runs on the host and on the device.
//
// A two-phase rule (LAMB, StableAdamW: its update needs sums over each whole
// tensor; docs/design.md#per-tensor-reductions) has kSums > 0 in the family and
// in Rule<D, ...>, and in place of update():
//
//   moments_read_p(scalars)                  whether phase 1 reads p for this segment (if not, p is 0)
//   moments(p, g, s0, s1, s2, scalars)       phase 1, one element: the states updated
//                                           (p and g as the rule's prologue leaves them)
//   terms(p, g, s0, s1, s2, scalars, out)    phase 1, one element: its term of each sum
//                                           (double), the states as stored
//   apply_scalars(hp, t, grad_mult, sums, n) per segment of n elements, from its kSums sums:
//                                           Rule::Apply, phase 2's scalars
//   apply(p, s0, s1, s2, apply)              phase 2, one element: p from p and the states
//                                           as phase 1 stored them
//
// and, optionally, when phase 2 recomputes from the states something phase 1 also
// computes (LAMB's update u: a square root and a division per element), kCachesUpdate
// = true and
//
//   update(p, g, s0, s1, s2, scalars)        phase 1, one element: that value (M), with
//                                           terms()'s arguments
//   apply_update(p, u, apply)                phase 2, one element: p from p and that value,
//                                           the bits apply() gives
//
// which the CPU kernel uses for a segment it steps whole while it is in cache
// (csrc/cpu/loops.h kLocalSegmentBytes): phase 1 keeps u, phase 2 reads it back.
// csrc/include/fusedwd/rules.h lists every rule; tests/test_layout.py checks
// each against its Python spec (columns, switches, states and their codes).
#pragma once

#include "fusedwd/common.h"

// The hyperparameter columns of a rule from one list of names, in order:
//   struct Col { FUSEDWD_COLUMNS(lr, beta1, ...) };
// gives Col::lr == 0, Col::beta1 == 1, ..., Col::kCount and Col::names() (for the bindings).
#define FUSEDWD_COLUMNS(...)                                        \
  enum : int { __VA_ARGS__, kCount };                               \
  static const char* names() { return #__VA_ARGS__; }

// Before a FUSEDWD_HD function template that calls a callable it is given (with_switches):
// the CUDA kernels call it with device lambdas, the host code with host ones, and nvcc would
// otherwise warn that a __host__ __device__ function calls a __host__ one (#20013-D).
#if defined(__CUDACC__)
#define FUSEDWD_HD_CALLS_ANY _Pragma("nv_exec_check_disable")
#else
#define FUSEDWD_HD_CALLS_ANY
#endif

FUSEDWD_NS_BEGIN

// A rule family's kSums: 0 for an elementwise rule (which does not declare it).
template <class R, class = void>
struct SumsOf {
  static constexpr int value = 0;
};
template <class R>
struct SumsOf<R, decltype(void(R::kSums))> {
  static constexpr int value = R::kSums;
};
template <class R>
constexpr int kSumsOf = SumsOf<R>::value;

// A two-phase rule's kCachesUpdate: false where the rule does not declare it.
template <class R, class = void>
struct CachesUpdateOf {
  static constexpr bool value = false;
};
template <class R>
struct CachesUpdateOf<R, decltype(void(R::kCachesUpdate))> {
  static constexpr bool value = R::kCachesUpdate;
};
template <class R>
constexpr bool kCachesUpdateOf = CachesUpdateOf<R>::value;

FUSEDWD_NS_END
