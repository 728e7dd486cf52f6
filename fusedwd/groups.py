"""Decay / no-decay param groups from a model (no-decay masks).

Biases and normalization gains are scale parameters: decaying them toward zero
fights the normalization instead of regularizing the function, so the common
recipe (timm's ``param_groups_weight_decay``, GPT-2/LLaMA training code) keeps
them out of weight decay. Matching names alone misses ``RMSNorm`` and layers
named ``ln_*``; this module decides by module type first, then by shape.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from torch import nn

__all__ = ["param_groups", "is_norm_module"]

# Normalization layers by type. Subclasses count too (isinstance).
_NORM_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),  # torch >= 2.4
        nn.LocalResponseNorm,
    )
    if t is not None
)

# A predicate decides for one parameter: (qualified name, parameter, owning module) -> no decay?
NoDecayRule = Callable[[str, nn.Parameter, nn.Module], bool]


def is_norm_module(module: nn.Module) -> bool:
    """A normalization layer: torch's by type, or a custom one whose class name ends in ``Norm``
    (``LlamaRMSNorm``, ``T5LayerNorm``, ...)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def _default_no_decay(embeddings: bool) -> NoDecayRule:
    def rule(name: str, param: nn.Parameter, module: nn.Module) -> bool:
        if param.ndim <= 1:  # biases, norm gains and shifts, scalar gates
            return True
        if is_norm_module(module):
            return True
        if name == "bias" or name.endswith(".bias"):
            return True
        return embeddings and isinstance(module, (nn.Embedding, nn.EmbeddingBag))

    return rule


def _pattern_rule(patterns: Sequence[str]) -> NoDecayRule:
    def rule(name: str, param: nn.Parameter, module: nn.Module) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    return rule


def param_groups(
    model: nn.Module,
    weight_decay: float = 1e-2,
    no_decay: Optional[Union[NoDecayRule, Iterable[str]]] = None,
    *,
    no_decay_embeddings: bool = False,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a decay and a no-decay param group.

    By default a parameter gets no weight decay when it is 1-D (biases, norm
    gains), belongs to a normalization layer (LayerNorm, RMSNorm, BatchNorm,
    GroupNorm, InstanceNorm, or a custom ``*Norm`` class), or is named ``bias``;
    embeddings too with ``no_decay_embeddings=True``. ``no_decay`` replaces that
    rule: a callable ``(name, param, module) -> bool``, or name patterns
    (``fnmatch`` globs such as ``"*.bias"``, ``"pos_embed"``).

    Both groups step in one pass per bucket: groups that differ only in numbers
    share the fused kernel launch.

    Args:
        model: the module whose ``named_parameters`` to split (shared parameters once).
        weight_decay: decay of the decay group (the no-decay group gets 0.0).
        no_decay: the rule that picks no-decay parameters, replacing the default.
        no_decay_embeddings: with the default rule, also exempt embedding tables.
        **group_options: other keys for both groups (e.g. ``lr=3e-4``).

    Returns:
        A list of param-group dicts with ``params`` and ``param_names`` (empty groups
        are left out), ready for any torch optimizer.

    Example:
        >>> opt = fusedwd.AdamW(fusedwd.param_groups(model, weight_decay=0.1), lr=3e-4)

    References:
        Loshchilov & Hutter, ICLR 2019 (decoupled decay); timm ``param_groups_weight_decay``.
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"Invalid weight_decay: {weight_decay!r} (expected a number >= 0)")
    if no_decay is None:
        rule = _default_no_decay(no_decay_embeddings)
    elif callable(no_decay):
        rule = no_decay
    elif isinstance(no_decay, str):
        raise TypeError("no_decay takes a callable or a list of name patterns, not a single string")
    else:
        rule = _pattern_rule(list(no_decay))

    decay: list[tuple[str, nn.Parameter]] = []
    exempt: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local, param in module.named_parameters(recurse=False):
            # a tied weight (lm_head sharing wte) is listed once, under its first name
            if param is None or not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{local}" if module_name else local
            (exempt if rule(name, param, module) else decay).append((name, param))

    groups = []
    for members, wd in ((decay, float(weight_decay)), (exempt, 0.0)):
        if members:
            groups.append({
                "params": [p for _, p in members],
                "param_names": [n for n, _ in members],
                "weight_decay": wd,
                **group_options,
            })
    if not groups:
        raise ValueError("param_groups: the model has no trainable parameters")
    return groups
