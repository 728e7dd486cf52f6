"""The machinery every fusedwd optimizer shares (docs/design.md).

Subclasses describe a rule (its states, structural switches, hyperparameter
row, reference call and kernel launch); this class turns param groups into
buckets with flat states, gathers gradients, and runs one pass per bucket.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _cuda_ext, _ext
from .._buckets import SEG_G, SEG_INDEX, SEG_P, Bucket
from . import _dtensor, _flat, _graphs
from .._buckets import CTL_CLIP, CTL_FOUND_INF, CTL_INV_SCALE, CTL_SIZE
from .._spec import (SUPPORTED_DTYPES, Backend, check_backend, check_decay, check_max_grad_norm, group_lr_max,
                     hyper_tensor, storage_layout)
from .. import quant
from ..reference import Precision

# Elements per thread below which the CPU pass does not split (torch's at::internal::GRAIN_SIZE).
GRAIN_SIZE = 32768

# Storage dtype codes of the compiled kernels (csrc/include/fusedwd/common.h).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _built_by_zero() -> bool:
    """Whether ZeroRedundancyOptimizer is constructing this optimizer over one rank's shard."""
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:
        return False
    frame = sys._getframe(2)
    for _ in range(8):  # its constructor calls ours a few frames up
        if frame is None:
            return False
        if isinstance(frame.f_locals.get("self"), ZeroRedundancyOptimizer):
            return True
        frame = frame.f_back
    return False


def _unique(params: list[Tensor]) -> list[Tensor]:
    """A group's parameters, each once: a parameter listed twice in a group (torch warns) has one
    state and is stepped once per step (docs/design.md#duplicated-parameters)."""
    seen: set[int] = set()
    return [p for p in params if not (id(p) in seen or seen.add(id(p)))]


# The states whose 8-bit code is unsigned (second moments); every other state is signed.
UNSIGNED_STATES = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg"})


class FusedOptimizer(Optimizer):
    """Base class: torch.optim.Optimizer semantics over flat, fused state buffers."""

    # Per rule: state names in segment-table column order (S0, S1, S2); a rule's
    # `_state_slots(structure)` returns them with None for a state it does not keep.
    _STATE_NAMES: ClassVar[tuple[str, ...]] = ()
    _STEP_IN_STATE: ClassVar[bool] = True  # torch keeps `step` in state (AdamW, RMSprop; not SGD)
    _HP_NAMES: ClassVar[tuple[str, ...]] = ()  # hyperparameter row, in kernel column order
    _HP_TABLE_NAME: ClassVar[str] = ""  # name of the column dict in fusedwd._C

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
        if self.max_grad_norm is not None and _built_by_zero():
            raise ValueError(
                f"{type(self).__name__}: max_grad_norm inside torch.distributed.optim.ZeroRedundancyOptimizer would "
                "clip each rank's shard by its own norm; clip the full gradients with "
                "torch.nn.utils.clip_grad_norm_ before zero.step() instead"
            )
        # the global gradient norm of the last step (a 0-dim float32 tensor), with max_grad_norm
        self.last_grad_norm: Optional[Tensor] = None
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

    def _launch(self, ext: Any, table: int, nseg: int, hyper: int, dtype: int, structure: tuple, threads: int,
                **precision: Any) -> None:
        """One CPU pass: every rule's kernel takes (table, nseg, hyper, dtype, *switches, threads, **precision)."""
        getattr(ext, self._kernel_name() + "_step")(table, nseg, hyper, dtype, *structure, threads, **precision)

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

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles defaults, state and param_groups; max_grad_norm is an option too
        return {**super().__getstate__(), "max_grad_norm": self.max_grad_norm}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # unpickling brings max_grad_norm; torch's load_state_dict calls this too, with only state and
        # param_groups: the option it was built with stays (it was dropped, and clipping with it)
        self.max_grad_norm = state.get("max_grad_norm", getattr(self, "max_grad_norm", None))
        self.last_grad_norm = None
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
        fusedwd keeps them as saved
        and converts them once, into the buckets' storage dtypes, at the next step
        (docs/design.md#precision).
        """
        saved = {}
        for saved_group, group in zip(state_dict.get("param_groups", ()), self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                entry = state_dict.get("state", {}).get(pid)
                if isinstance(entry, dict):
                    # (8-bit codes too: torch casts every state, uint8 included, to the param dtype)
                    saved[id(p)] = {k: v for k, v in entry.items()
                                    if k != "step" and isinstance(v, Tensor) and v.dtype != p.dtype}
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                for name, value in saved.get(id(p), {}).items():
                    self.state[p][name] = value.to(device=p.device)
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
            reason = _cuda_ext.unusable(p.device)
            if reason is not None:
                raise RuntimeError(f"backend='cuda': {reason}; or use backend='auto' (Triton where it runs)")
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
        if p.device.type == "cuda":
            # the CUDA kernels where they hold code for the device (probed once per device), else Triton
            cuda_reason = _cuda_ext.unusable(p.device)
            if cuda_reason is None:
                return Backend.CUDA.value
            triton_reason = _ext.triton_unusable(p.device) if _ext.has_triton() else "Triton failed to import"
            if triton_reason is None:
                return Backend.TRITON.value
            _cuda_ext.warn_reference_once(p.device, f"{cuda_reason}; {triton_reason}")
        # no compiled kernel for this device: the reference runs anywhere torch does
        return Backend.REFERENCE.value

    def _plan_key_now(self) -> tuple:
        return tuple((id(g["params"]), len(g["params"]), self._structure(g), g["backend"], g.get("flat_grads"),
                      g.get("master_weights"), g.get("state_dtype"), g.get("stochastic_rounding"))
                     for g in self.param_groups)

    def _plan_is_current(self) -> bool:
        return self._plan is not None and self._plan_key_now() == self._plan_key

    def _current_plan(self) -> list[Bucket]:
        if not self._plan_is_current():
            self._plan = self._build_plan()
            self._plan_key = self._plan_key_now()
            self._hyper_tables = {}
        return self._plan

    def _build_plan(self) -> list[Bucket]:
        buckets: dict[tuple, Bucket] = {}
        salt = 0  # each parameter's index in the optimizer: its stochastic-rounding salt
        for row, group in enumerate(self.param_groups):
            structure = self._structure(group)
            slots = self._state_slots(structure)
            for p in _unique(group["params"]):
                layout = storage_layout(p.dtype, group, p.numel())
                backend = self._resolve_backend(group["backend"], p)
                _dtensor.check_flat_grads(type(self).__name__, group, p)
                dtensor = _dtensor.is_dtensor(p)
                # flat_grads: contiguous parameters of a compiled backend (check_views is in fusedwd._C)
                flat = bool(group.get("flat_grads")) and backend != Backend.REFERENCE and _ext.has_cpu() \
                    and p.is_contiguous()
                key = (p.device, p.dtype, backend, structure, flat, dtensor, layout)
                bucket = buckets.get(key)
                if bucket is None:
                    state_dtype, master, stochastic = layout
                    quantized = state_dtype == torch.uint8
                    if quantized and dtensor:
                        raise ValueError(f"{type(self).__name__}: state_dtype='int8' does not take DTensor "
                                         "parameters (FSDP2) yet: their shards would cut the 256-element blocks")
                    bucket = buckets[key] = Bucket(key, p.device, p.dtype, backend, structure, slots, flat_grads=flat,
                                                   dtensor=dtensor, state_dtype=state_dtype, master=master,
                                                   stochastic_rounding=stochastic, quantized=quantized,
                                                   signed=tuple(n not in UNSIGNED_STATES for n in slots))
                bucket.params.append(p)
                bucket.salts.append(salt)
                salt += 1
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
            _graphs.attach(bucket)  # GPU backends: the launch's tables, kept on the device
        return list(buckets.values())

    def _adopt_state(self, bucket: Bucket) -> None:
        """Move existing per-parameter state (a checkpoint, an earlier plan) into the flat buffers."""
        keeps_state = self._STEP_IN_STATE or any(bucket.state_names) or bucket.master
        for i, p in enumerate(bucket.params):
            state = self.state.get(p)
            if bucket.master:
                # a master starts as the parameter; a saved one (below) replaces it
                bucket.master_views[i].copy_(_dtensor.local(p).detach())
            self._adopt_master(bucket, i, state)
            if not keeps_state:
                bucket.exposed[i] = True
                continue
            if not state:
                continue
            for column, name in enumerate(bucket.state_names):
                if name is None or self._adopt_codes(bucket, i, state, name, column):
                    continue
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
                if bucket.quantized:  # a float state (torch's, or fp32 fusedwd's): encoded once
                    codes, scales = quant.quantize_blockwise(old, bucket.signed[column])
                    bucket.views[name][i].copy_(codes.view(bucket.shapes[i]))
                    bucket.absmax_views[name][i].copy_(scales)
                else:
                    bucket.views[name][i].copy_(old)
            step = self._initialized_step(state)
            if step is not None:
                bucket.steps[i] = step
            self._expose(bucket, i)
        bucket.n_unexposed = bucket.exposed.count(False)

    def _adopt_codes(self, bucket: Bucket, i: int, state: dict[str, Any], name: str, column: int) -> bool:
        """An 8-bit state saved as ``<name>_codes`` and ``<name>_absmax``: copied into 8-bit
        buffers exactly, or decoded once into float ones (docs/design.md#8-bit-states).
        Returns whether it was there."""
        codes, scales = state.get(name + "_codes"), state.get(name + "_absmax")
        if codes is None or scales is None:
            return False
        shape = bucket.shapes[i]
        blocks = -(-shape.numel() // quant.BLOCK_SIZE)
        if codes.dtype != torch.uint8 or codes.numel() != shape.numel() or scales.numel() != blocks:
            raise RuntimeError(
                f"{type(self).__name__}: 8-bit state '{name}' of {self._describe(bucket, i)} has codes "
                f"{codes.dtype} of {codes.numel()} and {scales.numel()} absmax, expected uint8 of "
                f"{shape.numel()} and {blocks}"
            )
        if bucket.quantized:
            bucket.views[name][i].copy_(codes.reshape(shape))
            bucket.absmax_views[name][i].copy_(scales.reshape(-1))
        else:
            bucket.views[name][i].copy_(quant.dequantize_blockwise(codes, scales, shape, bucket.signed[column]))
        return True

    def _adopt_master(self, bucket: Bucket, i: int, state: Optional[dict[str, Any]]) -> None:
        """docs/design.md#precision: a saved fp32 master is kept, never dropped silently."""
        old = state.get("master_param") if state else None
        if old is None:
            return
        if not bucket.master:
            raise ValueError(
                f"{type(self).__name__}: the state of {self._describe(bucket, i)} carries an fp32 master copy "
                "('master_param') but this optimizer keeps none for it; construct it with master_weights=True, "
                "or delete the 'master_param' entries to continue from the (rounded) parameters"
            )
        if bucket.dtensor and isinstance(old, Tensor):
            old = _dtensor.local_state(old, bucket.params[i])
        if not isinstance(old, Tensor) or old.shape != bucket.shapes[i]:
            raise RuntimeError(
                f"{type(self).__name__}: 'master_param' of {self._describe(bucket, i)} has shape "
                f"{tuple(old.shape) if isinstance(old, Tensor) else type(old).__name__}, "
                f"expected {tuple(bucket.shapes[i])}"
            )
        bucket.master_views[i].copy_(old)

    def _expose(self, bucket: Bucket, i: int) -> None:
        p = bucket.params[i]
        state = self.state[p]
        wrap = (lambda view: _dtensor.wrap(view, p)) if bucket.dtensor else (lambda view: view)
        for name in filter(None, bucket.state_names):
            if bucket.quantized:
                # codes and scales under their own names, so no reader takes the bytes for values
                state.pop(name, None)
                state[name + "_codes"] = bucket.views[name][i]
                state[name + "_absmax"] = bucket.absmax_views[name][i]
            else:
                state.pop(name + "_codes", None)
                state.pop(name + "_absmax", None)
                state[name] = wrap(bucket.views[name][i])
        if bucket.master:
            state["master_param"] = wrap(bucket.master_views[i])
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
        # inside torch.cuda.graph(...): only launches over tables already on the device (docs/design.md#cuda-graphs)
        capturing = _graphs.capturing(self)
        if capturing:
            _graphs.check_capture_start(self, self._plan_is_current())
        plan = self._current_plan()
        if capturing:
            _graphs.check_capture_plan(self, plan)
        # Validate and gather every bucket before the first pass writes anything, so a
        # bad parameter anywhere leaves every buffer untouched.
        prepared = [
            self._prepare_reference(b) if b.backend == Backend.REFERENCE else self._prepare_kernel(b) for b in plan
        ]
        # the tables where the kernels read them: uploaded where they changed, or a RuntimeError under capture
        hypers = _graphs.sync(self, plan, [work[0] if b.backend != Backend.REFERENCE else 0
                                           for b, work in zip(plan, prepared)], capturing)
        ctl = self._control(plan, prepared)
        for bucket, work in zip(plan, prepared):
            if bucket.backend == Backend.REFERENCE:
                self._run_reference(bucket, work, ctl)
            else:
                self._run_kernel(bucket, hypers[bucket.device], *work, ctl=ctl)
        return loss

    # ------------------------------------------------------- AMP and clipping
    def _control(self, plan: list[Bucket], prepared: list) -> Optional[Tensor]:
        """The control block every pass of this step reads (csrc/include/fusedwd/layout.h Ctl).

        From GradScaler's ``grad_scale`` (None once ``scaler.unscale_(opt)`` ran: the
        gradients are not unscaled twice) and ``found_inf``, and from the global gradient
        norm under ``max_grad_norm``; computed with tensor operations on the device, so
        neither a skipped nor a clipped step reads anything on the host. None: no AMP, no
        clipping.
        """
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is None and found_inf is None and self.max_grad_norm is None:
            return None
        device = plan[0].device if plan else torch.device("cpu")
        one = torch.ones((), dtype=torch.float32, device=device)
        # GradScaler's own unscale uses the fp32 reciprocal computed in fp64
        inv_scale = grad_scale.double().reciprocal().float().to(device).reshape(()) if grad_scale is not None else one
        found = found_inf.float().to(device).reshape(()) if found_inf is not None else torch.zeros_like(one)
        clip = one
        if self.max_grad_norm is not None:
            norm = self._grad_norm(plan, prepared, device) * inv_scale
            # torch.nn.utils.clip_grad_norm_'s coefficient
            clip = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            found = found + (~torch.isfinite(norm)).float()
            self.last_grad_norm = norm
        ctl = torch.empty(CTL_SIZE, dtype=torch.float32, device=device)
        ctl[CTL_INV_SCALE], ctl[CTL_FOUND_INF], ctl[CTL_CLIP] = inv_scale, found, clip
        return ctl

    def _grad_norm(self, plan: list[Bucket], prepared: list, device: torch.device) -> Tensor:
        """The 2-norm of every gradient this step takes, one read of each: on the CPU kernel's
        buckets a pass over this step's segment table summing squares in double
        (fusedwd._C.grad_sumsq); elsewhere per-tensor fp32 norms (torch._foreach_norm, on the
        device). The total is the square root of the sum of squares, rounded to fp32."""
        if any(b.dtensor for b in plan):
            raise ValueError(
                f"{type(self).__name__}: max_grad_norm needs the norm over every rank's shards; with DTensor "
                "parameters (FSDP2) clip with torch.nn.utils.clip_grad_norm_, which reduces across ranks"
            )
        sumsq = torch.zeros((), dtype=torch.float64, device=device)
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for bucket, work in zip(plan, prepared):
            if bucket.backend == Backend.CPU:
                n_active = work[0]
                sumsq += _ext.cpu().grad_sumsq(bucket.table_out.data_ptr(), n_active, DTYPE_CODES[bucket.dtype],
                                               self._threads(bucket))
                continue
            for p in bucket.params:
                if p.grad is not None:
                    by_kind.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for (_, dtype), grads in by_kind.items():
            # fp32 norms of fp32 and 16-bit gradients; fp64 ones in fp64 (_foreach_norm never narrows)
            norms = torch._foreach_norm(grads, 2.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            sumsq += torch.stack(norms).double().square().sum().to(device)
        return sumsq.sqrt().float()

    def _precision(self, bucket: Bucket, ctl: Optional[Tensor], dtype_code: Callable[[torch.dtype], Any]) -> dict:
        """The kernels' precision keywords for a bucket, only those that differ from the default."""
        kw: dict[str, Any] = {}
        if bucket.quantized:
            kw["quantized"] = True
        elif bucket.state_dtype != bucket.dtype:
            kw["state_dtype"] = dtype_code(bucket.state_dtype)
        if bucket.master:
            kw["master"] = True
        if bucket.stochastic_rounding:
            kw["stochastic_rounding"] = True
            kw["seed"] = self._stochastic_seed()
        if ctl is not None:
            kw["ctl"] = ctl.to(bucket.device)
        return kw

    def _stochastic_seed(self) -> int:
        """The seed of stochastic rounding: drawn once from torch's generator, kept in the
        param groups (so in state_dict) for a run resumed from a checkpoint."""
        for group in self.param_groups:
            if "sr_seed" in group:
                return int(group["sr_seed"])
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        for group in self.param_groups:
            group["sr_seed"] = seed
        return seed

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
                    staged: list[tuple[Tensor, Tensor, Tensor]], ctl: Optional[Tensor] = None) -> None:
        if not n_active:
            return
        if bucket.backend == Backend.TRITON:
            nseg, blocks = bucket.launch_shape
            _ext.triton(bucket.device).launch_image(self._HP_TABLE_NAME, bucket.device_table.buffer,
                                                    len(bucket.params), nseg, blocks, hyper, bucket.device,
                                                    bucket.dtype, *bucket.structure,
                                                    **self._precision(bucket, ctl, lambda d: d))
        elif bucket.backend == Backend.CUDA:
            self._run_cuda(bucket, hyper, n_active, self._precision(bucket, ctl, DTYPE_CODES.__getitem__))
        else:
            threads = self._threads(bucket)
            precision = self._precision(bucket, ctl, DTYPE_CODES.__getitem__)
            if "ctl" in precision:
                precision["ctl"] = precision["ctl"].data_ptr()  # a CPU tensor, alive as ctl
            self._launch(_ext.cpu(), bucket.table_out.data_ptr(), n_active, hyper.data_ptr(),
                         DTYPE_CODES[bucket.dtype], bucket.structure, threads, **precision)
        for p, p_c, _ in staged:
            if p_c is not p:
                p.copy_(p_c)
        if bucket.n_unexposed:
            self._expose_after_step(bucket, bucket.table_out[:n_active, SEG_INDEX].tolist())

    @staticmethod
    def _threads(bucket: Bucket) -> int:
        # like torch's parallel_for, no thread gets fewer than GRAIN_SIZE elements: on
        # small buckets a parallel region costs more than it saves, and on a busy machine
        # it waits for a descheduled thread at every step
        return max(1, min(torch.get_num_threads(), -(-bucket.length // GRAIN_SIZE)))

    def _run_cuda(self, bucket: Bucket, hyper: Tensor, n_active: int, precision: dict) -> None:
        """One launch of fusedwd._C_cuda on torch's current stream of the bucket's device, over its
        device-resident segment table."""
        _cuda_ext.launch(self._kernel_name(), bucket.device_table.buffer, n_active, hyper, DTYPE_CODES[bucket.dtype],
                         bucket.structure, bucket.device, bucket.arrivals, **precision)

    def _prepare_reference(self, bucket: Bucket) -> dict[int, list[int]]:
        """This step's parameters of the bucket, by param group row."""
        by_group: dict[int, list[int]] = {}
        for i, p in enumerate(bucket.params):
            if p.grad is None:
                continue
            self._check_param(bucket, i, *self._local_pair(bucket, i))
            by_group.setdefault(bucket.group_rows[i], []).append(i)
        return by_group

    def _run_reference(self, bucket: Bucket, by_group: dict[int, list[int]], ctl: Optional[Tensor] = None) -> None:
        grad_mult = 1.0
        if ctl is not None:
            # the reference is the readable spec, not a capturable path: it reads ctl on the host
            if float(ctl[CTL_FOUND_INF]) != 0.0:
                return
            grad_mult = float(ctl[CTL_INV_SCALE] * ctl[CTL_CLIP])  # the fp32 product, as the kernels form it
        seed = self._stochastic_seed() if bucket.stochastic_rounding else 0
        for row, indices in by_group.items():
            states = {name: [bucket.views[name][i] for i in indices] for name in filter(None, bucket.state_names)}
            if bucket.quantized:  # the rule's fp32 math on decoded states, re-encoded after (fusedwd.quant)
                states = {name: [quant.dequantize_blockwise(bucket.views[name][i], bucket.absmax_views[name][i],
                                                            bucket.shapes[i], bucket.signed[column])
                                 for i in indices]
                          for column, name in enumerate(bucket.state_names) if name is not None}
            precision = Precision(
                masters=[bucket.master_views[i] for i in indices] if bucket.master else None,
                grad_mult=grad_mult, stochastic_rounding=bucket.stochastic_rounding, seed=seed,
                salts=[bucket.salts[i] for i in indices],
            )
            self._reference(
                self.param_groups[row],
                bucket.structure,
                [_dtensor.local(bucket.params[i]) for i in indices],
                [_dtensor.local(bucket.params[i].grad) for i in indices],
                states,
                [bucket.step_views[i] for i in indices],
                precision,
            )
            if bucket.quantized:
                for column, name in enumerate(bucket.state_names):
                    for i, value in zip(indices, states.get(name, ())):
                        codes, scales = quant.quantize_blockwise(value, bucket.signed[column])
                        bucket.views[name][i].copy_(codes.view(bucket.shapes[i]))
                        bucket.absmax_views[name][i].copy_(scales)
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
        for p in _unique(group["params"]):
            if p.grad is None:
                continue
            bucket, i = where[id(p)]
            if bucket.dtensor:
                raise RuntimeError(
                    f"{type(self).__name__}: a compiled step does not take DTensor parameters (FSDP2) yet; "
                    f"{self._describe(bucket, i)} is one: call opt.step() outside torch.compile"
                )
            if bucket.master or bucket.stochastic_rounding or bucket.state_dtype != bucket.dtype \
                    or self.max_grad_norm is not None or getattr(self, "found_inf", None) is not None:
                raise RuntimeError(
                    f"{type(self).__name__}: a compiled step does not take master_weights, state_dtype, "
                    "stochastic_rounding, max_grad_norm or GradScaler's found_inf yet; call opt.step() "
                    "outside torch.compile"
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
