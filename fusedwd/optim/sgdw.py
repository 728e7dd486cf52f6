"""SGD with momentum and an explicit weight-decay mode, fused in one pass per bucket."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from .. import reference
from .._spec import check_sgdw, decay_row, group_lr_max
from ._base import FusedOptimizer


class SGDW(FusedOptimizer):
    r"""SGD with momentum and decoupled weight decay, fused in one pass.

    Same arguments and defaults as :class:`torch.optim.SGD`, plus ``decay``.
    Note that ``decay`` defaults to ``"decoupled"``: to reproduce
    ``torch.optim.SGD(weight_decay=wd)`` (coupled L2) pass ``decay="l2"``.

    .. math::
        g &\leftarrow \pm g + \ell_2\, p, \qquad p \leftarrow \delta\, p \\
        b &\leftarrow \mu b + (1-\tau) g \quad (b \leftarrow g \text{ on the first step}) \\
        p &\leftarrow p - \mathrm{lr}\,(g + \mu b \text{ if nesterov else } b)

    (docs/math.md#sgdw). The L2 term is added only where it is nonzero, and
    Inf and NaN spread exactly as in torch.optim (docs/math.md#non-finite-values). Without momentum, ``"decoupled"`` equals ``"l2"`` with the
    same ``weight_decay`` (the paper's Proposition 1); with momentum they differ.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        momentum: momentum factor (0 keeps no state).
        dampening: dampening of the momentum.
        weight_decay: decay coefficient; its meaning depends on ``decay``.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        maximize: maximize the objective.
        foreach, fused: accepted for drop-in compatibility; every step is fused.
        differentiable: must be False.
        capturable: build the step's hyperparameters on the device from a tensor lr,
            never reading lr or step on the host (for CUDA graphs; docs/design.md).
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
        >>> opt = fusedwd.SGDW(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    References:
        Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019, Alg. 1, Prop. 1.
    """

    _STEP_IN_STATE = False  # torch.optim.SGD keeps only momentum_buffer
    _HP_NAMES = ("lr", "momentum", "dampening", "decay_mult", "l2", "grad_sign")
    _HP_TABLE_NAME = "SGDW_HP"

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        capturable: bool = False,
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
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
            capturable=capturable, decay=decay, backend=backend, flat_grads=flat_grads,
            master_weights=master_weights, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
            min_8bit_numel=min_8bit_numel,
        )
        super().__init__(params, defaults, max_grad_norm=max_grad_norm)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_sgdw(group)

    def _structure(self, group: dict[str, Any]) -> tuple:
        return (float(group["momentum"]) != 0, bool(group["nesterov"]))

    def _state_slots(self, structure: tuple) -> tuple[Optional[str], ...]:
        has_momentum, _ = structure
        return ("momentum_buffer" if has_momentum else None,)

    def _initialized_step(self, state: dict[str, Any]) -> Optional[float]:
        # torch starts the buffer as a copy of the first gradient; a stored buffer means
        # that first step has happened (SGD's step count itself is internal)
        saved = state.get("momentum_buffer") is not None or state.get("momentum_buffer_codes") is not None
        return 1.0 if saved else None

    def _hyper_row(self, group: dict[str, Any], device: Any = None) -> list[Any]:
        lr, decay_mult, l2, grad_sign = decay_row(group, device)
        return [lr, float(group["momentum"]), float(group["dampening"]), decay_mult, l2, grad_sign]

    def _reference(self, group, structure, params, grads, states, steps, precision) -> None:
        reference.sgdw(
            params, grads, states.get("momentum_buffer", [None] * len(params)), steps,
            lr=float(group["lr"]), momentum=float(group["momentum"]), dampening=float(group["dampening"]),
            nesterov=group["nesterov"], weight_decay=float(group["weight_decay"]), decay=group["decay"],
            lr_max=group_lr_max(group), maximize=group["maximize"], precision=precision,
        )
