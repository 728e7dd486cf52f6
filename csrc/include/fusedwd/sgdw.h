// SGDW: the only C++ copy of its per-element math (CPU loops and CUDA kernels).
// docs/math.md#sgdw; the spec: fusedwd/rules/sgdw.py.
#pragma once

#include "fusedwd/common.h"
#include "fusedwd/rule.h"

FUSEDWD_NS_BEGIN

struct Sgdw {
  static constexpr const char* kName = "sgdw";
  static constexpr const char* kSwitchNames = "has_momentum, nesterov";
  struct Col {
    FUSEDWD_COLUMNS(lr, momentum, dampening, decay_mult, l2, grad_sign)
  };

  // Per-segment scalars: read in double from the hyper row, rounded once to M.
  template <typename M>
  struct Scalars {
    M grad_sign;   // -1 under maximize, times 1/grad_scale and the clip coefficient
    M l2;          // coupled L2 coefficient (0 for decoupled decay)
    Flag<M> has_l2;  // l2 != 0: only then is l2*p added (torch's rule)
    M decay_mult;  // multiplies p before the step (1 for coupled L2)
    M lr;
    M momentum;
    M one_minus_dampening;
    Flag<M> first_step;  // t == 1: the buffer starts as a copy of g (torch's clone)
  };

  // has_momentum: S0 holds momentum_buffer (signed 8-bit code).
  template <DType D, bool HAS_MOMENTUM, bool NESTEROV>
  struct Rule {
    using M = math_t<D>;
    using Scalars = Sgdw::Scalars<M>;
    static constexpr int kHpCols = Col::kCount;
    static constexpr bool kS0 = HAS_MOMENTUM, kS1 = false, kS2 = false;
    static constexpr bool kSigned0 = true, kSigned1 = true, kSigned2 = true;

    FUSEDWD_HD static Scalars scalars(const double* hp, double t, double grad_mult) {
      Scalars s;
      // grad_mult = 1/grad_scale * clip coefficient: folded into the sign, exact for +-1
      s.grad_sign = static_cast<M>(hp[Col::grad_sign] * grad_mult);
      s.l2 = static_cast<M>(hp[Col::l2]);
      s.has_l2 = hp[Col::l2] != 0.0;
      s.decay_mult = static_cast<M>(hp[Col::decay_mult]);
      s.lr = static_cast<M>(hp[Col::lr]);
      s.momentum = static_cast<M>(hp[Col::momentum]);
      s.one_minus_dampening = static_cast<M>(1.0 - hp[Col::dampening]);
      s.first_step = t == 1.0;
      return s;
    }

    // One element: the momentum buffer in S0 (read and written only when HAS_MOMENTUM).
    FUSEDWD_HD static void update(M& p, M g, M& buf, M&, M&, const Scalars& s) {
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
  };

  // The switch bits (bit 0: has_momentum, bit 1: nesterov) -> f(Rule<D, ...>{}). nesterov
  // needs momentum (validated in Python): without it d = g either way.
  FUSEDWD_HD_CALLS_ANY
  template <DType D, typename F>
  FUSEDWD_HD static decltype(auto) with_switches(unsigned switches, F&& f) {
    if (!(switches & 1u)) return f(Rule<D, false, false>{});
    if (switches & 2u) return f(Rule<D, true, true>{});
    return f(Rule<D, true, false>{});
  }
};

FUSEDWD_NS_END
