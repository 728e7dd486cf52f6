"""Lion with an explicit weight-decay mode, fused in one pass per bucket."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..rules import lion
from . import _docs
from ._base import FusedOptimizer


class Lion(FusedOptimizer):
    __doc__ = _docs.docstring(
        summary=r"""
        Lion (evolved sign momentum), fused in one pass.

        The update is the sign of an interpolation of the momentum and the gradient, so
        every element moves by exactly lr: the paper advises an lr 3-10x smaller than
        AdamW's and a weight decay 3-10x larger, so that lr*wd stays similar. One state,
        ``exp_avg`` (as lion-pytorch and optimi name it): 20 bytes per fp32 parameter
        moved per step against AdamW's 28.
        """,
        math=r"""
        .. math::
            g &\leftarrow \pm g + \ell_2\, p, \qquad p \leftarrow \delta\, p \\
            c &= \beta_1 m + (1-\beta_1) g, \qquad p \leftarrow p - \mathrm{lr}\,\mathrm{sign}(c) \\
            m &\leftarrow \beta_2 m + (1-\beta_2) g

        with sign(0) = 0, and :math:`(\delta, \ell_2)` = ``(1 - lr*wd, 0)`` for
        ``decay="decoupled"`` (the paper's and the common implementations'),
        ``(1 - (lr/lr_max)*wd, 0)`` for ``"independent"`` and ``(1, wd)`` for ``"l2"``
        (docs/math.md#lion).
        """,
        args={
            "lr": "learning rate (a float, or a 1-element tensor read each step).",
            "betas": "interpolation of the momentum for the update (beta1) and decay of the momentum kept (beta2).",
            "weight_decay": "decay coefficient; its meaning depends on ``decay``.",
        },
        example="""
        >>> opt = fusedwd.Lion(model.parameters(), lr=1e-4, weight_decay=1e-1)
        """,
        references="""
        Chen et al., *Symbolic Discovery of Optimization Algorithms*, NeurIPS 2023 (arXiv 2302.06675), Program 1.
        """,
    )

    RULE = lion.RULE

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
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
            lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable, fused=fused, decay=decay, backend=backend,
            flat_grads=flat_grads, master_weights=master_weights, state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding, min_8bit_numel=min_8bit_numel,
        )
        super().__init__(params, defaults, max_grad_norm=max_grad_norm)
