"""Mixed precision (issue 5): master weights, state dtypes, stochastic rounding,
GradScaler's found_inf / grad_scale, and fused gradient clipping.

Each option runs on the C++ CPU kernel against fusedwd.reference (which
implements it too), every state every step; then the properties each option
exists for: master weights track fp32, stochastic rounding is unbiased and
reproducible, a skipped step changes nothing, AMP and clipping equal torch's.
"""

import copy

import pytest
import torch

import fusedwd

import _rules
from _helpers import (
    assert_close,
    assert_isa_variants_bitwise_equal,
    compare_optimizers,
    make_params,
    random_grads,
    results_on_every_isa,
)

pytest.importorskip("fusedwd._C", reason="fusedwd._C is not built")

SHAPES = [(1,), (4097,), (33, 17), (6, 7, 5)]
# every rule in its richest structure (tests/_rules.py), decay modes taken in turn
DECAYS = ["decoupled", "l2", "independent"]
RULES = [(cls, dict(kw, decay=DECAYS[k % 3]), tuple(states))
         for k, (cls, kw, states) in enumerate(_rules.RICH_CONFIGS.values())]
RULE_IDS = list(_rules.RICH_CONFIGS)
LAYOUTS = [  # (param dtype, options, extra state names)
    (torch.bfloat16, dict(master_weights=True), ("master_param",)),
    (torch.float16, dict(master_weights=True, state_dtype=torch.bfloat16), ("master_param",)),
    (torch.bfloat16, dict(master_weights=True, state_dtype=torch.float16), ("master_param",)),
    (torch.float32, dict(state_dtype=torch.bfloat16), ()),
    (torch.bfloat16, dict(state_dtype=torch.float32), ()),
    (torch.bfloat16, dict(stochastic_rounding=True), ()),
    (torch.bfloat16, dict(stochastic_rounding=True, state_dtype=torch.float32), ()),
    (torch.float16, dict(master_weights=True, state_dtype=torch.float16), ("master_param",)),
    (torch.float16, dict(state_dtype=torch.float32), ()),
    (torch.float32, dict(state_dtype=torch.float16), ()),
]
LAYOUT_IDS = ["bf16-master", "fp16-master-bf16states", "bf16-master-fp16states", "fp32-bf16states",
              "bf16-fp32states", "bf16-sr", "bf16-sr-fp32states", "fp16-master-fp16states", "fp16-fp32states",
              "fp32-fp16states"]


def _seeded(opt, seed=1234):
    for group in opt.param_groups:
        group["sr_seed"] = seed
    return opt


@pytest.mark.parametrize("cls,hp,states", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("dtype,options,extra", LAYOUTS, ids=LAYOUT_IDS)
def test_cpu_kernel_matches_the_reference(cls, hp, states, dtype, options, extra):
    params_a = make_params(SHAPES, dtype)
    params_b = make_params(SHAPES, dtype)
    opt_a = _seeded(cls(params_a, backend="cpu", **hp, **options))
    opt_b = _seeded(cls(params_b, backend="reference", **hp, **options))
    compare_optimizers(opt_a, params_a, opt_b, params_b, states + extra, steps=12,
                       grad_fn=lambda t: random_grads(params_a, t))
    expected_state = options.get("state_dtype") or (torch.float32 if options.get("master_weights") else dtype)
    name = states[0]
    assert opt_a.state[params_a[1]][name].dtype == expected_state
    if extra:
        assert opt_a.state[params_a[1]]["master_param"].dtype == torch.float32


def test_amp_and_clipping_on_the_cpu_kernel_match_the_reference():
    params = [make_params(SHAPES, torch.bfloat16) for _ in range(2)]
    opts = [fusedwd.AdamW(p, lr=1e-2, weight_decay=0.1, master_weights=True, max_grad_norm=0.5, backend=b)
            for p, b in zip(params, ("cpu", "reference"))]
    scale = torch.tensor(1024.0)

    def before(t):
        for opt in opts:
            opt.grad_scale, opt.found_inf = scale, torch.tensor(1.0 if t == 3 else 0.0)

    compare_optimizers(opts[0], params[0], opts[1], params[1], ("exp_avg", "exp_avg_sq", "master_param", "step"),
                       steps=8, grad_fn=lambda t: random_grads(params[0], t, scale=1024.0), before_step=before)
    assert float(opts[0].state[params[0][0]]["step"]) == 7  # one of the 8 steps was skipped
    assert_close(opts[0].last_grad_norm, opts[1].last_grad_norm, "last_grad_norm")


@pytest.mark.parametrize("cls,hp,states", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("dtype,options,extra", LAYOUTS, ids=LAYOUT_IDS)
def test_isa_variants_are_bitwise_equal(cls, hp, states, dtype, options, extra):
    """Every CPU variant this machine runs (baseline, AVX2, AVX-512) writes the same bits,
    with the clip and the grad scale in the pass too."""
    def build():
        params = make_params(SHAPES, dtype)
        opt = _seeded(cls(params, backend="cpu", max_grad_norm=2.0, **hp, **options))
        opt.grad_scale = torch.tensor(8.0)
        return opt, params

    assert_isa_variants_bitwise_equal(
        results_on_every_isa(build, steps=5, grad_fn=lambda ps, t: random_grads(ps, t, scale=8.0)))


# ------------------------------------------------------------------ master weights
def _train(dtype, steps=200, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(dtype)
    opt = fusedwd.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **options)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 16, generator=gen), torch.randn(32, 4, generator=gen)) for _ in range(8)]
    for t in range(steps):
        x, y = data[t % len(data)]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
        opt.step()
    if options.get("master_weights"):
        return [opt.state[p]["master_param"].clone() for p in model.parameters()]
    return [p.detach().float().clone() for p in model.parameters()]


def test_master_weights_track_fp32_far_more_closely_than_plain_bf16():
    reference = _train(torch.float32)

    def distance(params):
        return max(((p - r).norm() / r.norm()).item() for p, r in zip(params, reference))

    plain, master = distance(_train(torch.bfloat16)), distance(_train(torch.bfloat16, master_weights=True))
    # lr 1e-4 moves a weight by less than half a bf16 ulp: plain bf16 barely moves at all
    assert master < 0.25 * plain, (master, plain)


# ------------------------------------------------------------- stochastic rounding
def _sr_step(seed, n=1 << 18, stochastic=True):
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = fusedwd.SGDW([p], lr=1e-3, stochastic_rounding=stochastic)
    if stochastic:
        _seeded(opt, seed)
    p.grad = torch.ones_like(p)
    opt.step()
    return p.detach().float()


def test_stochastic_rounding_is_unbiased():
    # 1 - 1e-3 lies between the bf16 neighbours 1 - 2^-8 and 1: round to nearest never moves
    exact = 1.0 - 1e-3
    nearest = _sr_step(0, stochastic=False)
    assert torch.all(nearest == 1.0)
    out = _sr_step(7)
    assert set(out.unique().tolist()) == {1.0 - 2.0**-8, 1.0}
    up = 1e-3 / 2.0**-8  # probability of rounding down to 1 - 2^-8
    sigma = 2.0**-8 * (up * (1 - up) / out.numel()) ** 0.5
    assert abs(out.mean().item() - exact) < 5 * sigma, (out.mean().item(), exact, sigma)


def test_stochastic_rounding_is_deterministic_under_a_seed():
    assert torch.equal(_sr_step(3), _sr_step(3))
    assert not torch.equal(_sr_step(3), _sr_step(4))


def test_stochastic_rounding_keeps_nan_and_inf():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0e38, 1.0])
    out = fusedwd.reference.stochastic_round_bf16(x, key=12345).float()
    assert out[0].isnan() and out[1] == float("inf") and out[2] == -float("inf")
    assert out[4] == 1.0


def test_stochastic_rounding_does_not_depend_on_bucketing():
    # the same parameter stepped alone or beside others (other buckets, other threads)
    # draws the same bits: they hash (seed, its index in the optimizer, step, element)
    alone = make_params([(4097,)], torch.bfloat16)
    crowd = make_params([(4097,)], torch.bfloat16) + make_params([(300,), (5000,)], torch.float32, seed=3)
    opts = [_seeded(fusedwd.AdamW(ps, lr=1e-3, stochastic_rounding=True)) for ps in (alone, crowd)]
    for t in range(3):
        for ps, opt in zip((alone, crowd), opts):
            for p, g in zip(ps, random_grads(ps, t)):
                p.grad = g
            opt.step()
        assert torch.equal(alone[0], crowd[0])


# --------------------------------------------------------------- AMP: GradScaler
def _amp_loop(opt_factory, inject=(2, 5), unscale_and_clip=False, steps=8):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 33), torch.nn.LayerNorm(33), torch.nn.Linear(33, 5))
    opt = opt_factory(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    gen = torch.Generator().manual_seed(5)
    skipped_unchanged = []
    for t in range(steps):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        if t in inject:
            next(model.parameters()).grad[0, 0] = float("inf")
        if unscale_and_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        before = copy.deepcopy((list(model.parameters()), opt.state_dict()["state"]))
        scaler.step(opt)
        scaler.update()
        if t in inject:
            after = (list(model.parameters()), opt.state_dict()["state"])
            skipped_unchanged.append(
                all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
                and all(torch.equal(v, after[1][k][n]) for k, s in before[1].items() for n, v in s.items())
            )
    return [p.detach() for p in model.parameters()], skipped_unchanged, scaler.get_scale()


@pytest.mark.parametrize("unscale_and_clip", [False, True], ids=["fused-unscale", "unscale_-then-clip"])
def test_grad_scaler_loop_matches_torch_fused_adamw(unscale_and_clip):
    ours, skipped, scale = _amp_loop(lambda ps: fusedwd.AdamW(ps, lr=1e-2, weight_decay=0.1),
                                     unscale_and_clip=unscale_and_clip)
    theirs, _, their_scale = _amp_loop(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
                                       unscale_and_clip=unscale_and_clip)
    assert skipped == [True, True], "a step with found_inf changed a parameter or a state"
    assert scale == their_scale
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, f"param {k}")


def test_found_inf_on_the_kernel_skips_everything_including_step_counts():
    params = make_params(SHAPES, torch.bfloat16)
    opt = fusedwd.AdamW(params, lr=1e-2, master_weights=True)
    for p, g in zip(params, random_grads(params, 0)):
        p.grad = g
    opt.step()
    snapshot = copy.deepcopy(([p.detach() for p in params], opt.state_dict()["state"]))
    for p, g in zip(params, random_grads(params, 1)):
        p.grad = g
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(snapshot[0], params))
    for k, s in snapshot[1].items():
        for name, v in s.items():
            assert torch.equal(v, opt.state_dict()["state"][k][name]), (k, name)


# -------------------------------------------------------------- fused clipping
@pytest.mark.parametrize("cls,hp,states", RULES, ids=RULE_IDS)
def test_fused_clipping_equals_clip_grad_norm_then_step(cls, hp, states):
    params_a = make_params(SHAPES)
    params_b = make_params(SHAPES)
    fused = cls(params_a, max_grad_norm=0.7, **hp)
    plain = cls(params_b, **hp)
    norms = []

    def clip(t):
        norms.append(torch.nn.utils.clip_grad_norm_(params_b, 0.7))

    for t in range(6):
        grads = random_grads(params_a, t)
        for pa, pb, g in zip(params_a, params_b, grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        clip(t)
        fused.step()
        plain.step()
        # the CPU kernel sums squares in double in one pass; torch takes per-tensor fp32 norms
        assert_close(fused.last_grad_norm, norms[-1], f"step {t}: the norm")
        assert norms[-1] > 0.7, "the test must clip"
        for k, (pa, pb) in enumerate(zip(params_a, params_b)):
            assert_close(pa, pb, f"step {t} param {k}: fused clipping vs clip_grad_norm_ + step", scale=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_grad_sumsq_pass_is_the_sum_of_squares(dtype):
    params = make_params(SHAPES + [(0,)], dtype)
    opt = fusedwd.AdamW(params, max_grad_norm=1e9)
    grads = random_grads(params, 0)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    exact = sum((g.double() ** 2).sum() for g in grads).sqrt()
    torch.testing.assert_close(opt.last_grad_norm.double(), exact, rtol=2**-22, atol=0)


def test_non_finite_norm_skips_the_step():
    params = make_params(SHAPES)
    opt = fusedwd.AdamW(params, max_grad_norm=1.0)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, random_grads(params, 0)):
        p.grad = g
    params[2].grad[0, 0] = float("nan")
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert not torch.isfinite(opt.last_grad_norm)
    assert all(float(opt.state[p]["step"]) == 0 for p in params)


# -------------------------------------------------------------------- state_dict
def _stepped(params, **options):
    opt = fusedwd.AdamW(params, lr=1e-2, weight_decay=0.1, **options)
    for t in range(3):
        for p, g in zip(params, random_grads(params, t)):
            p.grad = g
        opt.step()
    return opt


def test_master_weights_round_trip_through_state_dict():
    params = make_params(SHAPES, torch.bfloat16)
    opt = _stepped(params, master_weights=True)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"][0]["master_param"].dtype == torch.float32
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = fusedwd.AdamW(clone, lr=1e-2, weight_decay=0.1, master_weights=True)
    opt2.load_state_dict(saved)
    for t in range(3, 6):
        for ps, o in ((params, opt), (clone, opt2)):
            for p, g in zip(ps, random_grads(params, t)):
                p.grad = g
            o.step()
    for p, q in zip(params, clone):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], opt2.state[q]["master_param"])


def test_fp32_states_of_bf16_params_are_not_rounded_by_loading():
    params = make_params(SHAPES, torch.bfloat16)
    opt = _stepped(params, state_dtype=torch.float32)
    saved = copy.deepcopy(opt.state_dict())
    opt2 = fusedwd.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], state_dtype=torch.float32)
    opt2.load_state_dict(saved)
    q = opt2.param_groups[0]["params"][1]
    q.grad = torch.zeros_like(q)
    opt2.step()  # the plan adopts the loaded states
    opt2.zero_grad()
    assert opt2.state[q]["exp_avg"].dtype == torch.float32
    # after the extra step (zero gradient), exp_avg is beta1 * the saved fp32 value, unrounded
    torch.testing.assert_close(opt2.state[q]["exp_avg"], saved["state"][1]["exp_avg"] * 0.9, rtol=2**-22, atol=0)


def test_a_master_is_never_dropped_silently():
    params = make_params(SHAPES, torch.bfloat16)
    saved = copy.deepcopy(_stepped(params, master_weights=True).state_dict())
    plain = fusedwd.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params])
    plain.load_state_dict(saved)
    # the checkpoint's param groups bring their options, as torch's load_state_dict does
    assert plain.param_groups[0]["master_weights"] is True
    plain.param_groups[0]["master_weights"] = False  # switched off by hand: the master would be lost
    for p in plain.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match="master_weights=True"):
        plain.step()


def test_a_checkpoint_without_master_starts_the_master_from_the_params():
    params = make_params(SHAPES, torch.bfloat16)
    saved = copy.deepcopy(_stepped(params).state_dict())
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = fusedwd.AdamW(clone)
    opt.load_state_dict(saved)
    opt.param_groups[0]["master_weights"] = True  # options travel with the groups: convert after loading
    for p in clone:
        p.grad = torch.zeros_like(p)
    opt.grad_scale, opt.found_inf = None, torch.tensor(1.0)  # a skipped step: builds the plan, moves nothing
    opt.step()
    for p, q in zip(params, clone):
        assert torch.equal(opt.state[q]["master_param"], p.detach().float())


# ------------------------------------------------------------------------ errors
def test_bad_precision_options():
    p = make_params([(3,)], torch.bfloat16)
    with pytest.raises(ValueError, match="cannot be combined"):
        fusedwd.AdamW(p, master_weights=True, stochastic_rounding=True)
    with pytest.raises(TypeError, match="state_dtype"):
        fusedwd.AdamW(p, state_dtype=torch.int8)
    with pytest.raises(ValueError, match="max_grad_norm"):
        fusedwd.AdamW(p, max_grad_norm=0.0)
    with pytest.raises(TypeError, match="master_weights must be a bool"):
        fusedwd.SGDW(p, master_weights=1)
    opt = fusedwd.AdamW(p, state_dtype=torch.float16)  # bf16 params, fp16 states: not a kernel layout
    p[0].grad = torch.ones_like(p[0])
    with pytest.raises(ValueError, match="state_dtype=torch.float16 is not supported for torch.bfloat16"):
        opt.step()
    assert torch.equal(p[0], make_params([(3,)], torch.bfloat16)[0])


def test_max_grad_norm_survives_deepcopy():
    opt = fusedwd.AdamW(make_params([(3,)]), max_grad_norm=0.5)
    assert copy.deepcopy(opt).max_grad_norm == 0.5
