"""torch.optim's own test registry, run against fusedwd (issue 13).

torch describes each of its optimizers in ``torch.testing._internal.common_optimizers.optim_db``
by the inputs its own test suite runs: ``optim_inputs_func`` (constructor kwargs; the CPU list
and the CUDA one, whose extra entries are capturable), ``scheduler_inputs`` (lr schedulers),
``supported_impls`` (foreach, fused, differentiable) and ``optim_error_inputs_func`` (inputs
that must raise). Every entry of Adam, AdamW, SGD and RMSprop is run here against the fusedwd
optimizer and decay mode with the same rule:

    torch.optim.Adam                                -> fusedwd.AdamW(decay="l2")
    torch.optim.Adam(decoupled_weight_decay=True)   -> fusedwd.AdamW(decay="decoupled")
    torch.optim.AdamW                               -> fusedwd.AdamW(decay="decoupled")
    torch.optim.SGD / RMSprop                       -> fusedwd.SGDW / RMSpropW(decay="l2")

Each run takes STEPS steps of both on identical gradients, through a closure (whose loss feeds
ReduceLROnPlateau), and compares every parameter, every state and the lr after every step,
with a tolerance from tests/_tolerances.py scaled by each quantity's largest magnitude over the
model. fp32 and fp64 run against the torch implementation the input selects (single-tensor
by default), bf16 and fp16 against torch's fused one (the single-tensor path rounds after every
operation, a different computation). Each error input must raise the exception type torch
raises (a UserWarning for a group that lists a parameter twice).

Inputs that cannot be compared are skipped with the reason, and the session's summary lists
every skipped case and counts the cases per optimizer (tests/conftest.py).
"""

from __future__ import annotations

import copy
import unittest.mock
import warnings

import pytest
import torch

import fusedwd
from fusedwd import _ext
from _helpers import assert_close, interpreted_triton

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")
OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum

STEPS = 20
TRITON_STEPS = 4  # the interpreter is slow; the kernels are bit-checked against the CPU one elsewhere
SHAPES = [(4, 5), (5,), (3, 7, 2), (37,)]
BACKENDS = ["cpu", "reference"] if _ext.has_cpu() else ["reference"]

# name -> (torch class, optim_db entry, fusedwd class, decay, torch kwargs added to every input)
TARGETS = {
    "Adam": (torch.optim.Adam, "Adam", fusedwd.AdamW, "l2", {}),
    "Adam(decoupled_weight_decay=True)": (torch.optim.Adam, "Adam", fusedwd.AdamW, "decoupled",
                                          {"decoupled_weight_decay": True}),
    "AdamW": (torch.optim.AdamW, "AdamW", fusedwd.AdamW, "decoupled", {}),
    "SGD": (torch.optim.SGD, "SGD", fusedwd.SGDW, "l2", {}),
    "RMSprop": (torch.optim.RMSprop, "RMSprop", fusedwd.RMSpropW, "l2", {}),
}
INFOS = {info.name: info for info in common_optimizers.optim_db if info.name in {t[1] for t in TARGETS.values()}}
IMPLS = ("default", "foreach", "fused", "differentiable")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors are tiny: torch's fused kernels would still open a parallel region per tensor and
    step, which on a busy 2-core machine waits for a descheduled thread (40 ms a step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _optim_inputs(info, dtype):
    """The CPU inputs, then the CUDA list's extra ones (capturable: fusedwd takes it on CPU)."""
    out = {}
    for device in ("cpu", "cuda"):
        for oi in info.optim_inputs_func(device=device, dtype=dtype):
            out.setdefault(oi.desc, oi)
    return list(out.values())


def _error_inputs(info):
    """The CPU error inputs, then the CUDA list's extra ones, whose parameters are made on the CPU
    (they check flag combinations, not devices)."""
    out = {}
    for device in ("cpu", "cuda"):
        empty = torch.empty
        with unittest.mock.patch.object(torch, "empty", lambda *a, device=None, **k: empty(*a, **k)):
            inputs = info.optim_error_inputs_func(device=device, dtype=torch.float32)
        for ei in inputs:
            out.setdefault(ei.optimizer_error_input.desc, ei)
    return list(out.values())


class Case:
    def __init__(self, target, oi, impl="default", dtype=torch.float32, backend="cpu", schedulers=None,
                 sched_id=None):
        self.target, self.oi, self.impl, self.dtype, self.backend = target, oi, impl, dtype, backend
        self.schedulers, self.sched_id = schedulers, sched_id

    @property
    def id(self):
        dt = str(self.dtype).replace("torch.", "")
        sched = f"-sched{self.sched_id}" if self.schedulers else ""
        return f"{self.target}-{self.oi.desc}-{self.impl}-{dt}-{self.backend}{sched}".replace(" ", "_")


def _cases():
    cases = []
    for target, (_, info_name, *_rest) in TARGETS.items():
        info = INFOS[info_name]
        impls = [i for i in IMPLS if i == "default" or i in info.supported_impls]
        for dtype in (torch.float32, torch.float64):
            for backend in BACKENDS:
                for oi in _optim_inputs(info, dtype):
                    for impl in impls:
                        # the flags change torch's code path; fusedwd's is the same for every flag,
                        # so they run once, in fp32 on the first backend
                        if impl == "default" or (dtype == torch.float32 and backend == BACKENDS[0]):
                            cases.append(Case(target, oi, impl, dtype, backend))
        # every scheduler input with every input, fp32; schedulers act on the param groups, which
        # every backend reads alike, so on the first backend
        for oi in _optim_inputs(info, torch.float32):
            for k, schedulers in enumerate(info.scheduler_inputs):
                cases.append(Case(target, oi, "default", torch.float32, BACKENDS[0], schedulers, k))
        # 16-bit parameters against torch's fused implementation
        for dtype in (torch.bfloat16, torch.float16):
            for oi in _optim_inputs(info, dtype):
                cases.append(Case(target, oi, "fused", dtype, BACKENDS[0]))
    return cases


CASES = _cases()
# Adam(decoupled_weight_decay=True) runs the kernels AdamW runs: not again in the interpreter
TRITON_CASES = [Case(t, oi, backend="triton") for t, (_, n, *_r) in TARGETS.items() if t != "Adam(decoupled_weight_decay=True)"
                for oi in _optim_inputs(INFOS[n], torch.float32)]


def _skip_reason(case):
    torch_cls, info_name = TARGETS[case.target][:2]
    if case.impl == "fused" and "cpu" not in INFOS[info_name].supports_fused_on:
        return f"torch has no fused {torch_cls.__name__} (on CPU) to compare 16-bit parameters with"
    if case.impl == "fused" and torch_cls is torch.optim.SGD and case.dtype in (torch.bfloat16, torch.float16):
        return ("torch's fused CPU SGD leaves bf16/fp16 parameters unchanged (torch 2.13: "
                "test_torch_fused_sgd_does_not_step_16bit_parameters), nothing to compare with")
    return None


def test_torch_fused_sgd_does_not_step_16bit_parameters():
    """Why the 16-bit SGD inputs are skipped: torch 2.13's fused CPU SGD does not move bf16 or fp16
    parameters at all (fp32 ones it does). When this fails, torch fixed it: drop the skip."""
    for dtype in (torch.bfloat16, torch.float16):
        p0 = torch.randn(64).to(dtype)
        p = torch.nn.Parameter(p0.clone())
        opt = torch.optim.SGD([p], lr=1e-2, fused=True)
        p.grad = torch.ones_like(p)
        opt.step()
        assert torch.equal(p.detach(), p0), dtype
    p = torch.nn.Parameter(torch.zeros(64))
    opt = torch.optim.SGD([p], lr=1e-2, fused=True)
    p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(p.detach(), torch.full((64,), -1e-2))


def _input_kwargs(case):
    """The input's kwargs, for one optimizer (schedulers change a Tensor lr in place).

    torch does its scalar arithmetic on a Tensor lr or betas in that tensor's dtype, float32 in
    the registry: for fp64 parameters its bias corrections then carry float32 rounding, which
    fusedwd (float64 scalars) does not. At fp64 such tensors are given to both as float64
    tensors of the same values.
    """
    kw = copy.deepcopy(case.oi.kwargs)
    if case.dtype == torch.float64:
        wide = lambda x: x.to(torch.float64) if isinstance(x, torch.Tensor) else x  # noqa: E731
        kw = {k: (tuple(map(wide, v)) if k == "betas" else wide(v)) for k, v in kw.items()}
    return kw


def _torch_kwargs(case):
    """The input's kwargs for torch, with the implementation flag chosen.

    torch's capturable is CUDA-only (an AssertionError on CPU) and changes no math, so torch runs
    such an input without it: fused, or else single-tensor (foreach would then reject a Tensor lr).
    """
    extra = TARGETS[case.target][4]
    kw = {**_input_kwargs(case), **extra}
    capturable = kw.pop("capturable", False)
    if case.impl == "fused":
        kw["fused"] = True
    else:
        # default: the single-tensor implementation, the one each rule is written after
        kw["foreach"] = case.impl == "foreach" and not capturable
    return kw


def _fusedwd_kwargs(case, backend):
    torch_cls, _, ours_cls, decay, extra = TARGETS[case.target]
    kw = _input_kwargs(case)
    if case.impl in ("foreach", "fused", "differentiable"):
        kw[case.impl] = True  # accepted for parity (foreach and fused change nothing in fusedwd)
    # torch's defaults where fusedwd's differ (AdamW's weight_decay for torch.optim.Adam)
    defaults = torch_cls([torch.nn.Parameter(torch.zeros(1))], **_torch_kwargs(case)).defaults
    for key in ("lr", "weight_decay"):
        kw.setdefault(key, copy.deepcopy(defaults[key]))
    return {**kw, "decay": decay, "backend": backend}


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]


def _grads(params, t, seed=1):
    # a different magnitude per tensor and step, so the adaptive terms matter
    gen = torch.Generator().manual_seed(seed * 1000 + t)
    return [(torch.randn(p.shape, generator=gen, dtype=torch.float64)
             * (0.2 + 2.0 * torch.rand((), generator=gen, dtype=torch.float64)) * (1 + k % 3)).to(p.dtype)
            for k, p in enumerate(params)]


class Side:
    """One optimizer, its parameters and its schedulers."""

    def __init__(self, make, base, schedulers):
        self.params = [torch.nn.Parameter(b.clone()) for b in base]
        self.opt = make(self.params)
        self.schedulers = [s(self.opt) for s in schedulers or ()]

    def step(self, grads, loss):
        def closure():
            for p, g in zip(self.params, grads):
                p.grad = g.clone()
            return torch.tensor(loss)

        returned = self.opt.step(closure)
        assert float(returned) == loss, "step(closure) must return the closure's loss"
        for sched in self.schedulers:
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(returned)
            else:
                sched.step()


def _quantities(side):
    """name -> one tensor per parameter (None where a parameter has no such state)."""
    out = {"param": [p.detach() for p in side.params]}
    for k, p in enumerate(side.params):
        for name, value in side.opt.state[p].items():
            out.setdefault(name, [None] * len(side.params))[k] = value
    return out


def _flat(tensors):
    return torch.cat([x.detach().reshape(-1) for x in tensors if x is not None])


def _run(case, steps=STEPS):
    torch_cls = TARGETS[case.target][0]
    ours_cls = TARGETS[case.target][2]
    base = _params(case.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on lr schedulers' first step and the like
        theirs = Side(lambda ps: torch_cls(ps, **_torch_kwargs(case)), base, case.schedulers)
        ours = Side(lambda ps: ours_cls(ps, **_fusedwd_kwargs(case, case.backend)), base, case.schedulers)
        previous: dict[str, float] = {}
        for t in range(steps):
            grads = _grads(base, t)
            loss = 1.0  # a plateau: ReduceLROnPlateau lowers the lr after its patience
            theirs.step(grads, loss)
            ours.step(grads, loss)
            for g_t, g_o in zip(theirs.opt.param_groups, ours.opt.param_groups):
                assert float(g_o["lr"]) == pytest.approx(float(g_t["lr"]), rel=1e-12), f"step {t}: lr differs"
            q_t, q_o = _quantities(theirs), _quantities(ours)
            assert set(q_t) == set(q_o), f"step {t}: states {sorted(q_o)} in fusedwd, {sorted(q_t)} in torch"
            for name, expected in q_t.items():
                missing = [k for k, (a, e) in enumerate(zip(q_o[name], expected)) if (a is None) != (e is None)]
                assert not missing, f"step {t}: state {name!r} of parameters {missing} on one side only"
                e, a = _flat(expected), _flat(q_o[name])
                if name == "step":
                    assert torch.equal(a, e), f"step {t}: step counts {a.tolist()} vs torch {e.tolist()}"
                    continue
                # the tolerance scales with the quantity's largest magnitude over the model (this
                # step's and the last one's: a state near zero keeps its operands' rounding)
                scale = e.abs().max().item() if e.numel() else 0.0
                assert_close(a, e, f"{case.id} step {t} {name} (all parameters, flattened)",
                             scale=max(scale, previous.get(name, 0.0)))
                previous[name] = scale


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_registry_input(case):
    reason = _skip_reason(case)
    if reason:
        pytest.skip(reason)
    torch_cls, _, ours_cls = TARGETS[case.target][:3]
    if case.impl == "differentiable":
        with pytest.raises(ValueError, match="differentiable=True is not supported"):
            ours_cls(_params(case.dtype), **_fusedwd_kwargs(case, case.backend))
        pytest.skip("differentiable=True: fusedwd's fused in-place step is not differentiable and "
                    "raises a clear ValueError (checked)")
    try:
        torch_cls([torch.nn.Parameter(torch.zeros(1))], **_torch_kwargs(case))
    except Exception as exc:  # a combination torch rejects (a Tensor lr with foreach=True): so must fusedwd
        with pytest.raises(type(exc)):
            ours_cls(_params(case.dtype), **_fusedwd_kwargs(case, case.backend))
        return
    _run(case)


@pytest.fixture(scope="module")
def triton_cpu():
    with interpreted_triton() as reason:
        if reason is not None:
            pytest.skip(reason)
        yield


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.id)
def test_registry_input_triton(case, triton_cpu):
    _run(case, TRITON_STEPS)


ERROR_CASES = [(target, ei) for target, (_, n, *_r) in TARGETS.items() for ei in _error_inputs(INFOS[n])]


def _error_params(ei):
    params = ei.optimizer_error_input.params
    return [torch.nn.Parameter(torch.randn(1, 1))] if params is None else params


def _construct(cls, ei, kwargs):
    return cls(_error_params(ei), **kwargs)


def _expect(ei, make):
    """Run make() (construction, or construction and one step), expecting the error input's type."""
    kind = ei.error_type
    if issubclass(kind, Warning):
        with pytest.warns(kind):
            make()
    else:
        with pytest.raises(kind):
            make()


@pytest.mark.parametrize("target,ei", ERROR_CASES,
                         ids=[f"{t}-{ei.optimizer_error_input.desc}".replace(" ", "_") for t, ei in ERROR_CASES])
def test_registry_error_input(target, ei):
    torch_cls, _, ours_cls, decay, extra = TARGETS[target]
    kw = ei.optimizer_error_input.kwargs

    def build(cls, kwargs):
        def make():
            opt = _construct(cls, ei, kwargs)
            if ei.error_on == OptimizerErrorEnum.STEP_ERROR:
                for group in opt.param_groups:
                    for p in group["params"]:
                        p.grad = torch.randn_like(p)
                opt.step()
        return make

    # torch itself raises it (so the registry is read right), then fusedwd raises the same type
    _expect(ei, build(torch_cls, {**kw, **extra}))
    _expect(ei, build(ours_cls, {**kw, "decay": decay}))
