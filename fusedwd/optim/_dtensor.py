"""DTensor parameters (FSDP2's ``fully_shard``): the optimizer steps their local shards.

A DTensor has no storage of its own: its rank's shard is a plain tensor inside
it. A bucket of DTensor parameters is laid out from those shards (local shapes
and addresses), its kernels and the reference see only plain tensors, and the
states in ``optimizer.state[p]`` are DTensors over the flat views with the
parameter's mesh and placements, so ``torch.distributed.checkpoint`` and
``get_optimizer_state_dict`` find the layout torch.optim.AdamW gives them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support: no DTensor can reach us
    DTensor = None
    distribute_tensor = None


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """A DTensor's shard on this rank (the tensor itself, not a view); a plain tensor as is."""
    # _local_tensor, as FSDP2 itself reads it: to_local() would add an autograd node and a view per call
    return t._local_tensor if is_dtensor(t) else t


def local_pair(who: str, p: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """The local shards of a DTensor parameter and its gradient, after checking they match."""
    if not is_dtensor(g):
        raise RuntimeError(f"{who} is a DTensor, but its gradient is a {type(g).__name__}; expected a DTensor")
    if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
        raise RuntimeError(
            f"{who} is sharded as {tuple(p.placements)} on {p.device_mesh}, but its gradient as "
            f"{tuple(g.placements)} on {g.device_mesh}"
        )
    return p._local_tensor, g._local_tensor


def wrap(view: Tensor, p: Tensor) -> Tensor:
    """A state view exposed as a DTensor sharded like ``p`` (no copy, no communication)."""
    return DTensor.from_local(view, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)


def local_state(value: Tensor, p: Tensor) -> Tensor:
    """This rank's shard of a loaded state of DTensor parameter ``p``.

    A DTensor laid out like ``p`` gives its shard; one laid out otherwise is
    redistributed (a collective: every rank loads together); a plain tensor of
    the parameter's global shape (an unsharded checkpoint) is cut locally.
    """
    if is_dtensor(value):
        if value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return value._local_tensor
    if value.shape != p.shape:
        return value  # the caller reports the shape
    return distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)._local_tensor


def check_flat_grads(optimizer: str, group: dict[str, Any], p: Tensor) -> None:
    if group.get("flat_grads") and is_dtensor(p):
        raise ValueError(
            f"{optimizer}: flat_grads=True does not support DTensor parameters (FSDP2's fully_shard "
            "hands each backward's sharded gradient to the parameter itself); use flat_grads=False"
        )
