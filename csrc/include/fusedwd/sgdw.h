// SGDW: the only C++ copy of its per-element math (CPU loops and CUDA kernels).
#pragma once

#include "fusedwd/common.h"
#include "fusedwd/layout.h"

FUSEDWD_NS_BEGIN

// Per-segment scalars: read in double from the hyper row, rounded once to M.
template <typename M>
struct SgdwScalars {
  M grad_sign;        // -1 under maximize
  M l2;               // coupled L2 coefficient (0 for decoupled decay)
  bool has_l2;        // l2 != 0: only then is l2*p added (torch's rule)
  M decay_mult;       // multiplies p before the step (1 for coupled L2)
  M lr;
  M momentum;
  M one_minus_dampening;
  bool first_step;    // t == 1: the buffer starts as a copy of g (torch's clone)
};

// hp: the segment's SGDW hyper row; t: the 1-based step being taken.
template <typename M>
FUSEDWD_HD inline SgdwScalars<M> sgdw_scalars(const double* hp, double t, double grad_mult = 1.0) {
  SgdwScalars<M> s;
  // grad_mult = 1/grad_scale * clip coefficient: folded into the sign, exact for +-1
  s.grad_sign = static_cast<M>(hp[SGDW_GRAD_SIGN] * grad_mult);
  s.l2 = static_cast<M>(hp[SGDW_L2]);
  s.has_l2 = hp[SGDW_L2] != 0.0;
  s.decay_mult = static_cast<M>(hp[SGDW_DECAY_MULT]);
  s.lr = static_cast<M>(hp[SGDW_LR]);
  s.momentum = static_cast<M>(hp[SGDW_MOMENTUM]);
  s.one_minus_dampening = static_cast<M>(1.0 - hp[SGDW_DAMPENING]);
  s.first_step = t == 1.0;
  return s;
}

// One element. buf is read and written only when HAS_MOMENTUM.
template <bool HAS_MOMENTUM, bool NESTEROV, typename M>
FUSEDWD_HD inline void sgdw_update(M& p, M g, M& buf, const SgdwScalars<M>& s) {
  // docs/math.md#sgdw; reference: fusedwd.reference.sgdw
  g = decayed_grad(g, p, s.grad_sign, s.l2, s.has_l2);
  p = p * s.decay_mult;
  M d = g;
  if constexpr (HAS_MOMENTUM) {
    buf = s.first_step ? g : s.momentum * buf + s.one_minus_dampening * g;
    d = NESTEROV ? g + s.momentum * buf : buf;
  }
  p = p - s.lr * d;
}

FUSEDWD_NS_END
