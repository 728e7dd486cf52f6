"""The Triton kernels against fusedwd.reference and the CPU C++ kernel.

Every rule, structural switch, decay mode and dtype; parameters and every
state compared every step. On a machine without a GPU (or with
TRITON_INTERPRET=1 already set) the kernels run in Triton's interpreter on CPU
tensors, so sizes are kept small; with a GPU and no TRITON_INTERPRET they run
compiled, on CUDA tensors.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os

import pytest
import torch

import fusedwd
from fusedwd import _buckets, _ext

import _rules
from _helpers import assert_close, make_params, random_grads, redefine_triton
from _layouts import (
    LAYOUT_IDS,
    LAYOUTS,
    Q8_LAYOUT_IDS,
    Q8_LAYOUTS,
    SEED,
    LayoutBucket,
    assert_same_bits,
    compare_with_cpu,
    control,
)
from _rules import CONFIGS, OTHER_CASE_IDS, OTHER_CASES, RICHEST, RICHEST_IDS

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed", allow_module_level=True)

# Triton reads TRITON_INTERPRET when the kernels are defined, i.e. when fusedwd.triton is
# first imported: the fixture below sets it first, and only for this module's tests.
INTERPRET = (os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
             or not torch.cuda.is_available())
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

STEPS = 20
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DECAYS = ["decoupled", "independent", "l2"]
# one and several blocks per segment, with a partial last block (BLOCK_SIZE is 1024)
SHAPES = [(1,), (5, 7), (1030,)]



@pytest.fixture(scope="module", autouse=True)
def triton_kernels():
    """fusedwd.triton, defined in the mode this module tests (interpreted on CPU, or compiled for CUDA)."""
    with pytest.MonkeyPatch.context() as mp:
        if INTERPRET:
            mp.setenv("TRITON_INTERPRET", "1")
        module = _ext._load_triton()
        if module is not None and module.INTERPRETED != INTERPRET:
            # defined earlier in this process in the other mode: define the kernels again
            redefine_triton(module)
        reason = _ext.triton_unusable(DEVICE)
        if reason is not None and not _ext.has_triton():
            pytest.skip(reason)
        assert reason is None, reason
        yield _ext.triton(DEVICE)


def _on_device(params):
    # always a copy: on the CPU, .to(DEVICE) alone would share the reference's storage
    return [torch.nn.Parameter(p.detach().to(DEVICE, copy=True)) for p in params]


def _grouped(params, kw):
    # a second group with its own numbers shares the bucket (one launch, per-segment rows)
    return [{"params": params[::2]}, {"params": params[1::2], "lr": kw["lr"] * 0.5, "weight_decay": 0.05}]


def _pair(name, dtype, decay, shapes=SHAPES, other="reference"):
    """The same parameters under backend='triton' (on DEVICE) and ``other`` (on the CPU)."""
    cls, kw, states = CONFIGS[name]
    b = make_params(shapes, dtype)
    a = _on_device(b)
    opt_a = cls(_grouped(a, kw), decay=decay, backend="triton", **kw)
    opt_b = cls(_grouped(b, kw), decay=decay, backend=other, **kw)
    return opt_a, a, opt_b, b, states


def _compare_across_devices(opt_a, a, opt_b, b, states, steps, grad_fn, exact=False, before_step=None,
                            after_step=None):
    """Like compare_optimizers, with ``a`` on DEVICE and ``b`` on the CPU; bitwise when ``exact``."""
    previous: dict = {}
    for t in range(steps):
        grads = grad_fn(t)
        for pa, pb, g in zip(a, b, grads):
            pa.grad = None if g is None else g.to(DEVICE)
            pb.grad = None if g is None else g.clone()
        if before_step is not None:
            before_step(t)
        opt_a.step()
        opt_b.step()
        if after_step is not None:
            after_step(t)
        for k, (pa, pb) in enumerate(zip(a, b)):
            if grads[k] is None:
                continue
            pairs = [("param", pa.detach(), pb.detach())]
            pairs += [(n, opt_a.state[pa][n], opt_b.state[pb][n]) for n in states]
            for n, x, y in pairs:
                x = x.cpu()
                what = f"step {t} param {k} {n}"
                if exact or n == "step":
                    assert torch.equal(x, y), f"{what}: not bitwise equal (max diff {(x - y).abs().max().item()})"
                else:
                    assert_close(x, y, what, scale=previous.get((k, n), 0.0))
                    previous[(k, n)] = y.abs().max().item() if y.numel() else 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_matches_reference(name, decay, dtype):
    opt_a, a, opt_b, b, states = _pair(name, dtype, decay)
    assert [bk.backend for bk in opt_a._current_plan()] == ["triton"]
    _compare_across_devices(opt_a, a, opt_b, b, states, STEPS, lambda t: random_grads(b, t))


@pytest.mark.skipif(not _ext.has_cpu(), reason="fusedwd._C is not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", RICHEST_IDS)
def test_triton_matches_cpu_kernel(name, dtype):
    # Both follow csrc/include/fusedwd/<rule>.h operation by operation, without
    # contracted multiply-adds and with IEEE division and sqrt, so on the interpreter
    # they agree bit for bit; only fp64 AdamW differs, by its bias corrections
    # (libdevice's pow is not available to the interpreter; see _pow_int).
    opt_a, a, opt_b, b, states = _pair(name, dtype, "l2", other="cpu")
    exact = INTERPRET and not (dtype == torch.float64 and name.startswith("adamw"))
    _compare_across_devices(opt_a, a, opt_b, b, states, STEPS, lambda t: random_grads(b, t), exact=exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_odd_sizes_in_one_launch(dtype):
    # sizes around the block size, an empty tensor and an awkward 3-D shape, in one launch
    shapes = [(1,), (4097,), (1023,), (1024,), (1025,), (0,), (6, 42, 5), (2, 1)]
    opt_a, a, opt_b, b, states = _pair("adamw-amsgrad", dtype, "independent", shapes)
    _compare_across_devices(opt_a, a, opt_b, b, states, STEPS, lambda t: random_grads(b, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_unaligned_parameters(dtype):
    # Views one element into a buffer are not 16-byte aligned: their full blocks take the
    # masked path, beside aligned tensors whose full blocks take the 128-bit one.
    cls, kw, states = CONFIGS["rmspropw-centered-has_momentum"]
    base = make_params([(2049,)], dtype)[0].detach()
    b = [torch.nn.Parameter(base.clone()[1:]), *make_params([(2048,), (5,)], dtype, seed=1)]
    a = [torch.nn.Parameter(base.to(DEVICE, copy=True)[1:]), *_on_device(b[1:])]
    assert a[0].data_ptr() % 16 and not a[1].data_ptr() % 16
    opt_a = cls(a, backend="triton", **kw)
    opt_b = cls(b, backend="reference", **kw)
    _compare_across_devices(opt_a, a, opt_b, b, states, 5, lambda t: random_grads(b, t))


def test_many_tensors_in_one_launch(monkeypatch, triton_kernels):
    # 64 tensors of assorted sizes, empty ones included, in three param groups: one launch
    sizes = [(n,) for n in [0, 1, 2, 3, 17, 31, 64, 100] * 8]
    cls, kw, states = CONFIGS["rmspropw-centered-has_momentum"]
    b = make_params(sizes)
    a = _on_device(b)

    def groups(ps):
        return [{"params": ps[0::3]}, {"params": ps[1::3], "lr": 2e-3},
                {"params": ps[2::3], "weight_decay": 0.0, "decay": "l2"}]

    opt_a = cls(groups(a), backend="triton", **kw)
    opt_b = cls(groups(b), backend="reference", **kw)
    launches = _count_launches(monkeypatch, triton_kernels, cls)
    _compare_across_devices(opt_a, a, opt_b, b, states, 5, lambda t: random_grads(b, t))
    assert launches == [len(a)] * 5


def _count_launches(monkeypatch, triton_kernels, cls) -> list[int]:
    """Wrap the kernel (one for every rule): the list receives each launch's segment count."""
    kernel = triton_kernels._kernels._step_kernel
    launches: list[int] = []
    run = kernel.run

    def counting_run(*args, **kwargs):
        launches.append(args[4])  # nseg
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", counting_run)
    return launches


@pytest.mark.parametrize("cls", [fusedwd.AdamW, fusedwd.SGDW, fusedwd.RMSpropW], ids=lambda c: c.__name__)
def test_one_launch_per_bucket(cls, monkeypatch, triton_kernels):
    # a 100-tensor model in two dtypes, with a no-decay group: two buckets, so two launches
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(50)]).to(DEVICE)
    for layer in list(model)[::2]:
        layer.to(torch.bfloat16)
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() == 1]
    assert len(weights) + len(biases) == 100
    opt = cls([{"params": weights}, {"params": biases, "weight_decay": 0.0}], lr=1e-3, backend="triton")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    launches = _count_launches(monkeypatch, triton_kernels, cls)
    opt.step()
    assert len(opt._current_plan()) == 2
    assert sorted(launches) == [50, 50], "expected one launch per bucket, covering all of its tensors"


def test_step_counts_advance_once_per_segment(triton_kernels):
    # segments of up to five blocks, starting from different counts, in one launch
    block = triton_kernels.BLOCK_SIZE
    sizes = [4 * block + 1, block, block + 1, 1, 0, 3 * block]
    params = [torch.zeros(n, device=DEVICE) for n in sizes]
    grads = [torch.ones(n, device=DEVICE) for n in sizes]
    states = [(torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)) for n in sizes]
    steps = torch.tensor([0.0, 41.0, 6.0, 0.0, 9.0, 1000.0], device=DEVICE)
    rows = torch.zeros(len(sizes), _buckets.SEG_COLS, dtype=torch.int64)
    for i, n in enumerate(sizes):
        rows[i, _buckets.SEG_P] = params[i].data_ptr()
        rows[i, _buckets.SEG_G] = grads[i].data_ptr()
        rows[i, _buckets.SEG_S0] = states[i][0].data_ptr()
        rows[i, _buckets.SEG_S1] = states[i][1].data_ptr()
        rows[i, _buckets.SEG_STEP] = steps.data_ptr() + i * steps.element_size()
        rows[i, _buckets.SEG_N] = n
        rows[i, _buckets.SEG_INDEX] = i
    lr, beta1, beta2 = 0.1, 0.9, 0.99
    hyper = torch.tensor([[lr, beta1, beta2, 1e-8, 1.0, 0.0, 1.0]], dtype=torch.float64)
    before = steps.cpu().clone()
    triton_kernels.step("adamw", rows, hyper, DEVICE, torch.float32, (False,))
    assert torch.equal(steps.cpu(), before + 1)
    # every block used the count before the step: with g = 1, m = 1-beta1 and v = 1-beta2,
    # so p = -lr/(1-beta1^t) * (1-beta1) / (sqrt(1-beta2)/sqrt(1-beta2^t) + eps)
    for i, n in enumerate(sizes):
        t = float(before[i]) + 1
        expected = -lr / (1 - beta1**t) * (1 - beta1) / ((1 - beta2) ** 0.5 / (1 - beta2**t) ** 0.5 + 1e-8)
        if n:
            torch.testing.assert_close(params[i].cpu(), torch.full((n,), expected), rtol=1e-6, atol=0,
                                       msg=f"segment {i} ({n} elements, step {t})")


def test_params_without_grads_are_skipped_and_untouched():
    opt_a, a, opt_b, b, states = _pair("adamw", torch.float32, "decoupled")
    frozen = {0, 2}
    grads_at = {t: [None if (k in frozen and t % 2) else g for k, g in enumerate(random_grads(b, t))]
                for t in range(8)}
    snapshot = {}

    def before(t):
        snapshot.clear()
        for k in frozen:
            if a[k] in opt_a.state:
                snapshot[k] = [a[k].detach().clone()] + [opt_a.state[a[k]][n].clone() for n in states]

    def after(t):
        for k in snapshot:
            if grads_at[t][k] is None:
                now = [a[k].detach()] + [opt_a.state[a[k]][n] for n in states]
                assert all(torch.equal(x, y) for x, y in zip(now, snapshot[k])), f"step {t}: param {k} changed"

    # the same tensors go without a gradient every other step, so their counts fall behind
    _compare_across_devices(opt_a, a, opt_b, b, states, 8, grads_at.__getitem__, before_step=before,
                            after_step=after)
    assert [float(opt_a.state[p]["step"]) for p in a] == [4.0, 8.0, 4.0]


def test_changing_lr_is_data(triton_kernels):
    # a scheduler changes lr every step: read from the hyper table, it never recompiles
    cls, kw, states = CONFIGS["adamw"]
    b = make_params(SHAPES)
    a = _on_device(b)
    opt_a, opt_b = cls(a, backend="triton", **kw), cls(b, backend="reference", **kw)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)) for o in (opt_a, opt_b)]
    compiled = []  # compiled variants of the kernel before each step (the interpreter compiles nothing)

    def advance(t):
        if t:
            for s in schedulers:
                s.step()
        if not INTERPRET:
            kernel = triton_kernels._kernels._step_kernel
            compiled.append(len(kernel.device_caches[torch.cuda.current_device()][0]))

    _compare_across_devices(opt_a, a, opt_b, b, states, 6, lambda t: random_grads(b, t), before_step=advance)
    assert opt_a.param_groups[0]["lr"] == pytest.approx(kw["lr"] / 6)
    assert len(set(compiled[1:])) <= 1, f"compiled variants grew as lr changed: {compiled}"


def test_empty_group_and_no_grads():
    p = _on_device(make_params([(10,)]))[0]
    opt = fusedwd.AdamW([{"params": []}, {"params": [p]}], backend="triton")
    opt.step()  # nothing has a gradient: a no-op
    assert len(opt.state) == 0
    p.grad = torch.ones(10, device=DEVICE)
    opt.step()
    assert float(opt.state[p]["step"]) == 1
    assert opt.state[p]["step"].device == DEVICE


def test_state_dict_round_trip_with_the_reference():
    # a checkpoint taken from the reference continues under Triton with the same counts
    cls, kw, states = CONFIGS["adamw-amsgrad"]
    b = make_params(SHAPES)
    opt_b = cls(b, backend="reference", **kw)
    for t in range(3):
        for p, g in zip(b, random_grads(b, t)):
            p.grad = g
        opt_b.step()
    a = _on_device(b)
    opt_a = cls(a, backend="triton", **kw)
    opt_a.load_state_dict(opt_b.state_dict())
    _compare_across_devices(opt_a, a, opt_b, b, states, 5, lambda t: random_grads(b, t + 3))


# ------------------------------------------------------------------ mixed precision
# Storage layouts, the control block and stochastic rounding (issue 5), at the launcher
# level: LayoutBucket builds the segment table, and the CPU kernel steps an identical
# copy through the same rows, control blocks and seed (tests/_layouts.py).
needs_cpu = pytest.mark.skipif(not _ext.has_cpu(), reason="fusedwd._C is not built")
# one and two blocks, an empty segment, and a short one whose buffers are misaligned
PRECISION_SIZES = [1, 37, 1030, 0, 5]
MISALIGNED = frozenset({4})


def _launch_bucket(triton_kernels, bucket):
    """step(ctl, seed): the launcher over the bucket's table, with its rule and layout."""

    def step(ctl, seed):
        triton_kernels.step(bucket.rule, bucket.table(), bucket.hyper, bucket.device, bucket.dtype, bucket.switches,
                 state_dtype=bucket.state_dtype, master=bucket.master, stochastic_rounding=bucket.stochastic,
                 ctl=ctl, seed=seed, quantized=bucket.quantized)

    return step


def _exact(rule, layout):
    # as in test_triton_matches_cpu_kernel: bitwise on the interpreter, except fp64 AdamW's bias corrections
    return INTERPRET and not (rule == "adamw" and layout[0] == torch.float64)


@needs_cpu
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("rule,switches", RICHEST, ids=RICHEST_IDS)
def test_every_layout_matches_the_cpu_kernel(rule, switches, layout, triton_kernels):
    """Each storage layout (every state in use), through no control block, AMP unscaling with
    clipping, a found_inf step that must write nothing (step counts and masters included), and
    unscaling alone."""
    bucket = LayoutBucket(rule, switches, layout, PRECISION_SIZES, DEVICE, MISALIGNED)
    compare_with_cpu(bucket, _launch_bucket(triton_kernels, bucket), exact=_exact(rule, layout))


@needs_cpu
@pytest.mark.parametrize("layout", [(torch.float32, torch.float32, False, False),
                                    (torch.bfloat16, torch.float32, True, False)], ids=["f32", "bf16-f32-master"])
def test_several_programs_per_segment_match_the_cpu_kernel(layout, triton_kernels):
    # each program finds its segment and its rank in it in the program map: segments of one to
    # twelve programs, the last one full, partial or of 1 element, beside a short one, and a
    # misaligned segment of three programs (MISALIGNED: index 4) on the masked path
    block = triton_kernels.BLOCK_SIZE
    sizes = [4 * block + 1, 12 * block - 1000, 2 * block, 3, 2 * block + 5]
    bucket = LayoutBucket("adamw", (True,), layout, sizes, DEVICE, MISALIGNED)
    compare_with_cpu(bucket, _launch_bucket(triton_kernels, bucket), exact=INTERPRET)


def test_program_map_follows_the_segment_sizes(triton_kernels):
    # fill_image rebuilds the program map only when the sizes change, and then writes what a fresh image holds
    from fusedwd.triton import _launch

    span = triton_kernels.BLOCK_SIZE

    def rows(sizes):
        t = torch.zeros(len(sizes), _buckets.SEG_COLS, dtype=torch.int64)
        t[:, _buckets.SEG_N] = torch.tensor(sizes, dtype=torch.int64)
        t[:, _buckets.SEG_P] = torch.arange(len(sizes)) * 4096 + 64  # anything: only the sizes make the map
        return t

    capacity = 4
    room = triton_kernels.program_capacity([3 * span, span + 1, 0, 7])
    kept = torch.zeros(triton_kernels.image_words(capacity, room), dtype=torch.int64)
    for sizes in ([3 * span, span + 1, 0, 7], [3 * span, span + 1, 0], [3 * span, span + 1, 0, 7], [span, 1],
                  [3 * span, 5], [0, 0, 0], [0, 0], [2 * span + 1, 0]):
        fresh = torch.zeros_like(kept)
        assert triton_kernels.fill_image(kept, rows(sizes), 7, capacity) == triton_kernels.fill_image(
            fresh, rows(sizes), 7, capacity)
        assert torch.equal(kept, fresh), sizes
        # program p: its segment and its rank in it
        expected = [s | (r << 32) for s, n in enumerate(sizes) for r in range(max(1, -(-n // span)))]
        assert _launch._views(torch.cat([fresh, torch.zeros(capacity, dtype=torch.int64)]),
                              capacity).programs[:len(expected)].tolist() == expected
    with pytest.raises(ValueError, match="program_capacity"):
        triton_kernels.fill_image(kept, rows([4 * span, 4 * span]), 0, capacity)


@needs_cpu
@pytest.mark.parametrize("layout", [(torch.bfloat16, torch.float32, True, False),
                                    (torch.bfloat16, torch.bfloat16, False, True)], ids=["bf16-f32-master", "bf16-sr"])
@pytest.mark.parametrize("rule,switches", OTHER_CASES, ids=OTHER_CASE_IDS)
def test_every_switch_with_masters_and_stochastic_rounding(rule, switches, layout, triton_kernels):
    # the switches that leave state columns unused (0 in the table), with a master and with SR
    bucket = LayoutBucket(rule, switches, layout, PRECISION_SIZES, DEVICE, MISALIGNED)
    compare_with_cpu(bucket, _launch_bucket(triton_kernels, bucket), exact=INTERPRET)


def test_grad_mult_is_applied(triton_kernels):
    """1/grad_scale times the clip coefficient multiplies the gradient: 8x gradients under
    inv_scale 1/4 and clip 1/2 step exactly as the gradients without a control block, and
    unlike 8x gradients without one."""
    layout = (torch.float32, torch.float32, False, False)
    buckets = [LayoutBucket("sgdw", (True, False), layout, [37, 1030], DEVICE) for _ in range(3)]
    scaled, plain, unscaled = buckets
    for b, factor in ((scaled, 8.0), (plain, 1.0), (unscaled, 8.0)):
        b.new_grads(0)
        for g in b.grads:
            g.mul_(factor)
    _launch_bucket(triton_kernels, scaled)(control(0.25, 0.0, 0.5, DEVICE), 0)
    _launch_bucket(triton_kernels, plain)(None, 0)
    _launch_bucket(triton_kernels, unscaled)(None, 0)
    assert_same_bits(scaled, plain, "8x gradients, grad_mult 1/8")
    with pytest.raises(AssertionError):
        assert_same_bits(unscaled, plain, "8x gradients, no control block")


def test_stochastic_rounding_is_seeded_and_unbiased_in_its_choice(triton_kernels):
    """The same seed rounds alike, another seed otherwise; every result is one of the two bf16
    neighbours of what nearest rounding keeps, and both occur."""
    layout = (torch.bfloat16, torch.float32, False, True)

    def run(seed, stochastic=True):
        b = LayoutBucket("adamw", (False,), (layout[0], layout[1], False, stochastic), [1030], DEVICE)
        b.new_grads(0)
        _launch_bucket(triton_kernels, b)(None, seed)
        return b.params[0].cpu()

    first, again, other, nearest = run(SEED), run(SEED), run(SEED + 1), run(SEED, stochastic=False)
    assert torch.equal(first.view(torch.int16), again.view(torch.int16))
    assert not torch.equal(first.view(torch.int16), other.view(torch.int16))
    ulps = (first.view(torch.int16).int() - nearest.view(torch.int16).int()).abs()
    assert int(ulps.max()) <= 1 and 0 < int((ulps == 1).sum()) < first.numel()


@pytest.mark.parametrize("start", [1024, 3 * 2**30, 2**32 - 1024, 2**32, 5 * 2**32 + 7 * 1024])
def test_stochastic_rounding_bits_of_a_block_far_into_its_segment(start, triton_kernels):
    """A block's rounding bits come from its int64 first element and int32 offsets inside the block
    (_kernels._bf16_stochastic): they are the reference's bits of the flat indices start + offs, also
    past 2^31 and 2^32, where the hash folds the index's high half in."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, out_ptr, start_ptr, key, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        # through the module global fusedwd: Triton resolves a jit function's globals, not its closure
        bits = fusedwd.triton._kernels._bf16_stochastic(tl.load(x_ptr + offs), key.to(tl.uint32),
                                                        tl.load(start_ptr), offs)
        tl.store(out_ptr + offs, bits.to(tl.int16, bitcast=True))

    block = 1024
    x = torch.randn(block, generator=torch.Generator().manual_seed(SEED)).to(DEVICE)
    out = torch.empty(block, dtype=torch.int16, device=DEVICE)
    key = 0x2468ACE1
    probe[(1,)](x, out, torch.tensor([start], device=DEVICE), key, BLOCK=block)
    expected = fusedwd.reference.stochastic_round_bf16(x, key, first=start).view(torch.int16)
    assert torch.equal(out.cpu(), expected.cpu())
    # the index matters: the same values as the segment's first block round otherwise
    assert not torch.equal(out.cpu(), fusedwd.reference.stochastic_round_bf16(x, key).view(torch.int16).cpu())


def test_found_inf_skips_before_any_block_arrives(triton_kernels):
    # every program leaves at once: no step count advances, even of segments of several blocks
    bucket = LayoutBucket("adamw", (True,), (torch.bfloat16, torch.float32, True, False), [1, 2049, 0], DEVICE)
    bucket.new_grads(0)
    before = bucket.snapshot()
    for found_inf in (1.0, float("nan"), -3.0):
        _launch_bucket(triton_kernels, bucket)(control(0.5, found_inf, 1.0, DEVICE), 0)
        assert [torch.equal(x, y) for x, y in zip(before, bucket.snapshot())] == [True] * len(before), found_inf
    _launch_bucket(triton_kernels, bucket)(control(0.5, 0.0, 1.0, DEVICE), 0)
    assert torch.equal(bucket.steps.cpu(), torch.tensor([1.0, 4.0, 2.0]))


@needs_cpu
@pytest.mark.parametrize("dtype,options", [
    (torch.bfloat16, dict(master_weights=True)),
    (torch.bfloat16, dict(stochastic_rounding=True, state_dtype=torch.float32)),
    (torch.float32, dict(state_dtype=torch.bfloat16)),
], ids=["bf16-master", "bf16-sr-f32states", "f32-bf16states"])
def test_optimizer_precision_options_match_the_cpu_backend(dtype, options):
    """Through fusedwd.AdamW: GradScaler's scale and found_inf (one step skipped) and
    max_grad_norm reach the launcher as the CPU kernel's control block."""
    cls, kw, states = CONFIGS["adamw-amsgrad"]
    b = make_params([(5, 7), (1030,)], dtype)
    a = _on_device(b)
    opt_a = cls(a, backend="triton", max_grad_norm=0.5, **kw, **options)
    opt_b = cls(b, backend="cpu", max_grad_norm=0.5, **kw, **options)
    for opt in (opt_a, opt_b):
        for group in opt.param_groups:
            group["sr_seed"] = 99

    def amp(t):
        for opt in (opt_a, opt_b):
            opt.grad_scale, opt.found_inf = torch.tensor(64.0), torch.tensor(1.0 if t == 2 else 0.0)

    extra = ["master_param"] if options.get("master_weights") else []
    # within the tolerance table, not bitwise: the CPU backend's clipping norm sums squares in
    # double (fusedwd._C.grad_sumsq), a Triton bucket's takes torch's per-tensor fp32 norms,
    # so the clip coefficients may differ in their last bit
    _compare_across_devices(opt_a, a, opt_b, b, states + extra, 5, lambda t: random_grads(b, t, scale=64.0),
                            exact=False, before_step=amp)
    assert float(opt_a.state[a[0]]["step"]) == 4.0  # one of the five steps was skipped


def test_launcher_rejects_bad_precision_options(triton_kernels):
    bucket = LayoutBucket("sgdw", (True, False), (torch.float32, torch.float32, False, False), [3], DEVICE)
    launch = functools.partial(triton_kernels.step, "sgdw")
    args = (bucket.table(), bucket.hyper, DEVICE, torch.float32, (True, False))
    with pytest.raises(ValueError, match="unsupported storage layout"):
        launch(*args, master=True)  # fp32 parameters are their own master
    with pytest.raises(ValueError, match="unsupported storage layout"):
        launch(*args, stochastic_rounding=True)
    with pytest.raises(ValueError, match="unsupported storage layout"):
        launch(bucket.table(), bucket.hyper, DEVICE, torch.bfloat16, (True, False), state_dtype=torch.float16)
    with pytest.raises(ValueError, match="ctl must be"):
        launch(*args, ctl=torch.ones(3, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="seed"):
        launch(*args, seed=-1)
    with pytest.raises(TypeError):
        launch(*args, state_dtype=torch.int8)
    with pytest.raises(ValueError, match="takes 2 switches, got 1"):
        launch(bucket.table(), bucket.hyper, DEVICE, torch.float32, (True,))
    with pytest.raises(ValueError, match="unknown rule"):
        triton_kernels.step("sgd", *args)
    assert float(bucket.steps[0]) == 0.0, "a rejected launch wrote a step count"


# ------------------------------------------------------------------ 8-bit states
# Issue 6 on the Triton kernels: the CPU kernel's bytes (codes, absmax, parameters, masters,
# step counts) bit for bit. Several quant blocks per segment with partial last ones (1030 and
# 2100 elements), segments of fewer than 256 elements, an empty one, a misaligned one; a block
# of segment 2 whose states fall below the smallest normal (absmax 0, zero codes) and a NaN
# gradient in segment 4 at step 1 (its block's absmax NaN, zero codes, from then on).
Q8_SIZES = [1, 300, 1030, 0, 2100, 5]
Q8_EDGES = dict(tiny_block=(2, 1), nan_grad=(4, 1500, 1))


def _q8_bucket(rule, switches, layout):
    return LayoutBucket(rule, switches, layout, Q8_SIZES, DEVICE, frozenset({5}), **Q8_EDGES)


def _assert_edges_reached(bucket):
    # the test must see the edge cases it claims: the tiny block stored as 0, the NaN one as NaN
    for c, scales in bucket.absmax.items():
        assert float(scales[2][1]) == 0.0, c
        assert int(scales[4].isnan().sum()) == 1 and bool(scales[4][1500 // 256].isnan()), c


@needs_cpu
@pytest.mark.parametrize("layout", Q8_LAYOUTS, ids=Q8_LAYOUT_IDS)
@pytest.mark.parametrize("rule,switches", RICHEST, ids=RICHEST_IDS)
def test_q8_every_layout_matches_the_cpu_kernel(rule, switches, layout, triton_kernels):
    """8-bit states in each layout (every state in use): through no control block, AMP with
    clipping, a found_inf step that writes nothing (codes and absmax included), unscaling alone."""
    bucket = _q8_bucket(rule, switches, layout)
    compare_with_cpu(bucket, _launch_bucket(triton_kernels, bucket), exact=INTERPRET)
    _assert_edges_reached(bucket)


@needs_cpu
@pytest.mark.parametrize("layout", [Q8_LAYOUTS[0], Q8_LAYOUTS[3]], ids=[Q8_LAYOUT_IDS[0], Q8_LAYOUT_IDS[3]])
@pytest.mark.parametrize("rule,switches", OTHER_CASES, ids=OTHER_CASE_IDS)
def test_q8_every_switch_matches_the_cpu_kernel(rule, switches, layout, triton_kernels):
    # the switches that leave state columns (and their absmax columns) unused
    bucket = _q8_bucket(rule, switches, layout)
    compare_with_cpu(bucket, _launch_bucket(triton_kernels, bucket), exact=INTERPRET)
    if bucket.absmax:
        _assert_edges_reached(bucket)


@needs_cpu
@pytest.mark.parametrize("options", [{}, dict(master_weights=True)], ids=["f32", "bf16-master"])
def test_q8_optimizer_matches_the_cpu_backend(options):
    """fusedwd.AdamW(state_dtype="int8", backend="triton") against backend="cpu", bit for bit:
    8-bit and fp32-state tensors in separate buckets, two param groups, a skipped AMP step."""
    dtype = torch.bfloat16 if options else torch.float32
    b = make_params([(70, 90), (4097,), (100,)], dtype)
    a = _on_device(b)
    kw = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=True, state_dtype="int8", **options)
    opt_a = fusedwd.AdamW(_grouped(a, kw), backend="triton", **kw)
    opt_b = fusedwd.AdamW(_grouped(b, kw), backend="cpu", **kw)
    assert {bk.backend for bk in opt_a._current_plan()} == {"triton"}

    def amp(t):
        for opt in (opt_a, opt_b):
            opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0 if t == 2 else 0.0)

    for t in range(5):
        amp(t)
        for pa, pb, g in zip(a, b, random_grads(b, t, scale=8.0)):
            pa.grad, pb.grad = g.to(DEVICE), g.clone()
        opt_a.step()
        opt_b.step()
        for k, (pa, pb) in enumerate(zip(a, b)):
            sa, sb = opt_a.state[pa], opt_b.state[pb]
            assert sa.keys() == sb.keys()
            # 8-bit states for the tensors of at least 4096 elements, fp32 ones for the small one
            assert ("exp_avg_codes" in sa) == (pa.numel() >= 4096)
            for name, x, y in [("param", pa.detach(), pb.detach())] + [(n, sa[n], sb[n]) for n in sa]:
                if INTERPRET or name in ("step", "exp_avg_absmax"):
                    assert torch.equal(x.cpu(), y), f"step {t} param {k} {name}: not bitwise equal"
    assert float(opt_a.state[a[0]]["step"]) == 4.0  # one of the five steps was skipped


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_q8_level_is_the_spec_code_next_to_every_threshold(signed, triton_kernels):
    """_q8_level, the Triton copy of quant.h's square-root-free encode, against the spec's count
    of thresholds: every float32 within 48 ulps of each threshold (where a wrong guess or a
    constant copied wrong would show, and where the square-root definition differed), 0, 1,
    subnormals, and 2^16 values spread over every binade in [2^-40, 1]."""
    import _triton_level

    importlib.reload(_triton_level)  # defined in this module's Triton mode
    from fusedwd import quant

    thr = quant.thresholds(signed)
    near = (thr.view(torch.int32)[:, None] + torch.arange(-48, 49, dtype=torch.int32)).reshape(-1)
    gen = torch.Generator().manual_seed(5)
    spread = torch.rand(1 << 16, generator=gen, dtype=torch.float64).mul(-40).exp2().float()
    special = torch.tensor([0.0, 1.0, 1e-45, 1e-40, 1.1754942e-38, 1.1754944e-38, 0.99999994])
    y = torch.cat([near.view(torch.float32), spread, special])
    want = torch.searchsorted(thr.double(), y.double(), right=True).int()
    got = _triton_level.levels(y.to(DEVICE), signed).cpu()
    wrong = (got != want).nonzero().flatten()
    assert wrong.numel() == 0, f"{wrong.numel()} wrong, first y = {y[wrong[:3]].tolist()}: {got[wrong[:3]].tolist()} " \
                               f"instead of {want[wrong[:3]].tolist()}"
    assert len(set(want[: near.numel()].tolist())) == len(thr) + 1  # both sides of every threshold


def test_q8_launcher_rejects_bad_layouts(triton_kernels):
    bucket = _q8_bucket("sgdw", (True, False), Q8_LAYOUTS[0])
    args = (bucket.table(), bucket.hyper, DEVICE)
    for dtype, kw in ((torch.float64, {}), (torch.float32, dict(master=True)),
                      (torch.float16, dict(stochastic_rounding=True)),
                      (torch.float32, dict(state_dtype=torch.float32))):
        with pytest.raises(ValueError, match="unsupported storage layout: .*8-bit"):
            triton_kernels.step("sgdw", *args, dtype, (True, False), quantized=True, **kw)
    assert float(bucket.steps[0]) == 0.0, "a rejected launch wrote a step count"


# ------------------------------------------------------------------ layout and wiring
@pytest.mark.parametrize("name", _rules.NAMES)
def test_every_rule_has_its_compiled_helper(name, triton_kernels):
    """Each rule's triton_update, compiled in its module's namespace with its own columns."""
    rule = fusedwd.rules.get(name)
    update = triton_kernels._kernels.UPDATES[name]
    assert update.fn.__code__ is rule.triton_update.__code__
    columns = update.fn.__globals__["COL"]
    assert {c: getattr(columns, c).value for c in rule.columns} == {c: i for i, c in enumerate(rule.columns)}


def test_backend_resolution(monkeypatch, triton_kernels):
    p = torch.nn.Parameter(torch.randn(3, device=DEVICE))
    p.grad = torch.randn(3, device=DEVICE)
    # auto never picks the interpreter; on CUDA it picks the CUDA kernels where they hold code for the
    # device, else Triton (tests/test_auto_backend.py)
    from fusedwd import _cuda_ext

    plan = fusedwd.AdamW([p], backend="auto")._current_plan()
    on_cuda = "cuda" if _cuda_ext.unusable(DEVICE) is None else "triton"
    assert plan[0].backend == (on_cuda if DEVICE.type == "cuda" else "cpu" if _ext.has_cpu() else "reference")
    assert ("triton" in fusedwd.available_backends("cuda")) == (not triton_kernels.INTERPRETED)
    assert "triton" not in fusedwd.available_backends("cpu")

    # the wrong mode for the device: a clear error when the plan is built, nothing written
    monkeypatch.setattr(triton_kernels, "INTERPRETED", not triton_kernels.INTERPRETED)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fusedwd.AdamW([p], backend="triton").step()
    assert torch.equal(p.detach(), before)


def test_missing_triton_is_reported_on_use(monkeypatch):
    monkeypatch.setattr(_ext, "_triton_tried", True)
    monkeypatch.setattr(_ext, "_triton", None)
    monkeypatch.setattr(_ext, "_triton_error", ImportError("No module named 'triton'"))
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="needs Triton, which failed to import"):
        fusedwd.SGDW([p], backend="triton").step()
    assert "triton" not in fusedwd.available_backends("cuda")


def test_launcher_rejects_malformed_tables(triton_kernels):
    rows = torch.zeros(1, _buckets.SEG_COLS, dtype=torch.int64)
    cols = len(fusedwd.rules.get("sgdw").columns)
    with pytest.raises(ValueError, match="hyper must be a float64"):
        triton_kernels.step("sgdw", rows, torch.zeros(1, cols + 1, dtype=torch.float64), DEVICE, torch.float32,
                            (False, False))
    rows[0, _buckets.SEG_HP] = 3  # a hyperparameter row that does not exist
    with pytest.raises(ValueError, match="hyperparameter row"):
        triton_kernels.step("sgdw", rows, torch.zeros(1, cols, dtype=torch.float64), DEVICE, torch.float32,
                            (False, False))


# ------------------------------------------------------------------ two-phase rules
# LAMB and StableAdamW (docs/design.md#per-tensor-reductions): two launches, the per-64-element
# chunk sums and their combination in the CPU kernel's order, so the interpreter equals the CPU
# kernel bit for bit (fp64 within the tolerance table: the bias corrections' pow, as AdamW's).
TWO_PHASE = _rules.TWO_PHASE
# a segment of several blocks with a partial last chunk, one of exactly a chunk, empty ones, and
# a misaligned one (its full blocks take the masked path)
PHASE_SIZES = [4097, 1, 0, 64, 2049, 1030]
PHASE_MISALIGNED = frozenset({5})


def _phase_bucket(rule, layout, sizes=PHASE_SIZES, misaligned=PHASE_MISALIGNED, seed=0):
    return LayoutBucket(rule, (), layout, sizes, DEVICE, misaligned, seed)


def _phase_exact(layout):
    return INTERPRET and layout[0] != torch.float64


@needs_cpu
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("rule", TWO_PHASE)
def test_two_phase_every_layout_matches_the_cpu_kernel(rule, layout, triton_kernels):
    """Every storage layout through no control block, AMP with clipping, a skipped step (nothing
    written, step counts included) and unscaling alone: every buffer the CPU kernel's bits."""
    bucket = _phase_bucket(rule, layout)
    compare_with_cpu(bucket, _launch_bucket(triton_kernels, bucket), exact=_phase_exact(layout))


@needs_cpu
@pytest.mark.parametrize("rule", TWO_PHASE)
def test_two_phase_sums_and_phases_apart(rule, triton_kernels):
    """phases=1 then phases=2 through a sums tensor equal phases=3; phase 1 alone advances no step
    count, and its sums are the CPU kernel's bit for bit."""
    from fusedwd import _C

    layout = (torch.float32, torch.float32, False, False)
    together, apart, host = (_phase_bucket(rule, layout) for _ in range(3))
    host = host.copy("cpu")
    k = len(fusedwd.rules.get(rule).sums)
    n = len(PHASE_SIZES)
    sums = torch.full((n, k), float("nan"), dtype=torch.float64, device=DEVICE)
    cpu_sums = torch.full((n, k), float("nan"), dtype=torch.float64)
    for t in range(3):
        for b in (together, apart, host):
            b.new_grads(t)
        _launch_bucket(triton_kernels, together)(None, 0)
        steps = apart.steps.clone()
        triton_kernels.step(rule, apart.table(), apart.hyper, DEVICE, torch.float32, (), sums=sums, phases=1)
        assert torch.equal(apart.steps, steps), "phase 1 advanced a step count"
        table = host.table()
        _C.step(rule, table.data_ptr(), n, host.hyper.data_ptr(), _layouts_dtype_code(torch.float32), (), 1,
                sums=cpu_sums.data_ptr(), phases=1)
        assert torch.equal(_bits(sums), _bits(cpu_sums)), f"step {t}: the sums differ from the CPU kernel's"
        _C.step(rule, table.data_ptr(), n, host.hyper.data_ptr(), _layouts_dtype_code(torch.float32), (), 1,
                sums=cpu_sums.data_ptr(), phases=2)
        triton_kernels.step(rule, apart.table(), apart.hyper, DEVICE, torch.float32, (), sums=sums, phases=2)
        assert_same_bits(apart, together, f"step {t}: phases apart")
        assert_same_bits(apart, host, f"step {t}: against the CPU kernel")


def _layouts_dtype_code(dtype):
    from _layouts import dtype_code

    return dtype_code(dtype)


def _bits(x):
    return x.detach().cpu().contiguous().view(torch.int64)


@pytest.mark.parametrize("rule", TWO_PHASE)
def test_two_phase_launcher_rejects_bad_arguments(rule, triton_kernels):
    layout = (torch.float32, torch.float32, False, False)
    bucket = _phase_bucket(rule, layout, sizes=[3, 5], misaligned=frozenset())
    args = (rule, bucket.table(), bucket.hyper, DEVICE, torch.float32, ())
    k = len(fusedwd.rules.get(rule).sums)
    with pytest.raises(ValueError, match="phases=1 takes the sums"):
        triton_kernels.step(*args, phases=1)
    with pytest.raises(ValueError, match="phases must be 1, 2 or 3"):
        triton_kernels.step(*args, phases=4, sums=torch.zeros(2, k, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match=rf"sums must be a contiguous float64 \[2, {k}\]"):
        triton_kernels.step(*args, phases=1, sums=torch.zeros(2, k + 1, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="8-bit states"):
        triton_kernels.step(*args[:-2], torch.float32, (), quantized=True)
    with pytest.raises(ValueError, match="elementwise: it takes no sums"):
        triton_kernels.step("sgdw", bucket.table(), _rules.hyper_rows("sgdw"), DEVICE, torch.float32, (True, False),
                            phases=1, sums=torch.zeros(2, 1, dtype=torch.float64, device=DEVICE))
    assert float(bucket.steps.sum()) == float(torch.tensor([0.0, 3.0]).sum()), "a rejected launch wrote"


# Through the optimizers: backend='triton' against backend='cpu', bit for bit.
TWO_PHASE_OPTIONS = [
    ("fp32", torch.float32, {}),
    ("bf16", torch.bfloat16, {}),
    ("bf16-master", torch.bfloat16, dict(master_weights=True)),
    ("bf16-sr", torch.bfloat16, dict(stochastic_rounding=True)),
    ("fp32-bf16-states", torch.float32, dict(state_dtype=torch.bfloat16)),
]
TWO_PHASE_SHAPES = [(1,), (4097,), (33, 65), (0,), (64,)]


def _two_phase_groups(name, kw):
    """Two param groups sharing one bucket: the second with its own lr and no decay (LAMB: adapting anyway)."""
    second = dict(lr=kw["lr"] * 0.5, weight_decay=0.0, **(dict(always_adapt=True) if name == "lamb" else {}))
    return lambda ps: [{"params": ps[::2]}, {"params": ps[1::2], **second}]


def _two_phase_pair(name, dtype, shapes=TWO_PHASE_SHAPES, other="cpu", **options):
    info = _rules.INFOS[name]
    kw = dict(info.hyperparameters, **options)
    b = make_params(shapes, dtype)
    a = _on_device(b)
    split = _two_phase_groups(name, kw)
    opt_a = info.cls(split(a), backend="triton", **kw)
    opt_b = info.cls(split(b), backend=other, **kw)
    for opt in (opt_a, opt_b):
        for group in opt.param_groups:
            group["sr_seed"] = 4321
    states = ["step", "exp_avg", "exp_avg_sq"] + (["master_param"] if options.get("master_weights") else [])
    return opt_a, a, opt_b, b, states


@needs_cpu
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("label,dtype,options", TWO_PHASE_OPTIONS, ids=[o[0] for o in TWO_PHASE_OPTIONS])
@pytest.mark.parametrize("name", TWO_PHASE)
def test_two_phase_optimizer_matches_the_cpu_backend(name, label, dtype, options, decay):
    opt_a, a, opt_b, b, states = _two_phase_pair(name, dtype, decay=decay, maximize=decay == "l2", **options)
    assert [bk.backend for bk in opt_a._current_plan()] == ["triton"]
    _compare_across_devices(opt_a, a, opt_b, b, states, 6, lambda t: random_grads(b, t), exact=INTERPRET)


@pytest.mark.parametrize("name", TWO_PHASE)
def test_two_phase_matches_the_reference(name):
    opt_a, a, opt_b, b, states = _two_phase_pair(name, torch.float32, other="reference", decay="independent")
    _compare_across_devices(opt_a, a, opt_b, b, states, 8, lambda t: random_grads(b, t))


@needs_cpu
@pytest.mark.parametrize("name", TWO_PHASE)
def test_two_phase_grad_scaler_and_clipping(name):
    """GradScaler's scale and a found_inf step (nothing touched) and max_grad_norm reach both
    phases; within the tolerance table (the clip norms are summed differently: see
    test_optimizer_precision_options_match_the_cpu_backend)."""
    opt_a, a, opt_b, b, states = _two_phase_pair(name, torch.float32, max_grad_norm=0.5)

    def amp(t):
        for opt in (opt_a, opt_b):
            opt.grad_scale, opt.found_inf = torch.tensor(64.0), torch.tensor(1.0 if t == 2 else 0.0)
        if t == 2:
            amp.before = [p.detach().clone() for p in a] + [opt_a.state[p][s].clone() for p in a for s in states]

    def skipped(t):
        if t == 2:
            after = [p.detach() for p in a] + [opt_a.state[p][s] for p in a for s in states]
            assert all(torch.equal(x, y) for x, y in zip(amp.before, after)), "a skipped step wrote"

    _compare_across_devices(opt_a, a, opt_b, b, states, 5, lambda t: random_grads(b, t, scale=64.0),
                            before_step=amp, after_step=skipped)
    assert float(opt_a.state[a[1]]["step"]) == 4.0


@needs_cpu
@pytest.mark.parametrize("name", TWO_PHASE)
def test_two_phase_one_bucket_equals_one_optimizer_per_tensor(name):
    """The sums do not depend on how the tensors are grouped into launches."""
    info = _rules.INFOS[name]
    b = make_params(TWO_PHASE_SHAPES)
    together = _on_device(b)
    apart = _on_device(b)
    opt = info.cls(together, backend="triton", **info.hyperparameters)
    opts = [info.cls([p], backend="triton", **info.hyperparameters) for p in apart]
    for t in range(3):
        for p, q, g in zip(together, apart, random_grads(b, t)):
            p.grad, q.grad = g.to(DEVICE), g.to(DEVICE, copy=True)
        opt.step()
        for o in opts:
            o.step()
        for k, (p, q) in enumerate(zip(together, apart)):
            assert torch.equal(_bits_any(p), _bits_any(q)), f"step {t} tensor {k}"
            for s in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.state[p][s], opts[k].state[q][s]), f"step {t} tensor {k} {s}"


def _bits_any(x):
    x = x.detach().cpu().contiguous()
    return x.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()])


@needs_cpu
@pytest.mark.parametrize("name", TWO_PHASE)
def test_two_phase_many_param_groups_in_one_launch(name, monkeypatch, triton_kernels):
    info = _rules.INFOS[name]
    b = make_params([(3 + k % 7,) for k in range(400)])
    a = _on_device(b)

    def groups(ps):
        return [{"params": [p], "lr": 1e-3 * (1 + k % 13), "weight_decay": 0.01 * (k % 5)} for k, p in enumerate(ps)]

    opt_a = info.cls(groups(a), backend="triton", **info.hyperparameters)
    opt_b = info.cls(groups(b), backend="cpu", **info.hyperparameters)
    launches = []
    for kernel in ("_moments_kernel", "_apply_kernel"):
        original = getattr(triton_kernels._launch, kernel)

        class Counted:
            def __init__(self, original, name):
                self.original, self.name = original, name

            def __getitem__(self, grid):
                launches.append((self.name, grid))
                return self.original[grid]

        monkeypatch.setattr(triton_kernels._launch, kernel, Counted(original, kernel))
    _compare_across_devices(opt_a, a, opt_b, b, ["step", "exp_avg", "exp_avg_sq"], 2,
                            lambda t: random_grads(b, t), exact=INTERPRET)
    assert [name for name, _ in launches] == ["_moments_kernel", "_apply_kernel"] * 2


@needs_cpu
@pytest.mark.parametrize("name", TWO_PHASE)
def test_two_phase_state_dict_round_trip(name):
    """A checkpoint of the Triton optimizer continues under the CPU kernel with the same bits, and back."""
    opt_a, a, opt_b, b, states = _two_phase_pair(name, torch.float32)
    _compare_across_devices(opt_a, a, opt_b, b, states, 2, lambda t: random_grads(b, t), exact=INTERPRET)
    info = _rules.INFOS[name]
    c = [torch.nn.Parameter(p.detach().cpu().clone()) for p in a]
    opt_c = info.cls(_two_phase_groups(name, info.hyperparameters)(c), backend="cpu", **info.hyperparameters)
    # a copy, as a checkpoint read back from disk: load_state_dict keeps the given tensors until the
    # first step adopts them, so opt_a's next step would write into opt_c's state
    opt_c.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for group in opt_c.param_groups:
        group["backend"] = "cpu"  # the checkpoint names the backend it was taken with
    _compare_across_devices(opt_a, a, opt_c, c, states, 3, lambda t: random_grads(b, t + 2), exact=INTERPRET)
    assert [bk.backend for bk in opt_c._current_plan()] == ["cpu"]
