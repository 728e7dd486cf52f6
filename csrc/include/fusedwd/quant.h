// 8-bit blockwise states: the only C++ copy of the code (CPU loops; the GPU
// kernels include it too). docs/quantization.md; reference: fusedwd.quant.
//
// A state is cut into blocks of kQuantBlock elements from its tensor's first
// element, the last block partial; each block keeps one fp32 absmax and one
// byte per element. The quartic code: a normalized magnitude y = |x|/absmax is
// stored as k = rint(K * y^(1/4)), exactly: the number of thresholds
// ((j - 1/2)/K)^4 it reaches, and decoded as (k/K)^4, every step an IEEE fp32
// operation rounded to nearest even. Signed (m, momentum, grad_avg):
// K = 127, byte = 127 +- k. Unsigned (v, square_avg): K = 255, byte = k, and a
// positive value never takes the zero code, so Adam's denominator never decodes
// to 0 where v is not.
#pragma once

#include <cmath>
#include <cstdint>

#include "fusedwd/common.h"

#if !defined(__CUDACC__) && (defined(__AVX512F__) || defined(__AVX2__))
#include <immintrin.h>  // the vector guess of the AVX2 and AVX-512 CPU variants
#endif

FUSEDWD_NS_BEGIN

constexpr int64_t kQuantBlock = 256;
constexpr int kSignedLevels = 127;
constexpr int kUnsignedLevels = 255;
constexpr uint8_t kSignedZero = 127;

// float32(1/K), so K * rcp rounds to exactly 1.0: the top code decodes to 1.
FUSEDWD_HD inline float q_rcp(bool is_signed) { return bits_float(is_signed ? 0x3C010204u : 0x3B808081u); }

// (k/K)^4 as three fp32 products.
FUSEDWD_HD inline float q_magnitude(float k, float rcp) {
  const float t = k * rcp;
  const float t2 = t * t;
  return t2 * t2;
}

// Branch-free (selects only), so the CPU loops vectorize.
FUSEDWD_HD inline float q_decode(uint8_t byte, float absmax, bool is_signed) {
  if (is_signed) {
    // byte 255 is never written; it decodes to 1.0 like 254
    const float s = static_cast<float>(byte) - static_cast<float>(kSignedZero);
    const float a = ::fabsf(s);
    const float mag = q_magnitude(a < kSignedLevels ? a : static_cast<float>(kSignedLevels), q_rcp(true));
    return ::copysignf(mag, s) * absmax;  // s = 0: +0
  }
  return q_magnitude(static_cast<float>(byte), q_rcp(false)) * absmax;
}

// The decision threshold between codes j - 1 and j (j = 1..K): the decoded
// magnitude of the half code j - 1/2, ((j - 1/2)/K)^4 by q_magnitude's three
// fp32 products. Increasing in j; threshold K + 1 exceeds 1.
FUSEDWD_HD inline float q_threshold(float j, float rcp) { return q_magnitude(j - 0.5f, rcp); }

// The code of a normalized magnitude 0 <= y <= 1 from a guess x of K * y^(1/4)
// within half a code: f = floor(x) leaves one threshold in doubt, f + 1's (the
// half code f + 1/2), settled by one exact comparison. So the result does not
// depend on how the guess was made, only on its being that close.
FUSEDWD_HD inline int q_settle(float y, float x, float rcp) {
  const int f = static_cast<int>(x);  // x >= 0: truncation is floor
  const float t = (static_cast<float>(f) + 0.5f) * rcp;
  const float t2 = t * t;
  return f + (y >= t2 * t2 ? 1 : 0);
}

// The code of a normalized magnitude 0 <= y <= 1: the number of thresholds
// q_threshold(j), j = 1..K, that y reaches (fusedwd.quant's definition), found
// without a square root (two correctly rounded ones per state made the CPU
// step compute-bound). The guess is IEEE fp32 arithmetic only, the same on
// every backend; tests/test_int8.py checks the result against the count for
// every float y in [0, 1] on each CPU variant.
FUSEDWD_HD inline int q_level(float y, bool is_signed) {
  // s ~ 1.1 * y^(-1/4) from the bit pattern: a quarter of the exponent, the
  // mantissa as its linear interpolation (z = y * s^4 lies in [0.75, 0.95]
  // for every y >= 2^-126; below, s is bounded and y * s^3 tiny, so x is too)
  const float s = bits_float(0x4F500000u - (float_bits(y) >> 2));
  const float s2 = s * s;
  const float ys2 = y * s2;
  const float z = ys2 * s2;
  // y^(1/4) = y s^3 * z^(-3/4); K z^(-3/4) by a quadratic on [0.75, 0.95]
  // (relative error 2.5e-4, fitted once; the constants are exact fp32 bits):
  // x is within 0.06 codes of K * y^(1/4), and >= 0
  const float c2 = bits_float(is_signed ? 0x4303CF1Au : 0x438453F3u);
  const float c1 = bits_float(is_signed ? 0xC3AFDC45u : 0xC4308D84u);
  const float c0 = bits_float(is_signed ? 0x43AD98A0u : 0x442E4796u);
  const float x = (ys2 * s) * ((c2 * z + c1) * z + c0);
  return q_settle(y, x, q_rcp(is_signed));
}

// The normalized magnitude an element encodes, given the block's inverse absmax.
FUSEDWD_HD inline float q_normalized(float x, float inv, bool is_signed) {
  // (ternaries, not fminf/fmaxf, whose IEEE rules GCC does not vectorize)
  const float mag = is_signed ? ::fabsf(x) : (x > 0.0f ? x : 0.0f);
  const float prod = mag * inv;
  return prod < 1.0f ? prod : 1.0f;
}

// The byte of code k for an element of sign x.
FUSEDWD_HD inline uint8_t q_byte(float x, int k, bool is_signed) {
  if (is_signed) return static_cast<uint8_t>(x > 0.0f ? kSignedZero + k : kSignedZero - k);
  // the zero rule: a positive value takes at least code 1
  const int floor_code = x > 0.0f ? 1 : 0;
  return static_cast<uint8_t>(k > floor_code ? k : floor_code);
}

// One byte, given the block's inverse absmax (the block is finite and normal).
// Selects and bit operations only (no && / branches), so the CPU loops vectorize.
FUSEDWD_HD inline uint8_t q_encode(float x, float inv, bool is_signed) {
  return q_byte(x, q_level(q_normalized(x, inv, is_signed), is_signed), is_signed);
}

// The CPU variants with AVX2 or AVX-512 guess with the hardware's reciprocal
// square root estimate instead: r = rsqrt(rsqrt(y)) ~ y^(1/4). Its error is
// bounded by the ISA, whatever the implementation (AMD's and Intel's tables
// differ): |relative error| <= 1.5 * 2^-12 (rsqrtps) or 2^-14 (vrsqrt14ps), so
// K r is within 0.14 codes (0.03) and q_settle makes the code exact. y = 0
// (and a subnormal y, which rsqrtps reads as 0) gives rsqrt = +inf, then 0:
// code 0, as it must be (threshold 1 is 1.5e-11). Twice the speed of q_level's
// portable guess; tests/test_int8.py checks it for every float y in [0, 1].
#if !defined(__CUDACC__) && defined(__AVX512F__)
#define FUSEDWD_Q_LANES 16

// (the maskz forms with every lane set: the plain ones start from GCC 12's
// _mm512_undefined_*, which -Wmaybe-uninitialized reports)
inline __m512i q_level_v(__m512 y, bool is_signed) {
  const __mmask16 all = 0xFFFF;
  const __m512 x = _mm512_mul_ps(_mm512_maskz_rsqrt14_ps(all, _mm512_maskz_rsqrt14_ps(all, y)),
                                 _mm512_set1_ps(is_signed ? kSignedLevels : kUnsignedLevels));
  const __m512i f = _mm512_maskz_cvttps_epi32(all, x);
  __m512 t = _mm512_mul_ps(_mm512_add_ps(_mm512_maskz_cvtepi32_ps(all, f), _mm512_set1_ps(0.5f)),
                           _mm512_set1_ps(q_rcp(is_signed)));
  t = _mm512_mul_ps(t, t);
  t = _mm512_mul_ps(t, t);
  return _mm512_mask_add_epi32(f, _mm512_cmp_ps_mask(y, t, _CMP_GE_OQ), f, _mm512_set1_epi32(1));
}

// FUSEDWD_Q_LANES codes of x[0..16) into codes[0..16), as q_encode.
inline void q_encode_v(const float* x, float inv, uint8_t* codes, bool is_signed) {
  const __m512 v = _mm512_loadu_ps(x);
  const __m512 zero = _mm512_setzero_ps();
  const __mmask16 all = 0xFFFF;
  const __m512 mag = is_signed ? _mm512_abs_ps(v) : _mm512_maskz_max_ps(all, v, zero);
  const __m512 y = _mm512_maskz_min_ps(all, _mm512_mul_ps(mag, _mm512_set1_ps(inv)), _mm512_set1_ps(1.0f));
  const __m512i k = q_level_v(y, is_signed);
  const __mmask16 pos = _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ);
  __m512i b;
  if (is_signed) {
    const __m512i z = _mm512_set1_epi32(kSignedZero);
    b = _mm512_mask_add_epi32(_mm512_sub_epi32(z, k), pos, z, k);
  } else {
    b = _mm512_mask_max_epi32(k, pos, k, _mm512_set1_epi32(1));  // the zero rule
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_maskz_cvtepi32_epi8(0xFFFF, b));
}

// The codes of 16 values of y (the tests' exhaustive check).
inline void q_levels_v(const float* y, int32_t* k, bool is_signed) {
  _mm512_storeu_si512(k, q_level_v(_mm512_loadu_ps(y), is_signed));
}
#elif !defined(__CUDACC__) && defined(__AVX2__)
#define FUSEDWD_Q_LANES 8

inline __m256i q_level_v(__m256 y, bool is_signed) {
  const __m256 x = _mm256_mul_ps(_mm256_rsqrt_ps(_mm256_rsqrt_ps(y)),
                                 _mm256_set1_ps(is_signed ? kSignedLevels : kUnsignedLevels));
  const __m256i f = _mm256_cvttps_epi32(x);
  __m256 t = _mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(f), _mm256_set1_ps(0.5f)),
                           _mm256_set1_ps(q_rcp(is_signed)));
  t = _mm256_mul_ps(t, t);
  t = _mm256_mul_ps(t, t);
  // the comparison's all-ones lanes are -1: subtracting adds one
  return _mm256_sub_epi32(f, _mm256_castps_si256(_mm256_cmp_ps(y, t, _CMP_GE_OQ)));
}

inline void q_encode_v(const float* x, float inv, uint8_t* codes, bool is_signed) {
  const __m256 v = _mm256_loadu_ps(x);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 mag = is_signed ? _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v) : _mm256_max_ps(v, zero);
  const __m256 y = _mm256_min_ps(_mm256_mul_ps(mag, _mm256_set1_ps(inv)), _mm256_set1_ps(1.0f));
  const __m256i k = q_level_v(y, is_signed);
  const __m256i pos = _mm256_castps_si256(_mm256_cmp_ps(v, zero, _CMP_GT_OQ));
  __m256i b;
  if (is_signed) {
    const __m256i z = _mm256_set1_epi32(kSignedZero);
    b = _mm256_blendv_epi8(_mm256_sub_epi32(z, k), _mm256_add_epi32(z, k), pos);
  } else {
    b = _mm256_max_epi32(k, _mm256_and_si256(pos, _mm256_set1_epi32(1)));  // the zero rule
  }
  // 8 int32 (0..255) to 8 bytes
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(codes), _mm_packus_epi16(w, w));
}

inline void q_levels_v(const float* y, int32_t* k, bool is_signed) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(k), q_level_v(_mm256_loadu_ps(y), is_signed));
}
#endif

// codes[j] = q_encode(x[j], inv, SIGNED), j < n: by the vector guess where the
// variant has one, q_level's for the rest; the same bytes either way.
template <bool SIGNED>
inline void q_encode_values(const float* x, int64_t n, float inv, uint8_t* codes) {
  int64_t j = 0;
#if defined(FUSEDWD_Q_LANES)
  for (; j + FUSEDWD_Q_LANES <= n; j += FUSEDWD_Q_LANES) q_encode_v(x + j, inv, codes + j, SIGNED);
#endif
#pragma omp simd
  for (int64_t i = j; i < n; ++i) codes[i] = q_encode(x[i], inv, SIGNED);
}

// k[j] = the code of y[j], j < n, by the path q_encode_values takes (vector=true)
// or by q_level alone: the tests' exhaustive check of both.
inline void q_levels(const float* y, int64_t n, int32_t* k, bool is_signed, bool vector) {
  int64_t j = 0;
#if defined(FUSEDWD_Q_LANES)
  if (vector) {
    for (; j + FUSEDWD_Q_LANES <= n; j += FUSEDWD_Q_LANES) q_levels_v(y + j, k + j, is_signed);
  }
#else
  (void)vector;
#endif
#pragma omp simd
  for (int64_t i = j; i < n; ++i) k[i] = q_level(y[i], is_signed);
}

// What a block's absmax reduction takes of each element: |x|, or +inf for a NaN or an
// infinite x, so that a plain max over the block (a GPU block's warp shuffles) yields both
// its largest magnitude and whether it is poisoned. Never NaN.
FUSEDWD_HD inline float q_absmax_key(float x) {
  const float m = ::fabsf(x);
  return m <= 3.4028234663852886e38f ? m : INFINITY;
}

// From the max of q_absmax_key over a block: the absmax q_encode_block stores (NaN for a
// poisoned block, 0 below the smallest normal, else the max) and the inverse q_encode
// takes. Returns false when every byte of the block is the zero code.
FUSEDWD_HD inline bool q_block_scale(float key_max, float* absmax, float* inv) {
  const bool bad = !(key_max <= 3.4028234663852886e38f);
  if (bad || !(key_max >= 1.1754943508222875e-38f)) {
    *absmax = bad ? NAN : 0.0f;
    *inv = 0.0f;
    return false;
  }
  *absmax = key_max;
  *inv = 1.0f / key_max;
  return true;
}

// The byte that decodes to 0.
FUSEDWD_HD inline uint8_t q_zero_code(bool is_signed) { return is_signed ? kSignedZero : 0; }

// Encodes x[0, n) (n <= kQuantBlock) into codes[0, n) and *absmax: the block's
// largest magnitude; NaN (every byte the zero code) if an element is NaN or
// infinite, so the state stays visibly poisoned; 0 below the smallest normal.
template <bool SIGNED>
inline void q_encode_block(const float* x, int64_t n, uint8_t* codes, float* absmax) {
  // The largest |x| as the largest bit pattern with the sign cleared: non-negative
  // floats order as their bits, and +inf (0x7F800000) and every NaN lie above every
  // finite value, so one integer max finds the absmax and whether the block is
  // poisoned (a float max would need a NaN flag beside it, and GCC vectorized that
  // reduction as a serial compare-and-blend chain: a third of the encode's time).
  uint32_t top = 0;
#pragma omp simd reduction(max : top)
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = float_bits(x[j]) & 0x7FFFFFFFu;
    top = top > u ? top : u;
  }
  const uint8_t zero = SIGNED ? kSignedZero : 0;
  if (top >= 0x7F800000u || top < 0x00800000u) {  // NaN or inf; below the smallest normal
    *absmax = top >= 0x7F800000u ? NAN : 0.0f;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) codes[j] = zero;
    return;
  }
  const float a = bits_float(top);
  *absmax = a;
  q_encode_values<SIGNED>(x, n, 1.0f / a, codes);
}

FUSEDWD_NS_END
