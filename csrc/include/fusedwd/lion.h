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
    bool has_l2;   // l2 != 0: only then is l2*p added (torch's rule for every rule)
    M decay_mult;  // multiplies p before the step (1 for coupled L2)
    M lr;
    M beta1, one_minus_beta1;
    M beta2, one_minus_beta2;
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
      s.beta1 = static_cast<M>(hp[Col::beta1]);
      s.one_minus_beta1 = static_cast<M>(1.0 - hp[Col::beta1]);
      s.beta2 = static_cast<M>(hp[Col::beta2]);
      s.one_minus_beta2 = static_cast<M>(1.0 - hp[Col::beta2]);
      return s;
    }

    // One element: the momentum m in S0.
    FUSEDWD_HD static void update(M& p, M g, M& m, M&, M&, const Scalars& s) {
      // docs/math.md#lion; reference: fusedwd.reference.lion
      g = decayed_grad(g, p, s.grad_sign, s.l2, s.has_l2);
      p = p * s.decay_mult;
      const M c = s.beta1 * m + s.one_minus_beta1 * g;
      // sign(c): +-1, and c itself where it is +-0 (no step) or NaN (propagated); selects only
      const M sign = c > M(0) ? M(1) : (c < M(0) ? M(-1) : c);
      p = p - s.lr * sign;
      m = s.beta2 * m + s.one_minus_beta2 * g;
    }
  };

  // No switches: one Rule per dtype.
  template <DType D, typename F>
  static decltype(auto) with_switches(unsigned /*switches*/, F&& f) {
    return f(Rule<D>{});
  }
};

FUSEDWD_NS_END
