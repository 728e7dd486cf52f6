"""The two-phase rules (LAMB, StableAdamW; docs/design.md#per-tensor-reductions).

Their references against independent formulas (the paper's equations, timm's Lamb
semantics where they agree); the CPU kernel against the references in every dtype,
decay mode and storage layout; the sums independent of the thread count, of the ISA
variant and of how tensors are grouped into buckets (bit for bit); StableAdamW equal
to AdamW where its clipping never triggers; what AdamW has (GradScaler's skip,
max_grad_norm, param groups, state_dict); and the combinations refused with a message.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fusedwd

from _helpers import (
    assert_isa_variants_bitwise_equal,
    bitwise_equal,
    clone_params,
    compare_optimizers,
    make_params,
    random_grads,
    results_on_every_isa,
)
from _rules import INFOS, TWO_PHASE

C = pytest.importorskip("fusedwd._C")

SHAPES = [(1,), (4097,), (1024, 33), (6, 42, 123), (64,), (0,)]
DECAYS = ["decoupled", "independent", "l2"]
STATES = ["exp_avg", "exp_avg_sq", "step"]


def _grads(scale=1.0):
    return lambda params: (lambda t: random_grads(params, t, scale=scale))


def _kwargs(name, **extra):
    return dict(INFOS[name].hyperparameters, **extra)


# ------------------------------------------------------------ references
def _lamb_by_hand(p, grads, lr, b1, b2, eps, wd, decay="decoupled", lr_max=None, bias_correction=True,
                  always_adapt=False, max_trust=None):
    """LAMB, Algorithm 2 of the paper, in float64, written from the equations (not from the reference)."""
    p = p.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    lr_max = lr if lr_max is None else lr_max
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if decay == "l2":
            g = g + wd * p
        if decay == "independent":
            p = p * (1 - lr / lr_max * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t) if bias_correction else m
        v_hat = v / (1 - b2**t) if bias_correction else v
        u = m_hat / (v_hat.sqrt() + eps)
        if decay == "decoupled":
            u = u + wd * p
        ratio = 1.0
        if wd != 0 or always_adapt:
            pn, un = p.norm().item(), u.norm().item()
            ratio = pn / un if pn > 0 and un > 0 else 1.0
            if max_trust is not None:
                ratio = min(ratio, max_trust)
        p = p - lr * ratio * u
    return p


def _timm_lamb(p, grads, lr, b1, b2, eps, wd, always_adapt=False, trust_clip=False):
    """timm's Lamb semantics (timm/optim/lamb.py, single-tensor path, grad_averaging=True, no
    clipping, decoupled_decay=False): exp_avg.lerp_, denom = sqrt(v)/sqrt(bc2) + eps, update =
    (m/bc1)/denom + wd*p, trust ratio where(w>0, where(g>0, w/g, 1), 1), clamped at 1 by
    trust_clip, applied only for wd != 0 or always_adapt; p -= lr*update."""
    p = p.clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
        update = (m / (1 - b1**t)).div_(denom)
        if wd != 0:
            update.add_(p, alpha=wd)
        if wd != 0 or always_adapt:
            w_norm, g_norm = p.norm(2.0), update.norm(2.0)
            ratio = torch.where(w_norm > 0, torch.where(g_norm > 0, w_norm / g_norm, 1.0), 1.0)
            if trust_clip:
                ratio = torch.clamp(ratio, max=1.0)
            update.mul_(ratio)
        p.add_(update, alpha=-lr)
    return p


def _run_reference(cls, p0, grads, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = cls([p], backend="reference", **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("options", [dict(), dict(always_adapt=True, weight_decay=0.0), dict(max_trust_ratio=0.3),
                                     dict(bias_correction=False)], ids=["default", "adapt-no-wd", "max-trust", "no-bc"])
def test_lamb_reference_against_the_paper(decay, options):
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(37, 5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(37, 5, generator=gen, dtype=torch.float64) * (1 + t) for t in range(8)]
    kw = dict(lr=2e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, decay=decay)
    kw.update(options)
    got = _run_reference(fusedwd.LAMB, p0, grads, **kw)
    want = _lamb_by_hand(p0, grads, kw["lr"], 0.8, 0.95, 1e-6, kw["weight_decay"], decay=decay,
                         bias_correction=kw.get("bias_correction", True), always_adapt=kw.get("always_adapt", False),
                         max_trust=kw.get("max_trust_ratio"))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.equal(got, p0)


@pytest.mark.parametrize("options,timm", [(dict(), dict()), (dict(max_trust_ratio=1.0), dict(trust_clip=True)),
                                          (dict(weight_decay=0.0), dict()),
                                          (dict(weight_decay=0.0, always_adapt=True), dict(always_adapt=True))],
                         ids=["default", "trust-clip", "no-wd", "always-adapt"])
def test_lamb_reference_matches_timm_semantics(options, timm):
    gen = torch.Generator().manual_seed(4)
    p0 = torch.randn(300, generator=gen)
    grads = [torch.randn(300, generator=gen) * 0.3 for _ in range(10)]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05)
    kw.update(options)
    got = _run_reference(fusedwd.LAMB, p0, grads, **kw)
    want = _timm_lamb(p0, grads, kw["lr"], 0.9, 0.999, 1e-6, kw["weight_decay"], **timm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _stableadamw_by_hand(p, grads, lr, b1, b2, eps, wd, decay="decoupled", lr_max=None):
    """StableAdamW, Algorithm 2 of Wortsman et al. 2023, in float64, with the paper's debiased betas
    (its v_t and u_t are the bias-corrected moments, this step's gradient included)."""
    p = p.double().clone()
    v1, u2 = torch.zeros_like(p), torch.zeros_like(p)
    lr_max = lr if lr_max is None else lr_max
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if decay == "l2":
            g = g + wd * p
        b1_hat = b1 * (1 - b1 ** (t - 1)) / (1 - b1**t)
        b2_hat = b2 * (1 - b2 ** (t - 1)) / (1 - b2**t)
        v1 = b1_hat * v1 + (1 - b1_hat) * g
        u2 = b2_hat * u2 + (1 - b2_hat) * g * g
        rms = (g * g / torch.clamp(u2, min=eps**2)).mean().sqrt().item()
        eta = lr / max(1.0, rms)
        decay_rate = {"decoupled": eta * wd, "independent": eta / lr_max * wd, "l2": 0.0}[decay]
        p = p - decay_rate * p - eta * v1 / (u2.sqrt() + eps)
    return p


@pytest.mark.parametrize("decay", DECAYS)
def test_stableadamw_reference_against_the_paper(decay):
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(41, 7, generator=gen, dtype=torch.float64)
    # quiet gradients, then spikes: the clipping triggers on some steps and not others
    grads = [torch.randn(41, 7, generator=gen, dtype=torch.float64) * (30.0 if t in (4, 7) else 0.1)
             for t in range(10)]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, decay=decay)
    got = _run_reference(fusedwd.StableAdamW, p0, grads, **kw)
    want = _stableadamw_by_hand(p0, grads, 1e-2, 0.9, 0.99, 1e-6, 0.1, decay=decay)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    adamw = _run_reference(fusedwd.AdamW, p0, grads, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1,
                           decay=decay)
    assert not torch.allclose(got, adamw, rtol=1e-6, atol=0), "the clipping never triggered: the test shows nothing"


# ------------------------------------------------------------ the CPU kernel
LAYOUTS = [
    ("fp32", torch.float32, {}),
    ("fp64", torch.float64, {}),
    ("bf16", torch.bfloat16, {}),
    ("fp16", torch.float16, {}),
    ("bf16-master", torch.bfloat16, dict(master_weights=True)),
    ("bf16-sr", torch.bfloat16, dict(stochastic_rounding=True)),
    ("fp32-bf16-states", torch.float32, dict(state_dtype=torch.bfloat16)),
]


@pytest.mark.parametrize("name", TWO_PHASE)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
@pytest.mark.parametrize("decay", DECAYS)
def test_cpu_kernel_matches_reference(name, layout, decay):
    _, dtype, options = layout
    params = make_params(SHAPES, dtype)
    ref_params = clone_params(params)
    kw = _kwargs(name, decay=decay, maximize=decay == "l2", **options)
    opt = INFOS[name].cls(params, backend="cpu", **kw)
    ref = INFOS[name].cls(ref_params, backend="reference", **kw)
    for o in (opt, ref):  # the same stochastic-rounding bits
        for group in o.param_groups:
            group["sr_seed"] = 1234
    state_dtype = options.get("state_dtype")
    states = STATES + (["master_param"] if options.get("master_weights") else [])
    compare_optimizers(opt, params, ref, ref_params, states, 12, _grads()(params),
                       dtype=state_dtype if state_dtype is not None else None)


def _big_params(dtype=torch.float32):
    # enough elements for two threads (GRAIN_SIZE per thread), partition boundaries inside tensors
    return make_params([(300, 301), (70001,), (5,), (129, 257), (0,), (33,)], dtype, seed=7)


def _run_cpu(name, params, steps, threads=None, **kw):
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        opt = INFOS[name].cls(params, backend="cpu", **_kwargs(name, **kw))
        for t in range(steps):
            for p, g in zip(params, random_grads(params, t)):
                p.grad = g
            opt.step()
    finally:
        torch.set_num_threads(before)
    return [p.detach().clone() for p in params] + [opt.state[p][s].clone() for p in params for s in STATES]


@pytest.mark.parametrize("name", TWO_PHASE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_do_not_change_the_bits(name, dtype):
    one = _run_cpu(name, _big_params(dtype), 4, threads=1)
    two = _run_cpu(name, _big_params(dtype), 4, threads=2)
    for k, (a, b) in enumerate(zip(one, two)):
        assert bitwise_equal(a, b), f"tensor {k}: 2 threads differ from 1"


@pytest.mark.parametrize("name", TWO_PHASE)
def test_buckets_do_not_change_the_bits(name):
    """One bucket of every tensor, or one optimizer (so one bucket) per tensor: the same bits."""
    together = _run_cpu(name, _big_params(), 3)
    params = _big_params()
    opts = [INFOS[name].cls([p], backend="cpu", **_kwargs(name)) for p in params]
    for t in range(3):
        for p, g in zip(params, random_grads(params, t)):
            p.grad = g
        for opt in opts:
            opt.step()
    apart = [p.detach() for p in params] + [o.state[p][s] for o, p in zip(opts, params) for s in STATES]
    for k, (a, b) in enumerate(zip(together, apart)):
        assert bitwise_equal(a, b), f"tensor {k}: one bucket differs from one per tensor"


@pytest.mark.parametrize("name", TWO_PHASE)
def test_isa_variants_bitwise_equal(name):
    def build():
        params = _big_params()
        return INFOS[name].cls(params, backend="cpu", **_kwargs(name)), params

    assert_isa_variants_bitwise_equal(results_on_every_isa(build, 3, lambda params, t: random_grads(params, t)))


# storage layouts of the phases-apart test: (parameter dtype, optimizer options)
LAYOUTS = {
    "fp32": (torch.float32, {}),
    "fp32-bf16-states": (torch.float32, dict(state_dtype=torch.bfloat16)),
    "fp16-states": (torch.float16, {}),
    "bf16-master": (torch.bfloat16, dict(master_weights=True)),
    "bf16-sr": (torch.bfloat16, dict(stochastic_rounding=True)),
    "fp64": (torch.float64, {}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", TWO_PHASE)
def test_phases_apart_equal_phases_together(name, layout):
    """phases=1 then phases=2 through a sums buffer (what a cross-rank reduction goes between) equal
    phases=3; phase 1 alone advances no step count and writes the sums. With one thread and
    phases=3, every tensor of SHAPES is stepped whole in cache (csrc/cpu/loops.h
    kLocalSegmentBytes; LAMB from the u it kept), which phases apart never are: the two paths
    give the same bits in every layout."""
    from fusedwd import _buckets as B
    from fusedwd.optim._runners import RUNNERS, Step

    rule = INFOS[name].rule
    dtype, options = LAYOUTS[layout]
    results, sums_seen = [], []
    for split in (False, True):
        torch.manual_seed(5)  # the same stochastic-rounding seed (drawn at the first step) in both runs
        params = make_params(SHAPES, dtype, seed=11)
        opt = INFOS[name].cls(params, backend="cpu", **_kwargs(name), **options)
        for p, g in zip(params, random_grads(params, 0)):
            p.grad = g
        opt.step()  # builds the plan; now one step by hand
        for p, g in zip(params, random_grads(params, 1)):
            p.grad = g
        (bucket,) = opt._current_plan()
        step = Step(rule, opt.param_groups, opt._checks())
        n_active, _ = RUNNERS["cpu"].prepare(step, bucket)
        table = bucket.tables.table_out[:n_active].contiguous()
        hyper = step.hyper(bucket.device)
        precision = RUNNERS["cpu"].precision(step, bucket, B.DTYPE_CODES.__getitem__)
        sums = torch.full((n_active, len(rule.sums)), float("nan"), dtype=torch.float64)
        args = (name, table.data_ptr(), n_active, hyper.data_ptr(), B.DTYPE_CODES[dtype], (), 1)
        if split:
            before = bucket.states.steps.clone()
            C.step(*args, sums=sums.data_ptr(), phases=1, **precision)
            assert torch.equal(bucket.states.steps, before), "phase 1 advanced a step count"
            assert not sums.isnan().any()
            C.step(*args, sums=sums.data_ptr(), phases=2, **precision)
        else:
            C.step(*args, sums=sums.data_ptr(), **precision)
        sums_seen.append(sums.clone())
        results.append([p.detach().clone() for p in params] + [bucket.states.steps.clone()])
    assert bitwise_equal(sums_seen[0], sums_seen[1])
    for k, (a, b) in enumerate(zip(*results)):
        assert bitwise_equal(a, b), f"tensor {k}: phases apart differ from phases together"


def test_lamb_sums_are_the_norms():
    """The sums buffer holds ||p||^2 and ||u||^2 of each tensor (here the first step's): near the
    formula's, and the bits of fusedwd.reference.tensor_sum, the kernel's order written in torch."""
    from fusedwd import _buckets as B
    from fusedwd.optim._runners import RUNNERS, Step
    from fusedwd.reference import tensor_sum

    params = make_params([(4097,), (1024, 33)], seed=12)
    start = [p.detach().clone() for p in params]
    opt = fusedwd.LAMB(params, backend="cpu", weight_decay=0.1, eps=1e-6)
    for p, g in zip(params, random_grads(params, 0)):
        p.grad = g
    (bucket,) = opt._current_plan()
    step = Step(opt.RULE, opt.param_groups, opt._checks())
    n_active, _ = RUNNERS["cpu"].prepare(step, bucket)
    sums = torch.zeros((n_active, 2), dtype=torch.float64)
    C.step("lamb", bucket.tables.table_out.data_ptr(), n_active, step.hyper(bucket.device).data_ptr(),
           B.DTYPE_CODES[torch.float32], (), 1, sums=sums.data_ptr())
    for k, (p0, p) in enumerate(zip(start, params)):
        g = p.grad.double()
        m, v = 0.1 * g, 0.001 * g * g  # the first step's moments (betas 0.9, 0.999)
        u = (m / 0.1) / ((v / 0.001).sqrt() + 1e-6) + 0.1 * p0.double()
        torch.testing.assert_close(sums[k, 0].item(), p0.double().square().sum().item(), rtol=1e-12, atol=0)
        torch.testing.assert_close(sums[k, 1].item(), u.square().sum().item(), rtol=1e-5, atol=0)
        assert sums[k, 0].item() == tensor_sum(p0.double().square())


# ------------------------------------------------------------ StableAdamW and AdamW
def _quiet_grads(params, t):
    # |g| well below eps: g^2 / max(v_hat, eps^2) < 1, so the clipping never triggers
    return [g * 0.01 for g in random_grads(params, t)]


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_stableadamw_without_clipping_is_adamw(decay, backend):
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=0.1, weight_decay=0.1, decay=decay)
    params = make_params(SHAPES, seed=13)
    adamw_params = clone_params(params)
    opt = fusedwd.StableAdamW(params, backend=backend, **kw)
    adamw = fusedwd.AdamW(adamw_params, backend=backend, **kw)
    for t in range(10):
        grads = _quiet_grads(params, t)
        for p, q, g in zip(params, adamw_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        adamw.step()
        for k, (p, q) in enumerate(zip(params, adamw_params)):
            assert bitwise_equal(p, q), f"step {t} param {k}: StableAdamW differs from AdamW"
            for s in STATES:
                assert bitwise_equal(opt.state[p][s], adamw.state[q][s]), f"step {t} param {k} {s}"


def test_stableadamw_checkpoint_loads_into_torch_adamw():
    """The state layout is torch.optim.AdamW's: a StableAdamW checkpoint resumes in torch's AdamW, which
    then steps as StableAdamW does while the clipping does not trigger."""
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=0.1, weight_decay=0.1)
    params = make_params(SHAPES[:4], seed=14)
    opt = fusedwd.StableAdamW(params, backend="cpu", **kw)
    for t in range(3):
        for p, g in zip(params, _quiet_grads(params, t)):
            p.grad = g
        opt.step()
    torch_params = clone_params(params)
    torch_opt = torch.optim.AdamW(torch_params, **kw)
    torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() holds the live buffers
    for t in range(3, 6):
        grads = _quiet_grads(params, t)
        for p, q, g in zip(params, torch_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    for p, q in zip(params, torch_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], torch_opt.state[q]["exp_avg_sq"], rtol=1e-5, atol=0)


# ------------------------------------------------------------ what AdamW has
@pytest.mark.parametrize("name", TWO_PHASE)
def test_grad_scaler_skip_writes_nothing(name):
    params = make_params(SHAPES, seed=15)
    opt = INFOS[name].cls(params, backend="cpu", **_kwargs(name))
    for p, g in zip(params, random_grads(params, 0)):
        p.grad = g
    opt.step()
    before = [p.detach().clone() for p in params] + [opt.state[p][s].clone() for p in params for s in STATES]
    for p, g in zip(params, random_grads(params, 1)):
        p.grad = g
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
    opt.step()
    after = [p.detach() for p in params] + [opt.state[p][s] for p in params for s in STATES]
    for k, (a, b) in enumerate(zip(before, after)):
        assert bitwise_equal(a, b), f"tensor {k} changed in a skipped step"


@pytest.mark.parametrize("name", TWO_PHASE)
def test_grad_scale_and_clipping_match_reference(name):
    params = make_params(SHAPES, seed=16)
    ref_params = clone_params(params)
    kw = _kwargs(name, max_grad_norm=0.5)
    opt = INFOS[name].cls(params, backend="cpu", **kw)
    ref = INFOS[name].cls(ref_params, backend="reference", **kw)

    def scale(t):
        for o in (opt, ref):
            o.grad_scale, o.found_inf = torch.tensor(8.0), torch.tensor(0.0)

    grads = _grads(8.0)(params)
    compare_optimizers(opt, params, ref, ref_params, STATES, 6, grads, before_step=scale)
    assert opt.last_grad_norm is not None


@pytest.mark.parametrize("name", TWO_PHASE)
def test_many_param_groups_in_one_pass(name):
    """400 groups with their own numbers share one bucket, stepped in one pass, as the reference steps them."""
    params = make_params([(17,)] * 400, seed=17)
    ref_params = clone_params(params)

    def groups(ps):
        return [dict(params=[p], lr=1e-3 * (1 + k % 7), weight_decay=0.01 * (k % 3), decay=DECAYS[k % 3])
                for k, p in enumerate(ps)]

    opt = INFOS[name].cls(groups(params), backend="cpu", **_kwargs(name))
    ref = INFOS[name].cls(groups(ref_params), backend="reference", **_kwargs(name))
    assert len(opt._current_plan()) == 1
    compare_optimizers(opt, params, ref, ref_params, STATES, 4, _grads()(params))


@pytest.mark.parametrize("name", TWO_PHASE)
def test_state_dict_resumes_bit_for_bit(name):
    params = make_params(SHAPES, seed=18)
    straight = INFOS[name].cls(params, backend="cpu", **_kwargs(name))
    resumed_params = clone_params(params)
    for t in range(6):
        for p, g in zip(params, random_grads(params, t)):
            p.grad = g
        straight.step()
        if t == 2:
            saved = copy.deepcopy(straight.state_dict())  # state_dict() holds the live buffers
            resumed_params = clone_params(params)
    resumed = INFOS[name].cls(resumed_params, backend="cpu", **_kwargs(name))
    resumed.load_state_dict(saved)
    for t in range(3, 6):
        for p, g in zip(resumed_params, random_grads(resumed_params, t)):
            p.grad = g
        resumed.step()
    for p, q in zip(params, resumed_params):
        assert bitwise_equal(p, q)
        for s in STATES:
            assert bitwise_equal(straight.state[p][s], resumed.state[q][s])


# ------------------------------------------------------------ refused, with a message
@pytest.mark.parametrize("name", TWO_PHASE)
def test_int8_states_are_refused(name):
    params = make_params([(8192,)])
    opt = INFOS[name].cls(params, backend="cpu", state_dtype="int8", **_kwargs(name))
    params[0].grad = torch.randn(8192)
    with pytest.raises(ValueError, match=f"int8.*{name}"):
        opt.step()


@pytest.mark.parametrize("name", TWO_PHASE)
def test_the_cuda_backend_takes_cuda_tensors(name):
    # the CUDA kernel (csrc/cuda/phases.cuh) is tests/test_cuda_ext.py's (emulated) and
    # tests/test_gpu_wrappers.py's (on a GPU); CPU tensors are refused as for every rule
    params = make_params([(8,)])
    opt = INFOS[name].cls(params, backend="cuda", **_kwargs(name))
    params[0].grad = torch.randn(8)
    before = params[0].detach().clone()
    with pytest.raises(RuntimeError, match="backend='cuda'|no usable GPU|not built"):
        opt.step()
    assert torch.equal(params[0].detach(), before)


def test_validation_names_the_parameter():
    p = make_params([(4,)])
    with pytest.raises(ValueError, match="max_trust_ratio"):
        fusedwd.LAMB(p, max_trust_ratio=0.0)
    with pytest.raises(TypeError, match="always_adapt"):
        fusedwd.LAMB(p, always_adapt=1)
    with pytest.raises(ValueError, match="eps"):
        fusedwd.StableAdamW(p, eps=-1.0)


@pytest.mark.parametrize("name", TWO_PHASE)
def test_compiled_step_equals_eager_and_never_recompiles(name):
    """torch.compile traces the step into the rule's custom op (fusedwd::<rule>_step_), one graph
    for a tensor lr that changes every step, with the eager step's bits."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    models = [model(), model()]
    kw = _kwargs(name, lr=torch.tensor(1e-2, dtype=torch.float64), backend="cpu")
    eager, compiled = (INFOS[name].cls(m.parameters(), **kw) for m in models)
    step = torch.compile(compiled.step, fullgraph=True)
    for t in range(4):
        for m in models:
            m.zero_grad()
            gen = torch.Generator().manual_seed(100 + t)
            m(torch.randn(7, 12, generator=gen)).square().mean().backward()
        eager.step()
        step()
        for opt in (eager, compiled):
            opt.param_groups[0]["lr"].fill_(1e-2 / (2 + t))
        for p, q in zip(*(m.parameters() for m in models)):
            assert bitwise_equal(p, q), f"step {t}: compiled step differs from eager"
            for s in STATES:
                assert bitwise_equal(eager.state[p][s], compiled.state[q][s]), f"step {t}: state {s} differs"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
