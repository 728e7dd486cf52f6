"""AdamW with an explicit weight-decay mode, fused in one pass per bucket."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from .._spec import DECOUPLED_KEY, decay_from_torch_key, torch_decoupled_key
from ..rules import adamw
from . import _docs
from ._base import FusedOptimizer


class AdamW(FusedOptimizer):
    __doc__ = _docs.docstring(
        summary=r"""
        AdamW whose decay, moments, bias correction and step run in one fused pass.

        A drop-in for :class:`torch.optim.AdamW`: same arguments, defaults, state
        layout (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and results,
        plus an explicit weight-decay mode.
        """,
        math=r"""
        .. math::
            g &\leftarrow \pm g + \ell_2\, p, \qquad p \leftarrow \delta\, p \\
            m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
            p &\leftarrow p - \frac{\mathrm{lr}}{1-\beta_1^t}\,
                  \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

        with :math:`(\delta, \ell_2)` = ``(1 - lr*wd, 0)`` for ``decay="decoupled"``,
        ``(1 - (lr/lr_max)*wd, 0)`` for ``"independent"`` and ``(1, wd)`` for ``"l2"``
        (docs/math.md#adamw).
        """,
        args={
            "lr": "learning rate (a float, or a 1-element tensor read each step).",
            "betas": "coefficients of the running averages of the gradient and its square.",
            "eps": "added to the denominator.",
            "weight_decay": "decay coefficient; its meaning depends on ``decay``.",
            "amsgrad": "use the maximum of past squared-gradient averages.",
        },
        arg_notes={
            "decay": "Each group also carries torch.optim.Adam's ``decoupled_weight_decay`` (True for the "
                     "decoupled modes); a group without ``decay`` (a torch checkpoint) takes its mode from that "
                     "key (docs/design.md#decay-modes-in-checkpoints).",
        },
        example="""
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fusedwd.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
        """,
        references="""
        Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019, Alg. 2;
        Kingma & Ba, *Adam*, ICLR 2015, Alg. 1.
        """,
    )

    RULE = adamw.RULE

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

    def _validate(self, group: dict[str, Any]) -> None:
        # torch.optim.Adam's key, written for a torch optimizer that loads this group
        # (docs/design.md#decay-modes-in-checkpoints)
        group.setdefault(DECOUPLED_KEY, torch_decoupled_key(group["decay"]))
        super()._validate(group)
