"""The launcher: one Triton launch per bucket per step, over all of its segments.

``step(rule, ...)`` takes exactly what the C++ kernel takes, the bucket's gathered
int64 segment rows and the float64 hyperparameter table, both on the host,
and the same keyword-only precision options (storage dtype of the states,
master weights, stochastic rounding, the control block, the seed). It
derives each segment's first block (one vectorized cumsum), packs rows,
block starts, zeroed arrival counters, hyperparameters, the seed and a
default control block into ONE int64 buffer, copies it to the device in one
transfer, and launches one grid of one program per block.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import triton.language as tl
from torch import Tensor

from .. import quant, rules
from .._buckets import CTL_CLIP, CTL_INV_SCALE, CTL_SIZE, SEG_COLS, SEG_HP, SEG_N
from ._kernels import UPDATES, _step_kernel

# Elements per program and warps per program, fixed for every rule (no
# autotuning: the kernels update in place, so a tuner's trial runs would
# advance the optimizer several times). 1024 elements over 4 warps gives each
# thread 8 contiguous elements: two 128-bit accesses per fp32 buffer.
BLOCK_SIZE = 1024
NUM_WARPS = 4
# 8-bit states: a program owns whole quant blocks, counted from its tensor's first element
assert BLOCK_SIZE % quant.BLOCK_SIZE == 0

_STORAGE = {
    torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64,
}


_HALF = (torch.float16, torch.bfloat16)
# the kernel's switch arguments (SW0, SW1): a rule has at most this many
_MAX_SWITCHES = 2
# int64 words of the packed buffer holding the default control block (CTL_SIZE float32s)
_CTL_WORDS = (CTL_SIZE + 1) // 2


class _LaunchTables(NamedTuple):
    segments: Tensor  # int64 [nseg * SEG_COLS]
    block_starts: Tensor  # int64 [nseg + 1]
    arrivals: Tensor  # int64 [nseg], zeros
    hyper: Tensor  # float64 [groups * cols]
    seed: Tensor  # int64 [1]: the seed's bits
    ctl: Tensor  # float32 [>= CTL_SIZE]: the control block of no AMP and no clipping
    nseg: int
    num_blocks: int


def _check_layout(dtype: torch.dtype, state_dtype: torch.dtype, master: bool, stochastic: bool) -> None:
    """The storage combinations the kernels support: csrc/include/fusedwd/precision.h layout_supported."""
    half_p, half_s = dtype in _HALF, state_dtype in _HALF
    if master:
        ok = half_p and not stochastic and (state_dtype == torch.float32 or half_s)
    elif stochastic:
        ok = dtype == torch.bfloat16 and state_dtype in (torch.bfloat16, torch.float32)
    else:
        ok = state_dtype == dtype or (dtype == torch.float32 and half_s) or (half_p and state_dtype == torch.float32)
    if not ok:
        raise ValueError(f"unsupported storage layout: params {dtype}, states {state_dtype}"
                         + (", fp32 master weights" if master else "")
                         + (", stochastic rounding" if stochastic else ""))


def _check_q8_layout(dtype: torch.dtype, state_dtype: Optional[torch.dtype], master: bool, stochastic: bool) -> None:
    """8-bit states: precision.h q8_layout_supported (fp32 p; 16-bit p with an fp32 master; bf16 p
    rounded stochastically; 16-bit p rounded to nearest)."""
    if master:
        ok = dtype in _HALF and not stochastic
    elif stochastic:
        ok = dtype == torch.bfloat16
    else:
        ok = dtype == torch.float32 or dtype in _HALF
    if not ok or state_dtype not in (None, torch.uint8):
        raise ValueError(f"unsupported storage layout: params {dtype}, 8-bit states"
                         + (f" (state_dtype {state_dtype})" if state_dtype not in (None, torch.uint8) else "")
                         + (", fp32 master weights" if master else "")
                         + (", stochastic rounding" if stochastic else ""))


def _tables(segments: Tensor, hyper: Tensor, hp_cols: int, device: torch.device, seed: int) -> _LaunchTables:
    """Validate the host tables, derive the block starts, and put everything on ``device`` in one copy."""
    if segments.dtype != torch.int64 or segments.dim() != 2 or segments.shape[1] != SEG_COLS:
        raise ValueError(
            f"segments must be an int64 [nseg, {SEG_COLS}] table, got {segments.dtype} {tuple(segments.shape)}"
        )
    if hyper.dtype != torch.float64 or hyper.dim() != 2 or hyper.shape[1] != hp_cols:
        raise ValueError(f"hyper must be a float64 [groups, {hp_cols}] table, got {hyper.dtype} {tuple(hyper.shape)}")
    if segments.device.type != "cpu":
        raise ValueError("the segment table is read on the host; pass a CPU tensor")
    # capturable=True builds the hyperparameter rows on the device: they are never read on the host
    hyper_on_host = hyper.device.type == "cpu"
    if not hyper_on_host and hyper.device != device:
        raise ValueError(f"hyper must be on the host or on {device}, got a tensor on {hyper.device}")
    nseg = segments.shape[0]
    hp_rows = segments[:, SEG_HP]
    if int(hp_rows.min()) < 0 or int(hp_rows.max()) >= hyper.shape[0]:
        raise ValueError(f"a segment names a hyperparameter row outside [0, {hyper.shape[0]})")
    # an empty tensor still gets one (fully masked) block, which advances its step count
    blocks = torch.div(segments[:, SEG_N] + (BLOCK_SIZE - 1), BLOCK_SIZE, rounding_mode="floor").clamp_(min=1)

    sizes = [nseg * SEG_COLS, nseg + 1, nseg, hyper.numel(), 1, _CTL_WORDS]
    # pinned, so the one host-to-device copy below is asynchronous: a step never
    # waits for the GPU. The caching host allocator keeps the buffer until the copy is done.
    pinned = device.type == "cuda"
    packed = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=pinned)
    seg_part, start_part, arrival_part, hyper_part, seed_part, ctl_part = packed.split(sizes)
    seg_part.view(nseg, SEG_COLS).copy_(segments)
    start_part[0] = 0
    torch.cumsum(blocks, 0, out=start_part[1:])
    arrival_part.zero_()
    if hyper_on_host:
        hyper_part.view(torch.float64).copy_(hyper.reshape(-1))
    seed_part[0] = seed - (1 << 64) if seed >= 1 << 63 else seed  # the uint64's bits
    ctl = ctl_part.view(torch.float32)
    ctl.zero_()  # found_inf 0: the step is taken
    ctl[CTL_INV_SCALE] = ctl[CTL_CLIP] = 1.0
    num_blocks = int(start_part[-1])

    if device.type != "cpu":
        packed = packed.to(device, non_blocking=True)
    seg_part, start_part, arrival_part, hyper_part, seed_part, ctl_part = packed.split(sizes)
    if not hyper_on_host:
        hyper_part.view(torch.float64).copy_(hyper.reshape(-1))  # device to device, queued after the upload
    return _LaunchTables(seg_part, start_part, arrival_part, hyper_part.view(torch.float64), seed_part,
                         ctl_part.view(torch.float32), nseg, num_blocks)


def step(rule: str, segments: Tensor, hyper: Tensor, device: torch.device, dtype: torch.dtype,
         switches: Sequence[bool], *, state_dtype: Optional[torch.dtype] = None, master: bool = False,
         stochastic_rounding: bool = False, ctl: Optional[Tensor] = None, seed: int = 0,
         quantized: bool = False) -> None:
    """One step of ``rule`` over every segment of a bucket, in one launch (docs/math.md#<rule>).

    Args:
        rule: the rule's name (fusedwd.rules).
        segments: int64 ``[nseg, SEG_COLS]`` on the host: the bucket's rows for this
            step (docs/design.md#segment-table); every address points into ``device``.
        hyper: float64 ``[groups, len(columns)]`` on the host (or on ``device``: capturable=True),
            one row per param group in the rule's column order.
        device: where the tensors the rows point to live (CPU only under
            ``TRITON_INTERPRET=1``).
        dtype: the storage dtype of every parameter and gradient.
        switches: the rule's structural switches, one bool each, in its order; the rows carry
            the states they keep.
        state_dtype: the storage dtype of every state; None: ``dtype``. fp32 parameters
            may keep 16-bit states, 16-bit parameters fp32 ones.
        master: 16-bit parameters have an fp32 master copy at ``SEG_MASTER``: the update
            reads it, and writes it exactly and the parameter rounded to nearest even.
        stochastic_rounding: round bf16 parameters (without a master) stochastically,
            with bits keyed by ``seed``, the segment's ``SEG_SALT`` and its step.
        ctl: float32 ``[CTL_SIZE]`` on ``device``: 1/grad_scale, found_inf (nonzero: the
            launch writes nothing, step counts included) and the clip coefficient,
            read by the kernel; None: no scaling, no clipping.
        seed: the stochastic-rounding seed, in [0, 2^64).
        quantized: 8-bit blockwise states (docs/quantization.md): ``SEG_S*`` hold uint8 codes and
            ``SEG_A*`` each state's fp32 block absmax, blocks of 256 from each tensor's first element;
            ``state_dtype`` is then None (or torch.uint8). Layouts: fp32 parameters, 16-bit ones with
            ``master``, bf16 ones with ``stochastic_rounding``, 16-bit ones rounded to nearest.
    """
    spec = rules.get(rule)
    if rule not in UPDATES:
        raise NotImplementedError(f"rule {rule!r} has no Triton kernel yet (a two-phase rule: docs/backends.md); "
                                  "use backend='cpu' or 'reference'")
    switches = tuple(bool(s) for s in switches)
    if len(switches) != len(spec.switches):
        raise ValueError(f"rule {rule!r} takes {len(spec.switches)} switches, got {len(switches)}")
    if len(spec.switches) > _MAX_SWITCHES:
        raise ValueError(f"the Triton kernel takes at most {_MAX_SWITCHES} switches; rule {rule!r} has "
                         f"{len(spec.switches)}")
    master, stochastic_rounding, quantized = bool(master), bool(stochastic_rounding), bool(quantized)
    if dtype not in _STORAGE:
        raise TypeError(f"the Triton kernels take {', '.join(map(str, _STORAGE))} parameters, got {dtype}")
    if quantized:
        _check_q8_layout(dtype, state_dtype, master, stochastic_rounding)
    else:
        state_dtype = dtype if state_dtype is None else state_dtype
        if state_dtype not in _STORAGE:
            raise TypeError(f"the Triton kernels take {', '.join(map(str, _STORAGE))} states, got {state_dtype}")
        _check_layout(dtype, state_dtype, master, stochastic_rounding)
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    device = torch.device(device)
    # "cuda" names whichever CUDA device is current
    same_device = ctl is not None and ctl.device.type == device.type and device.index in (None, ctl.device.index)
    if ctl is not None and (ctl.dtype != torch.float32 or ctl.numel() < CTL_SIZE or not ctl.is_contiguous()
                            or not same_device):
        raise ValueError(f"ctl must be a contiguous float32 tensor of {CTL_SIZE} elements on {device}, got "
                         f"{ctl.dtype} {tuple(ctl.shape)} on {ctl.device}")
    if segments.shape[0] == 0:
        return
    tables = _tables(segments, hyper, len(spec.columns), device, int(seed))
    math = tl.float64 if dtype == torch.float64 else tl.float32
    launch = _step_kernel[(tables.num_blocks,)]
    args = (tables.segments, tables.block_starts, tables.arrivals, tables.hyper, tables.nseg,
            tables.ctl if ctl is None else ctl, tables.seed)
    kept = [slot is not None for slot in spec.slots(switches)] + [False] * (3 - len(spec.states))
    signed = [state.signed for state in spec.states] + [False] * (3 - len(spec.states))
    sw = switches + (False,) * (_MAX_SWITCHES - len(switches))
    options = dict(P=_STORAGE[dtype], S=tl.uint8 if quantized else _STORAGE[state_dtype], MATH=math, MASTER=master,
                   SR=stochastic_rounding, BLOCK_SIZE=BLOCK_SIZE, Q8=quantized, UPDATE=UPDATES[rule],
                   HP_COLS=len(spec.columns), KEEP0=kept[0], KEEP1=kept[1], KEEP2=kept[2], SIGNED0=signed[0],
                   SIGNED1=signed[1], SIGNED2=signed[2], NSW=len(switches), SW0=sw[0], SW1=sw[1],
                   num_warps=NUM_WARPS, enable_fp_fusion=False)
    if device.type == "cuda":
        with torch.cuda.device(device):  # Triton launches on the current device
            launch(*args, **options)
    else:
        launch(*args, **options)
