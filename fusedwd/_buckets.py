"""Buckets: flat state buffers and segment tables (docs/design.md#buckets).

A bucket is every parameter of one optimizer that shares device, dtype,
backend, storage layout and the structural options of its rule. What a bucket
holds is split by job: ``Bucket`` is the plan's decision (which parameters,
stored how); ``FlatStates`` its allocated buffers (one flat buffer per state
name, each tensor's slice starting 64-byte aligned; the tensors in
``optimizer.state[p]`` are views of those slices); ``Tables`` the segment
tables the compiled kernels read. Gradients re-homed into a flat buffer
(``flat_grads=True``) are fusedwd/optim/_flat.py's ``FlatGrads``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

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

# Storage dtype codes of the compiled kernels (csrc/include/fusedwd/common.h DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

ALIGN_BYTES = 64  # one cache line; also a full AVX-512 vector


def aligned_offsets(numels: list[int], element_size: int) -> tuple[list[int], int]:
    """Start offsets (in elements) of each tensor in a flat buffer, and its total length."""
    step = max(1, ALIGN_BYTES // element_size)
    offsets, total = [], 0
    for n in numels:
        offsets.append(total)
        total += -(-n // step) * step  # round up so the next slice starts aligned
    return offsets, total


@dataclass(frozen=True)
class Storage:
    """How a bucket stores its states and parameters (fusedwd/_spec.py storage_layout)."""

    state_dtype: torch.dtype  # every state's; torch.uint8: 8-bit blockwise codes (fusedwd/quant.py)
    master: bool = False  # an fp32 master copy of every (16-bit) parameter
    stochastic_rounding: bool = False  # bf16 parameters rounded stochastically

    @property
    def quantized(self) -> bool:
        return self.state_dtype == torch.uint8


@dataclass
class FlatStates:
    """A bucket's flat buffers and their per-parameter views (``allocate``)."""

    offsets: list[int]  # each parameter's first element in every flat buffer
    length: int  # elements in each flat buffer, alignment padding included
    buffers: dict[str, Tensor] = field(default_factory=dict)  # state name -> flat buffer
    views: dict[str, list[Tensor]] = field(default_factory=dict)  # state name -> per-parameter views
    # 8-bit states: state name -> the flat fp32 block absmax, and its per-parameter views
    absmax: dict[str, Tensor] = field(default_factory=dict)
    absmax_views: dict[str, list[Tensor]] = field(default_factory=dict)
    master: Optional[Tensor] = None  # float32, laid out like the states
    master_views: list[Tensor] = field(default_factory=list)
    steps: Optional[Tensor] = None  # float32 step count per parameter
    step_views: list[Tensor] = field(default_factory=list)


@dataclass
class Tables:
    """The int64 segment tables of a compiled backend (docs/design.md#segment-table)."""

    table_in: Tensor  # [n, SEG_COLS]: every parameter's row, pointers cached at build
    table_out: Tensor  # [n, SEG_COLS]: this step's active rows
    arrivals: Optional[Tensor] = None  # the CUDA kernel's arrival counter (one zero int32 on the device)
    # GPU backends: the tables a launch reads, kept on the device (fusedwd/optim/_graphs.py ResidentTable),
    # and the Triton launch's (segments, programs) of this step
    device_table: Optional[Any] = None
    launch_shape: tuple[int, int] = (0, 0)


@dataclass
class Bucket:
    """Parameters of one (device, dtype, backend, structure, storage) class, and their flat states."""

    key: Hashable
    device: torch.device
    dtype: torch.dtype
    backend: str  # resolved: "cpu", "triton", "cuda" or "reference"
    structure: tuple  # the rule's structural switches (amsgrad, has_momentum, ...)
    state_names: tuple[Optional[str], ...]  # per column S0, S1, S2; None where the rule keeps no state
    signed: tuple[bool, ...]  # per state column: its 8-bit code is signed (m, momentum) or not (v)
    storage: Storage
    dtensor: bool = False  # DTensor parameters (FSDP2): shapes, pointers and states are their local shards
    # a two-phase rule's DTensor bucket: the (mesh, mesh_dim) its per-tensor sums are added over
    # (fusedwd/optim/_dtensor.py reduction), None where each rank holds whole tensors
    reduce_over: Any = None
    # with reduce_over: float64 [n, sums], what each added sum is multiplied by before phase 2
    # (the shard's numel / the tensor's for a mean, else 1: fusedwd/optim/_dtensor.py sum_scale)
    sum_scale: Optional[Tensor] = None
    flat_grads: bool = False  # p.grad re-homed into one flat buffer (fusedwd/optim/_flat.py)
    params: list[Tensor] = field(default_factory=list)
    group_rows: list[int] = field(default_factory=list)  # index of each param's group
    shapes: list[torch.Size] = field(default_factory=list)
    salts: list[int] = field(default_factory=list)  # per parameter: its index in the optimizer
    states: Optional[FlatStates] = None  # allocate()
    tables: Optional[Tables] = None  # build_tables(), for the compiled backends
    grads: Any = None  # flat_grads=True: fusedwd/optim/_flat.py FlatGrads
    exposed: list[bool] = field(default_factory=list)  # optimizer.state[p] holds the views
    n_unexposed: int = 0

    @property
    def numels(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    def allocate(self, steps_on_device: bool = False) -> None:
        """Allocate the flat buffers and build the per-parameter views."""
        numels = self.numels
        # offsets aligned for the narrowest buffer are aligned for every wider one
        # (8-bit codes: state_dtype is torch.uint8, one byte per element)
        widths = [self.dtype, self.storage.state_dtype] + ([torch.float32] if self.storage.master else [])
        element_size = min(torch.empty((), dtype=d).element_size() for d in widths)
        offsets, total = aligned_offsets(numels, element_size)
        states = self.states = FlatStates(offsets, total)
        for column, name in enumerate(self.state_names):
            if name is None:
                continue
            if self.storage.quantized:
                # every state starts at 0: the zero code, absmax 0
                flat = torch.full((total,), quant.zero_code(self.signed[column]), dtype=torch.uint8,
                                  device=self.device)
                blocks = [-(-n // quant.BLOCK_SIZE) for n in numels]
                scales = torch.zeros(sum(blocks), dtype=torch.float32, device=self.device)
                states.absmax[name] = scales
                states.absmax_views[name] = list(scales.split(blocks))
            else:
                flat = torch.zeros(total, dtype=self.storage.state_dtype, device=self.device)
            states.buffers[name] = flat
            states.views[name] = self.flat_views(flat)
        if self.storage.master:
            states.master = torch.zeros(total, dtype=torch.float32, device=self.device)
            states.master_views = self.flat_views(states.master)
        # torch keeps `step` as a float32 scalar tensor on the host (non-capturable path)
        states.steps = torch.zeros(len(self.params), dtype=torch.float32,
                                   device=self.device if steps_on_device else "cpu")
        states.step_views = list(states.steps.unbind(0))
        self.exposed = [False] * len(self.params)
        self.n_unexposed = len(self.params)

    def flat_views(self, flat: Tensor) -> list[Tensor]:
        """Per-parameter views of a flat buffer laid out like the state buffers."""
        return [flat[o : o + int(torch.Size(s).numel())].view(s) for o, s in zip(self.states.offsets, self.shapes)]

    def build_tables(self, grad_views: Optional[list[Tensor]] = None) -> None:
        """The int64 segment table the compiled kernels read (docs/design.md#segment-table);
        ``grad_views``: the flat gradient buffer's views (flat_grads=True), whose addresses are fixed."""
        states = self.states
        steps_base, step_size = states.steps.data_ptr(), states.steps.element_size()
        rows = []
        for i, p in enumerate(self.params):
            if self.dtensor:
                p = p._local_tensor  # a DTensor's shard on this rank (its own data_ptr() is 0)
            row = [0] * SEG_COLS
            row[SEG_P] = p.data_ptr()
            for column, name in zip(STATE_COLUMNS, self.state_names):
                if name is not None:
                    row[column] = states.views[name][i].data_ptr()
            row[SEG_G] = grad_views[i].data_ptr() if grad_views else 0
            row[SEG_STEP] = steps_base + i * step_size
            row[SEG_N] = p.numel()
            row[SEG_HP] = self.group_rows[i]
            row[SEG_INDEX] = i
            row[SEG_MASTER] = states.master_views[i].data_ptr() if self.storage.master else 0
            row[SEG_SALT] = self.salts[i] if self.salts else 0
            if self.storage.quantized:
                for column, name in zip(ABSMAX_COLUMNS, self.state_names):
                    if name is not None:
                        row[column] = states.absmax_views[name][i].data_ptr()
            rows.append(row)
        table_in = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), SEG_COLS)
        self.tables = Tables(table_in, torch.zeros_like(table_in))
