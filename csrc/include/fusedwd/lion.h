// Lion: the only C++ copy of its per-element math (CPU loops and CUDA kernels).
// docs/math.md#lion; the spec: fusedwd/rules/lion.py.
#pragma once

#include "fusedwd/common.h"
#include "fusedwd/rule.h"

FUSEDWD_NS_BEGIN

struct Lion {
  static constexpr const char* kName = "lion";
  static constexpr const char* kSwitchNames = "";
  struct Col {
    FUSEDWD_COLUMNS(lr, beta1, beta2, decay_mult, l2, grad_sign)
  };

  // Per-segment scalars: read in double from the hyper row, rounded once to M.
  template <typename M>
  struct Scalars {
    M grad_sign;   // -1 under maximize, times 1/grad_scale and the clip coefficient
    M l2;          // coupled L2 coefficient (0 for decoupled decay)
    Flag<M> has_l2;  // l2 != 0: only then is l2*p added (torch's rule for every rule)
    M decay_mult;  // multiplies p before the step (1 for coupled L2)
    M lr;
    LerpWeight<M> c_weight;  // the direction c = lerp(exp_avg, g, 1 - beta1)
    LerpWeight<M> m_weight;  // exp_avg <- lerp(exp_avg, g, 1 - beta2)
  };

  // S0 holds exp_avg (signed 8-bit code); no switches.
  template <DType D>
  struct Rule {
    using M = math_t<D>;
    using Scalars = Lion::Scalars<M>;
    static constexpr int kHpCols = Col::kCount;
    static constexpr bool kS0 = true, kS1 = false, kS2 = false;
    static constexpr bool kSigned0 = true, kSigned1 = true, kSigned2 = true;

    // t (the 1-based step) is not used by the rule.
    FUSEDWD_HD static Scalars scalars(const double* hp, double /*t*/, double grad_mult) {
      Scalars s;
      // grad_mult = 1/grad_scale * clip coefficient: folded into the sign, exact for +-1
      s.grad_sign = static_cast<M>(hp[Col::grad_sign] * grad_mult);
      s.l2 = static_cast<M>(hp[Col::l2]);
      s.has_l2 = hp[Col::l2] != 0.0;
      s.decay_mult = static_cast<M>(hp[Col::decay_mult]);
      s.lr = static_cast<M>(hp[Col::lr]);
      s.c_weight = lerp_weight<M>(1.0 - hp[Col::beta1]);
      s.m_weight = lerp_weight<M>(1.0 - hp[Col::beta2]);
      return s;
    }

    // One element: the momentum m in S0.
    FUSEDWD_HD static void update(M& p, M g, M& m, M&, M&, const Scalars& s) {
      // docs/math.md#lion; reference: fusedwd.reference.lion
      // the operations and their order are torch's, as AdamW's (docs/math.md#non-finite-values)
      g = decayed_grad(g, p, s.grad_sign, s.l2, s.has_l2);
      p = p * s.decay_mult;
      const M c = lerp_m(m, g, s.c_weight);
      // sign(c): +-1, and c itself where it is +-0 (no step) or NaN (propagated); selects only
      const M sign = c > M(0) ? M(1) : (c < M(0) ? M(-1) : c);
      p = p - s.lr * sign;
      m = lerp_m(m, g, s.m_weight);
    }
  };

  // No switches: one Rule per dtype.
  FUSEDWD_HD_CALLS_ANY
  template <DType D, typename F>
  FUSEDWD_HD static decltype(auto) with_switches(unsigned /*switches*/, F&& f) {
    return f(Rule<D>{});
  }
};

FUSEDWD_NS_END
