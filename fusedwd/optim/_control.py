"""AMP and clipping: the control block every pass of a step reads (csrc/include/fusedwd/layout.h Ctl).

From GradScaler's ``grad_scale`` (None once ``scaler.unscale_(opt)`` ran: the
gradients are not unscaled twice) and ``found_inf``, and from the global
gradient norm under ``max_grad_norm``; computed with tensor operations on the
device, so neither a skipped nor a clipped step reads anything on the host
(docs/design.md#precision-master-weights-state-dtypes-amp-and-clipping).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .._buckets import CTL_CLIP, CTL_FOUND_INF, CTL_INV_SCALE, CTL_SIZE, Bucket
from ._runners import RUNNERS


def control(plan: Sequence[Bucket], prepared: Sequence[Any], grad_scale: Optional[Tensor],
            found_inf: Optional[Tensor], max_grad_norm: Optional[float], who: str
            ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(ctl, norm)``: the float32 control block (1/grad_scale, found_inf, clip coefficient) and the
    global gradient norm under max_grad_norm; ``(None, None)`` without AMP and clipping."""
    if grad_scale is None and found_inf is None and max_grad_norm is None:
        return None, None
    device = plan[0].device if plan else torch.device("cpu")
    one = torch.ones((), dtype=torch.float32, device=device)
    # GradScaler's own unscale uses the fp32 reciprocal computed in fp64
    inv_scale = grad_scale.double().reciprocal().float().to(device).reshape(()) if grad_scale is not None else one
    found = found_inf.float().to(device).reshape(()) if found_inf is not None else torch.zeros_like(one)
    clip, norm = one, None
    if max_grad_norm is not None:
        norm = grad_norm(plan, prepared, device, who) * inv_scale
        # torch.nn.utils.clip_grad_norm_'s coefficient
        clip = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        found = found + (~torch.isfinite(norm)).float()
    ctl = torch.empty(CTL_SIZE, dtype=torch.float32, device=device)
    ctl[CTL_INV_SCALE], ctl[CTL_FOUND_INF], ctl[CTL_CLIP] = inv_scale, found, clip
    return ctl, norm


def grad_norm(plan: Sequence[Bucket], prepared: Sequence[Any], device: torch.device, who: str) -> Tensor:
    """The 2-norm of every gradient this step takes, one read of each: a backend's own pass where
    it has one (the CPU kernel sums squares in double over this step's segment table); elsewhere
    per-tensor norms (torch._foreach_norm, on the device: fp32, and fp64 for fp64 gradients). The
    total is the square root of the sum of squares, rounded to fp32."""
    if any(b.dtensor for b in plan):
        raise ValueError(
            f"{who}: max_grad_norm needs the norm over every rank's shards; with DTensor parameters (FSDP2) "
            "clip with torch.nn.utils.clip_grad_norm_, which reduces across ranks"
        )
    sumsq = torch.zeros((), dtype=torch.float64, device=device)
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for bucket, work in zip(plan, prepared):
        own = RUNNERS[bucket.backend].sumsq(bucket, work)
        if own is not None:
            sumsq += own.to(device)
            continue
        for p in bucket.params:
            if p.grad is not None:
                by_kind.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for (_, dtype), grads in by_kind.items():
        # fp32 norms of fp32 and 16-bit gradients; fp64 ones in fp64 (_foreach_norm never narrows)
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        sumsq += torch.stack(norms).double().square().sum().to(device)
    return sumsq.sqrt().float()
