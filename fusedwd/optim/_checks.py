"""Bad input: naming a parameter in an error, and the checks a step makes of each one.

Shared by every backend's preparation (fusedwd/optim/_runners.py), the flat
gradients (_flat.py) and the compiled step (_compiled.py), so that a bad
parameter or gradient reads the same whichever path found it, and is found
before anything is written.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .._buckets import Bucket
from . import _dtensor


class Checks:
    """The checks of one optimizer's parameters: ``who`` ("AdamW") and its param groups."""

    def __init__(self, who: str, param_groups: Sequence[dict]) -> None:
        self.who = who
        self.param_groups = param_groups

    def describe(self, bucket: Bucket, i: int) -> str:
        """'parameter 3 'fc.weight' of param group 0': the bucket's parameter i as the user knows it."""
        return self.describe_param(bucket.group_rows[i], bucket.params[i])

    def describe_param(self, row: int, p: Tensor) -> str:
        """The same, for parameter ``p`` of param group ``row`` (before it has a bucket)."""
        group = self.param_groups[row]
        position = next((k for k, q in enumerate(group["params"]) if q is p), "?")
        names = group.get("param_names")
        name = f" '{names[position]}'" if names and isinstance(position, int) else ""
        return f"parameter {position}{name} of param group {row}"

    def local_pair(self, bucket: Bucket, i: int) -> tuple[Tensor, Tensor]:
        """Parameter i and its gradient as the step sees them: a DTensor's local shards."""
        p, g = bucket.params[i], bucket.params[i].grad
        if not bucket.dtensor:
            return p, g
        return _dtensor.local_pair(f"{self.who}: {self.describe(bucket, i)}", p, g)

    def check(self, bucket: Bucket, i: int, p: Tensor, g: Tensor) -> None:
        """Raise a clear error for a parameter or gradient the step cannot take."""
        who = f"{self.who}: {self.describe(bucket, i)}"
        if g.layout != torch.strided:
            raise RuntimeError(f"{who} has a {g.layout} gradient; fusedwd does not support sparse gradients")
        if g.is_complex():
            raise TypeError(f"{who} has a complex gradient ({g.dtype}); fusedwd supports real tensors only")
        if p.device != bucket.device or p.dtype != bucket.dtype:
            raise RuntimeError(
                f"{who} was {bucket.dtype} on {bucket.device} when the optimizer built its state, "
                f"and is now {p.dtype} on {p.device}; move or cast the model before creating the optimizer"
            )
        if p.shape != bucket.shapes[i]:
            raise RuntimeError(
                f"{who} changed shape from {tuple(bucket.shapes[i])} to {tuple(p.shape)} after its state was built"
            )
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise RuntimeError(
                f"{who}: its gradient is {g.dtype} {tuple(g.shape)} on {g.device}, "
                f"expected the parameter's {p.dtype} {tuple(p.shape)} on {p.device}"
            )
