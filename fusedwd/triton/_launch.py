"""Launchers: one Triton launch per bucket per step, over all of its segments.

A launcher takes exactly what the C++ kernel takes, the bucket's gathered
int64 segment rows and the float64 hyperparameter table, both on the host.
It derives each segment's first block (one vectorized cumsum), packs rows,
block starts, zeroed arrival counters and hyperparameters into ONE int64
buffer, copies it to the device in one transfer, and launches one grid of
one program per block.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton.language as tl
from torch import Tensor

from .._buckets import SEG_COLS, SEG_HP, SEG_N
from ._kernels import ADAMW_HP_COLS, RMSPROPW_HP_COLS, SGDW_HP_COLS, _adamw_kernel, _rmspropw_kernel, _sgdw_kernel

# Elements per program and warps per program, fixed for every rule (no
# autotuning: the kernels update in place, so a tuner's trial runs would
# advance the optimizer several times). 1024 elements over 4 warps gives each
# thread 8 contiguous elements: two 128-bit accesses per fp32 buffer.
BLOCK_SIZE = 1024
NUM_WARPS = 4

_STORAGE = {
    torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64,
}


class _LaunchTables(NamedTuple):
    segments: Tensor  # int64 [nseg * SEG_COLS]
    block_starts: Tensor  # int64 [nseg + 1]
    arrivals: Tensor  # int64 [nseg], zeros
    hyper: Tensor  # float64 [groups * cols]
    nseg: int
    num_blocks: int


def _tables(segments: Tensor, hyper: Tensor, hp_cols: int, device: torch.device) -> _LaunchTables:
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

    n_seg, n_start, n_hyper = nseg * SEG_COLS, nseg + 1, hyper.numel()
    # pinned, so the one host-to-device copy below is asynchronous: a step never
    # waits for the GPU. The caching host allocator keeps the buffer until the copy is done.
    pinned = device.type == "cuda"
    packed = torch.empty(n_seg + n_start + nseg + n_hyper, dtype=torch.int64, pin_memory=pinned)
    seg_part, start_part, arrival_part, hyper_part = packed.split([n_seg, n_start, nseg, n_hyper])
    seg_part.view(nseg, SEG_COLS).copy_(segments)
    start_part[0] = 0
    torch.cumsum(blocks, 0, out=start_part[1:])
    arrival_part.zero_()
    if hyper_on_host:
        hyper_part.view(torch.float64).copy_(hyper.reshape(-1))
    num_blocks = int(start_part[-1])

    if device.type != "cpu":
        packed = packed.to(device, non_blocking=True)
    seg_part, start_part, arrival_part, hyper_part = packed.split([n_seg, n_start, nseg, n_hyper])
    if not hyper_on_host:
        hyper_part.view(torch.float64).copy_(hyper.reshape(-1))  # device to device, queued after the upload
    return _LaunchTables(seg_part, start_part, arrival_part, hyper_part.view(torch.float64), nseg, num_blocks)


def _launch(kernel, hp_cols: int, segments: Tensor, hyper: Tensor, device: torch.device, dtype: torch.dtype,
            **switches: bool) -> None:
    """One launch of ``kernel`` over every segment; ``switches`` are the rule's constexpr structure flags."""
    if dtype not in _STORAGE:
        raise TypeError(f"the Triton kernels take {', '.join(map(str, _STORAGE))} tensors, got {dtype}")
    device = torch.device(device)
    if segments.shape[0] == 0:
        return
    tables = _tables(segments, hyper, hp_cols, device)
    math = tl.float64 if dtype == torch.float64 else tl.float32
    launch = kernel[(tables.num_blocks,)]
    args = (tables.segments, tables.block_starts, tables.arrivals, tables.hyper, tables.nseg)
    options = dict(STORAGE=_STORAGE[dtype], MATH=math, BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS,
                   enable_fp_fusion=False, **switches)
    if device.type == "cuda":
        with torch.cuda.device(device):  # Triton launches on the current device
            launch(*args, **options)
    else:
        launch(*args, **options)


def adamw_step_triton(segments: Tensor, hyper: Tensor, device: torch.device, dtype: torch.dtype,
                      amsgrad: bool) -> None:
    """One AdamW step over every segment of a bucket, in one launch (docs/math.md#adamw).

    Args:
        segments: int64 ``[nseg, SEG_COLS]`` on the host: the bucket's rows for this
            step (docs/design.md#segment-table); every address points into ``device``.
        hyper: float64 ``[groups, 7]`` on the host (or on ``device``: capturable=True): ``lr, beta1, beta2, eps,
            decay_mult, l2, grad_sign`` per param group.
        device: where the tensors the rows point to live (CPU only under
            ``TRITON_INTERPRET=1``).
        dtype: the storage dtype of every parameter, gradient and state.
        amsgrad: whether the rows carry ``max_exp_avg_sq`` (state 2).
    """
    _launch(_adamw_kernel, ADAMW_HP_COLS.value, segments, hyper, device, dtype, AMSGRAD=bool(amsgrad))


def sgdw_step_triton(segments: Tensor, hyper: Tensor, device: torch.device, dtype: torch.dtype,
                     has_momentum: bool, nesterov: bool) -> None:
    """One SGDW step over every segment of a bucket, in one launch (docs/math.md#sgdw).

    Args:
        segments, device, dtype: as for :func:`adamw_step_triton`.
        hyper: float64 ``[groups, 6]``: ``lr, momentum, dampening, decay_mult, l2, grad_sign``.
        has_momentum: whether the rows carry ``momentum_buffer`` (state 0).
        nesterov: Nesterov momentum.
    """
    _launch(_sgdw_kernel, SGDW_HP_COLS.value, segments, hyper, device, dtype, HAS_MOMENTUM=bool(has_momentum),
            NESTEROV=bool(nesterov))


def rmspropw_step_triton(segments: Tensor, hyper: Tensor, device: torch.device, dtype: torch.dtype,
                         centered: bool, has_momentum: bool) -> None:
    """One RMSpropW step over every segment of a bucket, in one launch (docs/math.md#rmspropw).

    Args:
        segments, device, dtype: as for :func:`adamw_step_triton`.
        hyper: float64 ``[groups, 7]``: ``lr, alpha, eps, momentum, decay_mult, l2, grad_sign``.
        centered: whether the rows carry ``grad_avg`` (state 1).
        has_momentum: whether the rows carry ``momentum_buffer`` (state 2).
    """
    _launch(_rmspropw_kernel, RMSPROPW_HP_COLS.value, segments, hyper, device, dtype, CENTERED=bool(centered),
            HAS_MOMENTUM=bool(has_momentum))
