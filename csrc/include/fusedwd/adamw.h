// AdamW: the only C++ copy of its per-element math (CPU loops and CUDA kernels).
#pragma once

#include "fusedwd/common.h"
#include "fusedwd/layout.h"

FUSEDWD_NS_BEGIN

// Per-segment scalars: derived in double from the hyper row and the step,
// then rounded once to the math type M.
template <typename M>
struct AdamWScalars {
  M grad_sign;        // -1 under maximize
  M l2;               // coupled L2 coefficient (0 for decoupled decay)
  bool has_l2;        // l2 != 0: only then is l2*p added (torch's rule)
  M decay_mult;       // multiplies p before the step (1 for coupled L2)
  LerpWeight<M> m_weight;  // exp_avg <- lerp(exp_avg, g, 1 - beta1)
  M beta2, one_minus_beta2;
  M eps;
  M step_size;        // lr / (1 - beta1^t)
  M bc2_sqrt;         // sqrt(1 - beta2^t)
};

// hp: the segment's AdamW hyper row; t: the 1-based step being taken.
template <typename M>
FUSEDWD_HD inline AdamWScalars<M> adamw_scalars(const double* hp, double t, double grad_mult = 1.0) {
  const double beta1 = hp[ADAMW_BETA1];
  const double beta2 = hp[ADAMW_BETA2];
  AdamWScalars<M> s;
  // grad_mult = 1/grad_scale * clip coefficient: folded into the sign, exact for +-1
  s.grad_sign = static_cast<M>(hp[ADAMW_GRAD_SIGN] * grad_mult);
  s.l2 = static_cast<M>(hp[ADAMW_L2]);
  s.has_l2 = hp[ADAMW_L2] != 0.0;
  s.decay_mult = static_cast<M>(hp[ADAMW_DECAY_MULT]);
  s.m_weight = lerp_weight<M>(1.0 - beta1);
  s.beta2 = static_cast<M>(beta2);
  s.one_minus_beta2 = static_cast<M>(1.0 - beta2);
  s.eps = static_cast<M>(hp[ADAMW_EPS]);
  s.step_size = static_cast<M>(hp[ADAMW_LR] / (1.0 - ::pow(beta1, t)));
  s.bc2_sqrt = static_cast<M>(::sqrt(1.0 - ::pow(beta2, t)));
  return s;
}

// One element. vmax is read and written only when AMSGRAD.
template <bool AMSGRAD, typename M>
FUSEDWD_HD inline void adamw_update(M& p, M g, M& m, M& v, M& vmax, const AdamWScalars<M>& s) {
  // docs/math.md#adamw; reference: fusedwd.reference.adamw
  // the operations and their order are torch's (docs/math.md#non-finite-values)
  g = decayed_grad(g, p, s.grad_sign, s.l2, s.has_l2);
  p = p * s.decay_mult;
  m = lerp_m(m, g, s.m_weight);
  v = s.beta2 * v + (s.one_minus_beta2 * g) * g;
  M v_used = v;
  if constexpr (AMSGRAD) {
    vmax = maximum_m(vmax, v);
    v_used = vmax;
  }
  const M denom = sqrt_m(v_used) / s.bc2_sqrt + s.eps;
  p = p - (s.step_size * m) / denom;
}

FUSEDWD_NS_END
