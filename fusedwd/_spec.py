"""Hyperparameter defaults, validation and decay-mode resolution.

One place for what a valid hyperparameter is, used by the optimizer wrappers,
the reference implementation and the benchmark, so an error message reads the
same whichever entry point a user came through.
"""

from __future__ import annotations

import enum
import math
import numbers
from typing import Any, Mapping, MutableMapping, Optional

import torch


class Decay(str, enum.Enum):
    """Weight-decay modes (docs/math.md#weight-decay-modes)."""

    DECOUPLED = "decoupled"  # p *= 1 - lr*wd          (torch.optim.AdamW)
    INDEPENDENT = "independent"  # p *= 1 - (lr/lr_max)*wd  (the paper's fully decoupled decay)
    L2 = "l2"  # g += wd*p                 (torch.optim.Adam/SGD/RMSprop weight_decay)


class Backend(str, enum.Enum):
    """Where a step runs."""

    AUTO = "auto"  # the compiled kernel for the tensors' device, else the reference
    CPU = "cpu"  # the C++ CPU kernel (fusedwd._C)
    TRITON = "triton"  # the Triton kernels (fusedwd.triton): CUDA tensors, or CPU ones under TRITON_INTERPRET=1
    CUDA = "cuda"  # the CUDA C++ kernels (fusedwd._C_cuda): CUDA tensors
    REFERENCE = "reference"  # fusedwd.reference: pure torch, the executable spec


DECAY_MODES = tuple(m.value for m in Decay)
BACKENDS = tuple(b.value for b in Backend)

# torch's storage dtypes the kernels take; states are kept in the param's dtype.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _real_number(name: str, value: Any) -> float:
    # A 1-element tensor lr is torch's capturable idiom; read it as a number.
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a 1-element tensor, got a tensor of shape {tuple(value.shape)}"
            )
        if value.is_complex():
            raise TypeError(f"{name} must be real, got a complex tensor")
        return float(value.detach().reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_range(name: str, value: Any, lo: float, hi: float | None = None, hi_open: bool = True) -> float:
    x = _real_number(name, value)
    if math.isnan(x) or x < lo or (hi is not None and (x >= hi if hi_open else x > hi)):
        if hi is None:
            expected = f">= {lo}"
        else:
            expected = f"in [{lo}, {hi})" if hi_open else f"in [{lo}, {hi}]"
        raise ValueError(f"Invalid {name}: {value!r} (expected {expected})")
    return x


def check_betas(betas: Any) -> None:
    """A pair (beta1, beta2), each in [0, 1): the rules with two moment coefficients."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_range("betas[0]", betas[0], 0.0, 1.0)
    check_range("betas[1]", betas[1], 0.0, 1.0)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_decay(value: Any) -> str:
    if isinstance(value, Decay):
        return value.value
    if not isinstance(value, str) or value not in DECAY_MODES:
        raise ValueError(f"Invalid decay: {value!r} (expected one of {', '.join(map(repr, DECAY_MODES))})")
    return value


def check_backend(value: Any) -> str:
    if isinstance(value, Backend):
        return value.value
    if not isinstance(value, str) or value not in BACKENDS:
        raise ValueError(f"Invalid backend: {value!r} (expected one of {', '.join(map(repr, BACKENDS))})")
    return value


def device_lr(group: Mapping[str, Any]) -> bool:
    """Whether the group's lr is a tensor the step must not read on the host: any tensor lr under
    capturable=True, and a tensor on a GPU always (reading it would wait for the device)."""
    lr = group["lr"]
    return isinstance(lr, torch.Tensor) and (bool(group.get("capturable", False)) or lr.device.type != "cpu")


def _check_device_lr(lr: Any) -> None:
    """A device lr (device_lr) is checked without reading it (a read would sync)."""
    if lr.numel() != 1:
        raise ValueError(f"lr must be a number or a 1-element tensor, got a tensor of shape {tuple(lr.shape)}")
    if not lr.is_floating_point():
        raise TypeError(f"lr must be a floating-point tensor, got {lr.dtype}")


def _check_torch_flags(group: Mapping[str, Any]) -> None:
    """torch.optim's rules for its implementation flags, kept for parity: fusedwd ignores foreach
    and fused (every step is fused), but a combination torch rejects is rejected here too, with
    torch's exception type, so code that runs with fusedwd also runs with torch."""
    if group.get("fused"):
        if group.get("differentiable", False):
            raise RuntimeError("`fused` does not support `differentiable` (torch.optim's rule)")
        if group.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together (torch.optim's rule)")


def check_adam_tensor_flags(group: Mapping[str, Any]) -> None:
    """torch.optim.Adam's rule (not SGD's or RMSprop's): a Tensor lr or betas needs capturable
    under foreach=True. fusedwd ignores foreach; the error keeps code portable to torch."""
    if group.get("foreach") and not group.get("capturable", False):
        tensors = [("lr", group["lr"])] + [(f"betas[{i}]", b) for i, b in enumerate(group["betas"])]
        for name, value in tensors:
            if isinstance(value, torch.Tensor):
                raise ValueError(
                    f"{name} as a Tensor is not supported for capturable=False and foreach=True (torch.optim."
                    "Adam's rule); fusedwd ignores foreach: leave it None"
                )


def check_common(group: Mapping[str, Any]) -> None:
    """The options every rule's group has (each rule's check calls this first)."""
    _check_torch_flags(group)
    if device_lr(group):
        _check_device_lr(group["lr"])
    else:
        check_range("lr", group["lr"], 0.0)
    check_range("weight_decay", group["weight_decay"], 0.0)
    check_bool("maximize", group["maximize"])
    check_bool("flat_grads", group.get("flat_grads", False))
    check_decay(group["decay"])
    check_backend(group["backend"])
    if group.get("differentiable", False):
        raise ValueError("differentiable=True is not supported by fusedwd (its steps are fused in-place kernels)")
    check_bool("capturable", group.get("capturable", False))
    check_bool("master_weights", group.get("master_weights", False))
    check_bool("stochastic_rounding", group.get("stochastic_rounding", False))
    state_dtype = group.get("state_dtype")
    if state_dtype is not None and state_dtype != INT8 and state_dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"state_dtype must be None (the parameter's dtype), {INT8!r} (8-bit blockwise states) or one of "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}; got {state_dtype!r}"
        )
    min_numel = group.get("min_8bit_numel", MIN_8BIT_NUMEL)
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
        raise ValueError(f"Invalid min_8bit_numel: {min_numel!r} (expected an int >= 0)")
    if group.get("master_weights", False) and group.get("stochastic_rounding", False):
        raise ValueError("stochastic_rounding=True rounds parameters that have no master copy; "
                         "it cannot be combined with master_weights=True")


HALF_DTYPES = (torch.float16, torch.bfloat16)
INT8 = "int8"  # state_dtype of 8-bit blockwise states (fusedwd/quant.py); stored as torch.uint8 codes
MIN_8BIT_NUMEL = 4096  # smaller tensors keep float32 states under state_dtype="int8", as the peers do


def storage_layout(dtype: torch.dtype, group: Mapping[str, Any], numel: int = 0) -> tuple[torch.dtype, bool, bool]:
    """``(state_dtype, master, stochastic_rounding)`` for a parameter of ``dtype`` and ``numel``
    elements in ``group``; ``torch.uint8`` as state dtype means 8-bit blockwise states.

    master_weights applies to 16-bit parameters (fp32 and fp64 ones are their own
    master); stochastic_rounding to bf16 parameters; state_dtype="int8" to tensors of
    at least ``min_8bit_numel`` elements (smaller ones keep float32 states). The
    combinations are the kernels' (csrc/include/fusedwd/precision.h with_layout, with_q8_layout); any
    other raises a ValueError.
    """
    half = dtype in HALF_DTYPES
    master = bool(group.get("master_weights", False)) and half
    stochastic = bool(group.get("stochastic_rounding", False)) and dtype == torch.bfloat16 and not master
    state = group.get("state_dtype")
    if state == INT8:
        if dtype == torch.float64:
            raise ValueError("state_dtype='int8' takes float32, bfloat16 or float16 parameters, not float64")
        if numel >= group.get("min_8bit_numel", MIN_8BIT_NUMEL):
            return torch.uint8, master, stochastic
        state = torch.float32
    state = state or (torch.float32 if master else dtype)
    if master:
        ok = state in (torch.float32,) + HALF_DTYPES
    elif stochastic:
        ok = state in (torch.bfloat16, torch.float32)
    else:
        ok = state == dtype or (dtype == torch.float32 and state in HALF_DTYPES) or (half and state == torch.float32)
    if not ok:
        options = " with master_weights" if master else (" with stochastic_rounding" if stochastic else "")
        raise ValueError(
            f"state_dtype={state} is not supported for {dtype} parameters{options}: states are stored in the "
            "parameter's dtype, in float32, or (for float32 parameters or with master weights) in bfloat16/float16"
        )
    return state, master, stochastic


def check_max_grad_norm(value: Any) -> Optional[float]:
    if value is None:
        return None
    x = _real_number("max_grad_norm", value)
    if not x > 0 or math.isinf(x):
        raise ValueError(f"Invalid max_grad_norm: {value!r} (expected None or a finite number > 0)")
    return x


# torch 2.x's Adam group key: True where its decay is decoupled (torch.optim.AdamW), False for L2.
DECOUPLED_KEY = "decoupled_weight_decay"


def decay_from_torch_key(group: MutableMapping[str, Any]) -> None:
    """A group without ``decay`` (from a torch checkpoint, or a torch-style param group) takes it
    from torch Adam's ``decoupled_weight_decay``: True -> "decoupled", False -> "l2"
    (docs/design.md#decay-modes-in-checkpoints)."""
    if "decay" not in group and DECOUPLED_KEY in group:
        value = check_bool(DECOUPLED_KEY, group[DECOUPLED_KEY])
        group["decay"] = Decay.DECOUPLED.value if value else Decay.L2.value


def torch_decoupled_key(decay: Any) -> bool:
    """The ``decoupled_weight_decay`` a group of this decay mode writes: True for both decoupled
    modes, so that torch.optim.Adam loading it decays decoupled too (for "independent", torch's
    decay then scales with lr, not lr/lr_max: docs/design.md#decay-modes-in-checkpoints)."""
    return check_decay(decay) != Decay.L2


def check_decoupled_key(group: Mapping[str, Any]) -> None:
    value = check_bool(DECOUPLED_KEY, group[DECOUPLED_KEY])
    if value != torch_decoupled_key(group["decay"]):
        raise ValueError(
            f"{DECOUPLED_KEY}={value} contradicts decay={group['decay']!r}: torch's key is True for the "
            "decoupled modes ('decoupled', 'independent') and False for 'l2'; set both, or delete "
            f"'{DECOUPLED_KEY}' from the group and fusedwd writes it from decay"
        )


def decay_factors(decay: str, lr: Any, weight_decay: float, lr_max: float) -> tuple[Any, float]:
    """Resolve a decay mode into ``(decay_mult, l2)`` (docs/math.md#weight-decay-modes).

    Every rule then starts with ``g <- grad_sign*g + l2*p; p <- decay_mult*p``, the L2 term
    only where ``l2 != 0`` (docs/math.md#non-finite-values).
    ``lr`` may be a float64 0-dim tensor (the capturable and compiled paths): the
    same operations then run on the device and ``decay_mult`` is a tensor.
    """
    if isinstance(lr, torch.Tensor) and decay == Decay.INDEPENDENT and lr_max <= 0:
        return torch.where(lr > 0, 1.0 - weight_decay, 1.0), 0.0
    if decay == Decay.DECOUPLED:
        return 1.0 - lr * weight_decay, 0.0
    if decay == Decay.INDEPENDENT:
        # lr_max == 0 means the group was built with lr=0: the multiplier lr/lr_max is
        # undefined and there is no step to follow, so decay at the full rate only if lr > 0.
        multiplier = lr / lr_max if lr_max > 0 else (1.0 if lr > 0 else 0.0)
        return 1.0 - multiplier * weight_decay, 0.0
    if decay == Decay.L2:
        return 1.0, weight_decay
    raise ValueError(f"Invalid decay: {decay!r}")


def group_lr_max(group: Mapping[str, Any]) -> float:
    """The lr that ``decay="independent"`` divides by: the group's initial lr."""
    if "lr_max" in group:
        return _real_number("lr_max", group["lr_max"])
    if "initial_lr" in group:  # set by torch's LRScheduler
        return _real_number("initial_lr", group["initial_lr"])
    return _real_number("lr", group["lr"])


def decay_row(group: Mapping[str, Any], device: Any = None) -> tuple[Any, Any, float, float]:
    """``(lr, decay_mult, l2, grad_sign)`` of a group for this step: the columns every rule shares.

    With ``device``, a tensor lr is never read on the host: lr and decay_mult come
    back as float64 0-dim tensors on ``device``, computed by the same operations.
    """
    if device is not None and isinstance(group["lr"], torch.Tensor):
        lr = group["lr"].detach().reshape(()).to(device=device, dtype=torch.float64)
    else:
        lr = _real_number("lr", group["lr"])
    decay_mult, l2 = decay_factors(group["decay"], lr, float(group["weight_decay"]), group_lr_max(group))
    return lr, decay_mult, l2, -1.0 if group["maximize"] else 1.0


def hyper_tensor(row: list, device: Any) -> torch.Tensor:
    """A hyperparameter row of floats and 0-dim tensors as one float64 tensor on ``device``.

    Constants are filled on the device (torch.full launches a fill, not a host copy),
    so building the row neither syncs nor breaks a CUDA graph capture.
    """
    return torch.stack([
        x if isinstance(x, torch.Tensor) else torch.full((), float(x), dtype=torch.float64, device=device)
        for x in row
    ])
