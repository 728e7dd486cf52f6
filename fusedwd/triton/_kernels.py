"""The Triton kernel every rule runs: one generic kernel and block, the rule's helper a constant.

The kernel runs one program per block of ``BLOCK_SIZE`` elements of one
segment (one tensor) of a bucket, over all of the bucket's segments at once
(docs/backends.md#the-triton-kernels). A program reads its segment and its
rank in it from the launch's program map (one load, no search), the
segment's row of the int64 segment table (docs/design.md#segment-table) and
its step count, then updates its block in place, reading its param group's
row of the float64 hyperparameter table, and arrives on the segment's counter after its stores (``_arrive``: the last
program to arrive advances the step count). A full block whose buffers are
all 16-byte aligned (checked at run time: Triton cannot know it of addresses
read from a table) is updated without a mask, so it compiles to 128-bit
accesses; other blocks take the masked path. Both call the same block
function, ``_block``, which loads the states the rule keeps, calls the rule's
helper and stores what it returns.

Parameters and gradients are stored in one dtype (``P``), the states in
another (``S``, the same or float32 / 16-bit, csrc/include/fusedwd/precision.h with_layout);
with ``MASTER`` a 16-bit parameter is read from its fp32 master copy and both
are written, with ``SR`` a bf16 parameter is rounded stochastically
(``_load_param`` / ``_store_param``, as csrc/include/fusedwd/common.h's
load_param / store_param). A float32 control block read at run time carries
1/grad_scale and the clip coefficient, folded into grad_sign, and found_inf,
which skips the launch's every write, step counts included. With ``Q8`` the
states are 8-bit codes with one fp32 absmax per 256-element quant block
(docs/quantization.md): a program's elements form a [BLOCK_SIZE // 256, 256]
tile of whole quant blocks, decoded before and encoded after the same per-rule
helpers (``_q8_decode`` / ``_q8_encode``, as csrc/include/fusedwd/quant.h).

The element math is each rule's ``triton_update`` (fusedwd/rules/<rule>.py),
written in the order of csrc/include/fusedwd/<rule>.h so that both backends
round alike, and compiled here by ``compile_rule`` in its module's namespace
plus ``tl``, the helpers below that rules use (``RULE_HELPERS``: IEEE square
root and division, ``beta**t``, and torch's L2 term, lerp and maximum, which
decide how Inf and NaN spread, and Adam's moments of the two-phase rules) and ``COL``, the rule's hyperparameter columns
(docs/adding-a-rule.md#triton). Divisions and square roots are the IEEE
round-to-nearest ones (``tl.div_rn`` and ``tl.sqrt_rn`` in float32, where
Triton's defaults are approximate on NVIDIA GPUs), and the launcher compiles
with ``enable_fp_fusion=False`` so that no multiply-add is contracted, as the
C++ kernels are built with ``-ffp-contract=off``.
"""

from __future__ import annotations

import sys
import types

import triton
import triton.language as tl

from .. import _buckets, quant, rules

# Segment-table columns (docs/design.md#segment-table), from the Python writer.
SEG_P = tl.constexpr(_buckets.SEG_P)
SEG_G = tl.constexpr(_buckets.SEG_G)
SEG_S0 = tl.constexpr(_buckets.SEG_S0)
SEG_S1 = tl.constexpr(_buckets.SEG_S1)
SEG_S2 = tl.constexpr(_buckets.SEG_S2)
SEG_STEP = tl.constexpr(_buckets.SEG_STEP)
SEG_N = tl.constexpr(_buckets.SEG_N)
SEG_HP = tl.constexpr(_buckets.SEG_HP)
SEG_MASTER = tl.constexpr(_buckets.SEG_MASTER)
SEG_SALT = tl.constexpr(_buckets.SEG_SALT)
SEG_A0 = tl.constexpr(_buckets.SEG_A0)
SEG_COLS = tl.constexpr(_buckets.SEG_COLS)
# The control block (csrc/include/fusedwd/layout.h Ctl).
CTL_INV_SCALE = tl.constexpr(_buckets.CTL_INV_SCALE)
CTL_FOUND_INF = tl.constexpr(_buckets.CTL_FOUND_INF)
CTL_CLIP = tl.constexpr(_buckets.CTL_CLIP)
# The 8-bit code (fusedwd/quant.py, csrc/include/fusedwd/quant.h).
QUANT_BLOCK = tl.constexpr(quant.BLOCK_SIZE)  # elements per block, one fp32 absmax each
SIGNED_LEVELS = tl.constexpr(quant.SIGNED_LEVELS)  # K of the signed code
UNSIGNED_LEVELS = tl.constexpr(quant.UNSIGNED_LEVELS)  # K of the unsigned code
SIGNED_ZERO = tl.constexpr(quant.zero_code(True))  # the byte of 0 in the signed code

# The tables are read with scalar loads, so their alignment buys nothing:
# specializing on it would only compile more variants.
_TABLE_ARGS = ["seg_ptr", "program_ptr", "arrivals_ptr", "hp_ptr", "nseg", "ctl_ptr", "seed_ptr"]


# ------------------------------------------------------------------ segments
@triton.constexpr_function
def _vector_width(P, S, MASTER, Q8):
    """Contiguous elements per thread of every buffer of a kernel: 16 bytes of its widest element.

    Left to itself, Triton gives each load and store as many elements per
    thread as fill 16 bytes of that buffer (8 for 16-bit, 4 for fp32) and
    moves values between the two layouts through shared memory, a conversion
    per mixed-width buffer and per block, with the registers it takes (issue 14
    defect 6). One width, set on the offsets, gives every buffer the same
    layout: fp32 in 128-bit accesses, a 16-bit buffer beside it in 64-bit ones
    (a warp still reads 256 contiguous bytes per access), 8-bit codes in 32-bit
    ones. The 8-bit codes' fp32 absmax is read once per quant block, not here.
    """
    widest = max(P.primitive_bitwidth, 8 if Q8 else S.primitive_bitwidth, 32 if MASTER else 8)
    return 128 // widest


@triton.jit
def _locate(seg_ptr, program_ptr, BLOCK_SIZE: tl.constexpr):
    """This program's segment row and index, the segment's size, the program's first element (int64),
    the segment's program count, and whether all the segment's buffers start 16-byte aligned.

    The launch's program map holds, per program, its segment and its rank among the segment's
    programs (one int64 word, written with the segment table: _launch.fill_image), so the first
    load of a program finds its row: no search. A program owns one block of BLOCK_SIZE elements
    of one segment, from a multiple of BLOCK_SIZE; an empty segment still has one program of one
    fully masked block. (Several blocks per program, in a loop, held 16 to 26 more registers per
    thread and spilled in 14 variants: issue 14 defect 5, docs/backends.md.)
    """
    word = tl.load(program_ptr + tl.program_id(0))
    seg = word & 0xFFFFFFFF
    rank = word >> 32
    row = seg_ptr + seg * SEG_COLS
    n = tl.load(row + SEG_N)
    # The program's first element, in int64 (a segment may hold more than 2^31
    # elements), is added once to each buffer's address (_pointer); offsets
    # within the block are int32, which halves their registers and arithmetic.
    first = rank * BLOCK_SIZE
    programs = tl.maximum((n + (BLOCK_SIZE - 1)) // BLOCK_SIZE, 1)
    # A full block whose buffers all start 16-byte aligned needs no mask and may use
    # 128-bit accesses; Triton cannot know either from addresses read out of a table.
    # Unused state and master columns hold 0, which is aligned.
    addresses = (tl.load(row + SEG_P) | tl.load(row + SEG_G) | tl.load(row + SEG_S0) | tl.load(row + SEG_S1)
                 | tl.load(row + SEG_S2) | tl.load(row + SEG_MASTER))
    return row, seg, n, first, programs, (addresses & 15) == 0


@triton.jit
def _block_lanes(n, start, BLOCK_SIZE: tl.constexpr, Q8: tl.constexpr, VEC: tl.constexpr):
    """The in-block offsets (int32) of the block at element ``start`` of an ``n``-element segment, and
    their mask; its quant blocks and their mask (Q8; else unused); whether the block is full.

    With 8-bit states (Q8) the offsets are a [BLOCK_SIZE // QUANT_BLOCK, QUANT_BLOCK] tile, one
    row per 256-element quant block: a block starts at a multiple of BLOCK_SIZE from its
    segment's first element, so it owns whole quant blocks (the last one maybe partial), and a
    block's absmax is a max over one row.
    """
    rest = tl.minimum(n - start, BLOCK_SIZE).to(tl.int32)  # elements of this block in the segment
    if Q8:
        qblocks = tl.arange(0, BLOCK_SIZE // QUANT_BLOCK)
        offs = qblocks[:, None] * QUANT_BLOCK + tl.arange(0, QUANT_BLOCK)[None, :]
        offs = tl.max_contiguous(offs, [1, VEC])  # one width for every buffer (_vector_width)
        qmask = qblocks * QUANT_BLOCK < rest
    else:
        offs = tl.max_contiguous(tl.arange(0, BLOCK_SIZE), VEC)  # (_vector_width)
        # unused without Q8 (a jit function cannot return None)
        qblocks = rest
        qmask = rest > 0
    return offs, offs < rest, qblocks, qmask, rest == BLOCK_SIZE


@triton.jit
def _take_step(row):
    """The segment's stored step count t0 (float32), read once per program before its data.

    The count advances in _arrive, after the program's stores: no program can read an
    advanced count, since the count is written only by the segment's last program to arrive,
    after it has acquired every other program's arrival, and each program arrives after its
    read of t0 (see _arrive).
    """
    return tl.load(tl.load(row + SEG_STEP).to(tl.pointer_type(tl.float32)))


@triton.jit
def _arrive(row, arrival_ptr, programs, t0):
    """After the program's stores: arrive on the segment's counter (zero at launch); the last of
    the segment's ``programs`` to arrive writes the count t0 + 1 and resets the counter to zero, so
    the counters can stay on the device from one launch to the next (a CUDA graph replays them).

    Every program read t0 before its arrival: the barrier orders every thread's read (and store)
    before the one thread's release add, the adds of a segment form one release sequence on its
    counter, and only the last arriver needs their reads ordered before its write: its acquire
    exchange (which also zeroes the counter) reads the last add of that sequence, so it
    synchronizes with every earlier arrival. Other programs neither wait nor acquire.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(arrival_ptr, 1, sem="release")
    last = arrived == programs - 1
    # tl.full: a builtin, not a jit helper (see _q8_encode)
    everyone = tl.atomic_xchg(arrival_ptr, tl.full((), 0, tl.int64), sem="acquire", mask=last)
    step_ptr = tl.load(row + SEG_STEP).to(tl.pointer_type(tl.float32))
    # the exchange returned every arrival (the store waits on it)
    tl.store(step_ptr, t0 + 1.0, mask=last & (everyone == programs))


@triton.jit
def pow_int(base, exponent):
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


# ------------------------------------------------------------- control block
@triton.jit
def _skipped(ctl_ptr):
    """GradScaler found an inf (or the clip norm is not finite): the launch writes nothing, step counts included."""
    return tl.load(ctl_ptr + CTL_FOUND_INF) != 0.0


@triton.jit
def _grad_mult(ctl_ptr):
    """What every gradient is multiplied by: 1/grad_scale times the clip coefficient.

    Their float32 product widened to float64, as csrc/cpu/loops.h grad_mult(); the
    rules fold it into grad_sign in float64 and round that once to the math type.
    """
    return (tl.load(ctl_ptr + CTL_INV_SCALE) * tl.load(ctl_ptr + CTL_CLIP)).to(tl.float64)


# ------------------------------------------------------- stochastic rounding
# docs/math.md#stochastic-rounding; reference: fusedwd.reference.stochastic_round_bf16.
# The hash of csrc/include/fusedwd/common.h in uint32 arithmetic, which wraps
# modulo 2^32 like C++'s (literals above 2^31 are uint32 constants) and shifts
# logically; tests/test_triton.py checks it against the C++ kernel bit for bit.
@triton.jit
def _mix32(h):
    # murmur3's 32-bit finalizer
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _sr_key(seed_ptr, row, t):
    """The key of the segment's random bits at step t (uint32): common.h sr_key(seed, row[SEG_SALT], t)."""
    seed = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
    k = _mix32(seed.to(tl.uint32) ^ _mix32((seed >> 32).to(tl.uint32) + 0x9E3779B9))
    k = _mix32(k ^ tl.load(row + SEG_SALT).to(tl.uint32))
    return _mix32(k + t.to(tl.int64).to(tl.uint32) * 0x9E3779B9)


@triton.jit
def _bf16_stochastic(x, key, start, offs):
    """fp32 -> bf16 bits rounded up with probability (x - down)/(up - down): common.h float_to_bf16_sr
    with the bits sr_bits(key, i) of segment element i = start + offs. NaN (quieted) and Inf are kept."""
    # sr_bits hashes uint32(i ^ (i >> 32)); start is a multiple of the block size (a power of two) and
    # 0 <= offs < the block size, so uint32(i) = uint32(start) + offs without carry and i >> 32 = start >> 32
    base = start.to(tl.uint64, bitcast=True)
    i = (base.to(tl.uint32) + offs.to(tl.uint32)) ^ (base >> 32).to(tl.uint32)
    bits = _mix32(key ^ (i * 0x27D4EB2F))
    u = x.to(tl.uint32, bitcast=True)
    magnitude = u & 0x7FFFFFFF
    rounded = (u + (bits & 0xFFFF)) >> 16
    special = tl.where(magnitude > 0x7F800000, (u >> 16) | 0x0040, u >> 16)
    return tl.where(magnitude >= 0x7F800000, special, rounded).to(tl.uint16)


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
def _pointer(row, column, start, STORAGE: tl.constexpr, ALIGNED: tl.constexpr):
    """Element ``start`` of the buffer whose address is in ``column`` of the segment row, as a STORAGE pointer."""
    ptr = tl.load(row + column).to(tl.pointer_type(STORAGE)) + start
    if ALIGNED:
        # checked at run time by _locate before this path is taken
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _param_pointers(row, start, P: tl.constexpr, MASTER: tl.constexpr, ALIGNED: tl.constexpr):
    """The parameter's buffer and, with MASTER, its fp32 master copy (else the parameter's buffer again, unused)."""
    p_ptr = _pointer(row, SEG_P, start, P, ALIGNED)
    master_ptr = p_ptr
    if MASTER:
        master_ptr = _pointer(row, SEG_MASTER, start, tl.float32, ALIGNED)
    return p_ptr, master_ptr


@triton.jit
def _load_param(p_ptr, master_ptr, offs, mask, P: tl.constexpr, MATH: tl.constexpr, MASTER: tl.constexpr):
    """The parameter in the math type: its fp32 master copy when there is one (common.h load_param)."""
    if MASTER:
        return tl.load(master_ptr + offs, mask=mask)
    else:
        return _load(p_ptr, offs, mask, P, MATH)


@triton.jit
def _store_param(p_ptr, master_ptr, offs, x, mask, key, start, P: tl.constexpr, MASTER: tl.constexpr,
                 SR: tl.constexpr):
    """Store the updated parameter (common.h store_param): the master exactly and p rounded to nearest
    even (MASTER), p rounded stochastically (SR, bf16), or p rounded to nearest even."""
    if MASTER:
        tl.store(master_ptr + offs, x, mask=mask)
        _store(p_ptr, offs, x, mask, P)
    elif SR:
        tl.store(p_ptr + offs, _bf16_stochastic(x, key, start, offs).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        _store(p_ptr, offs, x, mask, P)


@triton.jit
def _precision(row, t, ctl_ptr, seed_ptr, SR: tl.constexpr):
    """The segment's gradient multiplier (float64) and stochastic-rounding key (uint32, 0 without SR)."""
    key = tl.full((), 0, tl.uint32)
    if SR:
        key = _sr_key(seed_ptr, row, t)
    return _grad_mult(ctl_ptr), key


@triton.jit
def sqrt_rn(x):
    # float32 sqrt and division are approximate on NVIDIA GPUs unless asked for
    # IEEE rounding; float64 ones are always correctly rounded (and the float32
    # intrinsics do not take float64)
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def div_rn(x, y):
    if x.dtype == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y


# ------------------------------------------------------------- 8-bit states
# docs/quantization.md; reference: fusedwd.quant; the C++ copy: csrc/include/fusedwd/quant.h.
# Every operation an IEEE fp32 one rounded to nearest even, as the CPU kernel's, so the
# bytes agree bit for bit.

@triton.jit
def _f32(bits):
    """The float32 with these bits (exact constants: no literal is ever rounded)."""
    return tl.full((), bits, tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _q8_decode(codes_ptr, absmax_ptr, offs, mask, qblocks, qmask, SIGNED: tl.constexpr):
    """quant.h q_decode: (k/K)^4 as three fp32 products t = k*RCP, t2 = t*t, t2*t2, signed, times
    the block's absmax; RCP = fp32(1/K). Byte 255 of the signed code decodes like 254."""
    byte = tl.load(codes_ptr + offs, mask=mask).to(tl.int32)
    absmax = tl.load(absmax_ptr + qblocks, mask=qmask)[:, None]
    if SIGNED:
        s = byte - SIGNED_ZERO
        t = tl.minimum(tl.abs(s), SIGNED_LEVELS).to(tl.float32) * _f32(0x3C010204)
        t2 = t * t
        mag = t2 * t2
        return tl.where(s < 0, -mag, mag) * absmax
    else:
        t = byte.to(tl.float32) * _f32(0x3B808081)
        t2 = t * t
        return (t2 * t2) * absmax


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _q8_level(y, SIGNED: tl.constexpr):
    """quant.h q_level: the code of a normalized magnitude 0 <= y <= 1, the number of thresholds
    T_j = ((j - 1/2)/K)^4 (the decode's products of the half code) that y reaches. No square
    root: s ~ y^(-1/4) from the bit pattern, x = y s^3 times a quadratic in z = y s^4 guesses
    K y^(1/4) within 0.06 codes, which leaves one threshold to compare with. The same fp32
    operations as the C++ helper (its portable guess), constants by their bits; int32 result."""
    s = (tl.full((), 0x4F500000, tl.uint32) - (y.to(tl.uint32, bitcast=True) >> 2)).to(tl.float32, bitcast=True)
    s2 = s * s
    ys2 = y * s2
    z = ys2 * s2
    if SIGNED:
        c2, c1, c0, rcp = _f32(0x4303CF1A), _f32(0xC3AFDC45), _f32(0x43AD98A0), _f32(0x3C010204)
    else:
        c2, c1, c0, rcp = _f32(0x438453F3), _f32(0xC4308D84), _f32(0x442E4796), _f32(0x3B808081)
    x = (ys2 * s) * ((c2 * z + c1) * z + c0)
    # quant.h q_settle: f = floor(x) (x >= 0), then the one threshold in doubt, f + 1's
    f = x.to(tl.int32)
    t = (f.to(tl.float32) + 0.5) * rcp
    t2 = t * t
    return tl.where(y >= t2 * t2, f + 1, f)


@triton.jit
def _q8_encode(codes_ptr, absmax_ptr, x, offs, mask, qblocks, qmask, SIGNED: tl.constexpr):
    """quant.h q_encode_block per quant block (one row of the tile): the block's absmax, NaN (every
    byte the zero code) if an element is NaN or infinite, 0 below the smallest normal; then
    k = _q8_level(min(|x|/absmax, 1)) per element (the zero rule for the unsigned code)."""
    m = tl.abs(x)
    # NaN and +-inf reduce as +inf (quant.h q_absmax_key): the max needs no NaN semantics
    key = tl.where(m <= _f32(0x7F7FFFFF), m, _f32(0x7F800000))
    if mask is not None:
        key = tl.where(mask, key, 0.0)  # lanes past the segment's end
    # tl.reduce (a builtin) with our own combine, not tl.max: triton.language's jit helpers are
    # compiled-mode functions if anything imported Triton before TRITON_INTERPRET was set
    # (torch.compile does), and the interpreter cannot call them
    a = tl.reduce(key, 1, _max_combine)
    bad = a == _f32(0x7F800000)
    ok = (a >= _f32(0x00800000)) & (a != _f32(0x7F800000))
    inv = tl.div_rn(tl.full(a.shape, 1.0, tl.float32), tl.where(ok, a, 1.0))
    if SIGNED:
        mag = m
    else:
        mag = tl.where(x > 0.0, x, 0.0)
    y = mag * inv[:, None]
    y = tl.where(y < 1.0, y, 1.0)  # NaN (a poisoned block's lanes, whose bytes are replaced below) too
    k = _q8_level(y, SIGNED)  # int32, 0..K
    if SIGNED:
        byte = tl.where(x > 0.0, SIGNED_ZERO + k, SIGNED_ZERO - k)
        byte = tl.where(ok[:, None], byte, SIGNED_ZERO)
    else:
        byte = tl.where((x > 0.0) & (k == 0), 1, k)
        byte = tl.where(ok[:, None], byte, 0)
    tl.store(codes_ptr + offs, byte.to(tl.uint8), mask=mask)
    stored = tl.where(bad, _f32(0x7FC00000), tl.where(ok, a, 0.0))
    tl.store(absmax_ptr + qblocks, stored, mask=qmask)


@triton.jit
def _state_pointers(row, start, column, S: tl.constexpr, ALIGNED: tl.constexpr, Q8: tl.constexpr):
    """A state's buffer (uint8 codes with Q8) and, with Q8, its fp32 block absmax (else the buffer again),
    from the block's first element."""
    if Q8:
        codes_ptr = _pointer(row, column, start, tl.uint8, ALIGNED)
        return codes_ptr, _pointer(row, column + (SEG_A0 - SEG_S0), start // QUANT_BLOCK, tl.float32, False)
    else:
        ptr = _pointer(row, column, start, S, ALIGNED)
        return ptr, ptr


@triton.jit
def _load_state(ptr, absmax_ptr, offs, mask, qblocks, qmask, S: tl.constexpr, MATH: tl.constexpr,
                Q8: tl.constexpr, SIGNED: tl.constexpr):
    """A state in the math type: decoded from its 8-bit code (Q8) or widened from S."""
    if Q8:
        return _q8_decode(ptr, absmax_ptr, offs, mask, qblocks, qmask, SIGNED)
    else:
        return _load(ptr, offs, mask, S, MATH)


@triton.jit
def _store_state(ptr, absmax_ptr, x, offs, mask, qblocks, qmask, S: tl.constexpr, Q8: tl.constexpr,
                 SIGNED: tl.constexpr):
    """Store a new state: encoded per quant block with its new absmax (Q8), or rounded once to S."""
    if Q8:
        _q8_encode(ptr, absmax_ptr, x, offs, mask, qblocks, qmask, SIGNED)
    else:
        _store(ptr, offs, x, mask, S)


# --------------------------------------------------- shared pieces of the rules
# csrc/include/fusedwd/common.h's: they decide how Inf and NaN spread (docs/math.md#non-finite-values).
# With sqrt_rn, div_rn and pow_int above, the names rule helpers are written against (compile_rule).
@triton.jit
def decayed_grad(g, p, grad_sign, l2, has_l2):
    """grad_sign*g, plus l2*p only where there is L2 decay (torch's rule: 0*Inf would be NaN)."""
    g = grad_sign * g
    return tl.where(has_l2, g + l2 * p, g)


@triton.jit
def lerp_weight(w, MATH: tl.constexpr):
    """common.h lerp_weight: torch's lerp weight w (float64) as (coeff, small) in the math type."""
    wm = w.to(MATH)
    small = tl.abs(wm) < 0.5
    return tl.where(small, wm, wm - 1.0), small


@triton.jit
def lerp(a, b, coeff, small):
    """torch's lerp(a, b, w): a + w*(b - a) for |w| < 0.5, else b + (w - 1)*(b - a) (common.h lerp_m)."""
    return tl.where(small, a, b) + coeff * (b - a)


@triton.jit
def maximum(a, b):
    """torch.maximum: NaN if either is NaN."""
    return tl.where((b > a) | (b != b), b, a)


@triton.jit
def adam_moments(g, p, m, v, beta1, beta2, l2, grad_sign, MATH: tl.constexpr):
    """adamw.h AdamMoments: the gradient (signed, scaled, plus the L2 term where l2 != 0) and Adam's
    m, v from it, in torch's operations (beta1, beta2, l2 float64; grad_sign in MATH)."""
    m_coeff, m_small = lerp_weight(1.0 - beta1, MATH)
    g = decayed_grad(g, p, grad_sign, l2.to(MATH), l2 != 0.0)
    m = lerp(m, g, m_coeff, m_small)
    v = beta2.to(MATH) * v + ((1.0 - beta2).to(MATH) * g) * g
    return g, m, v


# ------------------------------------------------------------------ the rules
# the shared helpers a rule's triton_update may call (and import under TYPE_CHECKING)
RULE_HELPERS = (sqrt_rn, div_rn, pow_int, decayed_grad, lerp_weight, lerp, maximum, adam_moments)


def compile_rule(rule: rules.Rule) -> triton.JITFunction:
    """The rule's ``triton_update``, compiled with ``triton.jit`` in its module's namespace plus the
    names rule helpers are written against: ``tl``, the shared helpers (``sqrt_rn``, ``div_rn``,
    ``pow_int``, ``decayed_grad``, ``lerp_weight``, ``lerp``, ``maximum``) and ``COL``,
    the rule's hyperparameter columns (``COL.beta1``: constexpr column indices, as C++'s ``Col``).

    The rule module does not import Triton (so neither does ``import fusedwd``): the function is
    rebuilt here from its code, so Triton reads its source from the rule's file and decides,
    as for every kernel of this module, whether it is compiled or interpreted.
    """
    fn = rule.triton_update
    columns = types.ModuleType(f"{fn.__module__}.COL")  # a module: Triton lets kernels read its attributes
    for index, name in enumerate(rule.columns):
        setattr(columns, name, tl.constexpr(index))
    scope = dict(vars(sys.modules[fn.__module__]))
    scope.update(tl=tl, COL=columns, **{helper.__name__: helper for helper in RULE_HELPERS})
    rebuilt = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    rebuilt.__qualname__ = fn.__qualname__
    return triton.jit(rebuilt)


# every elementwise rule's compiled helper, by name (a two-phase rule's are fusedwd/triton/_phases.py PHASES)
UPDATES = {name: compile_rule(rule) for name, rule in rules.RULES.items() if rule.triton_update is not None}


# ------------------------------------------------------------------ the kernel
@triton.jit
def _block(row, start, offs, mask, qblocks, qmask, t, hp_ptr, grad_mult, key, P: tl.constexpr, S: tl.constexpr,
           MATH: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr, ALIGNED: tl.constexpr, Q8: tl.constexpr,
           UPDATE: tl.constexpr, HP_COLS: tl.constexpr, KEEP0: tl.constexpr, KEEP1: tl.constexpr,
           KEEP2: tl.constexpr, SIGNED0: tl.constexpr, SIGNED1: tl.constexpr, SIGNED2: tl.constexpr,
           NSW: tl.constexpr, SW0: tl.constexpr, SW1: tl.constexpr):
    """One block of one segment: load p, g and the states the rule keeps, run the rule's helper,
    store the weight (from the unquantized new states) and then each state (re-encoded with Q8)."""
    hp = hp_ptr + tl.load(row + SEG_HP) * HP_COLS
    p_ptr, master_ptr = _param_pointers(row, start, P, MASTER, ALIGNED)
    g_ptr = _pointer(row, SEG_G, start, P, ALIGNED)
    p = _load_param(p_ptr, master_ptr, offs, mask, P, MATH, MASTER)
    g = _load(g_ptr, offs, mask, P, MATH)
    # a state the rule does not keep is passed as g, never read by its helper, never stored
    x0 = g
    x1 = g
    x2 = g
    if KEEP0:
        s0_ptr, a0_ptr = _state_pointers(row, start, SEG_S0, S, ALIGNED, Q8)
        x0 = _load_state(s0_ptr, a0_ptr, offs, mask, qblocks, qmask, S, MATH, Q8, SIGNED0)
    if KEEP1:
        s1_ptr, a1_ptr = _state_pointers(row, start, SEG_S1, S, ALIGNED, Q8)
        x1 = _load_state(s1_ptr, a1_ptr, offs, mask, qblocks, qmask, S, MATH, Q8, SIGNED1)
    if KEEP2:
        s2_ptr, a2_ptr = _state_pointers(row, start, SEG_S2, S, ALIGNED, Q8)
        x2 = _load_state(s2_ptr, a2_ptr, offs, mask, qblocks, qmask, S, MATH, Q8, SIGNED2)

    # the rule's switches, as many as it has
    if NSW == 0:
        p, x0, x1, x2 = UPDATE(p, g, x0, x1, x2, hp, t, grad_mult, MATH)
    elif NSW == 1:
        p, x0, x1, x2 = UPDATE(p, g, x0, x1, x2, hp, t, grad_mult, MATH, SW0)
    else:
        p, x0, x1, x2 = UPDATE(p, g, x0, x1, x2, hp, t, grad_mult, MATH, SW0, SW1)

    _store_param(p_ptr, master_ptr, offs, p, mask, key, start, P, MASTER, SR)
    if KEEP0:
        _store_state(s0_ptr, a0_ptr, x0, offs, mask, qblocks, qmask, S, Q8, SIGNED0)
    if KEEP1:
        _store_state(s1_ptr, a1_ptr, x1, offs, mask, qblocks, qmask, S, Q8, SIGNED1)
    if KEEP2:
        _store_state(s2_ptr, a2_ptr, x2, offs, mask, qblocks, qmask, S, Q8, SIGNED2)


@triton.jit(do_not_specialize=_TABLE_ARGS)
def _step_kernel(
    seg_ptr,  # int64 [nseg, SEG_COLS]: the bucket's segment rows (addresses, sizes, hp rows, salts)
    program_ptr,  # int64 [grid]: per program, its segment | its rank among the segment's programs << 32
    arrivals_ptr,  # int64 [nseg]: programs of each segment that have stored; zeros at launch, left at zero
    hp_ptr,  # float64 [groups, HP_COLS]: the rule's hyperparameter rows (fusedwd/rules/<rule>.py columns)
    nseg,  # number of segments (the map's segments are below it)
    ctl_ptr,  # float32 [CTL_SIZE]: 1/grad_scale, found_inf (nonzero: skip the step), clip coefficient
    seed_ptr,  # int64 [1]: the stochastic-rounding seed (a uint64's bits)
    P: tl.constexpr,  # element type of p and g
    S: tl.constexpr,  # element type of every state (tl.uint8: 8-bit codes, with Q8)
    MATH: tl.constexpr,  # tl.float32, or tl.float64 for float64 storage
    MASTER: tl.constexpr,  # p is read from and written to its fp32 master copy (SEG_MASTER) too
    SR: tl.constexpr,  # bf16 p is rounded stochastically
    BLOCK_SIZE: tl.constexpr,  # elements per program (a multiple of QUANT_BLOCK)
    Q8: tl.constexpr,  # 8-bit blockwise states: codes at SEG_S*, fp32 block absmax at SEG_A* (docs/quantization.md)
    UPDATE: tl.constexpr,  # the rule's helper (UPDATES[rule])
    HP_COLS: tl.constexpr,  # the rule's hyperparameter columns
    KEEP0: tl.constexpr,  # the rule keeps state 0 (SEG_S0) under these switches
    KEEP1: tl.constexpr,  # ... state 1
    KEEP2: tl.constexpr,  # ... state 2
    SIGNED0: tl.constexpr,  # state 0's 8-bit code is signed (else unsigned: second moments)
    SIGNED1: tl.constexpr,  # ... state 1's
    SIGNED2: tl.constexpr,  # ... state 2's
    NSW: tl.constexpr,  # the rule's number of switches (0 to 2)
    SW0: tl.constexpr,  # its first switch (False where it has none)
    SW1: tl.constexpr,  # its second switch
):
    # Every program reads the same found_inf: none arrives, so no count advances
    # (and every arrival counter stays zero). The program map and the row are read
    # meanwhile, not after it: they only read.
    skipped = _skipped(ctl_ptr)
    row, seg, n, first, programs, aligned = _locate(seg_ptr, program_ptr, BLOCK_SIZE)
    if not skipped:
        t0 = _take_step(row)
        t = t0.to(tl.float64) + 1.0
        grad_mult, key = _precision(row, t, ctl_ptr, seed_ptr, SR)
        offs, mask, qblocks, qmask, full = _block_lanes(n, first, BLOCK_SIZE, Q8, _vector_width(P, S, MASTER, Q8))
        vector = full & aligned
        if vector:
            _block(row, first, offs, None, qblocks, None, t, hp_ptr, grad_mult, key, P, S, MATH, MASTER, SR, True, Q8,
                   UPDATE, HP_COLS, KEEP0, KEEP1, KEEP2, SIGNED0, SIGNED1, SIGNED2, NSW, SW0, SW1)
        else:
            _block(row, first, offs, mask, qblocks, qmask, t, hp_ptr, grad_mult, key, P, S, MATH, MASTER, SR, False, Q8,
                   UPDATE, HP_COLS, KEEP0, KEEP1, KEEP2, SIGNED0, SIGNED1, SIGNED2, NSW, SW0, SW1)
        _arrive(row, arrivals_ptr + seg, programs, t0)
