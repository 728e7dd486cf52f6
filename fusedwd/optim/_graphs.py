"""Device-resident tables and the CUDA-graph capture guard (docs/design.md#cuda-graphs).

A GPU bucket's segment table (with, for Triton, its program map, arrival
counters, seed and default control block) and each device's hyperparameter
table live in device memory for as long as the plan does. Every step rebuilds
their image on the host (gather, the param groups) and compares it with what
was last uploaded: only a change is copied, from a fresh pinned buffer,
asynchronously, so a step never waits for the device. A step captured in a
CUDA graph then reads tables whose addresses and contents stay valid at every
replay. Nothing may be uploaded while a graph is captured (the copy would
replay from a host buffer that is gone by then), so under capture a changed
table is a RuntimeError raised before anything is launched.

With ``capturable=True`` the hyperparameter table is built once and updated
in place on the device from the groups' tensor lr, a fixed number of device
operations per step whatever the number of groups, never reading lr on the
host.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from .. import _cuda_ext, _ext
from .._spec import Backend, Decay, device_lr, group_lr_max

if TYPE_CHECKING:
    from .._buckets import Bucket
    from ._base import FusedOptimizer
    from ._runners import Step

GPU_BACKENDS = (Backend.TRITON.value, Backend.CUDA.value)


def capturing(opt: "FusedOptimizer") -> bool:
    """Whether torch's current CUDA stream is capturing a graph while ``opt`` steps.

    Asked only where a capture is possible (CUDA initialized) or a GPU backend
    runs or was asked for (Triton's interpreter included, so that tests can patch
    ``torch.cuda.is_current_stream_capturing`` on a CPU machine): the query
    itself would initialize CUDA.
    """
    if not (torch.cuda.is_initialized() or any(b.backend in GPU_BACKENDS for b in opt._plan or ())
            or any(g["backend"] in GPU_BACKENDS for g in opt.param_groups)):
        return False
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except RuntimeError:  # torch built without CUDA
        return False


def capture_error(opt: "FusedOptimizer", what: str) -> RuntimeError:
    return RuntimeError(
        f"{type(opt).__name__}.step() is being captured in a CUDA graph, but {what}. A captured step must only "
        "launch kernels over tables already on the device: construct the optimizer with capturable=True, take "
        "at least one eager step with the gradients at the addresses the graph will use (flat_grads=True keeps "
        "them fixed; or zero_grad(set_to_none=False) before the capture), and change nothing between that step "
        "and the capture (docs/design.md#cuda-graphs)"
    )


def check_capture_start(opt: "FusedOptimizer", plan_current: bool) -> None:
    """Under capture: every group capturable and the plan already built. Raises before anything runs."""
    if not all(g.get("capturable", False) for g in opt.param_groups):
        raise capture_error(opt, "a param group has capturable=False")
    if not plan_current:
        raise capture_error(opt, "its buckets and states are not built yet (or the param groups changed)")


def check_capture_plan(opt: "FusedOptimizer", plan: list["Bucket"]) -> None:
    """Under capture: every bucket on a GPU backend (another backend's work would not replay)."""
    for bucket in plan:
        if bucket.backend not in GPU_BACKENDS:
            raise capture_error(opt, f"a bucket on {bucket.device} runs the '{bucket.backend}' backend, whose "
                                     "work would run once during the capture and never at a replay")


class ResidentTable:
    """An int64 buffer on ``device``: its first words mirror ``host``, the rest the kernels own.

    The caller writes this step's image into ``host``; ``changed()`` compares it
    with what the device holds, ``upload()`` copies it (asynchronously, through a
    pinned buffer the caching host allocator recycles only once the copy is
    done). The device-owned tail (arrival counters) is zeroed once, here, and
    left at zero by every launch.
    """

    def __init__(self, device: torch.device, image_words: int, device_words: int = 0,
                 host: Optional[Tensor] = None) -> None:
        self.device = torch.device(device)
        # host: an int64 tensor of image_words the caller already fills (a bucket's table_out)
        self.host = torch.zeros(image_words, dtype=torch.int64) if host is None else host
        self.buffer = torch.zeros(image_words + device_words, dtype=torch.int64, device=self.device)
        self._shadow: Optional[Tensor] = None  # the image the device holds; None: none uploaded yet
        self.uploads = 0  # how many times the image was copied (tests, bench/gpu_check.py)

    def changed(self) -> bool:
        return self._shadow is None or not torch.equal(self.host, self._shadow)

    def upload(self) -> None:
        n = self.host.numel()
        if self.device.type == "cuda":
            staging = torch.empty(n, dtype=torch.int64, pin_memory=True)
            staging.copy_(self.host)
            self.buffer[:n].copy_(staging, non_blocking=True)
        else:
            self.buffer[:n].copy_(self.host)
        self._shadow = self.host.clone()
        self.uploads += 1


_warned_moved_lr = False


def _device_lr(opt: "FusedOptimizer", group: dict[str, Any], row: int, device: torch.device) -> Tensor:
    """The group's tensor lr on ``device`` without a host sync: a CPU lr of a CUDA device's group is
    moved there once (the group then holds the device tensor), with one warning per process."""
    global _warned_moved_lr
    lr = group["lr"]
    if lr.device.type == "cpu" and device.type == "cuda":
        group["lr"] = lr = lr.detach().to(device)  # once: every later step finds it on the device
        if not _warned_moved_lr:
            _warned_moved_lr = True
            warnings.warn(
                f"{type(opt).__name__}: param group {row} has capturable=True and a CPU lr tensor for parameters "
                f"on {device}; reading it every step would synchronize with the device, so the group's lr is now "
                f"a copy on {device}. Update it through the param group (schedulers do: "
                "opt.param_groups[i]['lr'].fill_(value)); a reference kept to the CPU tensor no longer changes "
                f"it. Pass lr=torch.tensor(value, device='{device.type}') to avoid this warning.",
                UserWarning,
                stacklevel=4,
            )
    # another GPU's lr: a device-to-device copy, asynchronous to the host
    return lr.detach().reshape(()).to(device, non_blocking=True)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host list on ``device`` without a sync (pinned, asynchronous)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t


class HyperTable:
    """One device's hyperparameter table of an optimizer (float64 [groups, cols], docs/design.md).

    It is built on the host from numbers and uploaded when it changes (an lr
    scheduler changes it every step: one asynchronous copy), except for the
    groups whose lr is a tensor the step must not read (every tensor lr under
    capturable, a GPU one always): their ``lr`` and ``decay_mult`` are written in
    place on the device each step by the same float64 operations as
    _spec.decay_factors (so the results are bitwise those of the host path).
    """

    def __init__(self, opt: "FusedOptimizer", device: torch.device) -> None:
        self.device = torch.device(device)
        self.groups = len(opt.param_groups)
        self.cols = len(opt.RULE.columns)
        self.table = ResidentTable(self.device, self.groups * self.cols)
        self.lr_col = opt.RULE.columns.index("lr")
        self.decay_col = opt.RULE.columns.index("decay_mult")
        self._live_key: Optional[tuple] = None
        self._live: Optional[tuple[Tensor, ...]] = None

    @property
    def rows(self) -> Tensor:
        """The table on the device (a view of the resident buffer)."""
        return self.table.buffer.view(torch.float64).view(self.groups, self.cols)

    def stage(self, opt: "FusedOptimizer") -> None:
        """Write this step's host image (numbers only, never a tensor lr read)."""
        capturable = any(g.get("capturable", False) for g in opt.param_groups)
        image = self.table.host.view(torch.float64).view(self.groups, self.cols)
        tensor_rows, values = [], []
        for row, group in enumerate(opt.param_groups):
            # capturable: every tensor lr (as the compiled path, RULE.hyper_row(group, device)); and a GPU
            # tensor lr always, which a host read would wait for
            lr_tensor = isinstance(group["lr"], Tensor) and (capturable or device_lr(group))
            # a tensor lr is written on the device by refresh(): a placeholder here, never read
            values.append(opt.RULE.hyper_row(dict(group, lr=0.0) if lr_tensor else group))
            if lr_tensor:
                tensor_rows.append(row)
        image.copy_(torch.tensor(values, dtype=torch.float64))
        self._tensor_rows = tensor_rows
        self._groups = opt.param_groups

    def changed(self) -> bool:
        live = bool(self._tensor_rows) and self._live_key != self._key(self._groups)
        return self.table.changed() or live

    def upload(self) -> None:
        if self.table.changed():
            self.table.upload()

    def refresh(self, opt: "FusedOptimizer") -> Tensor:
        """Write lr and decay_mult of the tensor-lr groups in place on the device, and return the table."""
        rows = self.rows
        if self._tensor_rows:
            index_lr, index_decay, divisor, weight_decay, zero_lr_max, decay_rows = self._live_tensors(opt)
            groups = opt.param_groups
            # one stack (a cat kernel) and one cast, whatever the number of groups
            lr = torch.stack([_device_lr(opt, groups[r], r, self.device) for r in self._tensor_rows])
            lr = lr.to(torch.float64)
            flat = rows.view(-1)
            flat.index_copy_(0, index_lr, lr)
            if decay_rows is not None:
                lr = lr.index_select(0, decay_rows)
                # _spec.decay_factors: 1 - (lr / lr_max) * wd (lr_max 1 for "decoupled": exact);
                # lr_max <= 0 ("independent" from lr=0): the full rate once lr > 0
                multiplier = lr / divisor
                if zero_lr_max is not None:
                    multiplier = torch.where(zero_lr_max, (lr > 0).to(torch.float64), multiplier)
                flat.index_copy_(0, index_decay, 1.0 - multiplier * weight_decay)
        return rows

    def _key(self, groups: list[dict[str, Any]]) -> tuple:
        """What the in-place update depends on besides lr: the tensor-lr groups' decay settings."""
        return tuple((r, groups[r]["decay"], float(groups[r]["weight_decay"]), group_lr_max(groups[r]))
                     for r in self._tensor_rows)

    def _live_tensors(self, opt: "FusedOptimizer") -> tuple:
        """Per tensor-lr group, on the device: where lr and decay_mult go, and the decay's numbers.
        Rebuilt only when the groups' decay settings change (never under capture: changed() says so)."""
        groups = opt.param_groups
        key = self._key(groups)
        if key != self._live_key:
            decaying = [r for r in self._tensor_rows if groups[r]["decay"] != Decay.L2]
            lr_max = {r: group_lr_max(groups[r]) for r in decaying}

            def on_device(values, dtype):
                return _to_device(values, dtype, self.device)

            position = {r: k for k, r in enumerate(self._tensor_rows)}
            independent = [groups[r]["decay"] == Decay.INDEPENDENT for r in decaying]
            zero = [ind and lr_max[r] <= 0 for ind, r in zip(independent, decaying)]
            self._live = (
                on_device([r * self.cols + self.lr_col for r in self._tensor_rows], torch.int64),
                on_device([r * self.cols + self.decay_col for r in decaying], torch.int64),
                on_device([lr_max[r] if ind and lr_max[r] > 0 else 1.0 for ind, r in zip(independent, decaying)],
                          torch.float64),
                on_device([float(groups[r]["weight_decay"]) for r in decaying], torch.float64),
                on_device(zero, torch.bool) if any(zero) else None,
                on_device([position[r] for r in decaying], torch.int64) if decaying else None,
            )
            self._live_key = key
        return self._live


# ---------------------------------------------------------------------- the optimizer's hooks
def attach(bucket: "Bucket", sums: int = 0) -> None:
    """Give a GPU bucket its device-resident tables (at plan build, after Bucket.build_tables);
    ``sums``: the rule's per-tensor sums (a two-phase rule's, docs/design.md#per-tensor-reductions)."""
    tables = bucket.tables
    if bucket.backend == Backend.TRITON:
        # the launch image, its arrival counters and a two-phase rule's scratch for the most
        # programs a step of this bucket launches (fusedwd/triton/_launch.py)
        launcher = _ext.triton(bucket.device)
        n = len(bucket.params)
        # room for the program map of every segment (a shape never changes under a plan: _checks)
        room = launcher.program_capacity(bucket.numels)
        tables.device_table = ResidentTable(bucket.device, launcher.image_words(n, room),
                                            launcher.buffer_words(n, room, sums) - launcher.image_words(n, room))
    elif bucket.backend == Backend.CUDA:
        # the segment table: its host image is table_out itself; the kernel's arrival counter
        tables.device_table = ResidentTable(bucket.device, tables.table_out.numel(), host=tables.table_out.view(-1))
        n = len(bucket.params)
        # a two-phase rule: each segment's arrival counter after the launch's word (csrc/cuda/phases.cuh)
        tables.arrivals = torch.zeros(1 + (n if sums else 0), dtype=torch.int32, device=bucket.device)
        if sums:
            # the segments' sums between the phases and the kernel's scratch (chunk sums), for every
            # segment of the bucket
            tables.sums = torch.zeros(n, sums, dtype=torch.float64, device=bucket.device)
            tables.scratch = _cuda_ext.scratch(n, sum(bucket.numels), sums, bucket.device)


def sync(opt: "FusedOptimizer", step: "Step", plan: list["Bucket"], active: list[int],
         capturing: bool) -> dict[torch.device, Tensor]:
    """This step's tables where the kernels read them: staged on the host (``active``: each bucket's
    gathered rows), compared with what the devices hold, uploaded (asynchronously) where they changed;
    under capture a change raises before anything is launched. Returns each device's hyperparameter
    table (the CPU backend's is a host tensor)."""
    changed: list[tuple[Any, str]] = []
    tables = {}
    for device in dict.fromkeys(b.device for b in plan if b.backend != Backend.REFERENCE):
        table = opt._hyper_tables.get(device)
        if table is None:
            table = opt._hyper_tables[device] = HyperTable(opt, device)
        table.stage(opt)
        if table.changed():
            changed.append((table, f"the hyperparameters of its param groups on {device} changed"))
        tables[device] = table
    for bucket, n_active in zip(plan, active):
        own = bucket.tables
        if own is None or own.device_table is None:
            continue
        if bucket.backend == Backend.TRITON:
            seed = step.seed() if bucket.storage.stochastic_rounding else 0
            programs = _ext.triton(bucket.device).fill_image(own.device_table.host, own.table_out[:n_active], seed,
                                                             len(bucket.params))
            own.launch_shape = (n_active, programs)
        if own.device_table.changed():
            changed.append((own.device_table, f"the segment table of its {bucket.dtype} bucket on {bucket.device} "
                                              "changed (a parameter, gradient or state moved, or a gradient "
                                              "appeared or went away)"))
    if capturing and changed:
        raise capture_error(opt, changed[0][1])
    for table, _ in changed:
        table.upload()
    return {device: table.refresh(opt) for device, table in tables.items()}
