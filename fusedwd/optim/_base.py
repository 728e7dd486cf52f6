"""The optimizer every fusedwd rule is: torch.optim.Optimizer semantics over flat, fused state buffers.

A subclass names its rule (``RULE``, fusedwd/rules/<rule>.py) and gives torch's
signature; this class keeps torch's interface (param groups, state_dict,
zero_grad, GradScaler's attributes) and orchestrates a step, whose parts live
by job in this package (docs/design.md):

- _plan.py: param groups into buckets with flat states, segment tables;
- _state.py: saved states adopted into the flat buffers, views exposed in
  ``optimizer.state``;
- _control.py: AMP and clipping, the control block of a step;
- _runners.py: one runner per backend (cpu, triton, cuda, reference);
- _graphs.py: the tables GPU launches read, kept on the device, and the
  CUDA-graph capture guard;
- _compiled.py: the step torch.compile traces;
- _checks.py, _flat.py, _dtensor.py, _zero.py: bad input, flat gradients,
  FSDP2 shards, ZeroRedundancyOptimizer.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._buckets import Bucket
from .._spec import SUPPORTED_DTYPES, check_backend, check_decay, check_max_grad_norm, group_lr_max
from ..rules import Rule
from . import _control, _dtensor, _flat, _graphs, _plan, _state, _zero
from ._checks import Checks
from ._compiled import CompiledStep
from ._runners import RUNNERS, Step


class FusedOptimizer(CompiledStep, Optimizer):
    """Base class: torch.optim.Optimizer semantics over flat, fused state buffers.

    A subclass names its rule (``RULE``, fusedwd/rules/<rule>.py) and gives torch's
    signature; everything rule-specific is read from the rule.
    """

    RULE: ClassVar[Rule]

    # GradScaler hands the step its scale and found_inf (as attributes grad_scale and
    # found_inf) instead of unscaling the gradients and skipping the step itself
    _step_supports_amp_scaling: ClassVar[bool] = True

    def __init__(self, params: Any, defaults: dict[str, Any], max_grad_norm: Optional[float] = None) -> None:
        self._plan: Optional[list[Bucket]] = None
        self._plan_key: Optional[tuple] = None
        # per device: the hyperparameter table the kernels read (fusedwd/optim/_graphs.py)
        self._hyper_tables: dict[torch.device, _graphs.HyperTable] = {}
        check_decay(defaults["decay"])
        check_backend(defaults["backend"])
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self._zero_checked = False
        # the global gradient norm of the last step (a 0-dim float32 tensor), with max_grad_norm
        self.last_grad_norm: Optional[Tensor] = None
        super().__init__(params, defaults)

    # ------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._complete_group(group)
        who = type(self).__name__
        for p in group["params"]:
            if p.is_complex():
                raise TypeError(f"{who} does not support complex parameters (got {p.dtype})")
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{who} supports parameters of dtype {', '.join(str(d) for d in SUPPORTED_DTYPES)}; "
                                f"got {p.dtype}")
            if p.layout != torch.strided:
                raise TypeError(f"{who} does not support {p.layout} parameters")
            _dtensor.check_flat_grads(who, group, p)
        self._plan = None

    def _complete_group(self, group: dict[str, Any]) -> None:
        """Fill keys a group may lack (a torch checkpoint has no `decay`), then validate it."""
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        if "lr_max" not in group:
            # docs/math.md: lr_max is the group's initial lr; a scheduler records it as initial_lr
            group["lr_max"] = group_lr_max(group)
        self._validate(group)

    def _validate(self, group: dict[str, Any]) -> None:
        """The rule's checks of a group, at every step (schedulers and users edit groups between steps)."""
        self.RULE.check(group)

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles defaults, state and param_groups; max_grad_norm is an option too
        return {**super().__getstate__(), "max_grad_norm": self.max_grad_norm}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # unpickling brings max_grad_norm; torch's load_state_dict calls this too, with only state and
        # param_groups: the option it was built with stays (it was dropped, and clipping with it)
        self.max_grad_norm = state.get("max_grad_norm", getattr(self, "max_grad_norm", None))
        self.last_grad_norm = None
        self._zero_checked = False
        for group in self.param_groups:
            # fusedwd never differentiates through a step; a torch checkpoint saved
            # with differentiable=True steps identically without it.
            group.setdefault("capturable", False)
            group["differentiable"] = False
            self._complete_group(group)
        # the plan holds raw pointers into buffers of the original object: rebuild it
        self._plan = None
        self._plan_key = None
        self._hyper_tables = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, keeping each saved state's dtype.

        torch casts every state to its parameter's dtype, which would round an fp32
        master copy or fp32 states of a bf16 parameter and turn 8-bit codes into floats;
        fusedwd keeps them as saved and converts them once, into the buckets' storage
        dtypes, at the next step (docs/design.md#precision).
        """
        saved = _state.saved_dtypes(state_dict, self.param_groups)
        super().load_state_dict(state_dict)
        _state.restore_dtypes(self.state, self.param_groups, saved)
        self._plan = None

    # ------------------------------------------------------------------- plan
    def _checks(self) -> Checks:
        return Checks(type(self).__name__, self.param_groups)

    def _plan_is_current(self) -> bool:
        return self._plan is not None and _plan.plan_key(self.RULE, self.param_groups) == self._plan_key

    def _current_plan(self) -> list[Bucket]:
        key = _plan.plan_key(self.RULE, self.param_groups)
        if self._plan is None or key != self._plan_key:
            self._plan = _plan.build(self.RULE, self.param_groups, self.state, self._checks())
            self._plan_key = key
            self._hyper_tables = {}
        return self._plan

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset gradients as torch does; with ``flat_grads=True`` zero the flat buffers instead.

        The flat buffers' views stay the parameters' ``.grad`` whatever ``set_to_none``
        says: that is the point of the option (see fusedwd/optim/_flat.py).
        """
        flat = [b for b in (self._plan or ()) if b.grads is not None]
        if not flat:
            super().zero_grad(set_to_none)
            return
        owned = set()
        for bucket in flat:
            _flat.zero(bucket)
            owned.update(id(p) for p in bucket.params)
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in owned or p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform a single optimization step.

        Args:
            closure: a closure that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._traced_step()
            return loss
        for group in self.param_groups:
            self._validate(group)
        self._refuse_zero_clipping()
        # inside torch.cuda.graph(...): only launches over tables already on the device (docs/design.md#cuda-graphs)
        capturing = _graphs.capturing(self)
        if capturing:
            _graphs.check_capture_start(self, self._plan_is_current())
        plan = self._current_plan()
        if capturing:
            _graphs.check_capture_plan(self, plan)
        step = Step(self.RULE, self.param_groups, self._checks())
        # Validate and gather every bucket before the first pass writes anything, so a
        # bad parameter anywhere leaves every buffer untouched.
        prepared = [RUNNERS[b.backend].prepare(step, b) for b in plan]
        # the tables where the kernels read them: uploaded where they changed, or a RuntimeError under capture
        active = [RUNNERS[b.backend].active(work) for b, work in zip(plan, prepared)]
        step.hypers = _graphs.sync(self, step, plan, active, capturing)
        step.ctl, norm = _control.control(plan, prepared, getattr(self, "grad_scale", None),
                                          getattr(self, "found_inf", None), self.max_grad_norm, type(self).__name__)
        if norm is not None:
            self.last_grad_norm = norm
        for bucket, work in zip(plan, prepared):
            stepped = RUNNERS[bucket.backend].run(step, bucket, work)
            _state.expose_stepped(self.RULE, self.state, bucket, stepped)
        return loss

    def _refuse_zero_clipping(self) -> None:
        """max_grad_norm inside ZeroRedundancyOptimizer would clip each rank's shard by its own norm."""
        if self.max_grad_norm is None or self._zero_checked:
            return
        if _zero.held_by_zero(self):
            raise ValueError(
                f"{type(self).__name__}: max_grad_norm inside torch.distributed.optim.ZeroRedundancyOptimizer would "
                "clip each rank's shard by its own norm; clip the full gradients with "
                "torch.nn.utils.clip_grad_norm_ before zero.step() instead"
            )
        self._zero_checked = True
