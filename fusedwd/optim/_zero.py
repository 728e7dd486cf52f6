"""Whether torch's ZeroRedundancyOptimizer holds an optimizer as its rank's local optimizer.

Under ZeRO each rank's optimizer holds a shard of the parameters, so its own
gradient norm is not the global one, and max_grad_norm would clip each shard
by its own norm. ZeRO keeps its local optimizer as ``zero.optim``: this asks
exactly that, by identity, of the objects that refer to the optimizer; nothing
is inferred from the call stack. It is asked at the first clipped step (ZeRO
assigns ``optim`` after our constructor returns), and only when
torch.distributed is initialized, which ZeRO requires.
"""

from __future__ import annotations

import gc
from typing import Any


def held_by_zero(opt: Any) -> bool:
    try:
        import torch.distributed as dist
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:  # torch built without distributed support
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return False

    def holds(zero: Any) -> bool:
        return isinstance(zero, ZeroRedundancyOptimizer) and getattr(zero, "optim", None) is opt

    for ref in gc.get_referrers(opt):
        # an instance whose attributes live in its object (CPython >= 3.11), or its __dict__
        if holds(ref) or (isinstance(ref, dict) and ref.get("optim") is opt
                          and any(holds(owner) for owner in gc.get_referrers(ref))):
            return True
    return False
