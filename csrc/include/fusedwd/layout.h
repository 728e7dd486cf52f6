// Column layout of the segment table (int64) and the control block (float32);
// docs/design.md is the contract, fusedwd/_buckets.py the writer.
#pragma once

#include "fusedwd/common.h"

FUSEDWD_NS_BEGIN

// One int64 row per tensor.
enum SegCol : int {
  SEG_P = 0,      // address of the parameter's first element
  SEG_G = 1,      // address of the gradient's first element (dtype of p)
  SEG_S0 = 2,     // the rule's state 0 (AdamW exp_avg, SGDW momentum_buffer, ...), or 0
  SEG_S1 = 3,     // state 1 (AdamW exp_avg_sq, RMSpropW grad_avg, ...), or 0
  SEG_S2 = 4,     // state 2 (AdamW max_exp_avg_sq, RMSpropW momentum_buffer, ...), or 0
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

// The hyperparameter table: one float64 row per param group, its columns the
// rule's (each rule header's Col, in fusedwd/rules/<rule>.py's order).

FUSEDWD_NS_END
