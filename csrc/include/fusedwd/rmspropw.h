// RMSpropW: the only C++ copy of its per-element math (CPU loops and CUDA kernels).
// docs/math.md#rmspropw; the spec: fusedwd/rules/rmspropw.py.
#pragma once

#include "fusedwd/common.h"
#include "fusedwd/rule.h"

FUSEDWD_NS_BEGIN

struct Rmspropw {
  static constexpr const char* kName = "rmspropw";
  static constexpr const char* kSwitchNames = "centered, has_momentum";
  struct Col {
    FUSEDWD_COLUMNS(lr, alpha, eps, momentum, decay_mult, l2, grad_sign)
  };

  // Per-segment scalars: read in double from the hyper row, rounded once to M.
  template <typename M>
  struct Scalars {
    M grad_sign;   // -1 under maximize, times 1/grad_scale and the clip coefficient
    M l2;          // coupled L2 coefficient (0 for decoupled decay)
    Flag<M> has_l2;  // l2 != 0: only then is l2*p added (torch's rule)
    M decay_mult;  // multiplies p before the step (1 for coupled L2)
    M lr;
    M alpha, one_minus_alpha;
    LerpWeight<M> ga_weight;  // grad_avg <- lerp(grad_avg, g, 1 - alpha)
    M eps;
    M momentum;
  };

  // S0 square_avg (unsigned 8-bit code); centered: S1 grad_avg; has_momentum: S2
  // momentum_buffer (signed codes).
  template <DType D, bool CENTERED, bool HAS_MOMENTUM>
  struct Rule {
    using M = math_t<D>;
    using Scalars = Rmspropw::Scalars<M>;
    static constexpr int kHpCols = Col::kCount;
    static constexpr bool kS0 = true, kS1 = CENTERED, kS2 = HAS_MOMENTUM;
    static constexpr bool kSigned0 = false, kSigned1 = true, kSigned2 = true;

    // t (the 1-based step) is not used by the rule.
    FUSEDWD_HD static Scalars scalars(const double* hp, double /*t*/, double grad_mult) {
      Scalars s;
      // grad_mult = 1/grad_scale * clip coefficient: folded into the sign, exact for +-1
      s.grad_sign = static_cast<M>(hp[Col::grad_sign] * grad_mult);
      s.l2 = static_cast<M>(hp[Col::l2]);
      s.has_l2 = hp[Col::l2] != 0.0;
      s.decay_mult = static_cast<M>(hp[Col::decay_mult]);
      s.lr = static_cast<M>(hp[Col::lr]);
      s.alpha = static_cast<M>(hp[Col::alpha]);
      s.one_minus_alpha = static_cast<M>(1.0 - hp[Col::alpha]);
      s.ga_weight = lerp_weight<M>(1.0 - hp[Col::alpha]);
      s.eps = static_cast<M>(hp[Col::eps]);
      s.momentum = static_cast<M>(hp[Col::momentum]);
      return s;
    }

    // One element. ga (grad_avg) is used only when CENTERED, buf only when HAS_MOMENTUM.
    FUSEDWD_HD static void update(M& p, M g, M& sq, M& ga, M& buf, const Scalars& s) {
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
  };

  // The switch bits (bit 0: centered, bit 1: has_momentum) -> f(Rule<D, ...>{}).
  FUSEDWD_HD_CALLS_ANY
  template <DType D, typename F>
  FUSEDWD_HD static decltype(auto) with_switches(unsigned switches, F&& f) {
    const bool centered = switches & 1u, momentum = switches & 2u;
    if (centered) return momentum ? f(Rule<D, true, true>{}) : f(Rule<D, true, false>{});
    return momentum ? f(Rule<D, false, true>{}) : f(Rule<D, false, false>{});
  }
};

FUSEDWD_NS_END
