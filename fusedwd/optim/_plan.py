"""The plan: param groups turned into buckets, each with flat states and, for a compiled
backend, its segment table (docs/design.md#buckets).

A bucket holds every parameter that shares device, dtype, resolved backend, the
rule's structure, the storage layout and whether it is a DTensor or has flat
gradients. Param groups that differ only in numbers share a bucket: the kernels
read each segment's numbers from its group's hyperparameter row.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from torch import Tensor

from .. import _cuda_ext, _ext
from .._buckets import Bucket, Storage
from .._spec import Backend, storage_layout
from ..rules import Rule
from . import _dtensor, _flat, _graphs, _state
from ._checks import Checks


def resolve_backend(requested: str, p: Tensor, rule: Optional[Rule] = None) -> str:
    """The backend that steps ``p`` for a group's ``backend=`` (or a RuntimeError saying why it cannot)."""
    if requested == Backend.REFERENCE:
        return Backend.REFERENCE.value
    if requested == Backend.TRITON:
        _ext.triton(p.device)  # raises with the reason when Triton cannot step this device
        return Backend.TRITON.value
    if requested == Backend.CUDA:
        _cuda_ext.cuda()  # raises with the reason: not built, or no usable GPU
        if p.device.type != "cuda":
            raise RuntimeError(
                f"backend='cuda' runs on CUDA tensors, but a parameter is on {p.device}; "
                "use backend='auto', 'cpu' or 'reference'"
            )
        reason = _cuda_ext.unusable(p.device)
        if reason is not None:
            raise RuntimeError(f"backend='cuda': {reason}; or use backend='auto' (Triton where it runs)")
        return Backend.CUDA.value
    if p.device.type == "cpu":
        if requested == Backend.CPU or _ext.has_cpu():
            _ext.cpu()  # raises the kept ImportError when backend='cpu' was asked for
            return Backend.CPU.value
        _ext.warn_fallback_once()
        return Backend.REFERENCE.value
    if requested == Backend.CPU:
        raise RuntimeError(
            f"backend='cpu' runs on CPU tensors, but a parameter is on {p.device}; use backend='auto' or 'reference'"
        )
    if p.device.type == "cuda":
        # the CUDA kernels where they hold code for the device (probed once per device), else Triton
        cuda_reason = _cuda_ext.unusable(p.device)
        if cuda_reason is None:
            return Backend.CUDA.value
        triton_reason = _ext.triton_unusable(p.device) if _ext.has_triton() else "Triton failed to import"
        if triton_reason is None:
            return Backend.TRITON.value
        _cuda_ext.warn_reference_once(p.device, f"{cuda_reason}; {triton_reason}")
    # no compiled kernel for this device: the reference runs anywhere torch does
    return Backend.REFERENCE.value


def unique(params: Sequence[Tensor]) -> list[Tensor]:
    """A group's parameters, each once: a parameter listed twice in a group (torch warns) has one
    state and is stepped once per step (docs/design.md#duplicated-parameters)."""
    seen: set[int] = set()
    return [p for p in params if not (id(p) in seen or seen.add(id(p)))]


def plan_key(rule: Rule, param_groups: Sequence[Mapping[str, Any]]) -> tuple:
    """What a plan depends on: a new key means a new plan (a group added, a structure switched...)."""
    return tuple((id(g["params"]), len(g["params"]), rule.structure(g), g["backend"], g.get("flat_grads"),
                  g.get("master_weights"), g.get("state_dtype"), g.get("stochastic_rounding"))
                 for g in param_groups)


def build(rule: Rule, param_groups: Sequence[Mapping[str, Any]], state: Any, checks: Checks) -> list[Bucket]:
    """Buckets for every parameter, their states allocated and adopted from ``state``."""
    who = checks.who
    buckets: dict[tuple, Bucket] = {}
    salt = 0  # each parameter's index in the optimizer: its stochastic-rounding salt
    for row, group in enumerate(param_groups):
        structure = rule.structure(group)
        for p in unique(group["params"]):
            layout = storage_layout(p.dtype, group, p.numel())
            backend = resolve_backend(group["backend"], p, rule)
            _dtensor.check_flat_grads(who, group, p)
            dtensor = _dtensor.is_dtensor(p)
            # a two-phase rule adds a shard's sums over the ranks that hold the tensor's other elements
            over = _dtensor.reduction(f"{who}: {checks.describe_param(row, p)}", rule.name, p) \
                if dtensor and rule.reduces else None
            # flat_grads: contiguous parameters of a compiled backend (check_views is in fusedwd._C)
            flat = bool(group.get("flat_grads")) and backend != Backend.REFERENCE and _ext.has_cpu() \
                and p.is_contiguous()
            key = (p.device, p.dtype, backend, structure, flat, dtensor, layout, over)
            bucket = buckets.get(key)
            if bucket is None:
                storage = Storage(*layout)
                if storage.quantized and rule.reduces:
                    raise ValueError(f"{who}: state_dtype='int8' is not supported by {rule.name} yet: its per-tensor "
                                     "sums would read the 8-bit codes; use state_dtype=None, torch.float32 or "
                                     "torch.bfloat16")
                if over is not None and backend not in (Backend.CPU, Backend.TRITON, Backend.CUDA):
                    # the reference sums each tensor inside its own step: it has no place for one collective
                    raise ValueError(f"{who}: {checks.describe_param(row, p)} is a sharded DTensor (FSDP2), which "
                                     f"{rule.name} steps on the CPU, Triton and CUDA kernels only (its per-tensor "
                                     "sums are added over the ranks between the kernels' two phases); backend "
                                     f"{backend!r} would use this shard's sums alone: use backend='cpu' (CPU "
                                     "parameters), 'cuda' or 'triton' (GPU parameters)")
                if storage.quantized and dtensor:
                    raise ValueError(f"{who}: state_dtype='int8' does not take DTensor parameters (FSDP2) yet: "
                                     "their shards would cut the 256-element blocks")
                bucket = buckets[key] = Bucket(key, p.device, p.dtype, backend, structure, rule.slots(structure),
                                               tuple(s.signed for s in rule.states), storage, dtensor=dtensor,
                                               flat_grads=flat, reduce_over=over)
            bucket.params.append(p)
            bucket.salts.append(salt)
            salt += 1
            bucket.group_rows.append(row)
            bucket.shapes.append(_dtensor.local(p).shape)
    for bucket in buckets.values():
        # a GPU kernel reads and advances the step counts: keep them on its device
        # (as torch's fused AdamW does), so a step never syncs with the host
        bucket.allocate(steps_on_device=bucket.backend in (Backend.TRITON, Backend.CUDA))
        _state.adopt(rule, state, bucket, who, checks.describe)
        if bucket.flat_grads:
            _flat.attach(bucket)
        if bucket.reduce_over is not None:
            bucket.sum_scale = _dtensor.sum_scale(rule, bucket)
        if bucket.backend != Backend.REFERENCE:
            bucket.build_tables(bucket.grads.views if bucket.grads is not None else None)
        _graphs.attach(bucket, len(rule.sums))  # GPU backends: the launch's tables, kept on the device
    return list(buckets.values())
