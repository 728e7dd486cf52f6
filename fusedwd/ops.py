"""The fused steps as ``torch.library`` custom ops, so torch.compile traces through them.

``torch.ops.fusedwd.adamw_step_``, ``sgdw_step_`` and ``rmspropw_step_`` update
lists of tensors in place: the parameters, every state and the step counts
(each tensor list the schema marks as mutated). One call is one pass over all
of them: one kernel call per storage dtype (``fusedwd._C`` on CPU,
``fusedwd._C_cuda`` on CUDA), over a segment table the op builds from the
lists (docs/design.md#segment-table). Fake implementations let torch.compile
and FakeTensor mode trace a step without running it.

Hyperparameters are one float64 tensor, the rule's row of the hyperparameter
table (docs/design.md#hyperparameter-table) with the decay mode already
resolved: a tensor, so that a changing lr neither recompiles a compiled step
(pytorch issue 121857) nor needs a host read, and a row, so that the kernels
read it as they read the optimizers' tables. Build it with ``adamw_hyper``,
``sgdw_hyper`` or ``rmspropw_hyper``; it may live on the CPU or on the
tensors' device (the CUDA op then reads lr from device memory).

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
    >>> hyper = fusedwd.ops.adamw_hyper(lr=1e-3, weight_decay=1e-2)
    >>> torch.ops.fusedwd.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, [], steps, hyper, False)
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _cuda_ext, _ext
from ._buckets import SEG_COLS, SEG_G, SEG_HP, SEG_INDEX, SEG_N, SEG_P, SEG_S0, SEG_S1, SEG_S2, SEG_STEP
from ._spec import decay_row
from .optim._base import DTYPE_CODES

__all__ = ["adamw_step_", "sgdw_step_", "rmspropw_step_", "adamw_hyper", "sgdw_hyper", "rmspropw_hyper"]

# torch.compile's CUDA graphs leave ops with this tag out of their graphs (torch >= 2.5)
_TAGS = tuple(t for t in [getattr(torch.Tag, "cudagraph_unsafe", None)] if t is not None)


# ------------------------------------------------------------ hyper rows
def _hyper(values: Sequence[float], device: Optional[torch.device]) -> Tensor:
    return torch.tensor(list(values), dtype=torch.float64, device=device)


def _decay_columns(lr: float, weight_decay: float, decay: str, lr_max: Optional[float], maximize: bool):
    """(decay_mult, l2, grad_sign): the columns every rule's row shares, as the optimizers compute them."""
    group = dict(lr=lr, weight_decay=weight_decay, decay=decay, maximize=maximize)
    if lr_max is not None:
        group["lr_max"] = lr_max
    return decay_row(group)[1:]


def adamw_hyper(lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 1e-2, *, decay: str = "decoupled", lr_max: Optional[float] = None,
                maximize: bool = False, device=None) -> Tensor:
    """AdamW's row ``lr, beta1, beta2, eps, decay_mult, l2, grad_sign`` (docs/math.md#adamw)."""
    decay_mult, l2, sign = _decay_columns(lr, weight_decay, decay, lr_max, maximize)
    return _hyper([lr, betas[0], betas[1], eps, decay_mult, l2, sign], device)


def sgdw_hyper(lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, *,
               decay: str = "decoupled", lr_max: Optional[float] = None, maximize: bool = False,
               device=None) -> Tensor:
    """SGDW's row ``lr, momentum, dampening, decay_mult, l2, grad_sign`` (docs/math.md#sgdw)."""
    decay_mult, l2, sign = _decay_columns(lr, weight_decay, decay, lr_max, maximize)
    return _hyper([lr, momentum, dampening, decay_mult, l2, sign], device)


def rmspropw_hyper(lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8, momentum: float = 0.0,
                   weight_decay: float = 0.0, *, decay: str = "decoupled", lr_max: Optional[float] = None,
                   maximize: bool = False, device=None) -> Tensor:
    """RMSpropW's row ``lr, alpha, eps, momentum, decay_mult, l2, grad_sign`` (docs/math.md#rmspropw)."""
    decay_mult, l2, sign = _decay_columns(lr, weight_decay, decay, lr_max, maximize)
    return _hyper([lr, alpha, eps, momentum, decay_mult, l2, sign], device)


# Row widths, as csrc/include/fusedwd/layout.h (tests/test_ops.py checks them against fusedwd._C).
HP_COLS = {"adamw": 7, "sgdw": 6, "rmspropw": 7}


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
            f"(fusedwd.ops.{rule}_hyper), got {hyper.dtype} of {hyper.numel()}"
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
            for column, (_, tensors, used) in zip((SEG_S0, SEG_S1, SEG_S2), states):
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
            getattr(ext, f"{rule}_step")(table.data_ptr(), len(rows), hp.data_ptr(), DTYPE_CODES[dtype], *switches,
                                         torch.get_num_threads())
        for original, staged in write_back:
            original.copy_(staged)


# ------------------------------------------------------------ the ops
def _adamw_states(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad):
    return [("exp_avgs", exp_avgs, True), ("exp_avg_sqs", exp_avg_sqs, True),
            ("max_exp_avg_sqs", max_exp_avg_sqs, amsgrad)]


def _sgdw_states(momentum_buffers, has_momentum):
    return [("momentum_buffers", momentum_buffers, has_momentum), ("", [], False), ("", [], False)]


def _rmspropw_states(square_avgs, grad_avgs, momentum_buffers, centered, has_momentum):
    return [("square_avgs", square_avgs, True), ("grad_avgs", grad_avgs, centered),
            ("momentum_buffers", momentum_buffers, has_momentum)]


@torch.library.custom_op(
    "fusedwd::adamw_step_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"),
    device_types="cpu", tags=_TAGS,
)
def adamw_step_(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                max_exp_avg_sqs: List[Tensor], steps: List[Tensor], hyper: Tensor, amsgrad: bool) -> None:
    """One AdamW step in place (docs/math.md#adamw); ``max_exp_avg_sqs`` is empty unless ``amsgrad``."""
    _run("adamw", params, grads, _adamw_states(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad), steps, hyper,
         (amsgrad,))


@adamw_step_.register_kernel("cuda")
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper, amsgrad):
    _run("adamw", params, grads, _adamw_states(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad), steps, hyper,
         (amsgrad,))


@adamw_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper, amsgrad):
    _check("adamw", params, grads, _adamw_states(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad), steps, hyper)


@torch.library.custom_op(
    "fusedwd::sgdw_step_", mutates_args=("params", "momentum_buffers", "steps"), device_types="cpu", tags=_TAGS
)
def sgdw_step_(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], steps: List[Tensor],
               hyper: Tensor, has_momentum: bool, nesterov: bool) -> None:
    """One SGDW step in place (docs/math.md#sgdw); ``momentum_buffers`` is empty unless ``has_momentum``.

    A step count of 0 before the step marks the first step: the buffer takes the gradient (torch's rule).
    """
    _run("sgdw", params, grads, _sgdw_states(momentum_buffers, has_momentum), steps, hyper, (has_momentum, nesterov))


@sgdw_step_.register_kernel("cuda")
def _(params, grads, momentum_buffers, steps, hyper, has_momentum, nesterov):
    _run("sgdw", params, grads, _sgdw_states(momentum_buffers, has_momentum), steps, hyper, (has_momentum, nesterov))


@sgdw_step_.register_fake
def _(params, grads, momentum_buffers, steps, hyper, has_momentum, nesterov):
    _check("sgdw", params, grads, _sgdw_states(momentum_buffers, has_momentum), steps, hyper)


@torch.library.custom_op(
    "fusedwd::rmspropw_step_",
    mutates_args=("params", "square_avgs", "grad_avgs", "momentum_buffers", "steps"),
    device_types="cpu", tags=_TAGS,
)
def rmspropw_step_(params: List[Tensor], grads: List[Tensor], square_avgs: List[Tensor], grad_avgs: List[Tensor],
                   momentum_buffers: List[Tensor], steps: List[Tensor], hyper: Tensor, centered: bool,
                   has_momentum: bool) -> None:
    """One RMSpropW step in place (docs/math.md#rmspropw); ``grad_avgs`` is empty unless ``centered``,
    ``momentum_buffers`` unless ``has_momentum``."""
    _run("rmspropw", params, grads, _rmspropw_states(square_avgs, grad_avgs, momentum_buffers, centered, has_momentum),
         steps, hyper, (centered, has_momentum))


@rmspropw_step_.register_kernel("cuda")
def _(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, hyper, centered, has_momentum):
    _run("rmspropw", params, grads, _rmspropw_states(square_avgs, grad_avgs, momentum_buffers, centered, has_momentum),
         steps, hyper, (centered, has_momentum))


@rmspropw_step_.register_fake
def _(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, hyper, centered, has_momentum):
    _check("rmspropw", params, grads, _rmspropw_states(square_avgs, grad_avgs, momentum_buffers, centered,
                                                        has_momentum), steps, hyper)
