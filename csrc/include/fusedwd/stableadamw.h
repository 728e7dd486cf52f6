// StableAdamW: the only C++ copy of its per-element math (CPU loops, CUDA phases_kernel).
// docs/math.md#stableadamw; the spec and reference: fusedwd/rules/stableadamw.py.
// A two-phase rule (rule.h): phase 1 updates m, v and sums g^2 / max(v_hat, eps^2)
// over the tensor; phase 2 takes AdamW's step with lr / max(1, RMS).
#pragma once

#include "fusedwd/adamw.h"
#include "fusedwd/common.h"
#include "fusedwd/rule.h"

FUSEDWD_NS_BEGIN

struct StableAdamW {
  static constexpr const char* kName = "stableadamw";
  static constexpr const char* kSwitchNames = "";
  static constexpr int kSums = 1;  // ratio_sum
  struct Col {
    FUSEDWD_COLUMNS(lr, beta1, beta2, eps, decay_mult, l2, grad_sign, wd, wd_lr_max)
  };

  // Phase 1's per-segment scalars.
  template <typename M>
  struct Scalars {
    AdamMoments<M> moments;  // coupled L2 ("l2"), else 0
    M bc2;     // 1 - beta2^t: v_hat = v / bc2
    M eps_sq;  // eps^2, the floor of v_hat in the ratio
  };

  // Phase 2's per-segment scalars: AdamW's, from the clipped lr.
  template <typename M>
  struct Apply {
    M decay_mult;  // 1 - (lr_t / wd_lr_max) * wd
    M step_size;   // lr_t / (1 - beta1^t)
    M bc2_sqrt;    // sqrt(1 - beta2^t)
    M eps;
  };

  // S0: exp_avg (signed 8-bit code), S1: exp_avg_sq, as torch.optim.AdamW; no switches.
  template <DType D>
  struct Rule {
    using M = math_t<D>;
    using Scalars = StableAdamW::Scalars<M>;
    using Apply = StableAdamW::Apply<M>;
    static constexpr int kHpCols = Col::kCount;
    static constexpr int kSums = StableAdamW::kSums;
    static constexpr bool kS0 = true, kS1 = true, kS2 = false;
    static constexpr bool kSigned0 = true, kSigned1 = false, kSigned2 = false;

    FUSEDWD_HD static Scalars scalars(const double* hp, double t, double grad_mult) {
      Scalars s;
      s.moments = AdamMoments<M>::template from<Col>(hp, grad_mult);
      s.bc2 = static_cast<M>(1.0 - ::pow(hp[Col::beta2], t));
      s.eps_sq = static_cast<M>(hp[Col::eps] * hp[Col::eps]);
      return s;
    }

    // Phase 1 reads p only for the L2 term (p is decayed in phase 2).
    FUSEDWD_HD static bool moments_read_p(const Scalars& s) { return s.moments.has_l2; }

    // Phase 1, one element: AdamW's moments (p is decayed in phase 2, with the clipped lr).
    FUSEDWD_HD static void moments(M& p, M& g, M& m, M& v, M&, const Scalars& s) {
      // docs/math.md#stableadamw; reference: fusedwd.reference.stableadamw
      g = s.moments.grad(g, p);
      s.moments.update(g, m, v);
    }

    // Phase 1, one element: g^2 / max(v_hat, eps^2), v as stored (torch.maximum's NaN rule).
    FUSEDWD_HD static void terms(M, M g, M, M v, M, const Scalars& s, double (&out)[kSums]) {
      out[0] = static_cast<double>((g * g) / maximum_m(v / s.bc2, s.eps_sq));
    }

    // Between the phases, per segment of n elements: lr_t = lr / max(1, sqrt(ratio_sum / n)).
    FUSEDWD_HD static Apply apply_scalars(const double* hp, double t, double, const double* sums, int64_t n) {
      const double lr = hp[Col::lr];
      const double rms = n > 0 ? ::sqrt(sums[0] / static_cast<double>(n)) : 0.0;
      const double lr_t = rms > 1.0 ? lr / rms : lr;  // a NaN RMS leaves lr
      const double lr_max = hp[Col::wd_lr_max];
      // "independent" with lr_max == 0 (a group built with lr=0): the full rate only if lr_t > 0
      const double mult = lr_max > 0.0 ? lr_t / lr_max : (lr_t > 0.0 ? 1.0 : 0.0);
      Apply a;
      a.decay_mult = static_cast<M>(1.0 - mult * hp[Col::wd]);
      a.step_size = static_cast<M>(lr_t / (1.0 - ::pow(hp[Col::beta1], t)));
      a.bc2_sqrt = static_cast<M>(::sqrt(1.0 - ::pow(hp[Col::beta2], t)));
      a.eps = static_cast<M>(hp[Col::eps]);
      return a;
    }

    // Phase 2, one element: AdamW's step, from p (as stored) and the states as phase 1 stored them.
    FUSEDWD_HD static void apply(M& p, M m, M v, M, const Apply& a) {
      p = p * a.decay_mult;
      p = adam_step(p, m, v, a.step_size, a.bc2_sqrt, a.eps);
    }
  };

  FUSEDWD_HD_CALLS_ANY
  template <DType D, typename F>
  FUSEDWD_HD static decltype(auto) with_switches(unsigned /*switches*/, F&& f) {
    return f(Rule<D>{});
  }
};

FUSEDWD_NS_END
