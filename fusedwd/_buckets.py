"""Buckets: flat state buffers and segment tables (docs/design.md#buckets).

A bucket is every parameter of one optimizer that shares device, dtype,
backend and the structural options of its rule. Its states live in one flat
buffer per state name, each tensor's slice starting 64-byte aligned; the
tensors in ``optimizer.state[p]`` are views of those slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Optional

import torch
from torch import Tensor

from . import quant

# Segment-table columns (docs/design.md#segment-table); csrc/include/fusedwd/layout.h
# holds the same numbers; tests/test_layout.py checks they agree.
(SEG_P, SEG_G, SEG_S0, SEG_S1, SEG_S2, SEG_STEP, SEG_N, SEG_HP, SEG_INDEX, SEG_MASTER, SEG_SALT,
 SEG_A0, SEG_A1, SEG_A2) = range(14)
SEG_COLS = 14
ABSMAX_COLUMNS = (SEG_A0, SEG_A1, SEG_A2)  # 8-bit states: each state's fp32 block absmax
# The per-launch float32 control block (layout.h Ctl): 1/grad_scale, found_inf, clip coefficient.
CTL_INV_SCALE, CTL_FOUND_INF, CTL_CLIP = range(3)
CTL_SIZE = 3
STATE_COLUMNS = (SEG_S0, SEG_S1, SEG_S2)

ALIGN_BYTES = 64  # one cache line; also a full AVX-512 vector


def aligned_offsets(numels: list[int], element_size: int) -> tuple[list[int], int]:
    """Start offsets (in elements) of each tensor in a flat buffer, and its total length."""
    step = max(1, ALIGN_BYTES // element_size)
    offsets, total = [], 0
    for n in numels:
        offsets.append(total)
        total += -(-n // step) * step  # round up so the next slice starts aligned
    return offsets, total


@dataclass
class Bucket:
    """Parameters of one (device, dtype, backend, structure) class and their flat states."""

    key: Hashable
    device: torch.device
    dtype: torch.dtype
    backend: str  # resolved: "cpu" or "reference"
    structure: tuple  # the rule's structural switches (amsgrad, nesterov, ...)
    state_names: tuple[Optional[str], ...]  # per column S0, S1, S2; None where the rule keeps no state
    flat_grads: bool = False  # p.grad re-homed into grad_buffer (fusedwd/optim/_flat.py)
    # storage of the states, and the precision options (fusedwd/_spec.py storage_layout)
    state_dtype: Optional[torch.dtype] = None  # None: the parameters' dtype
    master: bool = False  # an fp32 master copy of every (16-bit) parameter
    stochastic_rounding: bool = False  # bf16 parameters rounded stochastically
    salts: list[int] = field(default_factory=list)  # per parameter: its index in the optimizer
    # 8-bit blockwise states (fusedwd/quant.py): buffers hold uint8 codes, absmax the fp32 scales
    quantized: bool = False
    signed: tuple[bool, ...] = ()  # per state column: the signed code (m, momentum) or not (v)
    absmax: dict[str, Tensor] = field(default_factory=dict)
    absmax_views: dict[str, list[Tensor]] = field(default_factory=dict)
    # DTensor parameters (FSDP2): shapes, pointers and states are their local shards (fusedwd/optim/_dtensor.py)
    dtensor: bool = False
    params: list[Tensor] = field(default_factory=list)
    group_rows: list[int] = field(default_factory=list)  # index of each param's group
    shapes: list[torch.Size] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    length: int = 0  # elements in each flat buffer, alignment padding included
    buffers: dict[str, Tensor] = field(default_factory=dict)
    views: dict[str, list[Tensor]] = field(default_factory=dict)
    master_buffer: Optional[Tensor] = None  # float32, laid out like the states
    master_views: list[Tensor] = field(default_factory=list)
    steps: Optional[Tensor] = None  # float32 step count per parameter
    step_views: list[Tensor] = field(default_factory=list)
    table_in: Optional[Tensor] = None  # int64 [n, SEG_COLS], pointers cached at build
    table_out: Optional[Tensor] = None  # int64 [n, SEG_COLS], this step's active rows
    exposed: list[bool] = field(default_factory=list)  # state[p] holds the views
    n_unexposed: int = 0
    # the CUDA kernel's arrival counter (one zero int32 on the device, left at zero)
    arrivals: Optional[Tensor] = None
    # GPU backends: the tables a launch reads, kept on the device (fusedwd/optim/_graphs.py ResidentTable),
    # and the Triton launch's (segments, blocks) of this step
    device_table: Optional[object] = None
    launch_shape: tuple[int, int] = (0, 0)
    # flat_grads=True: every p.grad is a view of one flat buffer (fusedwd/optim/_flat.py)
    grad_buffer: Optional[Tensor] = None
    grad_views: list[Tensor] = field(default_factory=list)

    def allocate(self, steps_on_device: bool = False) -> None:
        """Allocate the flat buffers and build the per-parameter views."""
        numels = [int(torch.Size(s).numel()) for s in self.shapes]
        if self.state_dtype is None:
            self.state_dtype = self.dtype
        # offsets aligned for the narrowest buffer are aligned for every wider one
        widths = [self.dtype, self.state_dtype] + ([torch.float32] if self.master else [])
        # (8-bit codes: state_dtype is torch.uint8, one byte per element)
        element_size = min(torch.empty((), dtype=d).element_size() for d in widths)
        self.offsets, total = aligned_offsets(numels, element_size)
        self.length = total
        for column, name in enumerate(self.state_names):
            if name is None:
                continue
            if self.quantized:
                # every state starts at 0: the zero code, absmax 0
                signed = self.signed[column]
                flat = torch.full((total,), quant.zero_code(signed), dtype=torch.uint8, device=self.device)
                blocks = [-(-n // quant.BLOCK_SIZE) for n in numels]
                scales = torch.zeros(sum(blocks), dtype=torch.float32, device=self.device)
                self.absmax[name] = scales
                self.absmax_views[name] = list(scales.split(blocks))
            else:
                flat = torch.zeros(total, dtype=self.state_dtype, device=self.device)
            self.buffers[name] = flat
            self.views[name] = self.flat_views(flat)
        if self.master:
            self.master_buffer = torch.zeros(total, dtype=torch.float32, device=self.device)
            self.master_views = self.flat_views(self.master_buffer)
        # torch keeps `step` as a float32 scalar tensor on the host (non-capturable path)
        self.steps = torch.zeros(len(self.params), dtype=torch.float32,
                                 device=self.device if steps_on_device else "cpu")
        self.step_views = list(self.steps.unbind(0))
        self.exposed = [False] * len(self.params)
        self.n_unexposed = len(self.params)

    def flat_views(self, flat: Tensor) -> list[Tensor]:
        """Per-parameter views of a flat buffer laid out like the state buffers."""
        return [flat[o : o + int(torch.Size(s).numel())].view(s) for o, s in zip(self.offsets, self.shapes)]

    def build_tables(self) -> None:
        """The int64 segment table the compiled kernels read (docs/design.md#segment-table)."""
        steps_base, step_size = self.steps.data_ptr(), self.steps.element_size()
        rows = []
        for i, p in enumerate(self.params):
            if self.dtensor:
                p = p._local_tensor  # a DTensor's shard on this rank (its own data_ptr() is 0)
            row = [0] * SEG_COLS
            row[SEG_P] = p.data_ptr()
            for column, name in zip(STATE_COLUMNS, self.state_names):
                if name is not None:
                    row[column] = self.views[name][i].data_ptr()
            row[SEG_G] = self.grad_views[i].data_ptr() if self.grad_views else 0
            row[SEG_STEP] = steps_base + i * step_size
            row[SEG_N] = p.numel()
            row[SEG_HP] = self.group_rows[i]
            row[SEG_INDEX] = i
            row[SEG_MASTER] = self.master_views[i].data_ptr() if self.master else 0
            row[SEG_SALT] = self.salts[i] if self.salts else 0
            if self.quantized:
                for column, name in zip(ABSMAX_COLUMNS, self.state_names):
                    if name is not None:
                        row[column] = self.absmax_views[name][i].data_ptr()
            rows.append(row)
        self.table_in = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), SEG_COLS)
        self.table_out = torch.zeros_like(self.table_in)
