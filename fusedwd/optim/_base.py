"""The machinery every fusedwd optimizer shares (docs/design.md).

Subclasses describe a rule (its states, structural switches, hyperparameter
row, reference call and kernel launch); this class turns param groups into
buckets with flat states, gathers gradients, and runs one pass per bucket.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _cuda_ext, _ext
from .._buckets import SEG_G, SEG_INDEX, SEG_P, Bucket
from . import _dtensor, _flat
from .._spec import SUPPORTED_DTYPES, Backend, check_backend, check_decay, group_lr_max, hyper_tensor

# Elements per thread below which the CPU pass does not split (torch's at::internal::GRAIN_SIZE).
GRAIN_SIZE = 32768

# Storage dtype codes of the compiled kernels (csrc/include/fusedwd/common.h).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


class FusedOptimizer(Optimizer):
    """Base class: torch.optim.Optimizer semantics over flat, fused state buffers."""

    # Per rule: state names in segment-table column order (S0, S1, S2); a rule's
    # `_state_slots(structure)` returns them with None for a state it does not keep.
    _STATE_NAMES: ClassVar[tuple[str, ...]] = ()
    _STEP_IN_STATE: ClassVar[bool] = True  # torch keeps `step` in state (AdamW, RMSprop; not SGD)
    _HP_NAMES: ClassVar[tuple[str, ...]] = ()  # hyperparameter row, in kernel column order
    _HP_TABLE_NAME: ClassVar[str] = ""  # name of the column dict in fusedwd._C

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self._plan: Optional[list[Bucket]] = None
        self._plan_key: Optional[tuple] = None
        check_decay(defaults["decay"])
        check_backend(defaults["backend"])
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- rule hooks
    def _check_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _structure(self, group: dict[str, Any]) -> tuple:
        """The group's switches that decide which states exist (part of the bucket key)."""
        raise NotImplementedError

    def _state_slots(self, structure: tuple) -> tuple[Optional[str], ...]:
        raise NotImplementedError

    def _hyper_row(self, group: dict[str, Any], device: Any = None) -> list[Any]:
        """The group's row of the rule's hyperparameter table (docs/design.md#hyperparameter-table).

        With ``device``, a tensor lr is not read on the host: the entries that depend
        on it are float64 0-dim tensors on ``device`` (see _spec.decay_row).
        """
        raise NotImplementedError

    def _launch(self, ext: Any, table: int, nseg: int, hyper: int, dtype: int, structure: tuple, threads: int) -> None:
        """One CPU pass: every rule's kernel takes (table, nseg, hyper, dtype, *switches, threads)."""
        getattr(ext, self._kernel_name() + "_step")(table, nseg, hyper, dtype, *structure, threads)

    @classmethod
    def _kernel_name(cls) -> str:
        """The rule's name in the compiled modules: ADAMW_HP -> adamw (adamw_step)."""
        return cls._HP_TABLE_NAME.removesuffix("_HP").lower()

    def _reference(self, group: dict[str, Any], structure: tuple, params: list[Tensor], grads: list[Tensor],
                   states: dict[str, list[Tensor]], steps: list[Tensor]) -> None:
        raise NotImplementedError

    def _initialized_step(self, state: dict[str, Any]) -> Optional[float]:
        """The step count to resume from for an existing per-parameter state."""
        step = state.get("step")
        return None if step is None else float(step)

    # ------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._complete_group(group)
        for p in group["params"]:
            if p.is_complex():
                raise TypeError(f"{type(self).__name__} does not support complex parameters (got {p.dtype})")
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"{type(self).__name__} supports parameters of dtype "
                    f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}; got {p.dtype}"
                )
            if p.layout != torch.strided:
                raise TypeError(f"{type(self).__name__} does not support {p.layout} parameters")
            _dtensor.check_flat_grads(type(self).__name__, group, p)
        self._plan = None

    def _complete_group(self, group: dict[str, Any]) -> None:
        """Fill keys a group may lack (a torch checkpoint has no `decay`), then validate it."""
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        if "lr_max" not in group:
            # docs/math.md: lr_max is the group's initial lr; a scheduler records it as initial_lr
            group["lr_max"] = group_lr_max(group)
        self._check_group(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            # fusedwd never differentiates through a step; a torch checkpoint saved
            # with differentiable=True steps identically without it.
            group.setdefault("capturable", False)
            group["differentiable"] = False
            self._complete_group(group)
        # the plan holds raw pointers into buffers of the original object: rebuild it
        self._plan = None
        self._plan_key = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._plan = None

    # ------------------------------------------------------------------- plan
    def _resolve_backend(self, requested: str, p: Tensor) -> str:
        if requested == Backend.REFERENCE:
            return Backend.REFERENCE.value
        if requested == Backend.TRITON:
            _ext.triton(p.device)  # raises with the reason when Triton cannot step this device
            return Backend.TRITON.value
        if requested == Backend.CUDA:
            _cuda_ext.cuda()  # raises with the reason: not built, or no usable GPU
            if p.device.type != "cuda":
                raise RuntimeError(
                    f"backend='cuda' runs on CUDA tensors, but a parameter is on {p.device}; "
                    "use backend='auto', 'cpu' or 'reference'"
                )
            return Backend.CUDA.value
        if p.device.type == "cpu":
            if requested == Backend.CPU or _ext.has_cpu():
                _ext.cpu()  # raises the kept ImportError when backend='cpu' was asked for
                return Backend.CPU.value
            _ext.warn_fallback_once()
            return Backend.REFERENCE.value
        if requested == Backend.CPU:
            raise RuntimeError(
                f"backend='cpu' runs on CPU tensors, but a parameter is on {p.device}; "
                "use backend='auto' or 'reference'"
            )
        if p.device.type == "cuda" and _cuda_ext.has_cuda():
            return Backend.CUDA.value
        if p.device.type == "cuda" and _ext.has_triton() and _ext.triton_unusable(p.device) is None:
            return Backend.TRITON.value
        # no compiled kernel for this device: the reference runs anywhere torch does
        return Backend.REFERENCE.value

    def _current_plan(self) -> list[Bucket]:
        key = tuple((id(g["params"]), len(g["params"]), self._structure(g), g["backend"], g.get("flat_grads"))
                    for g in self.param_groups)
        if self._plan is None or key != self._plan_key:
            self._plan = self._build_plan()
            self._plan_key = key
        return self._plan

    def _build_plan(self) -> list[Bucket]:
        buckets: dict[tuple, Bucket] = {}
        for row, group in enumerate(self.param_groups):
            structure = self._structure(group)
            slots = self._state_slots(structure)
            for p in group["params"]:
                backend = self._resolve_backend(group["backend"], p)
                _dtensor.check_flat_grads(type(self).__name__, group, p)
                dtensor = _dtensor.is_dtensor(p)
                # flat_grads: contiguous parameters of a compiled backend (check_views is in fusedwd._C)
                flat = bool(group.get("flat_grads")) and backend != Backend.REFERENCE and _ext.has_cpu() \
                    and p.is_contiguous()
                key = (p.device, p.dtype, backend, structure, flat, dtensor)
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = Bucket(key, p.device, p.dtype, backend, structure, slots, flat_grads=flat,
                                                   dtensor=dtensor)
                bucket.params.append(p)
                bucket.group_rows.append(row)
                bucket.shapes.append(_dtensor.local(p).shape)
        for bucket in buckets.values():
            # a GPU kernel reads and advances the step counts: keep them on its device
            # (as torch's fused AdamW does), so a step never syncs with the host
            bucket.allocate(steps_on_device=bucket.backend in (Backend.TRITON, Backend.CUDA))
            self._adopt_state(bucket)
            if bucket.flat_grads:
                _flat.attach(bucket)
            if bucket.backend != Backend.REFERENCE:
                bucket.build_tables()
        return list(buckets.values())

    def _adopt_state(self, bucket: Bucket) -> None:
        """Move existing per-parameter state (a checkpoint, an earlier plan) into the flat buffers."""
        keeps_state = self._STEP_IN_STATE or any(bucket.state_names)
        for i, p in enumerate(bucket.params):
            state = self.state.get(p)
            if not keeps_state:
                bucket.exposed[i] = True
                continue
            if not state:
                continue
            for name in filter(None, bucket.state_names):
                old = state.get(name)
                if old is None:
                    continue  # a state this structure adds (e.g. amsgrad switched on) starts at zero
                if bucket.dtensor and isinstance(old, Tensor):
                    old = _dtensor.local_state(old, p)  # shapes below are this rank's shard
                if not isinstance(old, Tensor) or old.shape != bucket.shapes[i]:
                    raise RuntimeError(
                        f"{type(self).__name__}: state '{name}' of {self._describe(bucket, i)} has shape "
                        f"{tuple(old.shape) if isinstance(old, Tensor) else type(old).__name__}, "
                        f"expected {tuple(bucket.shapes[i])}"
                    )
                bucket.views[name][i].copy_(old)
            step = self._initialized_step(state)
            if step is not None:
                bucket.steps[i] = step
            self._expose(bucket, i)
        bucket.n_unexposed = bucket.exposed.count(False)

    def _expose(self, bucket: Bucket, i: int) -> None:
        p = bucket.params[i]
        state = self.state[p]
        for name in filter(None, bucket.state_names):
            state[name] = _dtensor.wrap(bucket.views[name][i], p) if bucket.dtensor else bucket.views[name][i]
        if self._STEP_IN_STATE:
            state["step"] = bucket.step_views[i]
        bucket.exposed[i] = True

    def _expose_after_step(self, bucket: Bucket, indices: list[int]) -> None:
        # torch creates a parameter's state on its first step; so do we
        for i in indices:
            if not bucket.exposed[i]:
                self._expose(bucket, i)
                bucket.n_unexposed -= 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset gradients as torch does; with ``flat_grads=True`` zero the flat buffers instead.

        The flat buffers' views stay the parameters' ``.grad`` whatever ``set_to_none``
        says: that is the point of the option (see fusedwd/optim/_flat.py).
        """
        flat = [b for b in (self._plan or ()) if b.grad_views]
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
            self._check_group(group)  # schedulers and users edit groups between steps
        plan = self._current_plan()
        # Validate and gather every bucket before the first pass writes anything, so a
        # bad parameter anywhere leaves every buffer untouched.
        prepared = [
            self._prepare_reference(b) if b.backend == Backend.REFERENCE else self._prepare_kernel(b) for b in plan
        ]
        hyper: Optional[Tensor] = None
        for bucket, work in zip(plan, prepared):
            if bucket.backend == Backend.REFERENCE:
                self._run_reference(bucket, work)
            else:
                if hyper is None:
                    hyper = self._hyper_table(bucket.device)
                self._run_kernel(bucket, hyper, *work)
        return loss

    def _hyper_table(self, device: torch.device) -> Tensor:
        """Every group's hyperparameter row, as the kernels read them.

        capturable=True builds it on the buckets' device from a tensor lr without a
        host read (a CUDA graph replays it with the lr of the replay); otherwise it is
        built on the host from numbers.
        """
        if any(g.get("capturable") for g in self.param_groups):
            return torch.stack([hyper_tensor(self._hyper_row(g, device), device) for g in self.param_groups])
        return torch.tensor([self._hyper_row(g) for g in self.param_groups], dtype=torch.float64)

    def _prepare_kernel(self, bucket: Bucket) -> tuple[int, list[tuple[Tensor, Tensor, Tensor]]]:
        """Fill the bucket's table of this step's segments; returns (rows, staged copies)."""
        if bucket.grad_views:
            return _flat.prepare(self, bucket, _ext.cpu()), []
        # The Triton backend works without the C++ module: its parameters then all take
        # the Python path below, one at a time.
        # gather reads tensors through raw pointers: a DTensor's shard is one level down.
        gather = _ext.cpu().gather if (bucket.backend == Backend.CPU or _ext.has_cpu()) and not bucket.dtensor \
            else None
        # On a CUDA bucket gather cannot check the gradient's device. torch's .grad setter
        # already requires the parameter's device, and a parameter moved since the plan was
        # built has a new address, which sends it to _check_param below.
        expect_cpu = bucket.device.type == "cpu"
        params, table_in, table_out = bucket.params, bucket.table_in, bucket.table_out
        n, i, n_active = len(params), 0, 0
        staged: list[tuple[Tensor, Tensor, Tensor]] = []
        while True:
            if gather is not None:
                i, n_active = gather(params, i, table_in.data_ptr(), table_out.data_ptr(), n_active, bucket.dtype,
                                     expect_cpu)
            else:
                while i < n and params[i].grad is None:
                    i += 1
            if i >= n:
                return n_active, staged
            # gather stops at a parameter it cannot take as is: diagnose it here
            p, g = self._local_pair(bucket, i)
            self._check_param(bucket, i, p, g)
            p_c, g_c = p, g
            if not (p.is_contiguous() and g.is_contiguous()):
                p_c, g_c = p.contiguous(), g.contiguous()  # stage through contiguous copies
                staged.append((p, p_c, g_c))
            else:
                table_in[i, SEG_P] = p.data_ptr()  # p.data was replaced by a same-shaped tensor
            row = table_in[i].clone()
            row[SEG_P], row[SEG_G] = p_c.data_ptr(), g_c.data_ptr()
            table_out[n_active] = row
            i, n_active = i + 1, n_active + 1

    def _run_kernel(self, bucket: Bucket, hyper: Tensor, n_active: int,
                    staged: list[tuple[Tensor, Tensor, Tensor]]) -> None:
        if not n_active:
            return
        if bucket.backend == Backend.TRITON:
            launch = _ext.triton(bucket.device).LAUNCHERS[self._HP_TABLE_NAME]
            launch(bucket.table_out[:n_active], hyper, bucket.device, bucket.dtype, *bucket.structure)
        elif bucket.backend == Backend.CUDA:
            self._run_cuda(bucket, hyper, n_active)
        else:
            # like torch's parallel_for, no thread gets fewer than GRAIN_SIZE elements: on
            # small buckets a parallel region costs more than it saves, and on a busy machine
            # it waits for a descheduled thread at every step
            threads = max(1, min(torch.get_num_threads(), -(-bucket.length // GRAIN_SIZE)))
            self._launch(_ext.cpu(), bucket.table_out.data_ptr(), n_active, hyper.data_ptr(),
                         DTYPE_CODES[bucket.dtype], bucket.structure, threads)
        for p, p_c, _ in staged:
            if p_c is not p:
                p.copy_(p_c)
        if bucket.n_unexposed:
            self._expose_after_step(bucket, bucket.table_out[:n_active, SEG_INDEX].tolist())

    def _run_cuda(self, bucket: Bucket, hyper: Tensor, n_active: int) -> None:
        """One launch of fusedwd._C_cuda on torch's current stream of the bucket's device."""
        if bucket.arrivals is None:
            bucket.arrivals = torch.zeros(1, dtype=torch.int32, device=bucket.device)
        _cuda_ext.step(self._kernel_name(), bucket.table_out[:n_active], hyper, DTYPE_CODES[bucket.dtype],
                       bucket.structure, bucket.device, bucket.arrivals)

    def _prepare_reference(self, bucket: Bucket) -> dict[int, list[int]]:
        """This step's parameters of the bucket, by param group row."""
        by_group: dict[int, list[int]] = {}
        for i, p in enumerate(bucket.params):
            if p.grad is None:
                continue
            self._check_param(bucket, i, *self._local_pair(bucket, i))
            by_group.setdefault(bucket.group_rows[i], []).append(i)
        return by_group

    def _run_reference(self, bucket: Bucket, by_group: dict[int, list[int]]) -> None:
        for row, indices in by_group.items():
            self._reference(
                self.param_groups[row],
                bucket.structure,
                [_dtensor.local(bucket.params[i]) for i in indices],
                [_dtensor.local(bucket.params[i].grad) for i in indices],
                {name: [bucket.views[name][i] for i in indices] for name in filter(None, bucket.state_names)},
                [bucket.step_views[i] for i in indices],
            )
            if bucket.n_unexposed:
                self._expose_after_step(bucket, indices)

    # ------------------------------------------------------------- bad input
    def _describe(self, bucket: Bucket, i: int) -> str:
        row = bucket.group_rows[i]
        group = self.param_groups[row]
        position = next((k for k, q in enumerate(group["params"]) if q is bucket.params[i]), "?")
        names = group.get("param_names")
        name = f" '{names[position]}'" if names and isinstance(position, int) else ""
        return f"parameter {position}{name} of param group {row}"

    def _local_pair(self, bucket: Bucket, i: int) -> tuple[Tensor, Tensor]:
        """Parameter i and its gradient as the step sees them: a DTensor's local shards."""
        p, g = bucket.params[i], bucket.params[i].grad
        if not bucket.dtensor:
            return p, g
        return _dtensor.local_pair(f"{type(self).__name__}: {self._describe(bucket, i)}", p, g)

    def _check_param(self, bucket: Bucket, i: int, p: Tensor, g: Tensor) -> None:
        """Raise a clear error for a parameter or gradient the step cannot take."""
        who = f"{type(self).__name__}: {self._describe(bucket, i)}"
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

    # ------------------------------------------- the traced step (torch.compile)
    def _init_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], s0: list[Tensor],
                    s1: list[Tensor], s2: list[Tensor], steps: list[Tensor]) -> None:
        """Fill the lists a fused op steps for one group: its parameters with a gradient,
        their gradients, state views (columns S0..S2) and step counts.

        torch.compile calls a method of this name eagerly, outside the graph, and guards
        on the optimizer's state (torch/_dynamo/variables/optimizer.py): the plan, the
        flat buffers and every state exist before tracing starts.
        """
        self._check_group(group)
        plan = self._current_plan()
        where = {id(p): (b, i) for b in plan for i, p in enumerate(b.params)}
        columns = (s0, s1, s2)
        for p in group["params"]:
            if p.grad is None:
                continue
            bucket, i = where[id(p)]
            if bucket.dtensor:
                raise RuntimeError(
                    f"{type(self).__name__}: a compiled step does not take DTensor parameters (FSDP2) yet; "
                    f"{self._describe(bucket, i)} is one: call opt.step() outside torch.compile"
                )
            if bucket.backend not in (Backend.CPU, Backend.CUDA):
                raise RuntimeError(
                    f"{type(self).__name__}: a compiled step runs the fused ops (backend 'cpu' or 'cuda'); "
                    f"{self._describe(bucket, i)} is on backend '{bucket.backend}'"
                )
            self._check_param(bucket, i, p, p.grad)
            params.append(p)
            grads.append(p.grad)
            for column, name in zip(columns, bucket.state_names):
                if name is not None:
                    column.append(bucket.views[name][i])
            steps.append(bucket.step_views[i])
            if not bucket.exposed[i]:
                self._expose(bucket, i)
                bucket.n_unexposed -= 1

    def _traced_step(self) -> None:
        """The step torch.compile traces: one fused op per group, lr read from the graph.

        A tensor lr enters the graph as an input, so a scheduler changing it does not
        recompile; a float lr is a constant the graph guards on, as in torch.optim.
        """
        op = getattr(torch.ops.fusedwd, self._kernel_name() + "_step_")
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
            structure = self._structure(group)
            states = (s0, s1, s2)[: len(self._state_slots(structure))]
            hyper = hyper_tensor(self._hyper_row(group, params[0].device), params[0].device)
            op(params, grads, *states, steps, hyper, *structure)
