// Storage <-> math type conversions shared by the CPU loops and the CUDA kernels.
//
// fp16 and bf16 are stored as their raw 16-bit patterns (uint16_t) so the same
// code compiles under g++ (no half type needed) and nvcc (where the bits are
// reinterpreted as __half / __nv_bfloat16 and converted by the intrinsics).
// Host conversions are branch-free bit arithmetic so that GCC vectorizes them
// inside the element loops; all of them round to nearest even and keep NaN/Inf.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if !defined(__CUDACC__) && defined(__F16C__)
#include <immintrin.h>  // the bulk fp16 conversions below
#define FUSEDWD_HW_F16 1
#endif

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FUSEDWD_HD __host__ __device__
#else
#define FUSEDWD_HD
#endif

// Each CPU ISA variant compiles these inline functions with different flags;
// a per-variant inline namespace gives every copy its own symbol, so the linker
// can never substitute the AVX-512 copy of a helper into the baseline path.
#ifndef FUSEDWD_ISA_NS
#define FUSEDWD_ISA_NS generic
#endif
#define FUSEDWD_NS_BEGIN \
  namespace fusedwd {    \
  inline namespace FUSEDWD_ISA_NS {
#define FUSEDWD_NS_END \
  }                    \
  }

FUSEDWD_NS_BEGIN

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

FUSEDWD_HD inline uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

FUSEDWD_HD inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

FUSEDWD_HD inline float bf16_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __bfloat162float(__ushort_as_bfloat16(h));
#else
  // bf16 is the upper half of an fp32: exact, NaN payload kept.
  return bits_float(static_cast<uint32_t>(h) << 16);
#endif
}

FUSEDWD_HD inline uint16_t float_to_bf16(float x) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
#else
  const uint32_t u = float_bits(x);
  // round to nearest even: add 0x7fff plus the lowest kept bit, carry may reach Inf
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  // NaN: truncate and set the quiet bit so rounding can never turn it into Inf
  const uint32_t quiet_nan = (u >> 16) | 0x0040u;
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(is_nan ? quiet_nan : rounded);
#endif
}

FUSEDWD_HD inline float f16_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  // Exponent rebias by bit arithmetic (F. Giesen, "half_to_float_fast5"), all
  // three cases computed and selected so the loop stays branch-free.
  const uint32_t shifted_exp = 0x7c00u << 13;  // fp16 exponent mask in fp32 position
  const uint32_t body = (static_cast<uint32_t>(h) & 0x7fffu) << 13;
  const uint32_t exp = body & shifted_exp;
  const uint32_t normal = body + ((127u - 15u) << 23);
  // Inf/NaN: push the exponent to 255, mantissa (NaN payload) kept; a NaN comes
  // out quiet (bit 22 set), as from F16C's vcvtph2ps and IEEE 754's conversions
  const uint32_t inf_nan = (normal + ((128u - 16u) << 23)) | (body == shifted_exp ? 0u : 0x00400000u);
  // zero/subnormal: exact fp32 subtraction renormalizes the mantissa
  const uint32_t subnormal =
      float_bits(bits_float(normal + (1u << 23)) - bits_float(113u << 23));
  const uint32_t magnitude = exp == shifted_exp ? inf_nan : (exp == 0 ? subnormal : normal);
  return bits_float(magnitude | ((static_cast<uint32_t>(h) & 0x8000u) << 16));
#endif
}

FUSEDWD_HD inline uint16_t float_to_f16(float x) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(x));
#else
  // F. Giesen, "float_to_half_fast3_rtne", with the branches turned into selects.
  const uint32_t u_signed = float_bits(x);
  const uint32_t sign = u_signed & 0x80000000u;
  const uint32_t u = u_signed ^ sign;
  const uint32_t f16_overflow = (127u + 16u) << 23;  // 65536.0f: rounds to Inf
  const uint32_t f16_min_normal = 113u << 23;        // 2^-14
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;  // 0.5f
  // NaN -> quiet NaN keeping the payload's top 9 bits (F16C's vcvtps2ph, IEEE 754's
  // conversion), Inf and overflow -> Inf
  const uint32_t special = u > 0x7f800000u ? (0x7e00u | ((u >> 13) & 0x3ffu)) : 0x7c00u;
  // subnormal: the fp32 adder rounds (to nearest even) at the fp16 subnormal ulp
  const uint32_t subnormal = float_bits(bits_float(u) + bits_float(denorm_magic)) - denorm_magic;
  // normal: rebias, then round to nearest even on the 13 dropped bits
  const uint32_t mant_odd = (u >> 13) & 1u;
  const uint32_t normal = (u + ((15u - 127u) << 23) + 0xfffu + mant_odd) >> 13;
  const uint32_t magnitude =
      u >= f16_overflow ? special : (u < f16_min_normal ? subnormal : normal);
  return static_cast<uint16_t>(magnitude | (sign >> 16));
#endif
}

// Bulk fp16 <-> fp32 conversions for the CPU variants with F16C (and AVX-512):
// one instruction per 8 or 16 values. GCC does not vectorize scalar fp16
// conversions (F16C intrinsics and _Float16 casts stay one element per
// instruction, GCC 12, also with AVX512-FP16), so the CPU loops convert their
// fp16 buffers a chunk at a time with these (csrc/cpu/loops.h Io / In). Rounding
// to nearest even whatever MXCSR says; NaN, infinities, subnormals and ties as
// f16_to_float / float_to_f16 above, bit for bit (tests/test_cpu_ext.py tries
// every half and a sweep of floats on each variant); the tails take those.
#if defined(FUSEDWD_HW_F16)

inline void f16_to_float_n(const uint16_t* in, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    // (maskz with every lane: the plain intrinsic starts from GCC 12's _mm512_undefined_ps,
    // which -Wmaybe-uninitialized reports)
    _mm512_storeu_ps(out + i,
                     _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i))));
  }
#endif
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  }
  for (; i < n; ++i) out[i] = f16_to_float(in[i]);
}

inline void float_to_f16_n(const float* in, uint16_t* out, int64_t n) {
  constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm512_maskz_cvtps_ph(0xFFFF, _mm512_loadu_ps(in + i), kRne));
  }
#endif
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(in + i), kRne));
  }
  for (; i < n; ++i) out[i] = float_to_f16(in[i]);
}
#endif

// Storage type and math type of each DType: 16-bit formats compute in fp32,
// fp64 in fp64.
template <DType D>
struct Storage;
template <>
struct Storage<DType::F32> {
  using type = float;
  using math = float;
};
template <>
struct Storage<DType::F16> {
  using type = uint16_t;
  using math = float;
};
template <>
struct Storage<DType::BF16> {
  using type = uint16_t;
  using math = float;
};
template <>
struct Storage<DType::F64> {
  using type = double;
  using math = double;
};

template <DType D>
using storage_t = typename Storage<D>::type;
template <DType D>
using math_t = typename Storage<D>::math;

template <DType D>
FUSEDWD_HD inline math_t<D> load(const storage_t<D>* ptr, int64_t i) {
  if constexpr (D == DType::F16) {
    return f16_to_float(ptr[i]);
  } else if constexpr (D == DType::BF16) {
    return bf16_to_float(ptr[i]);
  } else {
    return ptr[i];
  }
}

template <DType D>
FUSEDWD_HD inline void store(storage_t<D>* ptr, int64_t i, math_t<D> x) {
  if constexpr (D == DType::F16) {
    ptr[i] = float_to_f16(x);
  } else if constexpr (D == DType::BF16) {
    ptr[i] = float_to_bf16(x);
  } else {
    ptr[i] = x;
  }
}

// x as it reads back once stored in D (rounded to nearest even for 16-bit storage).
template <DType D>
FUSEDWD_HD inline math_t<D> as_stored(math_t<D> x) {
  if constexpr (D == DType::F16) {
    return f16_to_float(float_to_f16(x));
  } else if constexpr (D == DType::BF16) {
    return bf16_to_float(float_to_bf16(x));
  } else {
    return x;
  }
}

// ---------------------------------------------------------------- stochastic rounding
// docs/math.md#stochastic-rounding; reference: fusedwd.reference.stochastic_round_bf16.
// The random bits of an element are a hash of (seed, parameter salt, step, element
// index): reproducible, and independent of how tensors are bucketed or split
// between threads and blocks.

// murmur3's 32-bit finalizer: every input bit affects every output bit.
FUSEDWD_HD inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// Per segment and step: the key every element's bits derive from.
FUSEDWD_HD inline uint32_t sr_key(uint64_t seed, int64_t salt, double t) {
  uint32_t k = mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32) + 0x9e3779b9u));
  k = mix32(k ^ static_cast<uint32_t>(salt));
  return mix32(k + static_cast<uint32_t>(static_cast<int64_t>(t)) * 0x9e3779b9u);
}

// 32 random bits for element i of the segment (indices past 2^32 fold their high half in).
FUSEDWD_HD inline uint32_t sr_bits(uint32_t key, int64_t i) {
  const uint64_t u = static_cast<uint64_t>(i);
  return mix32(key ^ static_cast<uint32_t>(u ^ (u >> 32)) * 0x27d4eb2fu);
}

// Unbiased rounding of an fp32 to bf16: add 16 random bits below the kept ones and
// truncate, so x rounds up with probability (x - down)/(up - down). NaN and Inf are
// kept (NaN quieted, as by float_to_bf16).
FUSEDWD_HD inline uint16_t float_to_bf16_sr(float x, uint32_t bits) {
  const uint32_t u = float_bits(x);
  const uint32_t magnitude = u & 0x7fffffffu;
  const uint32_t rounded = (u + (bits & 0xffffu)) >> 16;
  const uint32_t special = magnitude > 0x7f800000u ? ((u >> 16) | 0x0040u) : (u >> 16);
  return static_cast<uint16_t>(magnitude >= 0x7f800000u ? special : rounded);
}

// ---------------------------------------------------------------- parameter access
// A parameter is read from its fp32 master copy when there is one (MASTER), and
// written to both: the master exactly, the parameter rounded to nearest even, or
// stochastically when SR (bf16 parameters without a master).
template <DType P, bool MASTER>
FUSEDWD_HD inline math_t<P> load_param(const storage_t<P>* p, const float* master, int64_t i) {
  if constexpr (MASTER) {
    return master[i];
  } else {
    return load<P>(p, i);
  }
}

template <DType P, bool MASTER, bool SR>
FUSEDWD_HD inline void store_param(storage_t<P>* p, float* master, int64_t i, math_t<P> x, uint32_t key) {
  if constexpr (MASTER) {
    master[i] = x;
    store<P>(p, i, x);
  } else if constexpr (SR) {
    static_assert(P == DType::BF16, "stochastic rounding stores bf16 parameters");
    p[i] = float_to_bf16_sr(x, sr_bits(key, i));
  } else {
    store<P>(p, i, x);
  }
}

FUSEDWD_HD inline float sqrt_m(float x) { return ::sqrtf(x); }
FUSEDWD_HD inline double sqrt_m(double x) { return ::sqrt(x); }

// The rules' shared pieces that decide how Inf and NaN spread (docs/math.md#non-finite-values),
// written as torch writes them.

// A per-segment yes/no that the element math selects on (has_l2, lerp's start...), held as
// 1 or 0 in the math type M. GCC vectorizes a select on a compare of an invariant M, but
// not on a bool read from the segment's scalars unless it unswitches the loop, which it
// does only for small bodies: with bool flags AMSGrad's loops with 16-bit states or
// 16-bit parameters stayed scalar (3-6x slower per element). Trivial, so the CUDA
// kernel's shared-memory segment slots may hold it.
template <typename M>
struct Flag {
  M on;
  Flag() = default;
  FUSEDWD_HD Flag(bool yes) : on(yes ? M(1) : M(0)) {}
  FUSEDWD_HD operator bool() const { return on != M(0); }
};

// g <- grad_sign*g (+ l2*p only where there is L2 decay: torch adds the term only for a
// nonzero weight_decay, and 0*Inf would turn an infinite parameter into NaN).
template <typename M>
FUSEDWD_HD inline M decayed_grad(M g, M p, M grad_sign, M l2, Flag<M> has_l2) {
  g = grad_sign * g;
  return has_l2 ? g + l2 * p : g;
}

// torch's lerp(a, b, w) with a per-segment weight (aten/src/ATen/native/Lerp.h):
// a + w*(b - a) for |w| < 0.5, else b - (b - a)*(1 - w), here b + (b - a)*(w - 1), the
// same bits. Unlike b1*a + (1-b1)*b, it gives NaN where a and b are the same infinity.
template <typename M>
struct LerpWeight {
  M coeff;        // w, or w - 1 when |w| >= 0.5
  Flag<M> small;  // |w| < 0.5: start from a, else from b
};

template <typename M>
FUSEDWD_HD inline LerpWeight<M> lerp_weight(double w) {
  const M wm = static_cast<M>(w);
  const bool small = (wm < M(0) ? -wm : wm) < M(0.5);
  return LerpWeight<M>{small ? wm : wm - M(1), small};
}

template <typename M>
FUSEDWD_HD inline M lerp_m(M a, M b, const LerpWeight<M>& w) {
  return (w.small ? a : b) + w.coeff * (b - a);
}

// torch.maximum: NaN if either is NaN (a plain a >= b ? a : b would drop a NaN in a).
template <typename M>
FUSEDWD_HD inline M maximum_m(M a, M b) {
  return (b > a || b != b) ? b : a;
}

FUSEDWD_NS_END
