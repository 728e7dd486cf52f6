// Column layout of the segment table (int64) and of the hyperparameter tables
// (float64); docs/design.md is the contract, fusedwd/_buckets.py the writer.
#pragma once

#include "fusedwd/common.h"

FUSEDWD_NS_BEGIN

// One int64 row per tensor.
enum SegCol : int {
  SEG_P = 0,      // address of the parameter's first element
  SEG_G = 1,      // address of the gradient's first element (dtype of p)
  SEG_S0 = 2,     // state 0: AdamW exp_avg, SGDW momentum_buffer, RMSpropW square_avg
  SEG_S1 = 3,     // state 1: AdamW exp_avg_sq, RMSpropW grad_avg, or 0
  SEG_S2 = 4,     // state 2: AdamW max_exp_avg_sq, RMSpropW momentum_buffer, or 0
  SEG_STEP = 5,   // address of the float32 step count (read t, use t+1, write t+1)
  SEG_N = 6,      // number of elements
  SEG_HP = 7,     // row index into the hyperparameter table
  SEG_INDEX = 8,  // index of the parameter inside its bucket (unused by kernels)
  SEG_MASTER = 9,  // address of the fp32 master copy of p (master weights), or 0
  SEG_SALT = 10,   // the parameter's stochastic-rounding salt (its index in the optimizer)
  SEG_A0 = 11,     // 8-bit states: address of state 0's fp32 block absmax (quant.h), or 0
  SEG_A1 = 12,     // ... of state 1
  SEG_A2 = 13,     // ... of state 2
  SEG_COLS = 14,
};

// The per-launch control block (float32, on the tensors' device), written by the
// optimizer from GradScaler's grad_scale / found_inf and the clipping norm; kernels
// read it, so a skipped or scaled step needs no host read.
enum Ctl : int {
  CTL_INV_SCALE = 0,  // 1 / grad_scale (1 without AMP)
  CTL_FOUND_INF = 1,  // nonzero: skip the step, write nothing (step counts included)
  CTL_CLIP = 2,       // gradient-norm clip coefficient (1 without clipping)
  CTL_SIZE = 3,
};

// The control block's two readings, one copy for every backend (ctl may be null:
// no AMP, no clipping). A NaN found_inf skips too.
FUSEDWD_HD inline bool ctl_skips(const float* ctl) { return ctl != nullptr && ctl[CTL_FOUND_INF] != 0.0f; }

// What every gradient is multiplied by: 1/grad_scale times the clip coefficient,
// their fp32 product widened to double (folded into each segment's grad_sign).
FUSEDWD_HD inline double ctl_grad_mult(const float* ctl) {
  return ctl == nullptr ? 1.0 : static_cast<double>(ctl[CTL_INV_SCALE] * ctl[CTL_CLIP]);
}

// One float64 row per param group, per rule.
enum AdamWHp : int {
  ADAMW_LR = 0,
  ADAMW_BETA1 = 1,
  ADAMW_BETA2 = 2,
  ADAMW_EPS = 3,
  ADAMW_DECAY_MULT = 4,
  ADAMW_L2 = 5,
  ADAMW_GRAD_SIGN = 6,
  ADAMW_HP_COLS = 7,
};

enum SgdwHp : int {
  SGDW_LR = 0,
  SGDW_MOMENTUM = 1,
  SGDW_DAMPENING = 2,
  SGDW_DECAY_MULT = 3,
  SGDW_L2 = 4,
  SGDW_GRAD_SIGN = 5,
  SGDW_HP_COLS = 6,
};

enum RmspropwHp : int {
  RMSPROPW_LR = 0,
  RMSPROPW_ALPHA = 1,
  RMSPROPW_EPS = 2,
  RMSPROPW_MOMENTUM = 3,
  RMSPROPW_DECAY_MULT = 4,
  RMSPROPW_L2 = 5,
  RMSPROPW_GRAD_SIGN = 6,
  RMSPROPW_HP_COLS = 7,
};

FUSEDWD_NS_END
