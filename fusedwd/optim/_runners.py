"""One runner per backend, behind one interface: how a bucket is prepared and stepped.

``prepare(step, bucket)`` validates the bucket's parameters and gradients and
gathers what its pass needs, writing nothing, so that a step that raises leaves
every buffer untouched (the optimizer prepares every bucket before running
any). ``run(step, bucket, work)`` takes the step and returns the indices of the
parameters it stepped. ``sumsq(bucket, work)`` is the backend's own read pass
for max_grad_norm, or None where torch computes the norms.

The compiled backends share the gathering of gradient addresses into the
bucket's segment table (docs/design.md#gathering-gradients) and differ only in
their launch: fusedwd._C, fusedwd.triton or fusedwd._C_cuda, each a single
``step(rule, ...)`` for every rule.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import _cuda_ext, _ext, quant
from .._buckets import CTL_CLIP, CTL_FOUND_INF, CTL_INV_SCALE, DTYPE_CODES, SEG_COLS, SEG_G, SEG_INDEX, SEG_P, Bucket
from .._spec import Backend, hyper_tensor
from ..reference import Precision
from ..rules import Rule
from . import _dtensor, _flat
from ._checks import Checks

# Elements per thread below which the CPU pass does not split (torch's at::internal::GRAIN_SIZE).
GRAIN_SIZE = 32768


class Step:
    """What the runners read during one optimizer step: the rule and the param groups, the
    parameter checks, the control block (None: no AMP, no clipping), the hyperparameter table
    of each device and the stochastic-rounding seed (drawn once, then kept in the param groups,
    so in state_dict, for a run resumed from a checkpoint)."""

    def __init__(self, rule: Rule, param_groups: list[dict], checks: Checks) -> None:
        self.rule = rule
        self.param_groups = param_groups
        self.checks = checks
        self.ctl: Optional[Tensor] = None
        # each device's table where the kernels read it (the optimizer's step sets it: _graphs.sync)
        self.hypers: dict[torch.device, Tensor] = {}

    def hyper(self, device: torch.device) -> Tensor:
        """Every group's hyperparameter row, as the kernels read them: the optimizer's resident table
        (fusedwd/optim/_graphs.py), or, for a Step used alone, one built now.

        capturable=True builds it on ``device`` from a tensor lr without a host read (a CUDA
        graph replays it with the lr of the replay); otherwise it is built on the host.
        """
        if device not in self.hypers:
            rule = self.rule
            if any(g.get("capturable") for g in self.param_groups):
                table = torch.stack([hyper_tensor(rule.hyper_row(g, device), device) for g in self.param_groups])
            else:
                table = torch.tensor([rule.hyper_row(g) for g in self.param_groups], dtype=torch.float64)
            self.hypers[device] = table
        return self.hypers[device]

    def seed(self) -> int:
        for group in self.param_groups:
            if "sr_seed" in group:
                return int(group["sr_seed"])
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        for group in self.param_groups:
            group["sr_seed"] = seed
        return seed


class Runner:
    """How one backend steps a bucket (see the module's docstring)."""

    def prepare(self, step: Step, bucket: Bucket) -> Any:
        raise NotImplementedError

    def run(self, step: Step, bucket: Bucket, work: Any) -> list[int]:
        raise NotImplementedError

    def active(self, work: Any) -> int:
        """The segment-table rows this step's ``work`` launches over (0: the backend has no table)."""
        return 0

    def sumsq(self, bucket: Bucket, work: Any) -> Optional[Tensor]:
        return None


class ReferenceRunner(Runner):
    """fusedwd.reference, one param group's tensors at a time (the executable spec)."""

    def prepare(self, step: Step, bucket: Bucket) -> dict[int, list[int]]:
        """This step's parameters of the bucket, by param group row."""
        by_group: dict[int, list[int]] = {}
        for i, p in enumerate(bucket.params):
            if p.grad is None:
                continue
            step.checks.check(bucket, i, *step.checks.local_pair(bucket, i))
            by_group.setdefault(bucket.group_rows[i], []).append(i)
        return by_group

    def run(self, step: Step, bucket: Bucket, work: dict[int, list[int]]) -> list[int]:
        grad_mult = 1.0
        ctl = step.ctl
        if ctl is not None:
            # the reference is the readable spec, not a capturable path: it reads ctl on the host
            if float(ctl[CTL_FOUND_INF]) != 0.0:
                return []
            grad_mult = float(ctl[CTL_INV_SCALE] * ctl[CTL_CLIP])  # the fp32 product, as the kernels form it
        storage, flat = bucket.storage, bucket.states
        seed = step.seed() if storage.stochastic_rounding else 0
        stepped = []
        for row, indices in work.items():
            names = [(column, name) for column, name in enumerate(bucket.state_names) if name is not None]
            if storage.quantized:  # the rule's fp32 math on decoded states, re-encoded after (fusedwd.quant)
                states = {name: [quant.dequantize_blockwise(flat.views[name][i], flat.absmax_views[name][i],
                                                            bucket.shapes[i], bucket.signed[column])
                                 for i in indices] for column, name in names}
            else:
                states = {name: [flat.views[name][i] for i in indices] for _, name in names}
            precision = Precision(
                masters=[flat.master_views[i] for i in indices] if storage.master else None,
                grad_mult=grad_mult, stochastic_rounding=storage.stochastic_rounding, seed=seed,
                salts=[bucket.salts[i] for i in indices],
            )
            step.rule.reference(
                step.param_groups[row], bucket.structure, [_dtensor.local(bucket.params[i]) for i in indices],
                [_dtensor.local(bucket.params[i].grad) for i in indices], states,
                [flat.step_views[i] for i in indices], precision,
            )
            if storage.quantized:
                for column, name in names:
                    for i, value in zip(indices, states[name]):
                        codes, scales = quant.quantize_blockwise(value, bucket.signed[column])
                        flat.views[name][i].copy_(codes.view(bucket.shapes[i]))
                        flat.absmax_views[name][i].copy_(scales)
            stepped += indices
        return stepped


Staged = list[tuple[Tensor, Tensor, Tensor]]  # (parameter, its contiguous copy, the gradient's)


class KernelRunner(Runner):
    """A compiled backend: gather this step's segment rows, launch one pass over them, write back
    the parameters that were staged through contiguous copies."""

    def prepare(self, step: Step, bucket: Bucket) -> tuple[int, Staged]:
        """Fill the bucket's table of this step's segments; returns (rows, staged copies)."""
        tables = bucket.tables
        if bucket.grads is not None:
            return _flat.prepare(bucket, _ext.cpu(), step.checks), []
        # The Triton backend works without the C++ module: its parameters then all take
        # the Python path below, one at a time.
        # gather reads tensors through raw pointers: a DTensor's shard is one level down.
        gather = _ext.cpu().gather if (bucket.backend == Backend.CPU or _ext.has_cpu()) and not bucket.dtensor \
            else None
        # On a CUDA bucket gather cannot check the gradient's device. torch's .grad setter
        # already requires the parameter's device, and a parameter moved since the plan was
        # built has a new address, which sends it to the checks below.
        expect_cpu = bucket.device.type == "cpu"
        params, table_in, table_out = bucket.params, tables.table_in, tables.table_out
        n, i, n_active = len(params), 0, 0
        staged: Staged = []
        while True:
            if gather is not None:
                i, n_active = gather(params, i, table_in.data_ptr(), table_out.data_ptr(), n_active, bucket.dtype,
                                     expect_cpu)
            else:
                while i < n and params[i].grad is None:
                    i += 1
            if i >= n:
                return n_active, staged
            # gather stops at a parameter it cannot take as is: diagnose it here
            p, g = step.checks.local_pair(bucket, i)
            step.checks.check(bucket, i, p, g)
            p_c, g_c = p, g
            if not (p.is_contiguous() and g.is_contiguous()):
                p_c, g_c = p.contiguous(), g.contiguous()  # stage through contiguous copies
                staged.append((p, p_c, g_c))
            else:
                table_in[i, SEG_P] = p.data_ptr()  # p.data was replaced by a same-shaped tensor
            row = table_in[i].clone()
            row[SEG_P], row[SEG_G] = p_c.data_ptr(), g_c.data_ptr()
            table_out[n_active] = row
            i, n_active = i + 1, n_active + 1

    def active(self, work: tuple[int, Staged]) -> int:
        return work[0]

    def run(self, step: Step, bucket: Bucket, work: tuple[int, Staged]) -> list[int]:
        n_active, staged = work
        if not n_active and bucket.reduce_over is None:  # a reduced bucket joins its collective all the same
            return []
        self.launch(step, bucket, n_active)
        for p, p_c, _ in staged:
            if p_c is not p:
                p.copy_(p_c)
        return bucket.tables.table_out[:n_active, SEG_INDEX].tolist() if bucket.n_unexposed else []

    def launch(self, step: Step, bucket: Bucket, n_active: int) -> None:
        raise NotImplementedError

    @staticmethod
    def precision(step: Step, bucket: Bucket, dtype_code: Callable[[torch.dtype], Any]) -> dict:
        """The kernels' precision keywords for a bucket, only those that differ from the default."""
        storage = bucket.storage
        kw: dict[str, Any] = {}
        if storage.quantized:
            kw["quantized"] = True
        elif storage.state_dtype != bucket.dtype:
            kw["state_dtype"] = dtype_code(storage.state_dtype)
        if storage.master:
            kw["master"] = True
        if storage.stochastic_rounding:
            kw["stochastic_rounding"] = True
            kw["seed"] = step.seed()
        if step.ctl is not None:
            kw["ctl"] = step.ctl.to(bucket.device)
        return kw


def threads(bucket: Bucket) -> int:
    """The CPU pass's threads: like torch's parallel_for, no thread gets fewer than GRAIN_SIZE
    elements: on small buckets a parallel region costs more than it saves, and on a busy machine
    it waits for a descheduled thread at every step."""
    return max(1, min(torch.get_num_threads(), -(-bucket.states.length // GRAIN_SIZE)))


class CpuRunner(KernelRunner):
    """fusedwd._C: the C++ CPU kernel (csrc/cpu)."""

    def launch(self, step: Step, bucket: Bucket, n_active: int) -> None:
        precision = self.precision(step, bucket, DTYPE_CODES.__getitem__)
        ctl = precision.pop("ctl", None)  # a CPU tensor, alive until the call returns
        hyper = step.hyper(bucket.device)

        def kernel(**kw: Any) -> None:
            _ext.cpu().step(step.rule.name, bucket.tables.table_out.data_ptr(), n_active, hyper.data_ptr(),
                            DTYPE_CODES[bucket.dtype], bucket.structure, threads(bucket),
                            ctl=0 if ctl is None else ctl.data_ptr(), **precision, **kw)

        if bucket.reduce_over is None:
            kernel()
            return
        active = torch.zeros(n_active, len(step.rule.sums), dtype=torch.float64)
        reduce_between_phases(bucket, n_active, active, bucket.tables.table_out[:n_active, SEG_INDEX],
                              lambda phases: kernel(sums=active.data_ptr(), phases=phases))

    def sumsq(self, bucket: Bucket, work: tuple[int, Staged]) -> Optional[Tensor]:
        """max_grad_norm's read pass over this step's segment table, summing squares in double."""
        value = _ext.cpu().grad_sumsq(bucket.tables.table_out.data_ptr(), work[0], DTYPE_CODES[bucket.dtype],
                                      threads(bucket))
        return torch.tensor(value, dtype=torch.float64)


def reduce_between_phases(bucket: Bucket, n_active: int, active: Tensor, rows: Tensor,
                          kernel: Callable[[int], None]) -> None:
    """A two-phase step of a bucket of FSDP2 shards: phase 1 (``kernel(1)``) sums this rank's part
    of each tensor into ``active`` (float64 [n_active, sums], zeroed by the caller: a skipped step
    writes none), the parts are added over the ranks (one collective per bucket), and phase 2
    (``kernel(2)``) steps with the whole tensors' sums (docs/design.md#per-tensor-reductions).
    ``rows``: each active row's parameter index (int64 [n_active], on ``active``'s device: no copy
    from the host between the launches)."""
    if n_active:
        kernel(1)
    if n_active == len(bucket.params):
        # every parameter has a gradient: the active rows are the bucket's, in its order
        sums = active
    else:
        # by parameter, so that ranks agree row for row (a parameter without a gradient adds 0)
        sums = active.new_zeros(len(bucket.params), active.shape[1]).index_copy_(0, rows, active)
    _dtensor.reduce_sums(sums, bucket.reduce_over)
    sums.mul_(bucket.sum_scale)
    if n_active:
        if sums is not active:
            torch.index_select(sums, 0, rows, out=active)
        kernel(2)


class TritonRunner(KernelRunner):
    """fusedwd.triton: one generic Triton kernel (CUDA tensors, or CPU ones under TRITON_INTERPRET=1),
    launched over the launch image kept on the device (fusedwd/optim/_graphs.py)."""

    def launch(self, step: Step, bucket: Bucket, n_active: int) -> None:
        tables = bucket.tables
        nseg, programs = tables.launch_shape
        launcher = _ext.triton(bucket.device)
        capacity = len(bucket.params)
        hyper = step.hyper(bucket.device)
        precision = self.precision(step, bucket, lambda d: d)

        def kernel(phases: int = 3) -> None:
            launcher.launch_image(step.rule.name, tables.device_table.buffer, capacity, nseg, programs, hyper,
                                  bucket.device, bucket.dtype, bucket.structure, phases=phases, **precision)

        if bucket.reduce_over is None:
            kernel()
            return
        # FSDP2 shards: the launch buffer's segment sums, added over the ranks between the phases;
        # the rows' parameter indices read from the segment rows already on the device
        active = launcher.sums_view(tables.device_table.buffer, capacity, len(step.rule.sums))[:nseg]
        active.zero_()
        rows = launcher.segment_rows(tables.device_table.buffer, capacity)[:nseg, SEG_INDEX]
        reduce_between_phases(bucket, nseg, active, rows, kernel)


class CudaRunner(KernelRunner):
    """fusedwd._C_cuda: the CUDA kernel, on torch's current stream of the bucket's device, over its
    segment table kept on the device (fusedwd/optim/_graphs.py)."""

    def launch(self, step: Step, bucket: Bucket, n_active: int) -> None:
        tables = bucket.tables
        precision = self.precision(step, bucket, DTYPE_CODES.__getitem__)
        if step.rule.reduces:  # two launches (csrc/cuda/phases.cuh) over the bucket's scratch
            precision["scratch"] = tables.scratch

        def kernel(phases: int = 3, sums: Optional[Tensor] = None) -> None:
            _cuda_ext.launch(step.rule.name, tables.device_table.buffer, n_active, step.hyper(bucket.device),
                             DTYPE_CODES[bucket.dtype], bucket.structure, bucket.device, tables.arrivals,
                             **precision, **({} if sums is None else dict(sums=sums, phases=phases)))

        if bucket.reduce_over is None:
            kernel()
            return
        # FSDP2 shards: the segments' sums added over the ranks between the two launches; the rows'
        # parameter indices read from the segment table on the device
        active = tables.sums[:n_active]
        active.zero_()
        rows = tables.device_table.buffer[:tables.table_out.numel()].view(-1, SEG_COLS)[:n_active, SEG_INDEX]
        reduce_between_phases(bucket, n_active, active, rows, lambda phases: kernel(phases, active))


RUNNERS: dict[str, Runner] = {
    Backend.REFERENCE.value: ReferenceRunner(),
    Backend.CPU.value: CpuRunner(),
    Backend.TRITON.value: TritonRunner(),
    Backend.CUDA.value: CudaRunner(),
}
