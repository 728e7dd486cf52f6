"""AdamW with an explicit weight-decay mode, fused in one pass per bucket."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from .. import reference
from .._spec import DECOUPLED_KEY, check_adamw, decay_from_torch_key, decay_row, group_lr_max, torch_decoupled_key
from ._base import FusedOptimizer


class AdamW(FusedOptimizer):
    r"""AdamW whose decay, moments, bias correction and step run in one fused pass.

    A drop-in for :class:`torch.optim.AdamW`: same arguments, defaults, state
    layout (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and results,
    plus an explicit weight-decay mode.

    .. math::
        g &\leftarrow \pm g + \ell_2\, p, \qquad p \leftarrow \delta\, p \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        p &\leftarrow p - \frac{\mathrm{lr}}{1-\beta_1^t}\,
              \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

    with :math:`(\delta, \ell_2)` = ``(1 - lr*wd, 0)`` for ``decay="decoupled"``,
    ``(1 - (lr/lr_max)*wd, 0)`` for ``"independent"`` and ``(1, wd)`` for ``"l2"``
    (docs/math.md#adamw). The L2 term is added only where it is nonzero, and
    Inf and NaN spread exactly as in torch.optim (docs/math.md#non-finite-values).

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: learning rate (a float, or a 1-element tensor read each step).
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        weight_decay: decay coefficient; its meaning depends on ``decay``.
        amsgrad: use the maximum of past squared-gradient averages.
        maximize: maximize the objective instead of minimizing it.
        foreach, fused: accepted for drop-in compatibility; every step is fused.
        capturable: build the step's hyperparameters on the device from a tensor lr,
            never reading lr, step or found_inf on the host (for CUDA graphs; docs/design.md).
        differentiable: must be False (a fused in-place step is not differentiable).
        decay: ``"decoupled"`` (torch.optim.AdamW), ``"independent"`` (the paper's
            fully decoupled decay, scaled by ``lr/lr_max`` only) or ``"l2"``
            (torch.optim.Adam's coupled L2). Each group also carries torch.optim.Adam's
            ``decoupled_weight_decay`` (True for the decoupled modes); a group without
            ``decay`` (a torch checkpoint) takes its mode from that key
            (docs/design.md#decay-modes-in-checkpoints).
        backend: ``"auto"`` (the compiled kernel for the parameters' device, else the
            reference), ``"cpu"`` or ``"reference"``.
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
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fusedwd.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()

    References:
        Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019, Alg. 2;
        Kingma & Ba, *Adam*, ICLR 2015, Alg. 1.
    """

    _HP_NAMES = ("lr", "beta1", "beta2", "eps", "decay_mult", "l2", "grad_sign")
    _HP_TABLE_NAME = "ADAMW_HP"

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
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
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decay=decay, backend=backend, flat_grads=flat_grads,
            master_weights=master_weights, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
            min_8bit_numel=min_8bit_numel,
        )
        super().__init__(params, defaults, max_grad_norm=max_grad_norm)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            decay_from_torch_key(param_group)  # a torch-style group: before the defaults fill `decay`
        super().add_param_group(param_group)

    def _complete_group(self, group: dict[str, Any]) -> None:
        decay_from_torch_key(group)  # a group of a torch checkpoint has no `decay`
        super()._complete_group(group)

    def _check_group(self, group: dict[str, Any]) -> None:
        # torch.optim.Adam's key, written for a torch optimizer that loads this group
        # (docs/design.md#decay-modes-in-checkpoints)
        group.setdefault(DECOUPLED_KEY, torch_decoupled_key(group["decay"]))
        check_adamw(group)

    def _structure(self, group: dict[str, Any]) -> tuple:
        return (bool(group["amsgrad"]),)

    def _state_slots(self, structure: tuple) -> tuple[Optional[str], ...]:
        (amsgrad,) = structure
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if amsgrad else None)

    def _hyper_row(self, group: dict[str, Any], device: Any = None) -> list[Any]:
        lr, decay_mult, l2, grad_sign = decay_row(group, device)
        beta1, beta2 = (float(b) for b in group["betas"])
        return [lr, beta1, beta2, float(group["eps"]), decay_mult, l2, grad_sign]

    def _reference(self, group, structure, params, grads, states, steps, precision) -> None:
        (amsgrad,) = structure
        beta1, beta2 = (float(b) for b in group["betas"])
        reference.adamw(
            params, grads, states["exp_avg"], states["exp_avg_sq"],
            states.get("max_exp_avg_sq", [None] * len(params)), steps,
            lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), decay=group["decay"], lr_max=group_lr_max(group),
            amsgrad=amsgrad, maximize=group["maximize"], precision=precision,
        )
