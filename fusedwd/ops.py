"""The fused steps as ``torch.library`` custom ops, so torch.compile traces through them.

One op per rule of the registry (fusedwd/rules), ``torch.ops.fusedwd.<rule>_step_``,
its schema built from the rule: it updates lists of tensors in place, the
parameters, every state and the step counts (each tensor list the schema marks
as mutated), e.g.::

    fusedwd::adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,
        Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps,
        Tensor hyper, bool amsgrad) -> ()

with one list per state of the rule (empty where its switch is off) and one bool
per switch. One call is one pass over all of them: one kernel call per storage
dtype (``fusedwd._C`` on CPU, ``fusedwd._C_cuda`` on CUDA), over a segment table
the op builds from the lists (docs/design.md#segment-table). Fake
implementations let torch.compile and FakeTensor mode trace a step without
running it.

Hyperparameters are one float64 tensor, the rule's row of the hyperparameter
table (docs/design.md#hyperparameter-table) with the decay mode already
resolved: a tensor, so that a changing lr neither recompiles a compiled step
(pytorch issue 121857) nor needs a host read, and a row, so that the kernels
read it as they read the optimizers' tables. Build it with ``hyper(rule, ...)``
(or ``<rule>_hyper(...)``); it may live on the CPU or on the tensors' device (the
CUDA op then reads lr from device memory).

Every step count is a float32 tensor of one element (torch's ``state["step"]``),
on the parameters' device; the op uses ``t = step + 1`` and stores it.

CUDA graphs: each call builds its segment table on the host and copies it to
the device, which a graph would replay from a host buffer long gone. So the
ops are tagged ``torch.Tag.cudagraph_unsafe`` (``torch.compile(...,
mode="reduce-overhead")`` runs them outside its graphs), and a call on CUDA
tensors while the current stream is capturing raises a RuntimeError. Capture
``opt.step()`` of an optimizer with ``capturable=True`` instead, whose tables
stay on the device (docs/design.md#cuda-graphs).

Example:
    >>> hyper = fusedwd.ops.hyper("adamw", lr=1e-3, weight_decay=1e-2)
    >>> torch.ops.fusedwd.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, [], steps, hyper, False)
"""

from __future__ import annotations

import functools
import string
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from . import _cuda_ext, _ext, rules
from ._buckets import DTYPE_CODES, SEG_COLS, SEG_G, SEG_HP, SEG_INDEX, SEG_N, SEG_P, SEG_STEP, STATE_COLUMNS

__all__ = ["hyper", "schema", "HP_COLS"]  # and, per rule, <rule>_hyper and <rule>_step_

# torch.compile's CUDA graphs leave ops with this tag out of their graphs (torch >= 2.5)
_TAGS = tuple(t for t in [getattr(torch.Tag, "cudagraph_unsafe", None)] if t is not None)


# ------------------------------------------------------------ hyper rows
def hyper(rule: str, *, device: Any = None, **hyperparameters: Any) -> Tensor:
    """The rule's hyperparameter row as a float64 tensor on ``device``, from the rule's
    keyword arguments as its optimizer takes them (defaults: the optimizer's), with
    ``decay`` (``"decoupled"``), ``lr_max`` (None: ``lr``) and ``maximize`` (False).

    Example:
        >>> fusedwd.ops.hyper("sgdw", lr=0.1, momentum=0.9, weight_decay=1e-4, decay="l2")
    """
    spec = rules.get(rule)
    return torch.tensor(spec.hyper_row(spec.group(**hyperparameters)), dtype=torch.float64, device=device)


# Row widths per rule (the kernels read the same: tests/test_layout.py).
HP_COLS = {name: len(spec.columns) for name, spec in rules.RULES.items()}


def _state_args(spec: rules.Rule) -> list[str]:
    """The op's argument of each state: the state's name, plural (exp_avg -> exp_avgs)."""
    return [s.name + "s" for s in spec.states]


def schema(rule: str) -> str:
    """The op's schema, from the rule: every mutated list with its own alias set."""
    spec = rules.get(rule)
    alias = iter(string.ascii_lowercase)
    args = [f"Tensor({next(alias)}!)[] params", "Tensor[] grads"]
    args += [f"Tensor({next(alias)}!)[] {name}" for name in _state_args(spec)]
    args += [f"Tensor({next(alias)}!)[] steps", "Tensor hyper"] + [f"bool {s.name}" for s in spec.switches]
    return f"({', '.join(args)}) -> ()"


# ------------------------------------------------------------ checks
def _check(rule: str, params: List[Tensor], grads: List[Tensor], states: Sequence[Tuple[str, List[Tensor], bool]],
           steps: List[Tensor], hyper: Tensor) -> None:
    """Raise ValueError for lists the kernels cannot take (shared by the real and fake kernels)."""
    n = len(params)
    lists = [("grads", grads, True), ("steps", steps, True)] + list(states)
    for name, tensors, used in lists:
        expected = n if used else 0
        if len(tensors) != expected:
            raise ValueError(f"fusedwd::{rule}_step_: {name} has {len(tensors)} tensors, expected {expected}")
    if hyper.dtype != torch.float64 or hyper.numel() != HP_COLS[rule]:
        raise ValueError(
            f"fusedwd::{rule}_step_: hyper must be a float64 tensor of {HP_COLS[rule]} values "
            f"(fusedwd.ops.hyper({rule!r}, ...)), got {hyper.dtype} of {hyper.numel()}"
        )
    for i, p in enumerate(params):
        if p.dtype not in DTYPE_CODES:
            raise ValueError(f"fusedwd::{rule}_step_: params[{i}] is {p.dtype}; supported: {list(DTYPE_CODES)}")
        for name, tensors, used in [("grads", grads, True)] + list(states):
            if used:
                t = tensors[i]
                if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
                    raise ValueError(
                        f"fusedwd::{rule}_step_: {name}[{i}] is {t.dtype} {tuple(t.shape)} on {t.device}, "
                        f"expected the parameter's {p.dtype} {tuple(p.shape)} on {p.device}"
                    )
        s = steps[i]
        if s.dtype != torch.float32 or s.numel() != 1 or s.device != p.device:
            raise ValueError(
                f"fusedwd::{rule}_step_: steps[{i}] must be a one-element float32 tensor on {p.device}, "
                f"got {s.dtype} of {s.numel()} on {s.device}"
            )


# ------------------------------------------------------------ kernels
def _contiguous(t: Tensor, write_back: List[Tuple[Tensor, Tensor]], mutated: bool) -> Tensor:
    # the kernels walk flat memory: stage a strided tensor through a contiguous copy
    if t.is_contiguous():
        return t
    c = t.contiguous()
    if mutated:
        write_back.append((t, c))
    return c


def _refuse_capture(rule: str, device: torch.device) -> None:
    """A RuntimeError when a CUDA call would be captured in a graph: its host-built table cannot be replayed."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"fusedwd::{rule}_step_ builds its segment table on the host at every call, so it cannot be captured "
            "in a CUDA graph (a replay would read a freed host buffer). Capture opt.step() of a fusedwd optimizer "
            "with capturable=True instead: its tables stay on the device (docs/design.md#cuda-graphs)"
        )


def _run(rule: str, params: List[Tensor], grads: List[Tensor], states: Sequence[Tuple[str, List[Tensor], bool]],
         steps: List[Tensor], hyper: Tensor, switches: Tuple[bool, ...]) -> None:
    _check(rule, params, grads, states, steps, hyper)
    for device in {p.device for p in params}:
        _refuse_capture(rule, device)  # before anything is written
    # one kernel call per (device, storage dtype)
    groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    for (device, dtype), indices in groups.items():
        write_back: List[Tuple[Tensor, Tensor]] = []
        keep: List[Tensor] = []  # the staged copies the table points at, alive until the launch is queued
        rows = []
        for i in indices:
            row = [0] * SEG_COLS
            p = _contiguous(params[i], write_back, True)
            g = _contiguous(grads[i], write_back, False)
            row[SEG_P], row[SEG_G] = p.data_ptr(), g.data_ptr()
            keep += [p, g]
            for column, (_, tensors, used) in zip(STATE_COLUMNS, states):
                if used:
                    s = _contiguous(tensors[i], write_back, True)
                    row[column] = s.data_ptr()
                    keep.append(s)
            row[SEG_STEP] = steps[i].data_ptr()
            row[SEG_N] = p.numel()
            row[SEG_HP] = 0
            row[SEG_INDEX] = i
            rows.append(row)
        table = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cuda":
            _cuda_ext.step(rule, table, hyper, DTYPE_CODES[dtype], switches, device)
        else:
            ext = _ext.cpu()
            hp = hyper.to("cpu").contiguous()
            ext.step(rule, table.data_ptr(), len(rows), hp.data_ptr(), DTYPE_CODES[dtype], switches,
                     torch.get_num_threads())
        for original, staged in write_back:
            original.copy_(staged)


# ------------------------------------------------------------ the ops
def _split(spec: rules.Rule, args: Sequence[Any]):
    """An op call's arguments as (params, grads, states, steps, hyper, switches); ``states`` holds
    (argument name, tensors, whether the switches keep that state) per state."""
    n = len(spec.states)
    params, grads, lists, steps, hyper_row = args[0], args[1], args[2:2 + n], args[2 + n], args[3 + n]
    switches = tuple(args[4 + n:])
    kept = spec.slots(switches)
    states = [(name, tensors, slot is not None) for name, tensors, slot in zip(_state_args(spec), lists, kept)]
    return params, grads, states, steps, hyper_row, switches


def _define(spec: rules.Rule) -> Callable[..., None]:
    def kernel(*args: Any) -> None:
        params, grads, states, steps, hyper_row, switches = _split(spec, args)
        _run(spec.name, params, grads, states, steps, hyper_row, switches)

    def fake(*args: Any) -> None:
        params, grads, states, steps, hyper_row, _ = _split(spec, args)
        _check(spec.name, params, grads, states, steps, hyper_row)

    mutated = ["params", *_state_args(spec), "steps"]
    op = torch.library.custom_op(f"fusedwd::{spec.name}_step_", kernel, mutates_args=mutated, device_types="cpu",
                                 schema=schema(spec.name), tags=_TAGS)
    op.register_kernel("cuda")(kernel)
    op.register_fake(fake)
    return op


_OPS = {name: _define(spec) for name, spec in rules.RULES.items()}


def __getattr__(name: str) -> Any:
    # fusedwd.ops.<rule>_step_ (the op) and fusedwd.ops.<rule>_hyper (its row builder)
    rule, _, kind = name.rpartition("_")
    if name.endswith("_step_") and name[: -len("_step_")] in _OPS:
        return _OPS[name[: -len("_step_")]]
    if kind == "hyper" and rule in rules.RULES:
        return functools.partial(hyper, rule)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
