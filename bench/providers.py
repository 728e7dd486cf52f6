"""The optimizers under test, each wrapped as a zero-argument ``step()``.

Every provider of a case gets its own copy of the parameters (and so its own
optimizer state) but shares one set of gradient tensors: AdamW only reads
gradients, and sharing them saves 4 B/param per provider (0.5 GB each on GPT-2
small).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

# torch.optim.AdamW's defaults, spelled out so every provider is given the same numbers.
HYPERPARAMETERS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}

TORCH_VARIANTS = {
    "torch-forloop": {"foreach": False, "fused": False},
    "torch-foreach": {"foreach": True, "fused": False},
    "torch-fused": {"foreach": False, "fused": True},
}
FLOOR = "floor"
BASELINE = "torch-fused"
# DeepSpeed's CPU Adam (ZeRO-Offload's optimizer), when the deepspeed package imports.
DEEPSPEED = "deepspeed-cpuadam"
DEEPSPEED_INSTALL = "DS_BUILD_OPS=0 pip install deepspeed py-cpuinfo"
FUSEDWD_PREFIX = "fusedwd-"
# Backends the fusedwd package may offer; "auto" is a choice among these, not a provider.
FUSEDWD_BACKENDS = ("cpu", "triton", "cuda", "reference")
# A compiled backend with flat_grads=True: every p.grad a view of one flat buffer per bucket.
FLAT_SUFFIX = "-flat"


@dataclass
class Provider:
    name: str
    step: Callable[[], None]
    description: str
    notes: list[str] = field(default_factory=list)
    # Tensors a step reaches only through raw addresses: held here so they outlive it.
    keepalive: tuple = ()


def traffic(amsgrad: bool) -> tuple[int, int]:
    """Buffers read and written per parameter by an AdamW step: (p, g, m, v[, vmax]) in, (p, m, v[, vmax]) out."""
    return (5, 4) if amsgrad else (4, 3)


def bytes_per_param(dtype: torch.dtype, amsgrad: bool) -> int:
    # States are kept in the parameter's dtype (torch's rule), so every buffer has one element size.
    reads, writes = traffic(amsgrad)
    return (reads + writes) * torch.empty((), dtype=dtype).element_size()


def fusedwd_backends(device: torch.device) -> tuple[list[str], str]:
    """The fusedwd backends usable on ``device`` and, when there are none, why."""
    try:
        import fusedwd
    except Exception as exc:  # a failed build must not stop the torch baselines from running
        return [], f"import fusedwd failed: {exc!r}"
    query = getattr(fusedwd, "available_backends", None)
    if query is not None:
        compiled = [b for b in query(device) if b not in ("auto", "reference")]
        # each compiled backend also with flat_grads=True, right after it in the table
        with_flat = [name for b in compiled for name in (b, b + FLAT_SUFFIX)]
        return with_flat + [b for b in query(device) if b == "reference"], ""
    usable = []
    for backend in FUSEDWD_BACKENDS:
        p = torch.nn.Parameter(torch.ones(8, device=device))
        p.grad = torch.ones_like(p)
        try:
            fusedwd.AdamW([p], backend=backend).step()
        except Exception:
            continue
        usable.append(backend)
    return usable, "" if usable else "no fusedwd backend accepted a step on this device"


def deepspeed_missing(device: torch.device) -> str:
    """Why the DeepSpeedCPUAdam provider cannot run on ``device`` ("" when it can be tried).

    Only looks for the package: importing it takes seconds, and its CPU op is
    compiled (about 45 s, cached under ~/.cache/torch_extensions) when the
    provider is first built, where a failure skips the provider with its error.
    """
    import importlib.util

    if device.type != "cpu":
        return "DeepSpeedCPUAdam steps CPU tensors only"
    if importlib.util.find_spec("deepspeed") is None:
        return f"deepspeed is not installed ({DEEPSPEED_INSTALL})"
    return ""


def deepspeed_cpu_adam(params, amsgrad: bool, state_dtype: torch.dtype | None = None):
    """DeepSpeedCPUAdam in AdamW mode with the shared hyperparameters; fp32 states unless ``state_dtype``
    is the parameters' dtype (its other mode: states in the parameter dtype)."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no accelerator probing (and its warning) on CPU machines
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    if amsgrad:
        raise ValueError("DeepSpeedCPUAdam has no amsgrad")
    fp32_states = state_dtype is None or state_dtype == torch.float32
    return DeepSpeedCPUAdam(params, adamw_mode=True, fp32_optimizer_states=fp32_states, **HYPERPARAMETERS)


def deepspeed_adamw(base, grads, amsgrad: bool) -> Provider:
    params = _copy_params(base, grads)
    # states in the parameter dtype, as torch and fusedwd keep them in this benchmark
    opt = deepspeed_cpu_adam(params, amsgrad, state_dtype=params[0].dtype if params else None)
    return Provider(DEEPSPEED, opt.step, "deepspeed.ops.adam.DeepSpeedCPUAdam(adamw_mode=True)")


def _copy_params(base: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(b.clone()) for b in base]
    for p, g in zip(params, grads):
        p.grad = g
    return params


def torch_adamw(variant: str, base, grads, amsgrad: bool) -> Provider:
    opt = torch.optim.AdamW(_copy_params(base, grads), amsgrad=amsgrad, **HYPERPARAMETERS, **TORCH_VARIANTS[variant])
    flags = ", ".join(f"{k}={v}" for k, v in TORCH_VARIANTS[variant].items() if v)
    return Provider(variant, opt.step, f"torch.optim.AdamW({flags or 'foreach=False'})")


def fusedwd_adamw(backend: str, base, grads, amsgrad: bool) -> Provider:
    import fusedwd

    flat = backend.endswith(FLAT_SUFFIX)
    name = FUSEDWD_PREFIX + backend
    backend = backend.removesuffix(FLAT_SUFFIX)
    opt = fusedwd.AdamW(_copy_params(base, grads), amsgrad=amsgrad, backend=backend, flat_grads=flat,
                        **HYPERPARAMETERS)
    # flat_grads moves the gradients into the optimizer's buffer at its first step;
    # build it now so the copy is not timed
    if flat:
        opt.step()
    return Provider(name, opt.step, f"fusedwd.AdamW(backend={backend!r}{', flat_grads=True' if flat else ''})")


def floor(num_params: int, dtype: torch.dtype, device: torch.device, amsgrad: bool) -> Provider:
    """One pass reading and writing the same buffers as an AdamW step, over flat buffers of the case's size.

    Flat buffers make this the floor for the bytes alone: what a step costs
    beyond it is compute, per-tensor overhead, or extra passes.
    """
    reads, writes = traffic(amsgrad)
    # p, g, m, v[, vmax]; the gradient is the one buffer read and not written.
    bufs = [torch.empty(num_params, dtype=dtype, device=device).normal_() for _ in range(reads)]
    grad, updated = bufs[1], [bufs[0]] + bufs[2:]
    assert len(updated) == writes
    kernel = None
    if device.type == "cpu":
        try:
            from fusedwd import _C

            kernel = _C.traffic_pass
        except Exception:
            kernel = None
    if kernel is not None:
        read_addrs = [b.data_ptr() for b in bufs]
        write_addrs = [b.data_ptr() for b in updated]
        elem = bufs[0].element_size()

        def step() -> None:
            # torch's thread count at each call, like the optimizers (bench.run --threads changes it)
            kernel(read_addrs, write_addrs, num_params, elem, torch.get_num_threads())

        return Provider(FLOOR, step, f"fusedwd._C.traffic_pass: {reads} reads + {writes} writes, torch's threads",
                        keepalive=tuple(bufs))

    # Without the compiled pass, approximate it with torch elementwise passes
    # that move exactly the same bytes: p += g reads p, g and writes p; each
    # state is read and written once by x *= 1. Three passes cost more than one
    # (each waits for the last), so this floor is an upper bound of the true one.
    p, states = bufs[0], bufs[2:]

    def step_torch() -> None:
        p.add_(grad)
        for s in states:
            s.mul_(1.0)

    return Provider(
        FLOOR,
        step_torch,
        f"torch approximation (fusedwd._C unavailable): p += g; state *= 1 for each of {len(states)} states",
        ["floor approximated by torch passes (upper bound)"],
    )


def make_base(shapes, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random parameters and gradients of the case's shapes.

    Normal draws, never zeros: zeros would let a provider skip work unseen and
    can drive the second moment into denormals, which slow some CPUs down.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    base, grads = [], []
    for s in shapes:
        base.append((torch.randn(s, generator=gen) * 0.02).to(device=device, dtype=dtype))
        grads.append((torch.randn(s, generator=gen) * 1e-3).to(device=device, dtype=dtype))
    return base, grads


def build(names: list[str], case, dtype: torch.dtype, device: torch.device,
          amsgrad: bool) -> tuple[list[Provider], dict[str, str]]:
    """The named providers for ``case`` and, for those that could not be built, the reason."""
    base, grads = make_base(case.shapes, dtype, device)
    providers: list[Provider] = []
    skipped: dict[str, str] = {}
    for name in names:
        try:
            if name == FLOOR:
                providers.append(floor(case.num_params, dtype, device, amsgrad))
            elif name in TORCH_VARIANTS:
                providers.append(torch_adamw(name, base, grads, amsgrad))
            elif name == DEEPSPEED:
                providers.append(deepspeed_adamw(base, grads, amsgrad))
            elif name.startswith(FUSEDWD_PREFIX):
                providers.append(fusedwd_adamw(name[len(FUSEDWD_PREFIX):], base, grads, amsgrad))
            else:
                raise ValueError(f"unknown provider {name!r}")
        except Exception as exc:  # e.g. torch's fused kernel rejecting a dtype: report it, run the rest
            skipped[name] = f"{type(exc).__name__}: {exc}"
    return providers, skipped


def param_bytes(case, dtype: torch.dtype) -> int:
    return case.num_params * torch.empty((), dtype=dtype).element_size()


def estimate_memory(case, dtype: torch.dtype, n_optimizers: int, amsgrad: bool) -> int:
    """Bytes a case will hold: shared grads, one (p, m, v[, vmax]) per optimizer, and the floor's buffers."""
    reads, _ = traffic(amsgrad)
    per_buffer = param_bytes(case, dtype)
    return per_buffer * (1 + n_optimizers * (reads - 1) + reads)



# ------------------------------------------------------------ two-phase rules
# LAMB and StableAdamW (docs/math.md#lamb, #stableadamw) with the shared hyperparameters,
# decay="decoupled": fusedwd's kernel against the best pure-torch step (foreach ops and
# torch._foreach_norm; torch.optim has neither rule), beside fusedwd's own AdamW step.
TWO_PHASE_RULES = ("LAMB", "StableAdamW")
# StableAdamW's paper and optimi use beta2 = 0.99 and eps = 1e-6; LAMB's apex and timm eps = 1e-6.
TWO_PHASE_HYPERPARAMETERS = {
    "LAMB": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 1e-2},
    "StableAdamW": {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 1e-2},
}
# The buffers each phase reads and writes (docs/backends.md): LAMB's phase 1 reads p, g, m, v and
# writes m, v, phase 2 reads p, m, v and writes p (40 B per fp32 parameter); StableAdamW's phase 1
# does not read p (36 B).
TWO_PHASE_TRAFFIC = {
    "LAMB": ((("p", "g", "m", "v"), ("m", "v")), (("p", "m", "v"), ("p",))),
    "StableAdamW": ((("g", "m", "v"), ("m", "v")), (("p", "m", "v"), ("p",))),
}
TORCH_FOREACH = "torch-foreach"


class _ForeachAdamMoments:
    """What the pure-torch two-phase rules share: Adam's m and v, in foreach ops."""

    def __init__(self, params, lr, betas, eps, weight_decay) -> None:
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def _moments(self):
        """Advance t and update m, v from the gradients; returns (p, g, m, v, bc1, bc2)."""
        p, g, m, v = self.params, [q.grad for q in self.params], self.m, self.v
        self.t += 1
        torch._foreach_lerp_(m, g, 1.0 - self.beta1)
        torch._foreach_mul_(v, self.beta2)
        torch._foreach_addcmul_(v, g, g, 1.0 - self.beta2)
        return p, g, m, v, 1.0 - self.beta1**self.t, 1.0 - self.beta2**self.t


class ForeachLAMB(_ForeachAdamMoments):
    """LAMB in pure torch: foreach ops and torch._foreach_norm, every per-tensor scalar kept in a
    tensor (no host read), as apex's and timm's semantics: bias correction, trust ratio
    ||p|| / ||r + wd*p||, 1 where either norm is 0."""

    @torch.no_grad()
    def step(self) -> None:
        p, _, m, v, bc1, bc2 = self._moments()
        u = torch._foreach_sqrt(v)  # then sqrt(v_hat) + eps, then r, then u = r + wd*p
        torch._foreach_div_(u, bc2**0.5)
        torch._foreach_add_(u, self.eps)
        torch._foreach_div_(u, m)
        torch._foreach_reciprocal_(u)
        torch._foreach_mul_(u, 1.0 / bc1)
        torch._foreach_add_(u, p, alpha=self.wd)
        p_norm, u_norm = torch.stack(torch._foreach_norm(p)), torch.stack(torch._foreach_norm(u))
        trust = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, torch.ones_like(p_norm))
        torch._foreach_mul_(u, list((-self.lr * trust).unbind()))
        torch._foreach_add_(p, u)


class ForeachStableAdamW(_ForeachAdamMoments):
    """StableAdamW in pure torch: foreach ops and torch._foreach_norm (the 1-norm of the nonnegative
    ratios is their sum); lr_t = lr / max(1, RMS), RMS = sqrt(mean(g^2 / max(v_hat, eps^2)))."""

    def __init__(self, params, lr, betas, eps, weight_decay) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)
        self.numel = torch.tensor([float(p.numel()) for p in self.params], dtype=torch.float32)

    @torch.no_grad()
    def step(self) -> None:
        p, g, m, v, bc1, bc2 = self._moments()
        ratio = torch._foreach_div(v, bc2)  # v_hat, floored at eps^2, then g^2 / it
        torch._foreach_clamp_min_(ratio, self.eps * self.eps)
        torch._foreach_reciprocal_(ratio)
        torch._foreach_mul_(ratio, g)
        torch._foreach_mul_(ratio, g)
        rms = (torch.stack(torch._foreach_norm(ratio, 1)) / self.numel).sqrt()
        lr_t = self.lr / torch.clamp(rms, min=1.0)
        torch._foreach_mul_(p, list((1.0 - lr_t * self.wd).unbind()))
        denom = ratio  # reused: sqrt(v)/sqrt(bc2) + eps
        torch._foreach_copy_(denom, v)
        torch._foreach_sqrt_(denom)
        torch._foreach_div_(denom, bc2**0.5)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(p, m, denom, -lr_t / bc1)


FOREACH_RULES = {"LAMB": ForeachLAMB, "StableAdamW": ForeachStableAdamW}


def two_phase_traffic(rule: str) -> int:
    """Buffer passes per parameter of a two-phase rule's step: reads + writes over both phases."""
    return sum(len(r) + len(w) for r, w in TWO_PHASE_TRAFFIC[rule])


def two_phase_bytes_per_param(rule: str, dtype: torch.dtype) -> int:
    return two_phase_traffic(rule) * torch.empty((), dtype=dtype).element_size()


def foreach_two_phase(rule: str, base, grads) -> Provider:
    opt = FOREACH_RULES[rule](_copy_params(base, grads), **TWO_PHASE_HYPERPARAMETERS[rule])
    return Provider(TORCH_FOREACH, opt.step, f"pure torch {rule}: foreach ops + torch._foreach_norm "
                                             "(bench/providers.py)")


def fusedwd_two_phase(rule: str, base, grads, backend: str = "cpu") -> Provider:
    import fusedwd

    cls = getattr(fusedwd, rule)
    opt = cls(_copy_params(base, grads), backend=backend, **TWO_PHASE_HYPERPARAMETERS[rule])
    return Provider(FUSEDWD_PREFIX + backend, opt.step, f"fusedwd.{rule}(backend={backend!r})")


def fusedwd_adamw_rows(backend: str, base, grads) -> Provider:
    """fusedwd's own AdamW step on the same tensors: the yardstick of the two-phase rules' cost."""
    provider = fusedwd_adamw(backend, base, grads, amsgrad=False)
    provider.name = "adamw-" + provider.name
    return provider


def two_phase_floor(rule: str, num_params: int, dtype: torch.dtype, device: torch.device) -> Provider:
    """Two passes over flat buffers moving a two-phase step's bytes (TWO_PHASE_TRAFFIC): phase 1's
    reads and writes, then phase 2's, each one fusedwd._C.traffic_pass."""
    from fusedwd import _C

    bufs = {name: torch.empty(num_params, dtype=dtype, device=device).normal_() for name in "pgmv"}
    elem = bufs["p"].element_size()
    passes = [([bufs[n].data_ptr() for n in reads], [bufs[n].data_ptr() for n in writes])
              for reads, writes in TWO_PHASE_TRAFFIC[rule]]

    def step() -> None:
        threads = torch.get_num_threads()  # as the optimizers read it
        for reads, writes in passes:
            _C.traffic_pass(reads, writes, num_params, elem, threads)

    text = ", then ".join(f"{len(r)} reads + {len(w)} writes" for r, w in TWO_PHASE_TRAFFIC[rule])
    return Provider(FLOOR, step, f"fusedwd._C.traffic_pass twice: {text}", keepalive=tuple(bufs.values()))
