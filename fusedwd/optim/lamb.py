"""LAMB with an explicit weight-decay mode: two phases per bucket in one parallel region."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..rules import lamb
from . import _docs
from ._base import FusedOptimizer


class LAMB(FusedOptimizer):
    __doc__ = _docs.docstring(
        summary=r"""
        LAMB (layer-wise adaptive moments), its per-tensor trust ratio computed inside the fused step.

        Adam's direction, scaled per tensor by the trust ratio ||p|| / ||u||: phase 1 updates
        the moments and sums both norms over each tensor, phase 2 applies the step, in one
        parallel region over the bucket (docs/design.md#per-tensor-reductions). States
        ``exp_avg``, ``exp_avg_sq`` and ``step``, as apex FusedLAMB and timm Lamb name them.
        Runs on the CPU kernel, Triton and CUDA (two launches per bucket each) and the reference;
        no 8-bit states.
        """,
        math=r"""
        .. math::
            g &\leftarrow \pm g + \ell_2\, p, \qquad p \leftarrow \delta\, p \\
            m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
            r &= \frac{m / (1-\beta_1^t)}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}, \qquad
            u = r + w\, p \\
            p &\leftarrow p - \mathrm{lr}\cdot\min\!\left(\frac{\|p\|}{\|u\|}, \tau_{max}\right) u

        with the trust ratio 1 where either norm is 0, and for a tensor whose ``weight_decay``
        is 0 unless ``always_adapt``. :math:`(\delta, \ell_2, w)` = ``(1, 0, wd)`` for
        ``decay="decoupled"`` (the paper's, apex ``adam_w_mode=True``), ``(1, wd, 0)`` for
        ``"l2"`` (apex ``adam_w_mode=False``) and ``(1 - (lr/lr_max)*wd, 0, 0)`` for
        ``"independent"`` (docs/math.md#lamb).
        """,
        args={
            "lr": "learning rate (a float, or a 1-element tensor read each step).",
            "betas": "coefficients of the running averages of the gradient and its square.",
            "eps": "added to the denominator (1e-6, as apex and timm).",
            "weight_decay": "decay coefficient; its meaning depends on ``decay``.",
            "bias_correction": "divide the moments by 1 - beta^t (apex's and timm's option).",
            "always_adapt": "apply the trust ratio to tensors with weight_decay 0 too (timm's ``always_adapt``, "
                            "apex's ``use_nvlamb``); by default they take Adam's step, as the paper excludes "
                            "biases and norms.",
            "max_trust_ratio": "clamp the trust ratio to at most this (None: no clamp; 1.0 is timm's "
                               "``trust_clip=True``).",
        },
        arg_notes={
            "max_grad_norm": "Off by default, as in every fusedwd optimizer, where apex FusedLAMB and timm Lamb "
                             "clip at 1.0: pass ``max_grad_norm=1.0`` for theirs (docs/math.md#lamb).",
            "state_dtype": 'Not ``"int8"`` (a ValueError): the per-tensor sums do not read 8-bit codes yet.',
        },
        example="""
        >>> opt = fusedwd.LAMB(model.parameters(), lr=2e-3, weight_decay=1e-2, max_grad_norm=1.0)
        """,
        references="""
        You et al., *Large Batch Optimization for Deep Learning: Training BERT in 76 minutes*, ICLR 2020
        (arXiv 1904.00962), Algorithm 2.
        """,
    )

    RULE = lamb.RULE

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 1e-2,
        bias_correction: bool = True,
        always_adapt: bool = False,
        max_trust_ratio: Optional[float] = None,
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
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
            always_adapt=always_adapt, max_trust_ratio=max_trust_ratio, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable, fused=fused, decay=decay, backend=backend,
            flat_grads=flat_grads, master_weights=master_weights, state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding, min_8bit_numel=min_8bit_numel,
        )
        super().__init__(params, defaults, max_grad_norm=max_grad_norm)
