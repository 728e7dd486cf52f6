"""DTensor parameters (FSDP2's ``fully_shard``): the optimizer steps their local shards.

A DTensor has no storage of its own: its rank's shard is a plain tensor inside
it. A bucket of DTensor parameters is laid out from those shards (local shapes
and addresses), its kernels and the reference see only plain tensors, and the
states in ``optimizer.state[p]`` are DTensors over the flat views with the
parameter's mesh and placements, so ``torch.distributed.checkpoint`` and
``get_optimizer_state_dict`` find the layout torch.optim.AdamW gives them.

A two-phase rule (LAMB, StableAdamW) sums over each whole tensor, and a shard's
sums are partial: ``reduction`` finds the mesh dimension a parameter's elements
are split over, and ``reduce_sums`` adds a bucket's per-tensor sums over it
between the two phases, in one collective and in rank order
(docs/design.md#per-tensor-reductions).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # torch built without distributed support: no DTensor can reach us
    DTensor = None
    distribute_tensor = None
try:  # FSDP2 over tensor parallelism shards a shard: still a split of the elements
    from torch.distributed.tensor.placement_types import _StridedShard

    SPLITS: tuple = (Shard, _StridedShard)
except ImportError:  # a torch without it (or without distributed support)
    SPLITS = (Shard,) if DTensor is not None else ()


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


def reduction(who: str, rule: str, p: Tensor) -> Optional[tuple[Any, int]]:
    """``(mesh, mesh_dim)`` over which the per-tensor sums of DTensor ``p`` must be added, or None
    where every rank holds the whole tensor (only ``Replicate()``).

    A ``Shard(d)`` (or strided shard) placement splits the elements between the ranks of its mesh
    dimension, whatever ``d``: the sums over the shards add up to the sum over the tensor. A
    ``Replicate()`` dimension holds copies, which must not be added. Anything else (``Partial()``:
    each rank holds an addend of every element, not a part of the elements), or elements split over
    more than one mesh dimension, is a ValueError.
    """
    placements = tuple(p.placements)
    split = [d for d, pl in enumerate(placements) if isinstance(pl, SPLITS)]
    other = [pl for pl in placements if not isinstance(pl, (*SPLITS, Replicate))]
    if other or len(split) > 1:
        why = "a Partial() placement holds addends, not parts of the elements" if other \
            else "its elements are split over several mesh dimensions"
        raise ValueError(
            f"{who} is placed as {placements} on {p.device_mesh}, and {rule} cannot add its per-tensor sums "
            f"over the ranks: {why}; expected Shard(d) on one mesh dimension (as FSDP2 and HSDP place "
            "parameters) and Replicate() on the others"
        )
    return (p.device_mesh, split[0]) if split else None


def sum_scale(rule: Any, bucket: Any) -> Tensor:
    """float64 ``[n, len(rule.sums)]``: what each parameter's added sums are multiplied by before
    phase 2. Phase 2 divides a mean's sum (``rule.means``: StableAdamW's RMS) by the segment's
    element count, the shard's; the mean is over the whole tensor, so that sum is scaled by
    shard numel / tensor numel (1 for the other sums, and exactly 1 for an unsplit tensor)."""
    means = [j for j, name in enumerate(rule.sums) if name in rule.means]
    scale = torch.ones(len(bucket.params), len(rule.sums), dtype=torch.float64)
    for i, (p, n) in enumerate(zip(bucket.params, bucket.numels)):
        scale[i, means] = n / p.numel() if p.numel() else 1.0
    return scale.to(bucket.device)


def reduce_sums(sums: Tensor, over: tuple[Any, int]) -> None:
    """Add ``sums`` (a bucket's float64 per-tensor sums, on its device) over the ranks of mesh
    dimension ``over``, in place: one all-gather, then the ranks' rows added in rank order, so every
    rank gets the same bits whatever the collective's algorithm. Nothing is read on the host (a GPU
    collective is enqueued on the device)."""
    mesh, mesh_dim = over
    group = mesh.get_group(mesh_dim)
    world = dist.get_world_size(group)
    gathered = sums.new_empty((world * sums.shape[0], *sums.shape[1:]))
    # the ranks' buffers end to end (all_gather_single; all_gather_into_tensor before torch 2.13)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, sums.contiguous(), group=group)
    gathered = gathered.view(world, *sums.shape)
    sums.copy_(gathered[0])
    for r in range(1, world):
        sums.add_(gathered[r])
