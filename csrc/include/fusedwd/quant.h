// 8-bit blockwise states: the only C++ copy of the code (CPU loops; the GPU
// kernels include it too). docs/quantization.md; reference: fusedwd.quant.
//
// A state is cut into blocks of kQuantBlock elements from its tensor's first
// element, the last block partial; each block keeps one fp32 absmax and one
// byte per element. The quartic code: a normalized magnitude y = |x|/absmax is
// stored as k = rint(K * y^(1/4)) and decoded as (k/K)^4, every step an IEEE
// fp32 operation rounded to nearest even. Signed (m, momentum, grad_avg):
// K = 127, byte = 127 +- k. Unsigned (v, square_avg): K = 255, byte = k, and a
// positive value never takes the zero code, so Adam's denominator never decodes
// to 0 where v is not.
#pragma once

#include <cmath>
#include <cstdint>

#include "fusedwd/common.h"

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

// Round half to even of 0 <= x < 2^22 by the float adder (the default rounding
// mode): exact, and vectorizable where rintf is not always.
FUSEDWD_HD inline float q_rint(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return (x + magic) - magic;
}

// One byte, given the block's inverse absmax (the block is finite and normal).
FUSEDWD_HD inline uint8_t q_encode(float x, float inv, bool is_signed) {
  // selects and bit operations only (no && / branches), so the CPU loops vectorize;
  // x is finite here (the block was checked)
  // (ternaries, not fminf/fmaxf, whose IEEE rules GCC does not vectorize)
  const float mag = is_signed ? ::fabsf(x) : (x > 0.0f ? x : 0.0f);
  const float prod = mag * inv;
  const float y = prod < 1.0f ? prod : 1.0f;
  const float k = q_rint(sqrt_m(sqrt_m(y)) * static_cast<float>(is_signed ? kSignedLevels : kUnsignedLevels));
  if (is_signed) return static_cast<uint8_t>(static_cast<int>(static_cast<float>(kSignedZero) + (x > 0.0f ? k : -k)));
  // the zero rule: a positive value takes at least code 1
  const float floor_code = x > 0.0f ? 1.0f : 0.0f;
  return static_cast<uint8_t>(static_cast<int>(k > floor_code ? k : floor_code));
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
  float a = 0.0f;
  int bad = 0;
#pragma omp simd reduction(max : a) reduction(| : bad)
  for (int64_t j = 0; j < n; ++j) {
    const float m = ::fabsf(x[j]);
    bad |= !(m <= 3.4028234663852886e38f);  // NaN or Inf
    a = a >= m ? a : m;
  }
  const uint8_t zero = SIGNED ? kSignedZero : 0;
  if (bad || !(a >= 1.1754943508222875e-38f)) {
    *absmax = bad ? NAN : 0.0f;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) codes[j] = zero;
    return;
  }
  const float inv = 1.0f / a;
  *absmax = a;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) codes[j] = q_encode(x[j], inv, SIGNED);
}

FUSEDWD_NS_END
