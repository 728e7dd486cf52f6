"""The optimizers' docstrings, assembled from shared pieces (as torch.optim assembles its own).

Every fusedwd optimizer takes the same options besides its rule's
hyperparameters; they are documented once, here, and ``docstring`` puts a
rule's own parts around them in optax's order: summary, math, Args, Returns,
Example, References.
"""

from __future__ import annotations

import textwrap
from typing import Optional

# (name, description) of every option the wrappers share, in the order of the Args section
SHARED_ARGS = {
    "maximize": "maximize the objective instead of minimizing it.",
    "foreach, fused": "accepted where torch.optim's signature has them, for drop-in compatibility; every step "
                      "is fused.",
    "capturable": (
        "build the step's hyperparameters on the device from a tensor lr, never reading lr, step or "
        "found_inf on the host (for CUDA graphs; docs/design.md)."
    ),
    "differentiable": "must be False (a fused in-place step is not differentiable).",
    "decay": (
        '``"decoupled"`` (``p *= 1 - lr*wd``, torch.optim.AdamW\'s), ``"independent"`` (the paper\'s fully '
        'decoupled decay, scaled by ``lr/lr_max`` only) or ``"l2"`` (coupled: ``g += wd*p``, torch.optim.Adam/'
        "SGD/RMSprop's ``weight_decay``); docs/math.md#weight-decay-modes."
    ),
    "backend": (
        '``"auto"`` (the compiled kernel for the parameters\' device, else the reference), ``"cpu"``, '
        '``"cuda"``, ``"triton"`` or ``"reference"`` (docs/backends.md).'
    ),
    "flat_grads": (
        "re-home every ``p.grad`` into one flat buffer per bucket (views that autograd accumulates into): "
        "the step then skips per-tensor gradient checks. ``zero_grad`` zeroes the buffer instead of setting "
        "gradients to None, so a parameter without a gradient is stepped with zeros, as under DDP's "
        "``gradient_as_bucket_view``. Worth it for thousands of small tensors."
    ),
    "master_weights": (
        "keep an fp32 master copy of every bf16/fp16 parameter (flat, like the states): the step reads and "
        "writes the master and writes the parameter rounded to nearest even in the same pass "
        "(docs/math.md#precision)."
    ),
    "state_dtype": (
        "storage dtype of the states (default: the parameter's, float32 with master weights); math is always "
        'float32. bfloat16/float16 states halve the memory of float32 ones; ``"int8"`` stores 8-bit blockwise '
        "states (one byte per element plus an fp32 absmax per 256, decoded, updated and re-encoded in the same "
        "pass: docs/quantization.md), a quarter of float32's."
    ),
    "min_8bit_numel": (
        'under ``state_dtype="int8"``, tensors with fewer elements keep float32 states (their bytes are '
        "negligible, their statistics the most fragile)."
    ),
    "stochastic_rounding": (
        "round updated bf16 parameters (without a master) stochastically, from a seeded hash of (seed, "
        "parameter, step, element): unbiased and reproducible."
    ),
    "max_grad_norm": (
        "clip the global gradient norm (all parameters, all groups) to this value inside the step: one read "
        "pass for the norm, the clip coefficient applied in the update pass. The norm is kept as "
        "``opt.last_grad_norm``; a non-finite norm skips the step. Not under ZeroRedundancyOptimizer or FSDP2, "
        "where a rank holds a shard (a ValueError: clip with torch.nn.utils.clip_grad_norm_)."
    ),
}

_INDENT = "    "


def _args(rule_args: dict[str, str], notes: dict[str, str]) -> str:
    lines = []
    for name, text in {"params": "parameters or param groups, as for any torch optimizer.", **rule_args,
                       **SHARED_ARGS}.items():
        if name in notes:
            text = f"{text} {notes[name]}"
        wrapped = textwrap.wrap(f"{name}: {text}", width=100, subsequent_indent=_INDENT)
        lines += [_INDENT + line for line in wrapped]
    return "\n".join(lines)


# what every rule's math section ends with (the prologue every rule shares)
NON_FINITE = ("The L2 term is added only where it is nonzero, and Inf and NaN spread as in torch.optim "
              "(docs/math.md#non-finite-values).")


def docstring(summary: str, math: str, args: dict[str, str], example: str, references: str,
              arg_notes: Optional[dict[str, str]] = None) -> str:
    """A wrapper's docstring: its rule's parts around the options every wrapper shares.

    ``args`` holds the rule's own hyperparameters (name -> description, the order of the
    signature); the shared options follow them, ``arg_notes`` appended to the shared ones named.
    """
    sections = [
        textwrap.dedent(summary).strip(),
        textwrap.dedent(math).strip() + "\n" + NON_FINITE,
        "Args:\n" + _args(args, arg_notes or {}),
        "Returns:\n" + _INDENT + "``step()`` returns the closure's loss, or None.",
        "Example:\n" + textwrap.indent(textwrap.dedent(example).strip(), _INDENT),
        "References:\n" + textwrap.indent(textwrap.dedent(references).strip(), _INDENT),
    ]
    return "\n\n".join(sections) + "\n"
