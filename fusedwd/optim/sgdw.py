"""SGD with momentum and an explicit weight-decay mode, fused in one pass per bucket."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..rules import sgdw
from . import _docs
from ._base import FusedOptimizer


class SGDW(FusedOptimizer):
    __doc__ = _docs.docstring(
        summary=r"""
        SGD with momentum and decoupled weight decay, fused in one pass.

        Same arguments and defaults as :class:`torch.optim.SGD`, plus ``decay``.
        Note that ``decay`` defaults to ``"decoupled"``: to reproduce
        ``torch.optim.SGD(weight_decay=wd)`` (coupled L2) pass ``decay="l2"``.
        """,
        math=r"""
        .. math::
            g &\leftarrow \pm g + \ell_2\, p, \qquad p \leftarrow \delta\, p \\
            b &\leftarrow \mu b + (1-\tau) g \quad (b \leftarrow g \text{ on the first step}) \\
            p &\leftarrow p - \mathrm{lr}\,(g + \mu b \text{ if nesterov else } b)

        (docs/math.md#sgdw). Without momentum, ``"decoupled"`` equals ``"l2"`` with the
        same ``weight_decay`` (the paper's Proposition 1); with momentum they differ.
        """,
        args={
            "lr": "learning rate.",
            "momentum": "momentum factor (0 keeps no state).",
            "dampening": "dampening of the momentum.",
            "weight_decay": "decay coefficient; its meaning depends on ``decay``.",
            "nesterov": "Nesterov momentum (needs momentum > 0 and dampening 0).",
        },
        example="""
        >>> opt = fusedwd.SGDW(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        """,
        references="""
        Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019, Alg. 1, Prop. 1.
        """,
    )

    RULE = sgdw.RULE

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
