"""Per-parameter state: adopting saved states into the flat buffers, and exposing their views.

``optimizer.state[p]`` keeps torch's layout (``step``, ``exp_avg``, ...): after a
plan is built its entries are views of the buckets' flat buffers (``expose``),
and whatever they held before (a checkpoint, an earlier plan) is copied in
first (``adopt``), converted once into the bucket's storage: rounded to its
state dtype, encoded to 8-bit codes or decoded from them, a saved fp32 master
kept (docs/design.md#precision, #8-bit-states). ``saved_dtypes`` and
``restore_dtypes`` keep what torch's load_state_dict would cast.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, MutableMapping, Optional

import torch
from torch import Tensor

from .. import quant
from .._buckets import Bucket
from ..rules import Rule
from . import _dtensor

# "parameter 3 'fc.weight' of param group 0": how errors name a bucket's parameter i
Describe = Callable[[Bucket, int], str]


def adopt(rule: Rule, state: Mapping[Tensor, dict], bucket: Bucket, who: str, describe: Describe) -> None:
    """Move existing per-parameter state of the bucket's parameters into its flat buffers and
    expose the views; parameters without state are exposed after their first step."""
    storage, flat = bucket.storage, bucket.states
    keeps_state = rule.step_in_state or any(bucket.state_names) or storage.master
    for i, p in enumerate(bucket.params):
        saved = state.get(p)
        if storage.master:
            # a master starts as the parameter; a saved one (below) replaces it
            flat.master_views[i].copy_(_dtensor.local(p).detach())
        _adopt_master(bucket, i, saved, who, describe)
        if not keeps_state:
            bucket.exposed[i] = True
            continue
        if not saved:
            continue
        for column, name in enumerate(bucket.state_names):
            if name is None or _adopt_codes(bucket, i, saved, name, column, who, describe):
                continue
            old = saved.get(name)
            if old is None:
                continue  # a state this structure adds (e.g. amsgrad switched on) starts at zero
            if bucket.dtensor and isinstance(old, Tensor):
                old = _dtensor.local_state(old, p)  # shapes below are this rank's shard
            if not isinstance(old, Tensor) or old.shape != bucket.shapes[i]:
                raise RuntimeError(
                    f"{who}: state '{name}' of {describe(bucket, i)} has shape "
                    f"{tuple(old.shape) if isinstance(old, Tensor) else type(old).__name__}, "
                    f"expected {tuple(bucket.shapes[i])}"
                )
            if storage.quantized:  # a float state (torch's, or fp32 fusedwd's): encoded once
                codes, scales = quant.quantize_blockwise(old, bucket.signed[column])
                flat.views[name][i].copy_(codes.view(bucket.shapes[i]))
                flat.absmax_views[name][i].copy_(scales)
            else:
                flat.views[name][i].copy_(old)
        step = rule.initialized_step(saved)
        if step is not None:
            flat.steps[i] = step
        expose(rule, state, bucket, i)
    bucket.n_unexposed = bucket.exposed.count(False)


def _adopt_codes(bucket: Bucket, i: int, saved: Mapping[str, Any], name: str, column: int, who: str,
                 describe: Describe) -> bool:
    """An 8-bit state saved as ``<name>_codes`` and ``<name>_absmax``: copied into 8-bit
    buffers exactly, or decoded once into float ones. Returns whether it was there."""
    codes, scales = saved.get(name + "_codes"), saved.get(name + "_absmax")
    if codes is None or scales is None:
        return False
    shape = bucket.shapes[i]
    blocks = -(-shape.numel() // quant.BLOCK_SIZE)
    if codes.dtype != torch.uint8 or codes.numel() != shape.numel() or scales.numel() != blocks:
        raise RuntimeError(
            f"{who}: 8-bit state '{name}' of {describe(bucket, i)} has codes {codes.dtype} of {codes.numel()} "
            f"and {scales.numel()} absmax, expected uint8 of {shape.numel()} and {blocks}"
        )
    flat = bucket.states
    if bucket.storage.quantized:
        flat.views[name][i].copy_(codes.reshape(shape))
        flat.absmax_views[name][i].copy_(scales.reshape(-1))
    else:
        flat.views[name][i].copy_(quant.dequantize_blockwise(codes, scales, shape, bucket.signed[column]))
    return True


def _adopt_master(bucket: Bucket, i: int, saved: Optional[Mapping[str, Any]], who: str, describe: Describe) -> None:
    """docs/design.md#precision: a saved fp32 master is kept, never dropped silently."""
    old = saved.get("master_param") if saved else None
    if old is None:
        return
    if not bucket.storage.master:
        raise ValueError(
            f"{who}: the state of {describe(bucket, i)} carries an fp32 master copy ('master_param') but this "
            "optimizer keeps none for it; construct it with master_weights=True, or delete the 'master_param' "
            "entries to continue from the (rounded) parameters"
        )
    if bucket.dtensor and isinstance(old, Tensor):
        old = _dtensor.local_state(old, bucket.params[i])
    if not isinstance(old, Tensor) or old.shape != bucket.shapes[i]:
        raise RuntimeError(
            f"{who}: 'master_param' of {describe(bucket, i)} has shape "
            f"{tuple(old.shape) if isinstance(old, Tensor) else type(old).__name__}, expected {tuple(bucket.shapes[i])}"
        )
    bucket.states.master_views[i].copy_(old)


def expose(rule: Rule, state: MutableMapping[Tensor, dict], bucket: Bucket, i: int) -> None:
    """Point ``state[p]`` of the bucket's parameter i at its views of the flat buffers."""
    p = bucket.params[i]
    entry = state[p]
    flat = bucket.states
    wrap = (lambda view: _dtensor.wrap(view, p)) if bucket.dtensor else (lambda view: view)
    for name in filter(None, bucket.state_names):
        if bucket.storage.quantized:
            # codes and scales under their own names, so no reader takes the bytes for values
            entry.pop(name, None)
            entry[name + "_codes"] = flat.views[name][i]
            entry[name + "_absmax"] = flat.absmax_views[name][i]
        else:
            entry.pop(name + "_codes", None)
            entry.pop(name + "_absmax", None)
            entry[name] = wrap(flat.views[name][i])
    if bucket.storage.master:
        entry["master_param"] = wrap(flat.master_views[i])
    if rule.step_in_state:
        entry["step"] = flat.step_views[i]
    bucket.exposed[i] = True


def expose_stepped(rule: Rule, state: MutableMapping[Tensor, dict], bucket: Bucket, indices: list[int]) -> None:
    """torch creates a parameter's state on its first step; so do we."""
    if not bucket.n_unexposed:
        return
    for i in indices:
        if not bucket.exposed[i]:
            expose(rule, state, bucket, i)
            bucket.n_unexposed -= 1


def saved_dtypes(state_dict: Mapping[str, Any], param_groups: list[dict]) -> dict[int, dict[str, Tensor]]:
    """The saved states torch's load_state_dict would cast to their parameter's dtype (an fp32
    master or fp32 states of a bf16 parameter, 8-bit codes), by parameter id."""
    saved = {}
    for saved_group, group in zip(state_dict.get("param_groups", ()), param_groups):
        for pid, p in zip(saved_group["params"], group["params"]):
            entry = state_dict.get("state", {}).get(pid)
            if isinstance(entry, dict):
                saved[id(p)] = {k: v for k, v in entry.items()
                                if k != "step" and isinstance(v, Tensor) and v.dtype != p.dtype}
    return saved


def restore_dtypes(state: MutableMapping[Tensor, dict], param_groups: list[dict],
                   saved: Mapping[int, Mapping[str, Tensor]]) -> None:
    """Put back what ``saved_dtypes`` kept, as saved (converted at the next step's plan)."""
    for group in param_groups:
        for p in group["params"]:
            for name, value in saved.get(id(p), {}).items():
                state[p][name] = value.to(device=p.device)
