"""RMSprop with an explicit weight-decay mode, fused in one pass per bucket."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..rules import rmspropw
from . import _docs
from ._base import FusedOptimizer


class RMSpropW(FusedOptimizer):
    __doc__ = _docs.docstring(
        summary=r"""
        RMSprop with decoupled weight decay, fused in one pass.

        Same arguments and defaults as :class:`torch.optim.RMSprop` (state
        ``step``, ``square_avg``, ``momentum_buffer``, ``grad_avg``), plus ``decay``;
        pass ``decay="l2"`` to reproduce torch's coupled ``weight_decay``.
        """,
        math=r"""
        .. math::
            g &\leftarrow \pm g + \ell_2\, p, \qquad p \leftarrow \delta\, p \\
            s &\leftarrow \alpha s + (1-\alpha) g^2, \qquad
            \bar g \leftarrow \alpha \bar g + (1-\alpha) g \ \text{(centered)} \\
            a &= \sqrt{s - \bar g^2} + \epsilon \ \text{(centered) or } \sqrt{s} + \epsilon \\
            p &\leftarrow p - \mathrm{lr}\, b,\ b \leftarrow \mu b + g/a \ \text{(momentum) or }
            p \leftarrow p - \mathrm{lr}\, g/a

        (docs/math.md#rmspropw).
        """,
        args={
            "lr": "learning rate.",
            "alpha": "smoothing constant of the squared-gradient average.",
            "eps": "added to the denominator.",
            "weight_decay": "decay coefficient; its meaning depends on ``decay``.",
            "momentum": "momentum factor.",
            "centered": "normalize by an estimate of the gradient's variance.",
        },
        example="""
        >>> opt = fusedwd.RMSpropW(model.parameters(), lr=1e-2, weight_decay=1e-4, centered=True)
        """,
        references="""
        Tieleman & Hinton, Lecture 6.5, 2012; Graves, arXiv:1308.0850 (centered);
        Loshchilov & Hutter, ICLR 2019 (decoupled decay).
        """,
    )

    RULE = rmspropw.RULE

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
