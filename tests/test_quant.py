"""fusedwd.quant, the 8-bit blockwise state spec: maps, encode rule, error bounds, edge cases.

The bounds come from the code's definition, not from a run: in r = (|x|/absmax)^(1/4)
the encode rounds to the nearest multiple of 1/K (it counts the thresholds
((j - 1/2)/K)^4 that |x|/absmax reaches), so every decoded element is
within a*((r + h)^4 - r^4) of its value, h = 1/(2K) plus float32 slack.
docs/quantization.md has the measured errors on real optimizer states.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from fusedwd.quant import (
    BLOCK_SIZE,
    MIN_ABSMAX,
    QuantizedState,
    code_map,
    dequantize_blockwise,
    quantize_blockwise,
    requantized_step,
    thresholds,
    zero_code,
)

SHAPES = [(1,), (255,), (256,), (4097,), (1024, 33), (6, 42, 123)]
LEVELS = {True: 127, False: 255}


def _roundtrip(x: torch.Tensor, signed: bool, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, absmax = quantize_blockwise(x, signed, **kw)
    return dequantize_blockwise(codes, absmax, x.shape, signed), codes, absmax


def _draw(shape, signed: bool, kind: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if kind == "heavy":  # Student t(2) times a log-normal scale: many decades in a block
        chi = torch.randn((2, *shape), generator=gen).pow(2).sum(0)
        x = x / (chi / 2).sqrt() * torch.exp(2 * torch.randn(shape, generator=gen))
    return x if signed else x * x  # v is a square


# ------------------------------------------------------------------------ maps
@pytest.mark.parametrize("signed", [True, False])
def test_map_is_exactly_the_float32_definition(signed):
    """table = sign * ((k * float32(1/K))^2)^2, float32 products rounded to nearest (numpy float32 here)."""
    K = LEVELS[signed]
    table = code_map(signed)
    assert table.dtype == torch.float32 and table.shape == (256,)
    for b in range(256):
        s = min(b - 127, 127) if signed else b
        t = np.float32(abs(s)) * (np.float32(1) / np.float32(K))
        t2 = np.float32(t * t)
        want = np.float32(t2 * t2) * np.float32(np.sign(s))
        assert table[b].item() == float(want), b
        # within 11 roundings of the exact (s/K)^4: RCP's and t's, times 4 by the power, and the products'
        exact = Fraction(abs(s), K) ** 4
        assert abs(Fraction(abs(table[b].item())) - exact) <= exact * Fraction(11, 2**24)


@pytest.mark.parametrize("signed", [True, False])
def test_map_monotonic_with_exact_ends(signed):
    table = code_map(signed)
    used = table[:255] if signed else table  # signed byte 255 is never written
    assert bool((used[1:] > used[:-1]).all())
    assert table[zero_code(signed)].item() == 0.0
    assert table[254 if signed else 255].item() == 1.0
    if signed:
        assert table[0].item() == -1.0 and table[255].item() == 1.0
        assert torch.equal(table[:127], -table[128:255].flip(0))  # symmetric about byte 127


@pytest.mark.parametrize("signed", [True, False])
def test_encoding_a_code_value_returns_its_byte(signed):
    """Every written byte is a fixed point of decode-then-encode, at several scales."""
    table = code_map(signed)
    used = torch.arange(255 if signed else 256)
    for a in (1.0, 3.7, 2.0**-100, 6.5e30):
        x = table[used].double() * a
        if signed:  # the block's absmax must be a: keep +-a in every block
            x[-1] = a
        codes, absmax = quantize_blockwise(x.float(), signed)
        assert absmax[0].item() == pytest.approx(a, rel=2**-23)
        xh = dequantize_blockwise(codes, absmax, x.shape, signed)
        again, _ = quantize_blockwise(xh, signed)
        assert torch.equal(again, codes)
    codes, _ = quantize_blockwise(table[used], signed)
    assert torch.equal(codes.long(), used)


def _numpy_thresholds(signed: bool) -> np.ndarray:
    """T_j = ((j - 1/2) * float32(1/K))^2^2, j = 1..K, float32 products rounded to nearest (numpy)."""
    K = LEVELS[signed]
    t = (np.arange(1, K + 1, dtype=np.float32) - np.float32(0.5)) * (np.float32(1) / np.float32(K))
    t2 = t * t
    return t2 * t2


def _numpy_encode(x: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """The encode rule of fusedwd.quant's docstring, written again in numpy float32,
    whose * and / are IEEE round-to-nearest-even (finite input, normal absmax)."""
    blocks = np.pad(x, (0, (-len(x)) % 256)).reshape(-1, 256)
    a = np.abs(blocks).max(1)
    inv = np.float32(1) / a
    mag = np.abs(blocks) if signed else np.maximum(blocks, np.float32(0))
    y = np.minimum(mag * inv[:, None], np.float32(1))
    k = np.searchsorted(_numpy_thresholds(signed), y, side="right")  # how many T_j <= y
    if signed:
        codes = np.where(blocks > 0, 127 + k, 127 - k)
    else:
        codes = np.where((blocks > 0) & (k == 0), 1, k)
    return codes.reshape(-1)[: len(x)], a


@pytest.mark.parametrize("signed", [True, False])
def test_encode_is_bitwise_the_ieee_float32_rule(signed):
    """Against an independent float32 implementation, on 2^20 heavy-tailed elements."""
    x = _draw((1 << 20,), signed, "heavy", seed=17)
    codes, absmax = quantize_blockwise(x, signed)
    want, want_absmax = _numpy_encode(x.numpy(), signed)
    assert np.array_equal(codes.numpy().astype(np.int64), want)
    assert np.array_equal(absmax.numpy(), want_absmax)


@pytest.mark.parametrize("signed", [True, False])
def test_thresholds_are_the_decoded_half_codes(signed):
    """T_j: the decode's float32 products of j - 1/2, increasing, within a few ulps of the real
    ((j - 1/2)/K)^4, so the count rounds K*y^(1/4) to nearest; the first is the smallest
    magnitude a nonzero code holds."""
    K = LEVELS[signed]
    thr = thresholds(signed)
    assert thr.dtype == torch.float32 and thr.shape == (K,)
    assert np.array_equal(thr.numpy(), _numpy_thresholds(signed))
    assert bool((thr[1:] > thr[:-1]).all()) and 0 < thr[0].item() and thr[-1].item() < 1
    for j in range(1, K + 1):
        exact = Fraction(2 * j - 1, 2 * K) ** 4
        assert abs(Fraction(thr[j - 1].item()) - exact) <= exact * Fraction(11, 2**24), j
    assert thr[0].item() == pytest.approx((0.5 / K) ** 4, rel=1e-6)


def _around_thresholds(signed: bool, ulps: int) -> torch.Tensor:
    """Every float32 within ``ulps`` of each threshold."""
    bits = thresholds(signed).view(torch.int32)
    return (bits[:, None] + torch.arange(-ulps, ulps + 1, dtype=torch.int32)).reshape(-1).view(torch.float32)


def _led_by_one(values: torch.Tensor) -> torch.Tensor:
    """``values`` in blocks of 255, each led by 1.0: the block's absmax is 1, so y is x itself."""
    blocks = torch.nn.functional.pad(values, (0, (-values.numel()) % 255)).view(-1, 255)
    return torch.cat([torch.ones(len(blocks), 1), blocks], 1).reshape(-1)


def _unlead(codes: torch.Tensor, n: int) -> torch.Tensor:
    return codes.view(-1, 256)[:, 1:].reshape(-1)[:n]


@pytest.mark.parametrize("signed", [True, False])
def test_codes_switch_exactly_at_the_thresholds(signed):
    """The float32 just below T_j takes code j - 1, T_j itself code j (ties go up), for every j
    (below T_1 the unsigned code's zero rule gives a positive value code 1)."""
    thr = thresholds(signed)
    below = (thr.view(torch.int32) - 1).view(torch.float32)
    values = torch.stack([below, thr], 1).reshape(-1)
    codes, absmax = quantize_blockwise(_led_by_one(values), signed)
    assert absmax.tolist() == [1.0] * len(absmax)
    k = _unlead(codes, values.numel()).long() - (127 if signed else 0)
    K = LEVELS[signed]
    below_codes = list(range(K)) if signed else [1] + list(range(1, K))
    assert k[0::2].tolist() == below_codes and k[1::2].tolist() == list(range(1, K + 1))


@pytest.mark.parametrize("signed", [True, False])
def test_the_square_root_encode_differs_only_next_to_a_threshold(signed):
    """The definition before issue 17, rint(sqrt(sqrt(y)) * K) with correctly rounded roots, gives
    the same code except for y within a few ulps of a threshold, and then the neighbouring one:
    these are the only bytes the change of definition moved. Of all 2^30 float32 y in [0, 1],
    271 (signed) and 799 (unsigned, with the zero rule) differ, every one within 9 ulps of a threshold (counted over
    all of them once in C++; docs/quantization.md): the window below holds them all. Neither
    definition is the exactly rounded one at every such y (both put their boundaries a few ulps
    from the real ((j - 1/2)/K)^4)."""
    x = _around_thresholds(signed, 64)
    codes, _ = quantize_blockwise(_led_by_one(x), signed)
    y = x.double()
    old = torch.round(_f32(_f32_sqrt(_f32_sqrt(y)) * LEVELS[signed])).long()
    if not signed:
        old = old.clamp(min=1)  # the zero rule, under either definition (every x here is positive)
    new = _unlead(codes, x.numel()).long() - (127 if signed else 0)
    differ = (old != new).nonzero().flatten()
    assert differ.numel() == {True: 271, False: 799}[signed]
    assert int((old - new).abs().max()) == 1
    thr = thresholds(signed).view(torch.int32).long()
    dist = (x[differ].view(torch.int32).long()[:, None] - thr[None, :]).abs().min(1).values
    assert int(dist.max()) <= 9, dist.max()


def _f32(y: torch.Tensor) -> torch.Tensor:
    return y.to(torch.float32).to(torch.float64)


def _f32_sqrt(y: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root of float32 values held in float64."""
    return _f32(torch.sqrt(y))


# ---------------------------------------------------------------- error bounds
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("shape", SHAPES)
def test_roundtrip_within_the_per_element_bound(signed, kind, shape):
    """Against float64: |x_hat - x| <= a*((r + h)^4 - r^4) per element, r = (|x|/a)^(1/4)."""
    x = _draw(shape, signed, kind)
    xh, codes, absmax = _roundtrip(x, signed)
    assert xh.shape == x.shape and xh.dtype == torch.float32 and codes.dtype == torch.uint8
    n = x.numel()
    assert absmax.shape == (-(-n // BLOCK_SIZE),) and codes.shape == (n,)
    a = absmax.double().repeat_interleave(BLOCK_SIZE)[:n]
    x64, xh64 = x.reshape(-1).double(), xh.reshape(-1).double()
    r = (x64.abs() / a) ** 0.25
    h = 0.5 / LEVELS[signed] + 2**-21  # half a step in r, plus the float32 roundings of the encode
    bound = a * ((r + h) ** 4 - r**4) + a * 2**-22  # + the decode's table and product roundings
    assert bool(((xh64 - x64).abs() <= bound).all())
    assert bool((torch.sign(xh64) * torch.sign(x64) >= 0).all())  # never the wrong sign
    # the absmax element of each block decodes exactly
    blocks = torch.nn.functional.pad(x.reshape(-1), (0, (-n) % BLOCK_SIZE)).view(-1, BLOCK_SIZE)
    idx = blocks.abs().argmax(1) + torch.arange(len(blocks)) * BLOCK_SIZE
    assert torch.equal(xh.reshape(-1)[idx].abs(), absmax)


@pytest.mark.parametrize("signed", [True, False])
def test_block_relative_error_on_gaussian_blocks(signed):
    """Per-block ||x_hat - x|| / ||x|| vs float64; docs/quantization.md quotes the measured values."""
    x = _draw((256 * 400,), signed, "normal", seed=3)
    xh, _, _ = _roundtrip(x, signed)
    err = (xh.double() - x.double()).view(-1, 256).norm(dim=1) / x.double().view(-1, 256).norm(dim=1)
    limit = 0.016 if signed else 0.009  # measured: 0.0127 (m, normal) / 0.0068 (v = normal^2) at the worst block
    assert float(err.max()) < limit
    assert float(err.median()) > limit / 4  # the measurement is of a lossy code, not of a copy


# ------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("signed", [True, False])
def test_zero_and_tiny_blocks_are_stored_as_zero(signed):
    x = torch.rand(3 * 256) + 0.5
    x[:256] = 0.0  # all zero
    x[256:512] = torch.rand(256) * 2.0**-127  # below the smallest normal absmax: flushed
    xh, codes, absmax = _roundtrip(x, signed)
    assert absmax[0].item() == 0.0 and absmax[1].item() == 0.0 and absmax[2].item() > 0
    assert bool((codes[:512] == zero_code(signed)).all())
    assert bool((xh[:512] == 0).all())
    assert bool((xh[512:] > 0).all())


@pytest.mark.parametrize("signed", [True, False])
def test_power_of_two_scaling_does_not_change_the_codes(signed):
    """Tiny (but normal) states keep their relative precision: the encode is scale-free."""
    x = _draw((4097,), signed, "heavy", seed=5)
    ref, ref_absmax = quantize_blockwise(x, signed)
    for e in (-100, -60, 60):
        codes, absmax = quantize_blockwise(x * 2.0**e, signed)
        assert torch.equal(codes, ref)
        assert torch.equal(absmax, ref_absmax * 2.0**e)
    assert float(MIN_ABSMAX) == 2.0**-126


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_nonfinite_element_poisons_its_block_only(signed, bad):
    x = _draw((3 * 256 + 10,), signed, "normal", seed=7)
    x[300] = bad
    xh, codes, absmax = _roundtrip(x, signed)
    assert absmax[1].isnan() and bool(xh[256:512].isnan().all())
    assert bool((codes[256:512] == zero_code(signed)).all())
    keep = torch.cat([torch.arange(256), torch.arange(512, x.numel())])
    assert bool(torch.isfinite(xh[keep]).all()) and bool(torch.isfinite(absmax[[0, 2, 3]]).all())


def test_signed_code_is_odd_and_zero_is_unsigned():
    x = _draw((1000,), True, "heavy", seed=11)
    codes, absmax = quantize_blockwise(x, True)
    neg, absmax_neg = quantize_blockwise(-x, True)
    assert torch.equal(neg.long(), 254 - codes.long()) and torch.equal(absmax, absmax_neg)
    z, _ = quantize_blockwise(torch.tensor([-0.0, 0.0, 1.0]), True)
    assert z.tolist() == [127, 127, 254]


def test_unsigned_code_drops_negative_values_to_zero():
    codes, _ = quantize_blockwise(torch.tensor([-1.0, 2.0, -0.0, 1e-30]), False)
    assert codes.tolist() == [0, 255, 0, 1]


@pytest.mark.parametrize("signed", [True, False])
def test_partial_last_block_is_its_own_block(signed):
    x = _draw((2 * 256 + 37,), signed, "heavy", seed=13)
    codes, absmax = quantize_blockwise(x, signed)
    assert absmax.shape == (3,)
    assert absmax[2].item() == x[512:].abs().max().item()
    tail, tail_absmax = quantize_blockwise(x[512:], signed)
    assert torch.equal(codes[512:], tail) and torch.equal(absmax[2:], tail_absmax)
    head, _ = quantize_blockwise(x[:512], signed)
    assert torch.equal(codes[:512], head)


def test_empty_tensor():
    codes, absmax = quantize_blockwise(torch.empty(0), True)
    assert codes.numel() == 0 and absmax.numel() == 0
    assert dequantize_blockwise(codes, absmax, (0, 3), True).shape == (0, 3)


# ------------------------------------------------------------- the v -> 0 remedy
def test_positive_v_never_decodes_to_zero():
    v = torch.full((256,), 1e-14)
    v[0] = 1.0  # v/absmax = 1e-14: below half the smallest code, (0.5/255)^4 = 1.5e-11
    plain, _, _ = _roundtrip(v, False, keep_positive=False)
    kept, codes, _ = _roundtrip(v, False)
    assert bool((plain[1:] == 0).all())
    assert bool((codes[1:] == 1).all()) and bool((kept[1:] >= v[1:]).all())  # rounded up: a safe denominator


def _adamw(p, g, t, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=1e-2):
    def update(m, v):
        p.mul_(1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p.sub_(lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + eps))
        return m, v
    return update


@pytest.mark.parametrize("keep_positive", [True, False])
def test_no_m_over_eps_blowup_when_a_gradient_stops(keep_positive, monkeypatch):
    """A block where one element's v is 9e-12 of the block's largest: its gradient then
    stops (g = 0, a sparse feature). Round-to-nearest decodes its v as 0 and the step
    becomes lr * m/eps (about 3e3 lr here); the zero rule keeps it below the fp32 step."""
    import fusedwd.quant as quant

    if not keep_positive:  # the same step with plain rounding: shows the test can fail
        real = quant.quantize_blockwise
        monkeypatch.setattr(quant, "quantize_blockwise", lambda x, signed, **kw: real(x, signed, keep_positive=False))
    n = 512
    m = torch.full((n,), 3e-5)
    v = torch.full((n,), 9e-10)  # |m|/sqrt(v) = 1: an ordinary Adam ratio
    m[::256], v[::256] = 10.0, 100.0  # each block's large element: v/absmax = 9e-12 for the others
    states = [QuantizedState.quantize(m, True), QuantizedState.quantize(v, False)]
    p = torch.zeros(n)
    g = torch.zeros(n)
    g[::256] = 1.0  # only the large elements see a gradient
    t = 100
    states = requantized_step(_adamw(p, g, t), *states)
    step = p.abs()[1:256].max().item() / 1e-3  # in units of lr
    if keep_positive:
        assert step < 2.0
    else:
        assert step > 1e3


def test_requantized_adamw_follows_fp32_adamw():
    """40 steps of AdamW with both moments re-encoded every step, against fp32 AdamW:
    parameters within 4% of their displacement (measured: 2.3%)."""
    gen = torch.Generator().manual_seed(0)
    shape = (64, 80)
    p0 = torch.randn(shape, generator=gen)
    target = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))
    p8, p32 = p0.clone(), p0.clone()
    states = [QuantizedState.zeros(shape, True), QuantizedState.zeros(shape, False)]
    m32, v32 = torch.zeros(shape), torch.zeros(shape)
    for t in range(1, 41):
        noise = torch.randn(shape, generator=gen) * 0.3
        g8, g32 = (p8 - target) + noise, (p32 - target) + noise
        states = requantized_step(_adamw(p8, g8, t, lr=1e-2), *states)
        m32, v32 = _adamw(p32, g32, t, lr=1e-2)(m32, v32)
    rel = ((p8 - p32).norm() / (p32 - p0).norm()).item()
    assert rel < 0.04
    assert rel > 0  # the states are really quantized
    assert states[0].codes.dtype == torch.uint8 and states[1].absmax.dtype == torch.float32


def test_requantized_step_checks_the_update():
    s = QuantizedState.zeros((10,), True)
    with pytest.raises(ValueError):
        requantized_step(lambda m: (m, m), s)
