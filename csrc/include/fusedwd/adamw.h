// AdamW: the only C++ copy of its per-element math (CPU loops and CUDA kernels).
// docs/math.md#adamw; the spec: fusedwd/rules/adamw.py.
#pragma once

#include "fusedwd/common.h"
#include "fusedwd/rule.h"

FUSEDWD_NS_BEGIN

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
    M grad_sign;   // -1 under maximize, times 1/grad_scale and the clip coefficient
    M l2;          // coupled L2 coefficient (0 for decoupled decay)
    bool has_l2;   // l2 != 0: only then is l2*p added (torch's rule)
    M decay_mult;  // multiplies p before the step (1 for coupled L2)
    LerpWeight<M> m_weight;  // exp_avg <- lerp(exp_avg, g, 1 - beta1)
    M beta2, one_minus_beta2;
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
      // grad_mult = 1/grad_scale * clip coefficient: folded into the sign, exact for +-1
      s.grad_sign = static_cast<M>(hp[Col::grad_sign] * grad_mult);
      s.l2 = static_cast<M>(hp[Col::l2]);
      s.has_l2 = hp[Col::l2] != 0.0;
      s.decay_mult = static_cast<M>(hp[Col::decay_mult]);
      s.m_weight = lerp_weight<M>(1.0 - beta1);
      s.beta2 = static_cast<M>(beta2);
      s.one_minus_beta2 = static_cast<M>(1.0 - beta2);
      s.eps = static_cast<M>(hp[Col::eps]);
      s.step_size = static_cast<M>(hp[Col::lr] / (1.0 - ::pow(beta1, t)));
      s.bc2_sqrt = static_cast<M>(::sqrt(1.0 - ::pow(beta2, t)));
      return s;
    }

    // One element: m, v and (amsgrad) vmax in S0, S1, S2.
    FUSEDWD_HD static void update(M& p, M g, M& m, M& v, M& vmax, const Scalars& s) {
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
  };

  // The switch bits (bit 0: amsgrad) -> f(Rule<D, ...>{}).
  template <DType D, typename F>
  static decltype(auto) with_switches(unsigned switches, F&& f) {
    if (switches & 1u) return f(Rule<D, true>{});
    return f(Rule<D, false>{});
  }
};

FUSEDWD_NS_END
