"""The CPU extension itself: partition arithmetic, ISA dispatch, step counts,
gather's contract, argument checks and the traffic pass.

The kernels against fusedwd.reference are tested elsewhere; here the ISA
variants are checked against the baseline variant (bitwise: the loops are built
with -ffp-contract=off, so every variant rounds alike) and the 16-bit stores
against torch's own conversions.
"""

import bisect

import pytest
import torch

import _rules
from _helpers import bitwise_equal

_C = pytest.importorskip("fusedwd._C", reason="fusedwd._C is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_ENUM = {dt: _C.DTYPES[str(dt).removeprefix("torch.")] for dt in DTYPES}

SIZES = [1, 4097, 0, 64, 63, 3000, 1000, 129, 0, 5]


class Bucket:
    """Tensors of one bucket and the int64 / float64 tables that point at them."""

    def __init__(self, rule, switches, dtype, sizes, seed):
        gen = torch.Generator().manual_seed(seed)

        def draw(n, kind="signed"):
            return _rules.draw(torch.randn(n, generator=gen, dtype=torch.float64), kind).to(dtype)

        used = _rules.used_states(rule, switches)
        self.p = [draw(n) for n in sizes]
        self.g = [draw(n) for n in sizes]
        # every state starts non-zero
        self.s = [[draw(n, _rules.state_kind(rule, col)) for n in sizes] if col in used else None
                  for col in (_C.SEG_S0, _C.SEG_S1, _C.SEG_S2)]
        self.step = torch.randint(0, 5, (len(sizes),), generator=gen).to(torch.float32)
        self.hyper = _rules.hyper_rows(rule, switches)
        self.table = torch.zeros(len(sizes), _C.SEG_COLS, dtype=torch.int64)
        for i, n in enumerate(sizes):
            row = self.table[i]
            row[_C.SEG_P] = self.p[i].data_ptr()
            row[_C.SEG_G] = self.g[i].data_ptr()
            for col, s in zip((_C.SEG_S0, _C.SEG_S1, _C.SEG_S2), self.s):
                row[col] = s[i].data_ptr() if s is not None else 0
            row[_C.SEG_STEP] = self.step[i : i + 1].data_ptr()
            row[_C.SEG_N] = n
            row[_C.SEG_HP] = i % self.hyper.shape[0]
            row[_C.SEG_INDEX] = i
        self.rule, self.switches, self.dtype = rule, switches, dtype

    def column(self, name):
        """The hyper table's column of this name (the rule's spec gives the order)."""
        return _rules.INFOS[self.rule].rule.columns.index(name)

    def run(self, num_threads):
        _C.step(self.rule, self.table.data_ptr(), self.table.shape[0], self.hyper.data_ptr(), DTYPE_ENUM[self.dtype],
                self.switches, num_threads)

    def tensors(self):
        return self.p + [t for s in self.s if s is not None for t in s] + [self.step]


@pytest.fixture
def restore_isa():
    before = _C.isa()
    yield
    _C.set_isa(before)


# ---------------------------------------------------------------- partition


def check_partition(sizes, num_threads):
    offs = [0]
    for n in sizes:
        offs.append(offs[-1] + n)
    total = offs[-1]
    ranges = _C.thread_ranges(sizes, num_threads)
    assert len(ranges) == num_threads
    # contiguous, ordered, covering [0, total): every element exactly once
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    for (_, end, _, _), (begin, _, _, _) in zip(ranges, ranges[1:]):
        assert end == begin
    for begin, end, first, offset in ranges:
        assert 0 <= begin <= end <= total
        # rounding each boundary down by < 64 elements keeps the split even
        assert end - begin <= total // num_threads + 64
        if begin == end:
            assert first == -1
            continue
        seg = bisect.bisect_right(offs, begin) - 1  # the non-empty segment holding begin
        assert (first, offset) == (seg, begin - offs[seg])
        assert sizes[seg] > 0 and offset < sizes[seg]
        # inside a segment, boundaries fall on multiples of 64 elements
        assert offset % 64 == 0


@pytest.mark.parametrize("num_threads", range(1, 9))
@pytest.mark.parametrize(
    "sizes",
    [
        [],
        [0],
        [0, 0, 0],
        [1],
        [4097],
        SIZES,
        [1000] * 100,
        [3, 0, 1, 7] * 500,  # many tiny segments
        [0, 2**31 + 5, 0, 3, 2**33 + 17, 1],  # beyond 2^31 elements: arithmetic only
        [2**40 + 63] * 3,
    ],
    ids=lambda s: f"{len(s)}seg-{sum(s)}el",
)
def test_partition(sizes, num_threads):
    check_partition(sizes, num_threads)


def test_partition_bad_arguments():
    with pytest.raises(ValueError):
        _C.thread_ranges([1, 2], 0)
    with pytest.raises(ValueError):
        _C.thread_ranges([1, -2], 2)


# ---------------------------------------------------------------- dispatch


def test_isa_names(restore_isa):
    isas = _C.supported_isas()
    assert isas[0] == "baseline"
    assert set(isas) <= {"baseline", "avx2", "avx512"}
    assert _C.isa() in isas
    for name in isas:
        _C.set_isa(name)
        assert _C.isa() == name
    with pytest.raises(ValueError):
        _C.set_isa("sse9")


CASES, CASE_IDS = _rules.RULE_CASES, _rules.RULE_CASE_IDS


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule,switches", CASES, ids=CASE_IDS)
def test_isa_variants_match_baseline(rule, switches, dtype, restore_isa):
    isas = _C.supported_isas()
    if len(isas) == 1:
        pytest.skip("only the baseline variant runs on this CPU")
    results = {}
    for isa in isas:
        _C.set_isa(isa)
        bucket = Bucket(rule, switches, dtype, SIZES, seed=0)
        before = [t.clone() for t in bucket.tensors()]
        for _ in range(3):
            bucket.run(num_threads=2)
        after = bucket.tensors()
        # every parameter and state was written (a large random tensor never stays put)
        assert all(not bitwise_equal(a, b) for a, b in zip(after, before) if a.numel() > 1000)
        results[isa] = after
    for isa in isas[1:]:
        for ref, got in zip(results["baseline"], results[isa]):
            # -ffp-contract=off: the variants round identically
            assert bitwise_equal(ref, got), isa


@pytest.mark.parametrize("rule,switches", CASES, ids=CASE_IDS)
def test_thread_count_does_not_change_results(rule, switches):
    """Segments split between threads use the same scalars in both halves."""
    one = Bucket(rule, switches, torch.float32, SIZES, seed=1)
    two = Bucket(rule, switches, torch.float32, SIZES, seed=1)
    for _ in range(2):
        one.run(num_threads=1)
        two.run(num_threads=2)
    for a, b in zip(one.tensors(), two.tensors()):
        assert bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_stores_round_like_torch(dtype, restore_isa):
    """SGDW without momentum, p <- p*decay_mult - lr*g, is a few fp32 ops that
    torch repeats exactly; the 16-bit store must round them as torch does:
    to nearest even, Inf and NaN kept, fp16 subnormals and overflow included."""
    finfo = torch.finfo(dtype)
    special = torch.tensor(
        [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, finfo.max, -finfo.max,
         finfo.tiny, finfo.tiny / 4, finfo.tiny * 0.75, finfo.eps, 1.0],
        dtype=torch.float64,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    n = 20000

    def spread():
        magnitude = torch.exp2(torch.empty(n, dtype=torch.float64).uniform_(-30, 17, generator=gen))
        return (magnitude * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)).to(dtype)

    # Inf and NaN in g only: an infinite p would be the store's input, not what the test varies
    p0 = spread().clamp(-finfo.max / 4, finfo.max / 4)
    g0 = torch.cat([special.to(dtype), spread()])[:n]
    for isa in _C.supported_isas():
        _C.set_isa(isa)
        for decay_mult, lr in ((1.0, 1.0), (1.0 + 2**-9, 0.5), (0.999, 3e-3), (1.7, 0.0)):
            bucket = Bucket("sgdw", (False, False), dtype, [n], seed=3)
            bucket.p[0].copy_(p0)
            bucket.g[0].copy_(g0)
            for name, value in (("lr", lr), ("l2", 0.0), ("grad_sign", 1.0), ("decay_mult", decay_mult)):
                bucket.hyper[:, bucket.column(name)] = value
            bucket.run(num_threads=2)
            # the same fp32 ops, scalars rounded to fp32 as the kernel does
            f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
            pf, gf = p0.float(), g0.float()
            # (l2 = 0: the L2 term is left out, as torch does)
            expected = (pf * f32(decay_mult) - f32(lr) * (f32(1.0) * gf)).to(dtype)
            got = bucket.p[0]
            assert torch.equal(got.isnan(), expected.isnan()), isa
            ok = got.isnan() | (got.view(torch.int16) == expected.view(torch.int16))
            assert bool(ok.all()), (isa, decay_mult, got[~ok][:5], expected[~ok][:5])


# ---------------------------------------------------------------- step counts


@pytest.mark.parametrize("num_threads", [1, 2, 3, 8])
@pytest.mark.parametrize("rule,switches", CASES, ids=CASE_IDS)
def test_step_counts_advance_exactly_once(rule, switches, num_threads):
    # 4097 and 3000 straddle thread boundaries; 0-length segments count too
    bucket = Bucket(rule, switches, torch.float32, SIZES, seed=4)
    start = bucket.step.clone()
    for k in range(1, 4):
        bucket.run(num_threads)
        assert torch.equal(bucket.step, start + k)


def test_sgdw_first_step_copies_gradient():
    """SGDW's stored step 0 means t = 1: buf = g exactly (torch clones g)."""
    bucket = Bucket("sgdw", (True, False), torch.float32, [4097, 100], seed=5)
    bucket.step.zero_()
    bucket.hyper[:, bucket.column("l2")] = 0.0
    bucket.hyper[:, bucket.column("grad_sign")] = 1.0
    bucket.run(num_threads=2)
    for g, buf in zip(bucket.g, bucket.s[0]):
        assert torch.equal(buf, g)


# ---------------------------------------------------------------- gather


class FakeTensor:
    """Answers gather's questions with chosen values, or raises."""

    def __init__(self, ptr=1, dtype=torch.float32, is_cpu=True, numel=4, contiguous=True,
                 grad=None, raise_in=()):  # fmt: skip
        self._ptr, self.dtype, self.is_cpu = ptr, dtype, is_cpu
        self._numel, self._contiguous, self.grad, self._raise = numel, contiguous, grad, raise_in

    def _maybe_raise(self, name):
        if name in self._raise:
            raise RuntimeError(name)

    def data_ptr(self):
        self._maybe_raise("data_ptr")
        return self._ptr

    def numel(self):
        self._maybe_raise("numel")
        return self._numel

    def is_contiguous(self):
        self._maybe_raise("is_contiguous")
        return self._contiguous


def table_for(params):
    table = torch.full((len(params), _C.SEG_COLS), -7, dtype=torch.int64)
    for i, p in enumerate(params):
        table[i, _C.SEG_P] = p.data_ptr()
        table[i, _C.SEG_N] = p.numel()
        table[i, _C.SEG_INDEX] = i
    return table


def run_gather(params, table_in, start=0, n_out=0, table_out=None, dtype=torch.float32, expect_cpu=True):
    if table_out is None:
        table_out = torch.full((len(params), _C.SEG_COLS), -1, dtype=torch.int64)
    i, n = _C.gather(params, start, table_in.data_ptr(), table_out.data_ptr(), n_out, dtype, expect_cpu)
    return i, n, table_out


def test_gather_copies_rows_and_skips_missing_grads():
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 5, 7, 1)]
    for i in (0, 2, 3):
        params[i].grad = torch.randn_like(params[i])
    table_in = table_for(params)
    i, n, out = run_gather(params, table_in)
    assert (i, n) == (4, 3)
    for row, k in enumerate((0, 2, 3)):
        expected = table_in[k].clone()
        expected[_C.SEG_G] = params[k].grad.data_ptr()
        assert torch.equal(out[row], expected)
    assert torch.equal(out[3], torch.full((_C.SEG_COLS,), -1, dtype=torch.int64))


def replace_param(ps, table_in, p):
    """Puts p at index 2 with a table row that matches it, isolating one check."""
    ps[2] = p
    table_in[2, _C.SEG_P] = p.data_ptr()
    table_in[2, _C.SEG_N] = p.numel()


def spoil_dtype(ps, table_in):
    p = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    p.grad = torch.randn_like(p)
    replace_param(ps, table_in, p)


def spoil_noncontiguous_grad(ps, table_in):
    ps[2].grad = torch.randn(16)[::2]


def spoil_changed_pointer(ps, table_in):
    ps[2].data = torch.randn(8)


def spoil_sparse_grad(ps, table_in):
    ps[2].grad = torch.randn(8).to_sparse()


def spoil_noncontiguous_param(ps, table_in):
    p = torch.nn.Parameter(torch.randn(4, 2).t())
    p.grad = torch.randn(2, 4)
    replace_param(ps, table_in, p)


SPOILERS = [spoil_dtype, spoil_noncontiguous_grad, spoil_changed_pointer, spoil_sparse_grad, spoil_noncontiguous_param]


@pytest.mark.parametrize("spoil", SPOILERS, ids=lambda f: f.__name__.removeprefix("spoil_"))
def test_gather_stops_and_resumes(spoil):
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(5)]
    for p in params:
        p.grad = torch.randn_like(p)
    table_in = table_for(params)
    spoil(params, table_in)
    i, n, out = run_gather(params, table_in)
    assert (i, n) == (2, 2)
    # the row of the failed parameter was not written
    assert torch.equal(out[2], torch.full((_C.SEG_COLS,), -1, dtype=torch.int64))
    i, n, out = run_gather(params, table_in, start=3, n_out=n, table_out=out)
    assert (i, n) == (5, 4)
    assert out[2, _C.SEG_INDEX] == 3 and out[3, _C.SEG_INDEX] == 4
    assert out[3, _C.SEG_G] == params[4].grad.data_ptr()


def test_gather_wrong_numel():
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    table_in = table_for(params)
    table_in[1, _C.SEG_N] = 9
    assert run_gather(params, table_in)[:2] == (1, 1)


def test_gather_clears_exceptions_and_checks_device():
    grad = FakeTensor(ptr=100)
    ok = FakeTensor(ptr=10, grad=grad)
    table_in = table_for([ok])
    assert run_gather([ok], table_in)[:2] == (1, 1)
    for name in ("data_ptr", "numel", "is_contiguous"):
        bad = FakeTensor(ptr=10, grad=FakeTensor(ptr=100, raise_in=(name,)))
        assert run_gather([bad], table_in)[:2] == (0, 0)
    off_cpu = FakeTensor(ptr=10, grad=FakeTensor(ptr=100, is_cpu=False))
    assert run_gather([off_cpu], table_in)[:2] == (0, 0)
    assert run_gather([off_cpu], table_in, expect_cpu=False)[:2] == (1, 1)
    no_grad_attr = object()
    assert run_gather([no_grad_attr], table_in)[:2] == (0, 0)


# ---------------------------------------------------------------- arguments


def test_bad_arguments_raise_value_error():
    bucket = Bucket("adamw", (False,), torch.float32, [10], seed=6)
    args = (bucket.table.data_ptr(), 1, bucket.hyper.data_ptr())
    with pytest.raises(ValueError, match="dtype"):
        _C.step("adamw", *args, 7, (False,), 1)
    with pytest.raises(ValueError, match="dtype"):
        _C.step("adamw", *args, -1, (False,), 1)
    with pytest.raises(ValueError, match="num_threads"):
        _C.step("adamw", *args, 0, (False,), 0)
    with pytest.raises(ValueError, match="dtype"):
        _C.step("sgdw", *args, 9, (True, False), 1)
    with pytest.raises(ValueError, match="num_threads"):
        _C.step("rmspropw", *args, 0, (True, False), -3)
    with pytest.raises(ValueError, match="unknown rule 'adam' \\(known: "):
        _C.step("adam", *args, 0, (False,), 1)
    with pytest.raises(ValueError, match="rule 'adamw' takes 1 switches, got 2"):
        _C.step("adamw", *args, 0, (False, False), 1)
    with pytest.raises(ValueError):
        _C.traffic_pass([], [], 10, 3, 1)
    with pytest.raises(ValueError):
        _C.traffic_pass([], [], 10, 4, 0)
    # nothing was touched by the rejected calls
    assert bucket.step.item() == Bucket("adamw", (False,), torch.float32, [10], seed=6).step.item()


@pytest.mark.parametrize("rule,switches", CASES, ids=CASE_IDS)
def test_zero_segments_is_a_no_op(rule, switches):
    # null addresses: nothing may be dereferenced
    _C.step(rule, 0, 0, 0, 0, switches, 2)


# ---------------------------------------------------------------- traffic pass


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("int_dtype,elem_size", [(torch.int32, 4), (torch.int16, 2)])
def test_traffic_pass_writes_outputs(int_dtype, elem_size, num_threads):
    n = 100_003
    reads = [torch.randint(-1000, 1000, (n,), dtype=int_dtype) for _ in range(3)]
    writes = [torch.full((n,), 7, dtype=int_dtype) for _ in range(2)]
    _C.traffic_pass([t.data_ptr() for t in reads], [t.data_ptr() for t in writes], n, elem_size, num_threads)
    expected = (reads[0] + reads[1] + reads[2]).to(int_dtype)
    for w in writes:
        assert torch.equal(w, expected)


# ------------------------------------------------------------ fp16 conversions
# The AVX2 and AVX-512 variants convert fp16 buffers a chunk at a time with F16C /
# AVX-512 instructions (common.h f16_to_float_n / float_to_f16_n); the baseline, the
# tails and the CUDA host code with common.h's bit arithmetic. Both round to nearest
# even and quiet a NaN keeping its payload's top bits (IEEE 754's conversion, what the
# instructions do), bit for bit: every half, and floats of every class.


def _convert(src: torch.Tensor, to_half: bool) -> torch.Tensor:
    out = torch.empty(src.numel(), dtype=torch.int16 if to_half else torch.float32)
    _C.convert_f16(src.data_ptr(), out.data_ptr(), src.numel(), to_half)
    return out


def _float_sweep() -> torch.Tensor:
    """float32 bit patterns of every class an fp16 conversion treats apart: each half's own
    value and the midpoints between neighbouring halves (ties, both parities) with the floats
    one ulp around them, fp16 subnormals and the smallest ones' halves, values that round to
    or past 65504 (overflow to inf), fp32 subnormals, +-0, +-inf, quiet and signaling NaNs
    with many payloads, and 2^20 random bit patterns of every exponent; both signs."""
    halves = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    mids = (halves[:-1].double() + halves[1:].double()) / 2  # exact in float32: one bit more than fp16
    mid_bits = mids.float().view(torch.int32)
    around = (mid_bits[:, None] + torch.arange(-1, 2, dtype=torch.int32)).reshape(-1)
    gen = torch.Generator().manual_seed(0)
    nan_payloads = torch.randint(1, 1 << 23, (4096,), generator=gen, dtype=torch.int32)
    special = torch.tensor([0x7F800000, 0x00000001, 0x007FFFFF, 0x00800000, 0x33000000, 0x33000001, 0x337FFFFF,
                            0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FFFFF, 0x47800000, 0x7F7FFFFF, 0,
                            0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0x7FFFFFFF, 0x7FC02000, 0x7F802000],
                           dtype=torch.int64).to(torch.int32)
    random = torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32)
    bits = torch.cat([halves.view(torch.int32), around, 0x7F800000 | nan_payloads, 0x7FC00000 | nan_payloads,
                      special, random])
    return torch.cat([bits, bits | torch.tensor(-(1 << 31), dtype=torch.int32)]).view(torch.float32)


def _expected_half_bits(x: torch.Tensor) -> torch.Tensor:
    """IEEE 754 float32 -> binary16: torch's round to nearest even, and a NaN as the quiet NaN of
    its sign and payload's top bits (torch itself returns one canonical NaN)."""
    bits = x.view(torch.int32).long()
    nan = x.isnan()
    quiet = ((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)
    return torch.where(nan, quiet, x.to(torch.float16).view(torch.int16).long() & 0xFFFF)


def _expected_float_bits(h: torch.Tensor) -> torch.Tensor:
    """binary16 -> float32: exact, a NaN quieted (bit 22 set), payload kept."""
    x = h.view(torch.float16)
    widened = x.float().view(torch.int32).long() & 0xFFFFFFFF
    hb = h.long() & 0xFFFF
    quiet = ((hb & 0x8000) << 16) | 0x7FC00000 | ((hb & 0x3FF) << 13)
    return torch.where(x.isnan(), quiet, widened)


@pytest.mark.parametrize("flush_denormal", [False, True], ids=["ieee", "flush-denormal"])
def test_fp16_conversions_every_variant_every_half_and_float_class(restore_isa, flush_denormal):
    halves = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    floats = _float_sweep()
    want_f = _expected_float_bits(halves)
    want_h = _expected_half_bits(floats)
    # the sweep reaches what it claims: ties rounding both ways, overflow, subnormal halves, NaN payloads
    assert int((want_h == 0x7C00).sum()) > 0 and int(((want_h & 0x7C00) == 0).sum()) > 1000
    assert len(set((want_h[floats.isnan()] & 0x3FF).tolist())) > 500
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero / denormals-are-zero modes")
    try:
        for isa in _C.supported_isas():
            _C.set_isa(isa)
            got_f = _convert(halves, to_half=False).view(torch.int32).long() & 0xFFFFFFFF
            got_h = _convert(floats, to_half=True).long() & 0xFFFF
            # a length that ends off the vector width: the tails take the scalar conversion
            assert torch.equal(_convert(floats[:1021], to_half=True).long() & 0xFFFF, want_h[:1021]), isa
            assert torch.equal(_convert(halves[:1021], to_half=False).view(torch.int32).long() & 0xFFFFFFFF,
                               want_f[:1021]), isa
            for name, got, want, src in (("f16->f32", got_f, want_f, halves), ("f32->f16", got_h, want_h, floats)):
                bad = (got != want).nonzero().flatten()
                bits = src.view(torch.int16 if src.dtype == torch.int16 else torch.int32)[bad[:4]]
                assert bad.numel() == 0, (f"{isa} {name}: {bad.numel()} differ, e.g. input bits "
                                          f"{[hex(int(b) & 0xFFFFFFFF) for b in bits]}: "
                                          f"{[hex(int(v)) for v in got[bad[:4]]]} instead of "
                                          f"{[hex(int(v)) for v in want[bad[:4]]]}")
    finally:
        if flush_denormal:
            torch.set_flush_denormal(False)
