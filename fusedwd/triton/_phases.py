"""The Triton kernels of the two-phase rules (LAMB, StableAdamW): two launches per bucket step.

docs/design.md#per-tensor-reductions. Both kernels run over the segment table,
program map and arrival counters of the generic kernel (fusedwd/triton/_kernels.py),
one program per block of ``BLOCK_SIZE`` elements of one segment:

- phase 1 (``_moments_kernel``) updates the states and writes the float64 sums of
  each 64-element chunk of its block (``CHUNK``, csrc/cpu/kernels.h kSumChunk) into
  a scratch buffer of ``BLOCK_SIZE // CHUNK`` chunks per block; the last block of a
  segment to arrive adds its segment's chunk sums in chunk order into the segment's
  row of the sums buffer. It advances no step count.
- phase 2 (``_apply_kernel``) reads its segment's sums and steps the parameter
  (and advances the step count once, as the generic kernel does).

A chunk's terms are added in csrc/cpu/loops.h chunk_sum's order (16 lanes of 4
sequential adds, then a tree) and the chunks of a segment one after the other,
as the CPU kernel adds them: the sums, so the step, are the CPU kernel's bits
whatever the grid, the buckets or the grouping of tensors. The per-rule math is
the rule's ``triton_phases`` (fusedwd/rules/<rule>.py), compiled by ``compile_phases``.

Nothing is read on the host between the phases: the sums stay on the device.
"""

from __future__ import annotations

import sys
import types

import triton
import triton.language as tl

from .. import rules
from ._kernels import (
    _TABLE_ARGS,
    RULE_HELPERS,
    SEG_G,
    SEG_HP,
    SEG_S0,
    SEG_S1,
    _arrive,
    _block_lanes,
    _grad_mult,
    _load,
    _load_param,
    _locate,
    _param_pointers,
    _pointer,
    _precision,
    _skipped,
    _store,
    _store_param,
    _take_step,
    _vector_width,
)

CHUNK = tl.constexpr(64)  # elements per partial sum: csrc/cpu/kernels.h kSumChunk
LANES = tl.constexpr(16)  # loops.h chunk_sum: lanes of CHUNK // LANES sequential adds, then a tree


def compile_phases(rule: rules.Rule) -> tuple[triton.JITFunction, ...]:
    """The rule's ``triton_phases`` (reads_p, moments, terms, apply_scalars, apply), compiled with ``triton.jit``.

    As ``_kernels.compile_rule``, but every ``triton_*`` function of the rule's module is
    rebuilt into one shared namespace, so the helpers can call the module's own pieces
    (LAMB's ``triton_direction``)."""
    if len(rule.sums) not in (1, 2) or len(rule.states) != 2 or rule.switches:
        raise ValueError(f"rule {rule.name!r}: the two-phase Triton kernels take 1 or 2 sums and two states "
                         "(S0, S1), without switches")
    module = sys.modules[rule.triton_phases.moments.__module__]
    columns = types.ModuleType(f"{module.__name__}.COL")
    for index, name in enumerate(rule.columns):
        setattr(columns, name, tl.constexpr(index))
    scope = dict(vars(module))
    scope.update(tl=tl, COL=columns, **{helper.__name__: helper for helper in RULE_HELPERS})
    for name, fn in vars(module).items():
        if name.startswith("triton_") and isinstance(fn, types.FunctionType) and fn.__module__ == module.__name__:
            rebuilt = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
            rebuilt.__qualname__ = fn.__qualname__
            scope[name] = triton.jit(rebuilt)
    return tuple(scope[fn.__name__] for fn in rule.triton_phases)


# every two-phase rule's compiled helpers, by name
PHASES = {name: compile_phases(rule) for name, rule in rules.RULES.items() if rule.triton_phases is not None}


# ------------------------------------------------------------- fixed-order sums
@triton.jit
def _halves(x, W: tl.constexpr):
    """[C, 2W] -> its lanes [0, W) and [W, 2W), each [C, W]."""
    C: tl.constexpr = x.shape[0]
    return tl.split(tl.permute(tl.reshape(x, [C, 2, W]), (0, 2, 1)))


@triton.jit
def _chunk_sums(terms, BLOCK_SIZE: tl.constexpr):
    """The float64 sum of each CHUNK consecutive terms of a block, in loops.h chunk_sum's order:
    lane l = ((x[l] + x[16 + l]) + x[32 + l]) + x[48 + l], then lane[l] += lane[l + w] for
    w = 8, 4, 2, 1. Returns [BLOCK_SIZE // CHUNK]."""
    C: tl.constexpr = BLOCK_SIZE // CHUNK
    # [chunk, q, lane] -> [chunk, lane, q0, q1] with q = 2*q1 + q0: each split peels q1, then q0
    x = tl.permute(tl.reshape(terms, [C, 2, 2, LANES]), (0, 3, 2, 1))
    low, high = tl.split(x)  # q1 = 0, 1: [C, LANES, 2]
    q0, q1 = tl.split(low)
    q2, q3 = tl.split(high)
    lane = ((q0 + q1) + q2) + q3  # [C, LANES]
    a, b = _halves(lane, 8)
    lane = a + b
    a, b = _halves(lane, 4)
    lane = a + b
    a, b = _halves(lane, 2)
    lane = a + b
    a, b = _halves(lane, 1)
    return tl.reshape(a + b, [C])


@triton.jit
def _add2(total, x):
    first, second = tl.split(x)
    return (total + first) + second


@triton.jit
def _add4(total, x):
    # x: [2, 2], the element index's low bit first: split peels the high bit
    first, second = tl.split(x)
    return _add2(_add2(total, first), second)


@triton.jit
def _add8(total, x):
    first, second = tl.split(x)
    return _add4(_add4(total, first), second)


@triton.jit
def _add16(total, x):
    """total + x[0] + x[1] + ... + x[15], one add at a time, in index order (x: [16] float64)."""
    # [a, b, c, d] with index 8a + 4b + 2c + d, reversed so that each split takes the highest bit
    y = tl.permute(tl.reshape(x, [2, 2, 2, 2]), (3, 2, 1, 0))
    first, second = tl.split(y)
    return _add8(_add8(total, first), second)


@triton.jit
def _segment_sums(partials_ptr, first_program, programs, K: tl.constexpr, CHUNKS: tl.constexpr):
    """A segment's sums (the second one 0 where K is 1): each its chunks' partial sums added one at
    a time in chunk order, as loops.h adds a segment's chunks (chunks past the segment's end hold
    +0.0, which leaves a sum of non-negative terms unchanged). One pass over the chunks for both
    sums: two independent chains of dependent adds."""
    total0 = tl.full((), 0.0, tl.float64)
    total1 = tl.full((), 0.0, tl.float64)
    chunk = tl.arange(0, CHUNKS)
    for b in range(programs):
        # .cg: the other programs' stores are in L2, never in this SM's L1
        base = partials_ptr + ((first_program + b) * CHUNKS + chunk) * K
        total0 = _add16(total0, tl.load(base, cache_modifier=".cg"))
        if K > 1:
            total1 = _add16(total1, tl.load(base + 1, cache_modifier=".cg"))
    return total0, total1


# ------------------------------------------------------------------ phase 1
@triton.jit
def _as_stored(x, S: tl.constexpr, MATH: tl.constexpr):
    """common.h as_stored: the value a state buffer of dtype S holds for x (x rounded to S, widened)."""
    if S == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        bits = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x0040, rounded)
        return (bits << 16).to(tl.float32, bitcast=True)
    elif S == tl.float16:
        return x.to(tl.float16).to(MATH)
    else:
        return x


@triton.jit
def _moments_block(row, start, offs, mask, t, hp, grad_mult, reads_p, P: tl.constexpr, S: tl.constexpr,
                   MATH: tl.constexpr, MASTER: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   MOMENTS: tl.constexpr, TERMS: tl.constexpr):
    """Phase 1 over one block: the new states stored; returns each sum's float64 terms of the block
    (0 past the segment's end; the rule's helper returns a second, unused, where it has one sum)."""
    p_ptr, master_ptr = _param_pointers(row, start, P, MASTER, ALIGNED)
    g = _load(_pointer(row, SEG_G, start, P, ALIGNED), offs, mask, P, MATH)
    # a rule whose phase 1 needs p only for some settings (StableAdamW: the L2 term) reads it only then
    if reads_p:
        p = _load_param(p_ptr, master_ptr, offs, mask, P, MATH, MASTER)
    else:
        # tl.full, a builtin: tl.zeros_like is a jit function of Triton's own, defined compiled or
        # interpreted when triton.language is first imported, which a process may do before
        # fusedwd.triton's kernels are (re)defined for the interpreter (tests/_helpers.py)
        p = tl.full(g.shape, 0.0, MATH)
    s0_ptr = _pointer(row, SEG_S0, start, S, ALIGNED)
    s1_ptr = _pointer(row, SEG_S1, start, S, ALIGNED)
    m = _load(s0_ptr, offs, mask, S, MATH)
    v = _load(s1_ptr, offs, mask, S, MATH)
    p, g, m, v = MOMENTS(p, g, m, v, hp, t, grad_mult, MATH)
    _store(s0_ptr, offs, m, mask, S)
    _store(s1_ptr, offs, v, mask, S)
    # the sums see the states as phase 2 will read them
    term0, term1 = TERMS(p, g, _as_stored(m, S, MATH), _as_stored(v, S, MATH), hp, t, MATH)
    if mask is not None:
        term0 = tl.where(mask, term0, 0.0)  # lanes past the segment's end: the CPU's zero padding
        term1 = tl.where(mask, term1, 0.0)
    return term0, term1


@triton.jit(do_not_specialize=_TABLE_ARGS + ["partials_ptr", "sums_ptr"])
def _moments_kernel(
    seg_ptr,  # int64 [nseg, SEG_COLS]: the bucket's segment rows (the generic kernel's)
    program_ptr,  # int64 [grid]: per program, its segment | its rank among the segment's programs << 32
    arrivals_ptr,  # int64 [nseg]: programs of each segment that have stored their chunk sums; zeros, left at zero
    hp_ptr,  # float64 [groups, HP_COLS]: the rule's hyperparameter rows
    nseg,  # number of segments
    ctl_ptr,  # float32 [CTL_SIZE]: 1/grad_scale, found_inf (nonzero: skip the step), clip coefficient
    seed_ptr,  # int64 [1]: unused here (phase 2 rounds p); the generic kernel's argument list
    partials_ptr,  # float64 [grid * BLOCK_SIZE // CHUNK, K]: each program's chunk sums (scratch)
    sums_ptr,  # float64 [nseg, K]: each segment's sums, written here, read by phase 2
    P: tl.constexpr,  # element type of p and g
    S: tl.constexpr,  # element type of the states
    MATH: tl.constexpr,  # tl.float32, or tl.float64 for float64 storage
    MASTER: tl.constexpr,  # p is read from its fp32 master copy (SEG_MASTER)
    BLOCK_SIZE: tl.constexpr,  # elements per program (a multiple of CHUNK * 16)
    READS_P: tl.constexpr,  # the rule's reads_p helper
    MOMENTS: tl.constexpr,  # the rule's moments helper
    TERMS: tl.constexpr,  # the rule's terms helper
    HP_COLS: tl.constexpr,  # the rule's hyperparameter columns
    K: tl.constexpr,  # the rule's sums per segment (1 or 2)
):
    CHUNKS: tl.constexpr = BLOCK_SIZE // CHUNK
    # Every program reads the same found_inf: none writes, no sum is formed (the program map
    # and the row are read meanwhile: they only read)
    skipped = _skipped(ctl_ptr)
    row, seg, n, start, programs, aligned = _locate(seg_ptr, program_ptr, BLOCK_SIZE)
    if not skipped:
        # the step being taken; phase 2 advances the count
        t = _take_step(row).to(tl.float64) + 1.0
        offs, mask, _, _, full = _block_lanes(n, start, BLOCK_SIZE, False, _vector_width(P, S, MASTER, False))
        vector = full & aligned
        hp = hp_ptr + tl.load(row + SEG_HP) * HP_COLS
        grad_mult = _grad_mult(ctl_ptr)
        reads_p = READS_P(hp)
        if vector:
            term0, term1 = _moments_block(row, start, offs, None, t, hp, grad_mult, reads_p, P, S, MATH, MASTER,
                                          True, BLOCK_SIZE, MOMENTS, TERMS)
        else:
            term0, term1 = _moments_block(row, start, offs, mask, t, hp, grad_mult, reads_p, P, S, MATH, MASTER,
                                          False, BLOCK_SIZE, MOMENTS, TERMS)
        # the chunk sums, past both paths: their exchange between threads (a chunk's lanes are
        # 16 elements apart) is the reduction's own, through shared memory
        chunk = tl.program_id(0).to(tl.int64) * CHUNKS + tl.arange(0, CHUNKS)
        tl.store(partials_ptr + chunk * K, _chunk_sums(term0, BLOCK_SIZE))
        if K > 1:
            tl.store(partials_ptr + chunk * K + 1, _chunk_sums(term1, BLOCK_SIZE))
        # Arrive after the stores: the barrier orders every thread's stores before the one
        # atomic, whose release makes them visible to the last block, which alone acquires
        # (an exchange that also resets the counter).
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr + seg, 1, sem="release")
        if arrived == programs - 1:
            # every block of the segment has stored its chunk sums: combine them, in order
            tl.atomic_xchg(arrivals_ptr + seg, tl.full((), 0, tl.int64), sem="acquire")
            # one thread acquired: the barrier orders every thread's reads of the other blocks'
            # chunk sums after it (the branch is uniform: the atomic's result is the block's)
            tl.debug_barrier()
            # the segment's programs are consecutive in the map: the first is this one less its rank
            first = tl.program_id(0).to(tl.int64) - start // BLOCK_SIZE
            total0, total1 = _segment_sums(partials_ptr, first, programs, K, CHUNKS)
            tl.store(sums_ptr + seg * K, total0)
            if K > 1:
                tl.store(sums_ptr + seg * K + 1, total1)


# ------------------------------------------------------------------ phase 2
@triton.jit
def _apply_block(row, start, offs, mask, key, scalars, P: tl.constexpr, S: tl.constexpr, MATH: tl.constexpr,
                 MASTER: tl.constexpr, SR: tl.constexpr, ALIGNED: tl.constexpr, APPLY: tl.constexpr):
    """Phase 2 over one block: p (as stored) and the states phase 1 stored -> the new p."""
    p_ptr, master_ptr = _param_pointers(row, start, P, MASTER, ALIGNED)
    p = _load_param(p_ptr, master_ptr, offs, mask, P, MATH, MASTER)
    m = _load(_pointer(row, SEG_S0, start, S, ALIGNED), offs, mask, S, MATH)
    v = _load(_pointer(row, SEG_S1, start, S, ALIGNED), offs, mask, S, MATH)
    p = APPLY(p, m, v, scalars)
    _store_param(p_ptr, master_ptr, offs, p, mask, key, start, P, MASTER, SR)


@triton.jit(do_not_specialize=_TABLE_ARGS + ["sums_ptr"])
def _apply_kernel(
    seg_ptr,  # int64 [nseg, SEG_COLS]: the segment rows phase 1 read
    program_ptr,  # int64 [grid]: the program map phase 1 read
    arrivals_ptr,  # int64 [nseg]: programs of each segment that are done; zeros, left at zero
    hp_ptr,  # float64 [groups, HP_COLS]
    nseg,  # number of segments
    ctl_ptr,  # float32 [CTL_SIZE]: the control block phase 1 read
    seed_ptr,  # int64 [1]: the stochastic-rounding seed (a uint64's bits)
    sums_ptr,  # float64 [nseg, K]: each segment's sums (phase 1's, or reduced across ranks since)
    P: tl.constexpr,
    S: tl.constexpr,
    MATH: tl.constexpr,
    MASTER: tl.constexpr,  # p is read from and written to its fp32 master copy too
    SR: tl.constexpr,  # bf16 p is rounded stochastically
    BLOCK_SIZE: tl.constexpr,
    APPLY_SCALARS: tl.constexpr,  # the rule's apply_scalars helper
    APPLY: tl.constexpr,  # the rule's apply helper
    HP_COLS: tl.constexpr,
    K: tl.constexpr,  # the rule's sums per segment (1 or 2)
):
    skipped = _skipped(ctl_ptr)
    row, seg, n, start, programs, aligned = _locate(seg_ptr, program_ptr, BLOCK_SIZE)
    if not skipped:
        t0 = _take_step(row)
        t = t0.to(tl.float64) + 1.0
        _, key = _precision(row, t, ctl_ptr, seed_ptr, SR)
        hp = hp_ptr + tl.load(row + SEG_HP) * HP_COLS
        # the segment's scalars before any element is loaded: their float64 divisions and square
        # roots are calls on NVIDIA GPUs, across which live element registers would be spilled
        scalars = APPLY_SCALARS(hp, t, tl.load(sums_ptr + seg * K), tl.load(sums_ptr + seg * K + (K - 1)),
                                n, MATH)
        offs, mask, _, _, full = _block_lanes(n, start, BLOCK_SIZE, False, _vector_width(P, S, MASTER, False))
        vector = full & aligned
        if vector:
            _apply_block(row, start, offs, None, key, scalars, P, S, MATH, MASTER, SR, True, APPLY)
        else:
            _apply_block(row, start, offs, mask, key, scalars, P, S, MATH, MASTER, SR, False, APPLY)
        _arrive(row, arrivals_ptr + seg, programs, t0)  # after the stores (issue 14 defect 5)
