"""The Triton kernels: one elementwise helper per rule, one kernel per rule.

Every kernel runs one program per block of ``BLOCK_SIZE`` elements of one
segment (one tensor) of a bucket, over all of the bucket's segments at once
(docs/backends.md#the-triton-kernels). A program finds its segment by binary
search over the first block of each segment, reads the segment's row of the
int64 segment table (docs/design.md#segment-table) and its param group's row
of the float64 hyperparameter table, and updates its slice in place. A full
block whose buffers are all 16-byte aligned (checked at run time: Triton
cannot know it of addresses read from a table) is updated without a mask, so
it compiles to 128-bit accesses; other blocks take the masked path. Both call
the same per-rule block function.

The element math lives in ``_adamw_update``, ``_sgdw_update`` and
``_rmspropw_update``, written in the order of csrc/include/fusedwd/<rule>.h so
that both backends round alike. Divisions and square roots are the IEEE
round-to-nearest ones (``tl.div_rn`` and ``tl.sqrt_rn`` in float32, where
Triton's defaults are approximate on NVIDIA GPUs), and the launchers compile
with ``enable_fp_fusion=False`` so that no multiply-add is contracted, as the
C++ kernels are built with ``-ffp-contract=off``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import _buckets

# Segment-table columns (docs/design.md#segment-table), from the Python writer.
SEG_P = tl.constexpr(_buckets.SEG_P)
SEG_G = tl.constexpr(_buckets.SEG_G)
SEG_S0 = tl.constexpr(_buckets.SEG_S0)
SEG_S1 = tl.constexpr(_buckets.SEG_S1)
SEG_S2 = tl.constexpr(_buckets.SEG_S2)
SEG_STEP = tl.constexpr(_buckets.SEG_STEP)
SEG_N = tl.constexpr(_buckets.SEG_N)
SEG_HP = tl.constexpr(_buckets.SEG_HP)
SEG_COLS = tl.constexpr(_buckets.SEG_COLS)

# Hyperparameter-table columns (docs/design.md#hyperparameter-table), as in
# csrc/include/fusedwd/layout.h; tests/test_triton.py checks them against each
# wrapper's _HP_NAMES.
ADAMW_LR, ADAMW_BETA1, ADAMW_BETA2, ADAMW_EPS, ADAMW_DECAY_MULT, ADAMW_L2, ADAMW_GRAD_SIGN, ADAMW_HP_COLS = (
    tl.constexpr(i) for i in range(8))
SGDW_LR, SGDW_MOMENTUM, SGDW_DAMPENING, SGDW_DECAY_MULT, SGDW_L2, SGDW_GRAD_SIGN, SGDW_HP_COLS = (
    tl.constexpr(i) for i in range(7))
RMSPROPW_LR, RMSPROPW_ALPHA, RMSPROPW_EPS, RMSPROPW_MOMENTUM, RMSPROPW_DECAY_MULT, RMSPROPW_L2, RMSPROPW_GRAD_SIGN, \
    RMSPROPW_HP_COLS = (tl.constexpr(i) for i in range(8))

# The tables are read with scalar loads, so their alignment buys nothing:
# specializing on it would only compile more variants.
_TABLE_ARGS = ["seg_ptr", "block_start_ptr", "arrivals_ptr", "hp_ptr", "nseg"]


# ------------------------------------------------------------------ segments
@triton.jit
def _locate(seg_ptr, block_start_ptr, nseg, BLOCK_SIZE: tl.constexpr):
    """This program's segment row, element offsets and mask, vector-path flag, segment index and block count."""
    block = tl.program_id(0).to(tl.int64)
    # the last segment whose first block is <= this block (block_start[0] == 0)
    lo = tl.full((), 0, tl.int64)
    hi = nseg.to(tl.int64)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(block_start_ptr + mid) <= block:
            lo = mid
        else:
            hi = mid
    seg = lo
    first = tl.load(block_start_ptr + seg)
    nblocks = tl.load(block_start_ptr + seg + 1) - first
    row = seg_ptr + seg * SEG_COLS
    # int64 offsets: a segment may hold more than 2^31 elements
    start = (block - first) * BLOCK_SIZE
    offs = start + tl.arange(0, BLOCK_SIZE).to(tl.int64)
    n = tl.load(row + SEG_N)
    mask = offs < n
    # A full block whose buffers all start 16-byte aligned needs no mask and may use
    # 128-bit accesses; Triton cannot know either from addresses read out of a table.
    # Unused state columns hold 0, which is aligned.
    addresses = (tl.load(row + SEG_P) | tl.load(row + SEG_G) | tl.load(row + SEG_S0) | tl.load(row + SEG_S1)
                 | tl.load(row + SEG_S2))
    vector = (start + BLOCK_SIZE <= n) & ((addresses & 15) == 0)
    return row, offs, mask, vector, seg, nblocks


@triton.jit
def _take_step(row, arrival_ptr, nblocks):
    """The 1-based step t this launch takes for the segment (float64); advances the stored count once.

    Every block of the segment reads the float32 count t0 before it arrives
    (an acq_rel atomic on the segment's arrival counter, zeroed by the launcher
    for each launch); the last block to arrive writes t0 + 1. The barrier
    orders every thread's read of t0 before the single-thread atomic, and the
    atomic's release/acquire orders those reads before the last block's write,
    so no block can read the advanced count.
    """
    step_ptr = tl.load(row + SEG_STEP).to(tl.pointer_type(tl.float32))
    t0 = tl.load(step_ptr)
    tl.debug_barrier()
    arrived = tl.atomic_add(arrival_ptr, 1, sem="acq_rel")
    tl.store(step_ptr, t0 + 1.0, mask=arrived == nblocks - 1)
    return t0.to(tl.float64) + 1.0


@triton.jit
def _pow_int(base, exponent):
    """base ** exponent for a float64 base and a non-negative integer exponent, by squaring.

    libdevice's pow is not available to the interpreter, and one code path for
    GPU and interpreter is what the tests check. The 2*log2(t) roundings, even
    magnified by the cancellation in 1 - base^t, stay far below a float32 ulp;
    with float64 storage they reach the last bits of the update.
    """
    result = tl.full((), 1.0, tl.float64)
    power = base
    e = exponent
    while e > 0:
        if e % 2 == 1:
            result = result * power
        power = power * power
        e = e // 2
    return result


# ------------------------------------------------------- storage <-> math type
@triton.jit
def _load(ptr, offs, mask, STORAGE: tl.constexpr, MATH: tl.constexpr):
    """Elements of a storage-dtype buffer, widened exactly to the math type."""
    x = tl.load(ptr + offs, mask=mask)
    if STORAGE == tl.bfloat16:
        # bf16 is the upper half of an fp32: exact, NaN payload kept
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(MATH)


@triton.jit
def _store(ptr, offs, x, mask, STORAGE: tl.constexpr):
    """Round the math-type values to the storage dtype once, to nearest-even, and store them."""
    if STORAGE == tl.bfloat16:
        # Spelled out as in csrc/include/fusedwd/common.h: the interpreter's
        # fp32 -> bf16 cast truncates, and this is RNE on every target.
        u = x.to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        # NaN: truncate and set the quiet bit so rounding can never turn it into Inf
        quiet_nan = (u >> 16) | 0x0040
        is_nan = (u & 0x7FFFFFFF) > 0x7F800000
        bits = tl.where(is_nan, quiet_nan, rounded).to(tl.uint16)
        tl.store(ptr + offs, bits.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        # fp16: a round-to-nearest-even conversion; fp32 and fp64: no conversion
        tl.store(ptr + offs, x.to(STORAGE), mask=mask)


@triton.jit
def _pointer(row, column, STORAGE: tl.constexpr, ALIGNED: tl.constexpr):
    """The buffer whose address is in ``column`` of the segment row, as a STORAGE pointer."""
    ptr = tl.load(row + column).to(tl.pointer_type(STORAGE))
    if ALIGNED:
        # checked at run time by _locate before this path is taken
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _sqrt_rn(x):
    # float32 sqrt and division are approximate on NVIDIA GPUs unless asked for
    # IEEE rounding; float64 ones are always correctly rounded (and the float32
    # intrinsics do not take float64)
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _div_rn(x, y):
    if x.dtype == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y


# -------------------------------------------------------------------- AdamW
@triton.jit
def _adamw_update(p, g, m, v, vmax, grad_sign, l2, decay_mult, beta1, one_minus_beta1, beta2, one_minus_beta2,
                  eps, step_size, bc2_sqrt, AMSGRAD: tl.constexpr):
    # docs/math.md#adamw; reference: fusedwd.reference.adamw
    g = grad_sign * g + l2 * p
    p = p * decay_mult
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * (g * g)
    v_used = v
    if AMSGRAD:
        # written so that a NaN in v propagates into vmax
        vmax = tl.where(vmax >= v, vmax, v)
        v_used = vmax
    denom = _div_rn(_sqrt_rn(v_used), bc2_sqrt) + eps
    p = p - step_size * _div_rn(m, denom)
    return p, m, v, vmax


@triton.jit
def _adamw_block(row, offs, mask, t, hp_ptr, STORAGE: tl.constexpr, MATH: tl.constexpr, AMSGRAD: tl.constexpr,
                 ALIGNED: tl.constexpr):
    # per-segment scalars in float64 from the segment's own step, then rounded to the math type
    hp = hp_ptr + tl.load(row + SEG_HP) * ADAMW_HP_COLS
    beta1 = tl.load(hp + ADAMW_BETA1)
    beta2 = tl.load(hp + ADAMW_BETA2)
    step_size = _div_rn(tl.load(hp + ADAMW_LR), 1.0 - _pow_int(beta1, t.to(tl.int64)))
    bc2_sqrt = _sqrt_rn(1.0 - _pow_int(beta2, t.to(tl.int64)))

    p_ptr = _pointer(row, SEG_P, STORAGE, ALIGNED)
    g_ptr = _pointer(row, SEG_G, STORAGE, ALIGNED)
    m_ptr = _pointer(row, SEG_S0, STORAGE, ALIGNED)  # exp_avg
    v_ptr = _pointer(row, SEG_S1, STORAGE, ALIGNED)  # exp_avg_sq
    p = _load(p_ptr, offs, mask, STORAGE, MATH)
    g = _load(g_ptr, offs, mask, STORAGE, MATH)
    m = _load(m_ptr, offs, mask, STORAGE, MATH)
    v = _load(v_ptr, offs, mask, STORAGE, MATH)
    vmax = v
    if AMSGRAD:
        vmax_ptr = _pointer(row, SEG_S2, STORAGE, ALIGNED)  # max_exp_avg_sq
        vmax = _load(vmax_ptr, offs, mask, STORAGE, MATH)

    p, m, v, vmax = _adamw_update(
        p, g, m, v, vmax,
        tl.load(hp + ADAMW_GRAD_SIGN).to(MATH), tl.load(hp + ADAMW_L2).to(MATH),
        tl.load(hp + ADAMW_DECAY_MULT).to(MATH),
        beta1.to(MATH), (1.0 - beta1).to(MATH), beta2.to(MATH), (1.0 - beta2).to(MATH),
        tl.load(hp + ADAMW_EPS).to(MATH), step_size.to(MATH), bc2_sqrt.to(MATH), AMSGRAD,
    )

    _store(p_ptr, offs, p, mask, STORAGE)
    _store(m_ptr, offs, m, mask, STORAGE)
    _store(v_ptr, offs, v, mask, STORAGE)
    if AMSGRAD:
        _store(vmax_ptr, offs, vmax, mask, STORAGE)


@triton.jit(do_not_specialize=_TABLE_ARGS)
def _adamw_kernel(
    seg_ptr,  # int64 [nseg, SEG_COLS]: the bucket's segment rows (addresses, sizes, hp rows)
    block_start_ptr,  # int64 [nseg + 1]: first block of each segment; the last entry is the grid size
    arrivals_ptr,  # int64 [nseg]: blocks of each segment that have read its step; zeros at launch
    hp_ptr,  # float64 [groups, ADAMW_HP_COLS]: lr, beta1, beta2, eps, decay_mult, l2, grad_sign
    nseg,  # number of segments
    STORAGE: tl.constexpr,  # element type of p, g and every state
    MATH: tl.constexpr,  # tl.float32, or tl.float64 for float64 storage
    AMSGRAD: tl.constexpr,  # keep and use max_exp_avg_sq (state 2)
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    row, offs, mask, vector, seg, nblocks = _locate(seg_ptr, block_start_ptr, nseg, BLOCK_SIZE)
    t = _take_step(row, arrivals_ptr + seg, nblocks)
    if vector:
        _adamw_block(row, offs, None, t, hp_ptr, STORAGE, MATH, AMSGRAD, True)
    else:
        _adamw_block(row, offs, mask, t, hp_ptr, STORAGE, MATH, AMSGRAD, False)


# --------------------------------------------------------------------- SGDW
@triton.jit
def _sgdw_update(p, g, buf, grad_sign, l2, decay_mult, lr, momentum, one_minus_dampening, first_step,
                 HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    # docs/math.md#sgdw; reference: fusedwd.reference.sgdw
    g = grad_sign * g + l2 * p
    p = p * decay_mult
    d = g
    if HAS_MOMENTUM:
        # t == 1: the buffer starts as a copy of g (torch's clone)
        buf = tl.where(first_step, g, momentum * buf + one_minus_dampening * g)
        if NESTEROV:
            d = g + momentum * buf
        else:
            d = buf
    p = p - lr * d
    return p, buf


@triton.jit
def _sgdw_block(row, offs, mask, t, hp_ptr, STORAGE: tl.constexpr, MATH: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                NESTEROV: tl.constexpr, ALIGNED: tl.constexpr):
    hp = hp_ptr + tl.load(row + SEG_HP) * SGDW_HP_COLS
    p_ptr = _pointer(row, SEG_P, STORAGE, ALIGNED)
    g_ptr = _pointer(row, SEG_G, STORAGE, ALIGNED)
    p = _load(p_ptr, offs, mask, STORAGE, MATH)
    g = _load(g_ptr, offs, mask, STORAGE, MATH)
    buf = g
    if HAS_MOMENTUM:
        buf_ptr = _pointer(row, SEG_S0, STORAGE, ALIGNED)  # momentum_buffer
        buf = _load(buf_ptr, offs, mask, STORAGE, MATH)

    p, buf = _sgdw_update(
        p, g, buf,
        tl.load(hp + SGDW_GRAD_SIGN).to(MATH), tl.load(hp + SGDW_L2).to(MATH), tl.load(hp + SGDW_DECAY_MULT).to(MATH),
        tl.load(hp + SGDW_LR).to(MATH), tl.load(hp + SGDW_MOMENTUM).to(MATH),
        (1.0 - tl.load(hp + SGDW_DAMPENING)).to(MATH), t == 1.0, HAS_MOMENTUM, NESTEROV,
    )

    _store(p_ptr, offs, p, mask, STORAGE)
    if HAS_MOMENTUM:
        _store(buf_ptr, offs, buf, mask, STORAGE)


@triton.jit(do_not_specialize=_TABLE_ARGS)
def _sgdw_kernel(
    seg_ptr,  # int64 [nseg, SEG_COLS]: the bucket's segment rows (addresses, sizes, hp rows)
    block_start_ptr,  # int64 [nseg + 1]: first block of each segment; the last entry is the grid size
    arrivals_ptr,  # int64 [nseg]: blocks of each segment that have read its step; zeros at launch
    hp_ptr,  # float64 [groups, SGDW_HP_COLS]: lr, momentum, dampening, decay_mult, l2, grad_sign
    nseg,  # number of segments
    STORAGE: tl.constexpr,  # element type of p, g and the momentum buffer
    MATH: tl.constexpr,  # tl.float32, or tl.float64 for float64 storage
    HAS_MOMENTUM: tl.constexpr,  # momentum != 0: keep momentum_buffer (state 0)
    NESTEROV: tl.constexpr,  # Nesterov momentum
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    row, offs, mask, vector, seg, nblocks = _locate(seg_ptr, block_start_ptr, nseg, BLOCK_SIZE)
    # t == 1 marks the first step, when the momentum buffer starts as a copy of g
    t = _take_step(row, arrivals_ptr + seg, nblocks)
    if vector:
        _sgdw_block(row, offs, None, t, hp_ptr, STORAGE, MATH, HAS_MOMENTUM, NESTEROV, True)
    else:
        _sgdw_block(row, offs, mask, t, hp_ptr, STORAGE, MATH, HAS_MOMENTUM, NESTEROV, False)


# ----------------------------------------------------------------- RMSpropW
@triton.jit
def _rmspropw_update(p, g, sq, ga, buf, grad_sign, l2, decay_mult, lr, alpha, one_minus_alpha, eps, momentum,
                     CENTERED: tl.constexpr, HAS_MOMENTUM: tl.constexpr):
    # docs/math.md#rmspropw; reference: fusedwd.reference.rmspropw
    g = grad_sign * g + l2 * p
    p = p * decay_mult
    sq = alpha * sq + one_minus_alpha * (g * g)
    if CENTERED:
        ga = alpha * ga + one_minus_alpha * g
        avg = _sqrt_rn(sq - ga * ga) + eps
    else:
        avg = _sqrt_rn(sq) + eps
    if HAS_MOMENTUM:
        buf = momentum * buf + _div_rn(g, avg)
        p = p - lr * buf
    else:
        p = p - lr * _div_rn(g, avg)
    return p, sq, ga, buf


@triton.jit
def _rmspropw_block(row, offs, mask, hp_ptr, STORAGE: tl.constexpr, MATH: tl.constexpr, CENTERED: tl.constexpr,
                    HAS_MOMENTUM: tl.constexpr, ALIGNED: tl.constexpr):
    hp = hp_ptr + tl.load(row + SEG_HP) * RMSPROPW_HP_COLS
    alpha = tl.load(hp + RMSPROPW_ALPHA)
    p_ptr = _pointer(row, SEG_P, STORAGE, ALIGNED)
    g_ptr = _pointer(row, SEG_G, STORAGE, ALIGNED)
    sq_ptr = _pointer(row, SEG_S0, STORAGE, ALIGNED)  # square_avg
    p = _load(p_ptr, offs, mask, STORAGE, MATH)
    g = _load(g_ptr, offs, mask, STORAGE, MATH)
    sq = _load(sq_ptr, offs, mask, STORAGE, MATH)
    ga = sq
    buf = sq
    if CENTERED:
        ga_ptr = _pointer(row, SEG_S1, STORAGE, ALIGNED)  # grad_avg
        ga = _load(ga_ptr, offs, mask, STORAGE, MATH)
    if HAS_MOMENTUM:
        buf_ptr = _pointer(row, SEG_S2, STORAGE, ALIGNED)  # momentum_buffer
        buf = _load(buf_ptr, offs, mask, STORAGE, MATH)

    p, sq, ga, buf = _rmspropw_update(
        p, g, sq, ga, buf,
        tl.load(hp + RMSPROPW_GRAD_SIGN).to(MATH), tl.load(hp + RMSPROPW_L2).to(MATH),
        tl.load(hp + RMSPROPW_DECAY_MULT).to(MATH), tl.load(hp + RMSPROPW_LR).to(MATH),
        alpha.to(MATH), (1.0 - alpha).to(MATH), tl.load(hp + RMSPROPW_EPS).to(MATH),
        tl.load(hp + RMSPROPW_MOMENTUM).to(MATH), CENTERED, HAS_MOMENTUM,
    )

    _store(p_ptr, offs, p, mask, STORAGE)
    _store(sq_ptr, offs, sq, mask, STORAGE)
    if CENTERED:
        _store(ga_ptr, offs, ga, mask, STORAGE)
    if HAS_MOMENTUM:
        _store(buf_ptr, offs, buf, mask, STORAGE)


@triton.jit(do_not_specialize=_TABLE_ARGS)
def _rmspropw_kernel(
    seg_ptr,  # int64 [nseg, SEG_COLS]: the bucket's segment rows (addresses, sizes, hp rows)
    block_start_ptr,  # int64 [nseg + 1]: first block of each segment; the last entry is the grid size
    arrivals_ptr,  # int64 [nseg]: blocks of each segment that have read its step; zeros at launch
    hp_ptr,  # float64 [groups, RMSPROPW_HP_COLS]: lr, alpha, eps, momentum, decay_mult, l2, grad_sign
    nseg,  # number of segments
    STORAGE: tl.constexpr,  # element type of p, g and every state
    MATH: tl.constexpr,  # tl.float32, or tl.float64 for float64 storage
    CENTERED: tl.constexpr,  # keep grad_avg (state 1) and normalize by the variance
    HAS_MOMENTUM: tl.constexpr,  # momentum > 0: keep momentum_buffer (state 2)
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    row, offs, mask, vector, seg, nblocks = _locate(seg_ptr, block_start_ptr, nseg, BLOCK_SIZE)
    # the rule does not use t, but torch counts RMSprop's steps
    _take_step(row, arrivals_ptr + seg, nblocks)
    if vector:
        _rmspropw_block(row, offs, None, hp_ptr, STORAGE, MATH, CENTERED, HAS_MOMENTUM, True)
    else:
        _rmspropw_block(row, offs, mask, hp_ptr, STORAGE, MATH, CENTERED, HAS_MOMENTUM, False)
