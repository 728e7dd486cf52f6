"""StableAdamW with an explicit weight-decay mode: two phases per bucket in one parallel region."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..rules import stableadamw
from . import _docs
from ._base import FusedOptimizer


class StableAdamW(FusedOptimizer):
    __doc__ = _docs.docstring(
        summary=r"""
        StableAdamW: AdamW with Adafactor's update clipping, per tensor, inside the fused step.

        Each tensor's learning rate is divided by max(1, RMS(g^2 / v_hat)): phase 1 updates the
        moments and sums the ratio over each tensor, phase 2 takes AdamW's step with the clipped
        lr, in one parallel region over the bucket (docs/design.md#per-tensor-reductions). The
        states are torch.optim.AdamW's (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints
        load into either; where the RMS never exceeds 1 the steps are AdamW's. Runs on the CPU
        kernel, Triton and CUDA (two launches per bucket each) and the reference; no 8-bit
        states.
        """,
        math=r"""
        .. math::
            g &\leftarrow \pm g + \ell_2\, p \\
            m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
            \qquad \hat v = v / (1-\beta_2^t) \\
            \mathrm{lr}_t &= \mathrm{lr} / \max\!\left(1, \mathrm{RMS}\right), \qquad
            \mathrm{RMS} = \sqrt{\mathrm{mean}\left(g^2 / \max(\hat v, \epsilon^2)\right)} \\
            p &\leftarrow \delta_t\, p - \frac{\mathrm{lr}_t}{1-\beta_1^t}\,
                  \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

        with :math:`(\delta_t, \ell_2)` = ``(1 - lr_t*wd, 0)`` for ``decay="decoupled"`` (the
        paper's), ``(1 - (lr_t/lr_max)*wd, 0)`` for ``"independent"`` (optimi's ``decouple_lr``)
        and ``(1, wd)`` for ``"l2"`` (docs/math.md#stableadamw).
        """,
        args={
            "lr": "learning rate (a float, or a 1-element tensor read each step).",
            "betas": "coefficients of the running averages of the gradient and its square (0.99 for beta2, as "
                     "the paper and optimi).",
            "eps": "added to the denominator; eps^2 floors v_hat in the RMS (1e-6, as the paper and optimi).",
            "weight_decay": "decay coefficient; its meaning depends on ``decay``.",
        },
        arg_notes={
            "state_dtype": 'Not ``"int8"`` (a ValueError): the per-tensor sums do not read 8-bit codes yet.',
        },
        example="""
        >>> opt = fusedwd.StableAdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
        """,
        references="""
        Wortsman et al., *Stable and low-precision training for large-scale vision-language models*,
        NeurIPS 2023 (arXiv 2304.13013), Algorithm 2.
        """,
    )

    RULE = stableadamw.RULE

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-6,
        weight_decay: float = 1e-2,
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
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable, fused=fused, decay=decay, backend=backend,
            flat_grads=flat_grads, master_weights=master_weights, state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding, min_8bit_numel=min_8bit_numel,
        )
        super().__init__(params, defaults, max_grad_norm=max_grad_norm)
