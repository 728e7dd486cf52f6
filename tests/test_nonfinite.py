"""Inf and NaN spread exactly as in torch.optim (docs/math.md#non-finite-values).

One run per rule and switch setting. Each element of the parameters carries at most one
injection: an Inf, -Inf or NaN in its gradient or in the parameter (at the first step or a
later one), or in one of its states (after the first step). Elements never meet in any rule,
so one run covers every injection. fusedwd is stepped beside torch's single-tensor, foreach
and fused implementations on the same gradients, and after every step each parameter and
state must have the same elements NaN, +Inf and -Inf as torch's, and its finite elements
within the tolerance table.

The first parameter (64 elements) is compared with all three torch implementations; the
second (35 elements: its last ones fall in the scalar tail of every SIMD loop) with the
single-tensor and foreach ones only, because torch's fused CPU Adam finishes a slice in scalar
code with std::max, which drops a NaN from max_exp_avg_sq (docs/math.md#non-finite-values;
test_torch_fused_tail_drops_a_nan_in_amsgrad_max shows it, so the day torch changes that,
this file says so).
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedwd
from fusedwd import _ext
from _helpers import assert_close, interpreted_triton

INF, NAN = math.inf, math.nan
SPECIALS = (INF, -INF, NAN)
STEPS = 6
SHAPES = [(64,), (5, 7)]
LATE = 2  # the later step of the injections (0 is the first)

# rule -> (torch state names, fusedwd class, torch classes by decay)
STATES = {
    "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "sgd": ("momentum_buffer",),
    "rmsprop": ("square_avg", "grad_avg", "momentum_buffer"),
}


def _case(rule, torch_cls, kw, decay="l2"):
    return pytest.param(rule, torch_cls, kw, decay, id=f"{torch_cls.__name__}-" + "-".join(
        f"{k}{v}" for k, v in kw.items()))


CASES = []
for wd in (0.0, 0.1):
    for amsgrad in (False, True):
        for maximize in (False, True):
            kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
            CASES.append(_case("adam", torch.optim.Adam, kw))
            CASES.append(_case("adam", torch.optim.AdamW, kw, decay="decoupled"))
# beta1 < 0.5: lerp's other branch, b - (b - a)*(1 - w); beta1 = 0: w = 1
for beta1 in (0.3, 0.0):
    CASES.append(_case("adam", torch.optim.Adam, dict(lr=0.05, betas=(beta1, 0.9), weight_decay=0.1, amsgrad=True)))
for wd in (0.0, 0.1):
    for momentum, dampening, nesterov in ((0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.5, False), (0.9, 0.0, True)):
        CASES.append(_case("sgd", torch.optim.SGD, dict(lr=0.05, momentum=momentum, dampening=dampening,
                                                        nesterov=nesterov, weight_decay=wd)))
CASES.append(_case("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.1, maximize=True)))
for wd in (0.0, 0.1):
    for centered in (False, True):
        for momentum in (0.0, 0.5):
            CASES.append(_case("rmsprop", torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, weight_decay=wd,
                                                                    centered=centered, momentum=momentum)))
CASES.append(_case("rmsprop", torch.optim.RMSprop, dict(lr=0.01, alpha=0.3, weight_decay=0.1, centered=True,
                                                        momentum=0.5, maximize=True)))

FUSEDWD = {"adam": fusedwd.AdamW, "sgd": fusedwd.SGDW, "rmsprop": fusedwd.RMSpropW}
BACKENDS = ["reference"] + (["cpu"] if _ext.has_cpu() else [])


@pytest.fixture(scope="module")
def triton_cpu():
    with interpreted_triton() as reason:
        if reason is not None:
            pytest.skip(reason)
        yield


def _torch_impls(torch_cls):
    impls = {"forloop": dict(foreach=False), "foreach": dict(foreach=True)}
    if torch_cls is not torch.optim.RMSprop:  # torch has no fused RMSprop
        impls["fused"] = dict(fused=True)
    return impls


def _sites(states):
    """(what, step, value) per injected element: gradient and parameter at the first and a later
    step, each state (present after the first step) at the later one."""
    sites = [(what, step, v) for what in ("grad", "param") for step in (0, LATE) for v in SPECIALS]
    return sites + [("state:" + name, LATE, v) for name in states for v in SPECIALS]


def _layout(numel, sites, seed):
    """Element index of each site: spread over the tensor, the last ones in its last elements."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(numel, generator=gen)[: len(sites)].tolist()
    picks[-3:] = [numel - 1, numel - 2, numel - 3][: len(picks[-3:])]
    return dict(zip(range(len(sites)), picks))


class Run:
    """One optimizer over its own copy of the parameters, fed identical gradients and injections."""

    def __init__(self, make, params0):
        self.params = [torch.nn.Parameter(p.clone()) for p in params0]
        self.opt = make(self.params)

    def step(self, t, grads, injections):
        with torch.no_grad():
            for k, (what, idx, value) in injections:
                if what == "param":
                    self.params[k].view(-1)[idx] = value
                elif what.startswith("state:"):
                    state = self.opt.state[self.params[k]].get(what[len("state:"):])
                    if state is not None:
                        state.view(-1)[idx] = value
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        self.opt.step()

    def tensors(self, k, names):
        state = self.opt.state[self.params[k]]
        return {"param": self.params[k].detach(), **{n: state[n] for n in names if state.get(n) is not None}}


def _assert_same(actual, expected, what, scale):
    """Same NaN, +Inf and -Inf elements; finite ones within the tolerance table."""
    for test in (torch.isnan, torch.isposinf, torch.isneginf):
        a, e = test(actual), test(expected)
        assert torch.equal(a, e), (
            f"{what}: {test.__name__} at {torch.nonzero(a).flatten().tolist()} in fusedwd, "
            f"{torch.nonzero(e).flatten().tolist()} in torch")
    finite = torch.isfinite(expected)
    assert_close(actual[finite], expected[finite], what, scale=scale)


def _finite_max(x):
    x = x[torch.isfinite(x)]
    return x.abs().max().item() if x.numel() else 0.0


def _run_against_torch(rule, torch_cls, kw, decay, backend, dtype, seed=0):
    names = STATES[rule]
    gen = torch.Generator().manual_seed(seed)
    params0 = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    sites = _sites(names)
    layouts = [_layout(p.numel(), sites, seed + k) for k, p in enumerate(params0)]
    ours = Run(lambda ps: FUSEDWD[rule](ps, **kw, decay=decay, backend=backend), params0)
    theirs = {impl: Run(lambda ps, f=flags: torch_cls(ps, **kw, **f), params0)
              for impl, flags in _torch_impls(torch_cls).items()}
    previous = {}
    checked = 0
    for t in range(STEPS):
        grads = []
        injections = []
        for k, p in enumerate(params0):
            g = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * (1 + t)).to(dtype)
            for s, (what, step, value) in enumerate(sites):
                if step == t:
                    if what == "grad":
                        g.view(-1)[layouts[k][s]] = value
                    else:
                        injections.append((k, (what, layouts[k][s], value)))
            grads.append(g)
        ours.step(t, grads, injections)
        for run in theirs.values():
            run.step(t, grads, injections)
        for k in range(len(params0)):
            mine = ours.tensors(k, names)
            for impl, run in theirs.items():
                if impl == "fused" and k == 1:
                    continue  # its scalar tail: see the module docstring
                for name, expected in run.tensors(k, names).items():
                    assert name in mine, f"step {t}: fusedwd lacks state {name!r}"
                    key = (k, name)
                    scale = max(_finite_max(expected), previous.get(key, 0.0))
                    _assert_same(mine[name], expected, f"{backend} step {t} param {k} {name} vs torch {impl}",
                                 scale)
                    checked += 1
                previous.update({(k, n): _finite_max(x) for n, x in run.tensors(k, names).items()})
    assert checked, "nothing was compared"
    # the test sees what it claims: non-finite values reached the parameters
    assert any(not torch.isfinite(p).all() for p in ours.params)
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule,torch_cls,kw,decay", CASES)
def test_nonfinite_spread_as_torch(rule, torch_cls, kw, decay, backend):
    _run_against_torch(rule, torch_cls, kw, decay, backend, torch.float32)


@pytest.mark.parametrize("rule,torch_cls,kw,decay", [c for c in CASES if "amsgradTrue" in c.id or
                                                     c.values[0] != "adam"][::3])
def test_nonfinite_spread_as_torch_fp64(rule, torch_cls, kw, decay):
    _run_against_torch(rule, torch_cls, kw, decay, BACKENDS[-1], torch.float64)


@pytest.mark.parametrize("rule,torch_cls,kw,decay", CASES[::2])
def test_nonfinite_spread_as_torch_triton(rule, torch_cls, kw, decay, triton_cpu):
    """The Triton kernels (interpreted on CPU tensors) against torch, then against the CPU kernel:
    the same NaN elements, every other element bit for bit."""
    ours = _run_against_torch(rule, torch_cls, kw, decay, "triton", torch.float32)
    if not _ext.has_cpu():
        return
    cpu = _run_against_torch(rule, torch_cls, kw, decay, "cpu", torch.float32)
    for k, (a, b) in enumerate(zip(ours.params, cpu.params)):
        states_a, states_b = ours.opt.state[a], cpu.opt.state[b]
        for name, x in [("param", a.detach())] + [(n, states_a[n]) for n in STATES[rule] if n in states_a]:
            y = b.detach() if name == "param" else states_b[name]
            assert torch.equal(x.isnan(), y.isnan()), f"param {k} {name}: NaN elements differ"
            keep = ~x.isnan()
            assert torch.equal(x[keep].view(torch.int32), y[keep].view(torch.int32)), \
                f"param {k} {name}: triton and cpu differ in bits"


def test_the_issue_example():
    """issue 13: an Inf gradient then a finite one; torch -inf, fusedwd was NaN."""
    for backend in BACKENDS:
        p, q = (torch.nn.Parameter(torch.ones(1)) for _ in range(2))
        a = torch.optim.SGD([p], lr=0.1)
        b = fusedwd.SGDW([q], lr=0.1, decay="l2", backend=backend)
        for g in (INF, 1.0):
            p.grad = torch.tensor([g])
            q.grad = torch.tensor([g])
            a.step()
            b.step()
        assert p.item() == q.item() == -INF, backend


def test_exp_avg_turns_nan_after_an_inf_gradient():
    """torch's lerp: an Inf gradient makes exp_avg Inf, the next finite one makes it NaN
    (b1*m + (1-b1)*g would keep Inf); exp_avg_sq keeps Inf."""
    for backend in BACKENDS:
        p = torch.nn.Parameter(torch.ones(3))
        opt = fusedwd.AdamW([p], lr=0.1, backend=backend)
        for g in (torch.tensor([INF, 1.0, 1.0]), torch.ones(3)):
            p.grad = g
            opt.step()
        state = opt.state[p]
        assert state["exp_avg"][0].isnan() and state["exp_avg_sq"][0] == INF, backend
        assert torch.isfinite(state["exp_avg"][1:]).all(), backend


def test_amsgrad_max_keeps_a_nan():
    """torch.maximum: a NaN in max_exp_avg_sq stays, whatever exp_avg_sq is."""
    for backend in BACKENDS:
        p = torch.nn.Parameter(torch.ones(3))
        opt = fusedwd.AdamW([p], lr=0.1, amsgrad=True, backend=backend)
        p.grad = torch.ones(3)
        opt.step()
        opt.state[p]["max_exp_avg_sq"][0] = NAN
        p.grad = torch.ones(3)
        opt.step()
        assert opt.state[p]["max_exp_avg_sq"][0].isnan() and torch.isfinite(opt.state[p]["exp_avg_sq"]).all()


def test_a_large_finite_gradient_does_not_overflow_v():
    """((1 - b2)*g)*g, as torch's addcmul: g = 1e20 in fp32 keeps exp_avg_sq finite (g*g is Inf)."""
    for backend in BACKENDS:
        p, q = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
        ours = fusedwd.AdamW([p], lr=0.1, backend=backend)
        theirs = torch.optim.AdamW([q], lr=0.1, foreach=False)
        for opt, x in ((ours, p), (theirs, q)):
            x.grad = torch.full((4,), 1e20)
            opt.step()
        assert torch.isfinite(ours.state[p]["exp_avg_sq"]).all(), backend
        assert_close(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"], backend)
        assert_close(p.detach(), q.detach(), backend)


def test_torch_fused_tail_drops_a_nan_in_amsgrad_max():
    """What the module docstring says of torch: its fused CPU Adam's scalar tail (std::max) drops a
    NaN exp_avg_sq from max_exp_avg_sq, its single-tensor path keeps it. If this starts failing,
    torch changed, and the second parameter can be compared with torch's fused path too."""
    out = {}
    for impl in (dict(foreach=False), dict(fused=True)):
        p = torch.nn.Parameter(torch.ones(17))
        opt = torch.optim.Adam([p], amsgrad=True, **impl)
        for t in range(2):
            g = torch.ones(17)
            if t:
                g[16] = NAN
            p.grad = g
            opt.step()
        out["fused" if "fused" in impl else "forloop"] = opt.state[p]["max_exp_avg_sq"][16]
    assert out["forloop"].isnan() and not out["fused"].isnan()
