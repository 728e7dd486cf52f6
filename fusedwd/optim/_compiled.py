"""The step torch.compile traces: one fused custom op per param group (docs/design.md#torchcompile).

``step()`` sees ``torch.compiler.is_compiling()`` and calls ``_traced_step``, which
calls ``torch.ops.fusedwd.<rule>_step_`` (fusedwd/ops.py) per group with the
lists ``_init_group`` fills. dynamo calls a method of that name eagerly, outside
the graph, and guards on the optimizer's state (torch/_dynamo/variables/optimizer.py),
so the plan, the flat buffers and every state exist before tracing starts. Both
are methods (dynamo intercepts the optimizer's own ``_init_group``), held by
this mixin of FusedOptimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._spec import Backend, hyper_tensor
from . import _plan, _state


class CompiledStep:
    """FusedOptimizer's traced step (this module's docstring)."""

    def _init_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], s0: list[Tensor],
                    s1: list[Tensor], s2: list[Tensor], steps: list[Tensor]) -> None:
        """Fill the lists a fused op steps for one group: its parameters with a gradient,
        their gradients, state views (columns S0..S2) and step counts."""
        self._validate(group)
        checks = self._checks()
        plan = self._current_plan()
        where = {id(p): (b, i) for b in plan for i, p in enumerate(b.params)}
        columns = (s0, s1, s2)
        who = checks.who
        for p in _plan.unique(group["params"]):
            if p.grad is None:
                continue
            bucket, i = where[id(p)]
            storage = bucket.storage
            if bucket.dtensor:
                raise RuntimeError(
                    f"{who}: a compiled step does not take DTensor parameters (FSDP2) yet; "
                    f"{checks.describe(bucket, i)} is one: call opt.step() outside torch.compile"
                )
            if storage.master or storage.stochastic_rounding or storage.state_dtype != bucket.dtype \
                    or self.max_grad_norm is not None or getattr(self, "found_inf", None) is not None:
                raise RuntimeError(
                    f"{who}: a compiled step does not take master_weights, state_dtype, stochastic_rounding, "
                    "max_grad_norm or GradScaler's found_inf yet; call opt.step() outside torch.compile"
                )
            if bucket.backend not in (Backend.CPU, Backend.CUDA):
                raise RuntimeError(
                    f"{who}: a compiled step runs the fused ops (backend 'cpu' or 'cuda'); "
                    f"{checks.describe(bucket, i)} is on backend '{bucket.backend}'"
                )
            checks.check(bucket, i, p, p.grad)
            params.append(p)
            grads.append(p.grad)
            for column, name in zip(columns, bucket.state_names):
                if name is not None:
                    column.append(bucket.states.views[name][i])
            steps.append(bucket.states.step_views[i])
            _state.expose_stepped(self.RULE, self.state, bucket, [i])

    def _traced_step(self) -> None:
        """One fused op per group, lr read from the graph.

        A tensor lr enters the graph as an input, so a scheduler changing it does not
        recompile; a float lr is a constant the graph guards on, as in torch.optim.
        """
        rule = self.RULE
        op = getattr(torch.ops.fusedwd, rule.name + "_step_")
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            s0: list[Tensor] = []
            s1: list[Tensor] = []
            s2: list[Tensor] = []
            steps: list[Tensor] = []
            self._init_group(group, params, grads, s0, s1, s2, steps)
            if not params:
                continue
            states = (s0, s1, s2)[: len(rule.states)]
            hyper = hyper_tensor(rule.hyper_row(group, params[0].device), params[0].device)
            op(params, grads, *states, steps, hyper, *rule.structure(group))
