"""RMSprop with an explicit weight-decay mode, fused in one pass per bucket."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from .. import reference
from .._spec import check_rmspropw, decay_row, group_lr_max
from ._base import FusedOptimizer


class RMSpropW(FusedOptimizer):
    r"""RMSprop with decoupled weight decay, fused in one pass.

    Same arguments and defaults as :class:`torch.optim.RMSprop` (state
    ``step``, ``square_avg``, ``momentum_buffer``, ``grad_avg``), plus ``decay``;
    pass ``decay="l2"`` to reproduce torch's coupled ``weight_decay``.

    .. math::
        g &\leftarrow \pm g + \ell_2\, p, \qquad p \leftarrow \delta\, p \\
        s &\leftarrow \alpha s + (1-\alpha) g^2, \qquad
        \bar g \leftarrow \alpha \bar g + (1-\alpha) g \ \text{(centered)} \\
        a &= \sqrt{s - \bar g^2} + \epsilon \ \text{(centered) or } \sqrt{s} + \epsilon \\
        p &\leftarrow p - \mathrm{lr}\, b,\ b \leftarrow \mu b + g/a \ \text{(momentum) or }
        p \leftarrow p - \mathrm{lr}\, g/a

    (docs/math.md#rmspropw). The L2 term is added only where it is nonzero, and
    Inf and NaN spread exactly as in torch.optim (docs/math.md#non-finite-values).

    Args:
        params: parameters or param groups.
        lr: learning rate.
        alpha: smoothing constant of the squared-gradient average.
        eps: added to the denominator.
        weight_decay: decay coefficient; its meaning depends on ``decay``.
        momentum: momentum factor.
        centered: normalize by an estimate of the gradient's variance.
        capturable: build the step's hyperparameters on the device from a tensor lr,
            never reading lr, step or found_inf on the host (for CUDA graphs; docs/design.md).
        differentiable: must be False (a fused in-place step is not differentiable).
        foreach: accepted for drop-in compatibility; every step is fused.
        maximize: maximize the objective.
        decay: ``"decoupled"``, ``"independent"`` or ``"l2"`` (docs/math.md).
        backend: ``"auto"``, ``"cpu"`` or ``"reference"``.
        flat_grads: re-home every ``p.grad`` into one flat buffer per bucket (views that
            autograd accumulates into): the step then skips per-tensor gradient checks.
            ``zero_grad`` zeroes the buffer instead of setting gradients to None, so a
            parameter without a gradient is stepped with zeros, as under DDP's
            ``gradient_as_bucket_view``. Worth it for thousands of small tensors.
        master_weights: keep an fp32 master copy of every bf16/fp16 parameter (flat, like the
            states): the step reads and writes the master and writes the parameter rounded
            to nearest even in the same pass (docs/math.md#precision).
        state_dtype: storage dtype of the states (default: the parameter's, float32 with
            master weights); math is always float32. bfloat16/float16 states halve the
            memory of float32 ones; ``"int8"`` stores 8-bit blockwise states (one byte per
            element plus an fp32 absmax per 256, decoded, updated and re-encoded in the same
            pass: docs/quantization.md), a quarter of float32's.
        min_8bit_numel: under ``state_dtype="int8"``, tensors with fewer elements keep float32
            states (their bytes are negligible, their statistics the most fragile).
        stochastic_rounding: round updated bf16 parameters (without a master) stochastically,
            from a seeded hash of (seed, parameter, step, element): unbiased and reproducible.
        max_grad_norm: clip the global gradient norm (all parameters, all groups) to this
            value inside the step: one read pass for the norm, the clip coefficient applied
            in the update pass. The norm is kept as ``opt.last_grad_norm``; a non-finite
            norm skips the step. Not under ZeroRedundancyOptimizer or FSDP2, where a rank
            holds a shard (a ValueError: clip with torch.nn.utils.clip_grad_norm_).

    Returns:
        ``step()`` returns the closure's loss, or None.

    Example:
        >>> opt = fusedwd.RMSpropW(model.parameters(), lr=1e-2, weight_decay=1e-4, centered=True)

    References:
        Tieleman & Hinton, Lecture 6.5, 2012; Graves, arXiv:1308.0850 (centered);
        Loshchilov & Hutter, ICLR 2019 (decoupled decay).
    """

    _HP_NAMES = ("lr", "alpha", "eps", "momentum", "decay_mult", "l2", "grad_sign")
    _HP_TABLE_NAME = "RMSPROPW_HP"

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        decay: str = "decoupled",
        backend: str = "auto",
        flat_grads: bool = False,
        master_weights: bool = False,
        state_dtype: Union[None, torch.dtype, str] = None,
        stochastic_rounding: bool = False,
        max_grad_norm: Optional[float] = None,
        min_8bit_numel: int = 4096,
    ) -> None:
        defaults = dict(
            lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
            capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable,
            decay=decay, backend=backend, flat_grads=flat_grads,
            master_weights=master_weights, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
            min_8bit_numel=min_8bit_numel,
        )
        super().__init__(params, defaults, max_grad_norm=max_grad_norm)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_rmspropw(group)

    def _structure(self, group: dict[str, Any]) -> tuple:
        return (bool(group["centered"]), float(group["momentum"]) > 0)

    def _state_slots(self, structure: tuple) -> tuple[Optional[str], ...]:
        centered, has_momentum = structure
        return ("square_avg", "grad_avg" if centered else None, "momentum_buffer" if has_momentum else None)

    def _hyper_row(self, group: dict[str, Any], device: Any = None) -> list[Any]:
        lr, decay_mult, l2, grad_sign = decay_row(group, device)
        return [lr, float(group["alpha"]), float(group["eps"]), float(group["momentum"]), decay_mult, l2, grad_sign]

    def _reference(self, group, structure, params, grads, states, steps, precision) -> None:
        centered, _ = structure
        none = [None] * len(params)
        reference.rmspropw(
            params, grads, states["square_avg"], states.get("grad_avg", none), states.get("momentum_buffer", none),
            steps, lr=float(group["lr"]), alpha=float(group["alpha"]), eps=float(group["eps"]),
            momentum=float(group["momentum"]), centered=centered, weight_decay=float(group["weight_decay"]),
            decay=group["decay"], lr_max=group_lr_max(group), maximize=group["maximize"], precision=precision,
        )
