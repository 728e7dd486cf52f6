// AdamW: the only C++ copy of its per-element math (CPU loops and CUDA kernels).
// docs/math.md#adamw; the spec: fusedwd/rules/adamw.py.
#pragma once

#include "fusedwd/common.h"
#include "fusedwd/rule.h"

FUSEDWD_NS_BEGIN

// Adam's moments, shared by every rule that keeps them (AdamW, LAMB, StableAdamW): the
// gradient's sign, scale and coupled L2 term, then exp_avg <- lerp(exp_avg, g, 1 - beta1) and
// exp_avg_sq <- beta2 * exp_avg_sq + (1 - beta2) * g * g (docs/math.md#adamw), in torch's
// operations and order (docs/math.md#non-finite-values). Col: the rule's columns, which
// name beta1, beta2, l2 and grad_sign.
template <typename M>
struct AdamMoments {
  M grad_sign;  // -1 under maximize, times 1/grad_scale and the clip coefficient
  M l2;         // coupled L2 coefficient (0 for decoupled decay)
  Flag<M> has_l2;  // l2 != 0: only then is l2*p added (torch's rule)
  LerpWeight<M> m_weight;  // exp_avg <- lerp(exp_avg, g, 1 - beta1)
  M beta2, one_minus_beta2;

  // From the hyper row, in double, rounded once to M; grad_mult = 1/grad_scale * clip
  // coefficient, folded into the sign (exact for +-1).
  template <class Col>
  FUSEDWD_HD static AdamMoments from(const double* hp, double grad_mult) {
    AdamMoments a;
    a.grad_sign = static_cast<M>(hp[Col::grad_sign] * grad_mult);
    a.l2 = static_cast<M>(hp[Col::l2]);
    a.has_l2 = hp[Col::l2] != 0.0;
    a.m_weight = lerp_weight<M>(1.0 - hp[Col::beta1]);
    a.beta2 = static_cast<M>(hp[Col::beta2]);
    a.one_minus_beta2 = static_cast<M>(1.0 - hp[Col::beta2]);
    return a;
  }

  // The gradient the moments take: signed, scaled, plus l2*p (p before any decay).
  FUSEDWD_HD M grad(M g, M p) const { return decayed_grad(g, p, grad_sign, l2, has_l2); }

  // Both moments from that gradient.
  FUSEDWD_HD void update(M g, M& m, M& v) const {
    m = lerp_m(m, g, m_weight);
    v = beta2 * v + (one_minus_beta2 * g) * g;
  }
};

// Adam's denominator: sqrt(v) / sqrt(1 - beta2^t) + eps (AdamW, StableAdamW, LAMB).
template <typename M>
FUSEDWD_HD inline M adam_denom(M v, M bc2_sqrt, M eps) {
  return sqrt_m(v) / bc2_sqrt + eps;
}

// Adam's step from the moments: p - step_size * m / adam_denom (AdamW, StableAdamW).
template <typename M>
FUSEDWD_HD inline M adam_step(M p, M m, M v, M step_size, M bc2_sqrt, M eps) {
  return p - (step_size * m) / adam_denom(v, bc2_sqrt, eps);
}

struct AdamW {
  static constexpr const char* kName = "adamw";
  static constexpr const char* kSwitchNames = "amsgrad";
  struct Col {
    FUSEDWD_COLUMNS(lr, beta1, beta2, eps, decay_mult, l2, grad_sign)
  };

  // Per-segment scalars: derived in double from the hyper row and the step,
  // then rounded once to the math type M.
  template <typename M>
  struct Scalars {
    AdamMoments<M> moments;
    M decay_mult;  // multiplies p before the step (1 for coupled L2)
    M eps;
    M step_size;  // lr / (1 - beta1^t)
    M bc2_sqrt;   // sqrt(1 - beta2^t)
  };

  // amsgrad: S2 holds max_exp_avg_sq. 8-bit codes: exp_avg signed, the second moments unsigned.
  template <DType D, bool AMSGRAD>
  struct Rule {
    using M = math_t<D>;
    using Scalars = AdamW::Scalars<M>;
    static constexpr int kHpCols = Col::kCount;
    static constexpr bool kS0 = true, kS1 = true, kS2 = AMSGRAD;
    static constexpr bool kSigned0 = true, kSigned1 = false, kSigned2 = false;

    // hp: the segment's hyper row; t: the 1-based step being taken.
    FUSEDWD_HD static Scalars scalars(const double* hp, double t, double grad_mult) {
      const double beta1 = hp[Col::beta1];
      const double beta2 = hp[Col::beta2];
      Scalars s;
      s.moments = AdamMoments<M>::template from<Col>(hp, grad_mult);
      s.decay_mult = static_cast<M>(hp[Col::decay_mult]);
      s.eps = static_cast<M>(hp[Col::eps]);
      s.step_size = static_cast<M>(hp[Col::lr] / (1.0 - ::pow(beta1, t)));
      s.bc2_sqrt = static_cast<M>(::sqrt(1.0 - ::pow(beta2, t)));
      return s;
    }

    // One element: m, v and (amsgrad) vmax in S0, S1, S2.
    FUSEDWD_HD static void update(M& p, M g, M& m, M& v, M& vmax, const Scalars& s) {
      // docs/math.md#adamw; reference: fusedwd.reference.adamw
      // the operations and their order are torch's (docs/math.md#non-finite-values)
      g = s.moments.grad(g, p);
      p = p * s.decay_mult;
      s.moments.update(g, m, v);
      M v_used = v;
      if constexpr (AMSGRAD) {
        vmax = maximum_m(vmax, v);
        v_used = vmax;
      }
      p = adam_step(p, m, v_used, s.step_size, s.bc2_sqrt, s.eps);
    }
  };

  // The switch bits (bit 0: amsgrad) -> f(Rule<D, ...>{}).
  FUSEDWD_HD_CALLS_ANY
  template <DType D, typename F>
  FUSEDWD_HD static decltype(auto) with_switches(unsigned switches, F&& f) {
    if (switches & 1u) return f(Rule<D, true>{});
    return f(Rule<D, false>{});
  }
};

FUSEDWD_NS_END
