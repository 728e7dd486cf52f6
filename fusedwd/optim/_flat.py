"""Gradients re-homed into one flat buffer per bucket (``flat_grads=True``).

Every ``p.grad`` becomes a view of the bucket's gradient buffer, laid out like
its state buffers, and autograd accumulates into those views in place. A step
then only confirms that the views are still in place (``fusedwd._C.check_views``,
three reads per parameter instead of the eight checks a fresh gradient tensor
needs), and the kernel reads gradients as one more contiguous stream.

The price, as with DDP's ``gradient_as_bucket_view``: ``zero_grad()`` zeroes the
buffer instead of setting gradients to None, so a parameter that took no part
in a backward pass is stepped with a zero gradient (its decay and momentum go
on) where torch would skip it. A gradient replaced behind the optimizer's back
(``model.zero_grad()`` sets them to None, autograd then allocates new ones) is
copied into the buffer at the next step, with one warning: it is correct but
costs what the option saves.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .._buckets import SEG_G, SEG_P, Bucket
from ._checks import Checks

_warned_replaced = False


@dataclass
class FlatGrads:
    """A bucket's gradient buffer, laid out like its states, and the views handed out as ``p.grad``."""

    buffer: Tensor
    views: list[Tensor]


def attach(bucket: Bucket) -> None:
    """Allocate the gradient buffer and hand its views out as ``p.grad`` (keeping present values)."""
    buffer = torch.zeros(bucket.states.length, dtype=bucket.dtype, device=bucket.device)
    bucket.grads = FlatGrads(buffer, bucket.flat_views(buffer))
    for p, view in zip(bucket.params, bucket.grads.views):
        if p.grad is not None:
            view.copy_(p.grad)
        p.grad = view


def zero(bucket: Bucket) -> None:
    """``zero_grad`` for a flat bucket: one fill, and the views handed out again where replaced."""
    bucket.grads.buffer.zero_()
    for p, view in zip(bucket.params, bucket.grads.views):
        if p.grad is not view:
            p.grad = view


def prepare(bucket: Bucket, ext, checks: Checks) -> int:
    """This step's segment table of a flat bucket; returns its row count (validates, writes no state)."""
    global _warned_replaced
    params, views, table_in = bucket.params, bucket.grads.views, bucket.tables.table_in
    skipped: list[int] = []
    i, n = 0, len(params)
    while True:
        i = ext.check_views(params, views, i, table_in.data_ptr())
        if i >= n:
            break
        p, g, view = params[i], params[i].grad, views[i]
        if g is None:
            skipped.append(i)  # set to None by hand and no backward since: skipped, as torch does
        elif g is not view:
            checks.check(bucket, i, p, g)
            if not _warned_replaced:
                _warned_replaced = True
                warnings.warn(
                    "fusedwd: flat_grads=True, but gradients were replaced (model.zero_grad() sets them to "
                    "None); copying them into the flat buffer every step. Call optimizer.zero_grad() to "
                    "keep the views and the speed.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            view.copy_(g)
            p.grad = view
        else:
            checks.check(bucket, i, p, g)
            if view.data_ptr() != int(table_in[i, SEG_G]):
                raise RuntimeError(
                    f"{checks.who}: the gradient view of {checks.describe(bucket, i)} was re-pointed "
                    "(p.grad.data = ... or set_()); with flat_grads=True assign p.grad instead"
                )
            if not p.is_contiguous():
                raise RuntimeError(
                    f"{checks.who}: {checks.describe(bucket, i)} was replaced by a non-contiguous tensor; "
                    "flat_grads=True takes contiguous parameters (build a new optimizer after the change)"
                )
            table_in[i, SEG_P] = p.data_ptr()  # p.data was replaced by a same-shaped tensor
        i += 1
    table_out = bucket.tables.table_out
    if not skipped:
        table_out[:n] = table_in
        return n
    keep = torch.ones(n, dtype=torch.bool)
    keep[skipped] = False
    rows = table_in[keep]
    table_out[: len(rows)] = rows
    return len(rows)

