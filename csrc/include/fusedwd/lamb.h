// LAMB: the only C++ copy of its per-element math (CPU loops, CUDA phases_kernel).
// docs/math.md#lamb; the spec and reference: fusedwd/rules/lamb.py.
// A two-phase rule (rule.h): phase 1 updates m, v and sums ||p||^2 and ||u||^2
// over the tensor; phase 2 steps by lr * trust * u.
#pragma once

#include "fusedwd/adamw.h"
#include "fusedwd/common.h"
#include "fusedwd/rule.h"

FUSEDWD_NS_BEGIN

struct Lamb {
  static constexpr const char* kName = "lamb";
  static constexpr const char* kSwitchNames = "";
  static constexpr int kSums = 2;  // param_sq, update_sq
  struct Col {
    FUSEDWD_COLUMNS(lr, beta1, beta2, eps, decay_mult, l2, grad_sign, wd, bias_correction, adapt, max_trust)
  };

  // What both phases share to form the update u = r + wd*p, r = (m/bc1) / (sqrt(v)/sqrt(bc2) + eps).
  template <typename M>
  struct Direction {
    M decay_mult;  // multiplies p first ("independent"; 1 otherwise)
    M inv_bc1;     // 1 / (1 - beta1^t), or 1 without bias correction
    M bc2_sqrt;    // sqrt(1 - beta2^t), or 1
    M eps;
    M wd;          // the decay inside the update ("decoupled"), else 0
    Flag<M> has_wd;  // wd != 0: only then is wd*p added
  };

  template <typename M>
  FUSEDWD_HD static Direction<M> direction(const double* hp, double t) {
    const bool bc = hp[Col::bias_correction] != 0.0;
    Direction<M> d;
    d.decay_mult = static_cast<M>(hp[Col::decay_mult]);
    d.inv_bc1 = static_cast<M>(bc ? 1.0 / (1.0 - ::pow(hp[Col::beta1], t)) : 1.0);
    d.bc2_sqrt = static_cast<M>(bc ? ::sqrt(1.0 - ::pow(hp[Col::beta2], t)) : 1.0);
    d.eps = static_cast<M>(hp[Col::eps]);
    d.wd = static_cast<M>(hp[Col::wd]);
    d.has_wd = hp[Col::wd] != 0.0;
    return d;
  }

  // u from p (decayed) and the states as stored
  template <typename M>
  FUSEDWD_HD static M update_of(M p, M m, M v, const Direction<M>& d) {
    const M r = (m * d.inv_bc1) / adam_denom(v, d.bc2_sqrt, d.eps);
    return d.has_wd ? r + d.wd * p : r;
  }

  // Phase 1's per-segment scalars.
  template <typename M>
  struct Scalars {
    AdamMoments<M> moments;  // coupled L2 ("l2"), else 0
    Direction<M> dir;
  };

  // Phase 2's per-segment scalars: the direction and lr * trust ratio.
  template <typename M>
  struct Apply {
    Direction<M> dir;
    M lr_trust;
  };

  // S0: exp_avg (signed 8-bit code), S1: exp_avg_sq; no switches.
  template <DType D>
  struct Rule {
    using M = math_t<D>;
    using Scalars = Lamb::Scalars<M>;
    using Apply = Lamb::Apply<M>;
    static constexpr int kHpCols = Col::kCount;
    static constexpr int kSums = Lamb::kSums;
    static constexpr bool kS0 = true, kS1 = true, kS2 = false;
    static constexpr bool kSigned0 = true, kSigned1 = false, kSigned2 = false;

    FUSEDWD_HD static Scalars scalars(const double* hp, double t, double grad_mult) {
      Scalars s;
      s.moments = AdamMoments<M>::template from<Col>(hp, grad_mult);
      s.dir = direction<M>(hp, t);
      return s;
    }

    // Phase 1 reads p: its norm is one of the sums.
    FUSEDWD_HD static bool moments_read_p(const Scalars&) { return true; }

    // Phase 1, one element: the moments, as AdamW's; p decayed as phase 2 will decay it.
    FUSEDWD_HD static void moments(M& p, M& g, M& m, M& v, M&, const Scalars& s) {
      // docs/math.md#lamb; reference: fusedwd.reference.lamb
      g = s.moments.grad(g, p);
      p = p * s.dir.decay_mult;
      s.moments.update(g, m, v);
    }

    // Phase 1, one element: its terms of ||p||^2 and ||u||^2 (exact squares of M in double),
    // from the states as stored.
    FUSEDWD_HD static void terms(M p, M g, M m, M v, M x2, const Scalars& s, double (&out)[kSums]) {
      const M u = update(p, g, m, v, x2, s);
      out[0] = static_cast<double>(p) * static_cast<double>(p);
      out[1] = static_cast<double>(u) * static_cast<double>(u);
    }

    // u, which phase 2 would recompute from the states: a segment stepped whole in cache keeps it
    // (rule.h kCachesUpdate)
    static constexpr bool kCachesUpdate = true;
    FUSEDWD_HD static M update(M p, M, M m, M v, M, const Scalars& s) { return update_of(p, m, v, s.dir); }

    // Between the phases, per segment: the trust ratio ||p|| / ||u|| (1 where either norm is
    // 0, or where the tensor does not adapt), at most max_trust, times lr.
    FUSEDWD_HD static Apply apply_scalars(const double* hp, double t, double, const double* sums, int64_t) {
      double trust = 1.0;
      if (hp[Col::adapt] != 0.0) {
        const double p_norm = ::sqrt(sums[0]);
        const double u_norm = ::sqrt(sums[1]);
        trust = (p_norm > 0.0 && u_norm > 0.0) ? p_norm / u_norm : 1.0;
        trust = hp[Col::max_trust] < trust ? hp[Col::max_trust] : trust;
      }
      Apply a;
      a.dir = direction<M>(hp, t);
      a.lr_trust = static_cast<M>(hp[Col::lr] * trust);
      return a;
    }

    // Phase 2, one element: p (as stored) and the states (as phase 1 stored them).
    FUSEDWD_HD static void apply(M& p, M m, M v, M, const Apply& a) {
      p = p * a.dir.decay_mult;
      p = p - a.lr_trust * update_of(p, m, v, a.dir);
    }

    // Phase 2 with u as phase 1 formed it (from p decayed and the states as stored): apply()'s bits
    FUSEDWD_HD static void apply_update(M& p, M u, const Apply& a) {
      p = p * a.dir.decay_mult;
      p = p - a.lr_trust * u;
    }
  };

  FUSEDWD_HD_CALLS_ANY
  template <DType D, typename F>
  FUSEDWD_HD static decltype(auto) with_switches(unsigned /*switches*/, F&& f) {
    return f(Rule<D>{});
  }
};

FUSEDWD_NS_END
