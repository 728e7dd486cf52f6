// RMSpropW: the only C++ copy of its per-element math (CPU loops and CUDA kernels).
#pragma once

#include "fusedwd/common.h"
#include "fusedwd/layout.h"

FUSEDWD_NS_BEGIN

// Per-segment scalars: read in double from the hyper row, rounded once to M.
template <typename M>
struct RmspropwScalars {
  M grad_sign;        // -1 under maximize
  M l2;               // coupled L2 coefficient (0 for decoupled decay)
  bool has_l2;        // l2 != 0: only then is l2*p added (torch's rule)
  M decay_mult;       // multiplies p before the step (1 for coupled L2)
  M lr;
  M alpha, one_minus_alpha;
  LerpWeight<M> ga_weight;  // grad_avg <- lerp(grad_avg, g, 1 - alpha)
  M eps;
  M momentum;
};

// hp: the segment's RMSpropW hyper row; t (1-based step) is not used by the
// rule but kept for a uniform signature across rules.
template <typename M>
FUSEDWD_HD inline RmspropwScalars<M> rmspropw_scalars(const double* hp, double /*t*/, double grad_mult = 1.0) {
  RmspropwScalars<M> s;
  // grad_mult = 1/grad_scale * clip coefficient: folded into the sign, exact for +-1
  s.grad_sign = static_cast<M>(hp[RMSPROPW_GRAD_SIGN] * grad_mult);
  s.l2 = static_cast<M>(hp[RMSPROPW_L2]);
  s.has_l2 = hp[RMSPROPW_L2] != 0.0;
  s.decay_mult = static_cast<M>(hp[RMSPROPW_DECAY_MULT]);
  s.lr = static_cast<M>(hp[RMSPROPW_LR]);
  s.alpha = static_cast<M>(hp[RMSPROPW_ALPHA]);
  s.one_minus_alpha = static_cast<M>(1.0 - hp[RMSPROPW_ALPHA]);
  s.ga_weight = lerp_weight<M>(1.0 - hp[RMSPROPW_ALPHA]);
  s.eps = static_cast<M>(hp[RMSPROPW_EPS]);
  s.momentum = static_cast<M>(hp[RMSPROPW_MOMENTUM]);
  return s;
}

// One element. ga (grad_avg) is used only when CENTERED, buf only when HAS_MOMENTUM.
template <bool CENTERED, bool HAS_MOMENTUM, typename M>
FUSEDWD_HD inline void rmspropw_update(M& p, M g, M& sq, M& ga, M& buf,
                                       const RmspropwScalars<M>& s) {
  // docs/math.md#rmspropw; reference: fusedwd.reference.rmspropw
  // the operations and their order are torch's (docs/math.md#non-finite-values)
  g = decayed_grad(g, p, s.grad_sign, s.l2, s.has_l2);
  p = p * s.decay_mult;
  sq = s.alpha * sq + (s.one_minus_alpha * g) * g;
  M avg;
  if constexpr (CENTERED) {
    ga = lerp_m(ga, g, s.ga_weight);
    avg = sqrt_m(sq - ga * ga) + s.eps;
  } else {
    avg = sqrt_m(sq) + s.eps;
  }
  if constexpr (HAS_MOMENTUM) {
    buf = s.momentum * buf + g / avg;
    p = p - s.lr * buf;
  } else {
    p = p - (s.lr * g) / avg;
  }
}

FUSEDWD_NS_END
