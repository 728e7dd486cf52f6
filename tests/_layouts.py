"""The kernels' storage layouts and a bucket of segments stepped through its table.

Shared by tests/test_triton.py and tests/test_cuda_ext.py: each steps a
``LayoutBucket`` with its backend and an identical copy with ``fusedwd._C``,
then compares every buffer (parameters, masters, states, step counts) bit for
bit. The bucket is built at the kernel level, segment table and all, so the
backends are compared on exactly the rows, control blocks and seeds the CPU
kernel sees.
"""

from __future__ import annotations

import torch

from fusedwd import _buckets as B, quant

F32, F16, BF16, F64, U8 = torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8

# (param dtype, state dtype, master, stochastic rounding): every layout of
# csrc/include/fusedwd/precision.h layout_supported.
LAYOUTS = [
    (F32, F32, False, False), (F16, F16, False, False), (BF16, BF16, False, False), (F64, F64, False, False),
    (F32, BF16, False, False), (F32, F16, False, False), (BF16, F32, False, False), (F16, F32, False, False),
    (BF16, F32, True, False), (BF16, BF16, True, False), (BF16, F16, True, False),
    (F16, F32, True, False), (F16, BF16, True, False), (F16, F16, True, False),
    (BF16, BF16, False, True), (BF16, F32, False, True),
]
# 8-bit blockwise states (state dtype torch.uint8: codes, with fp32 block absmax at SEG_A*):
# every layout of precision.h q8_layout_supported.
Q8_LAYOUTS = [
    (F32, U8, False, False), (BF16, U8, True, False), (F16, U8, True, False), (BF16, U8, False, True),
    (BF16, U8, False, False), (F16, U8, False, False),
]
_SHORT = {F32: "f32", F16: "f16", BF16: "bf16", F64: "f64", U8: "q8"}
LAYOUT_IDS = [f"{_SHORT[p]}-{_SHORT[s]}" + ("-master" if m else "") + ("-sr" if sr else "")
              for p, s, m, sr in LAYOUTS]
Q8_LAYOUT_IDS = [f"{_SHORT[p]}-{_SHORT[s]}" + ("-master" if m else "") + ("-sr" if sr else "")
                 for p, s, m, sr in Q8_LAYOUTS]

# every rule's switch combinations, as the launchers take them
SWITCHES = {
    "adamw": [(False,), (True,)],  # amsgrad
    "sgdw": [(False, False), (True, False), (True, True)],  # has_momentum, nesterov
    "rmspropw": [(False, False), (False, True), (True, False), (True, True)],  # centered, has_momentum
}
RULE_CASES = [(rule, sw) for rule, sws in SWITCHES.items() for sw in sws]
RULE_CASE_IDS = [f"{rule}-" + "".join("1" if s else "0" for s in sw) for rule, sw in RULE_CASES]
# the switches that use every state column: one case per rule where the layout is what varies
RICHEST = [("adamw", (True,)), ("sgdw", (True, True)), ("rmspropw", (True, True))]

# Two hyperparameter rows per rule, non-default numbers: decoupled decay, then
# maximize with coupled L2 (docs/design.md#hyperparameter-table).
HYPER = {
    "adamw": [[3e-3, 0.8, 0.95, 1e-6, 0.9997, 0.0, 1.0], [1e-2, 0.9, 0.999, 1e-8, 1.0, 0.05, -1.0]],
    "sgdw": [[0.05, 0.9, 0.1, 0.9995, 0.0, 1.0], [0.02, 0.8, 0.0, 1.0, 0.03, -1.0]],
    "rmspropw": [[1e-3, 0.9, 1e-6, 0.5, 0.9999, 0.0, 1.0], [5e-3, 0.99, 1e-8, 0.9, 1.0, 0.02, -1.0]],
}


def used_states(rule: str, switches: tuple) -> list[int]:
    """The state columns the rule reads and writes under these switches."""
    if rule == "adamw":
        return [B.SEG_S0, B.SEG_S1] + ([B.SEG_S2] if switches[0] else [])
    if rule == "sgdw":
        return [B.SEG_S0] if switches[0] else []
    return [B.SEG_S0] + ([B.SEG_S1] if switches[0] else []) + ([B.SEG_S2] if switches[1] else [])


def signed_state(rule: str, column: int) -> bool:
    """Whether a state column takes the signed 8-bit code (m, momentum, grad_avg) or the unsigned one (v)."""
    if rule == "adamw":
        return column == B.SEG_S0
    return rule == "sgdw" or column != B.SEG_S0


def control(inv_scale: float = 1.0, found_inf: float = 0.0, clip: float = 1.0, device="cpu") -> torch.Tensor:
    """A float32 control block (csrc/include/fusedwd/layout.h Ctl)."""
    ctl = torch.empty(B.CTL_SIZE, dtype=torch.float32)
    ctl[B.CTL_INV_SCALE], ctl[B.CTL_FOUND_INF], ctl[B.CTL_CLIP] = inv_scale, found_inf, clip
    return ctl.to(device)


def _bits(x: torch.Tensor, canonical_nan: bool = False) -> torch.Tensor:
    # compare bit patterns: NaN payloads included (unless canonical_nan), -0.0 != 0.0
    x = x.detach().cpu().contiguous()
    if canonical_nan and x.is_floating_point():
        x = torch.where(torch.isnan(x), torch.full_like(x, float("nan")), x)
    return x.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[x.element_size()])


class LayoutBucket:
    """Segments of one rule and layout: parameters, gradients, used states, fp32 masters and
    float32 step counts, with random values (second moments positive), random salts, and
    per-segment steps starting at different counts (0 included: SGDW's first step).

    ``misaligned`` segments have every buffer one element past a 16-byte boundary.

    With state dtype torch.uint8 the states are 8-bit (``quantized``): random codes and random
    positive block absmax (fp32, one per 256 elements of each tensor, at SEG_A*). ``tiny_block``
    (segment, block): that block's absmax starts subnormal and its gradients are always 0, so its
    new states fall below the smallest normal (stored as absmax 0, zero codes); ``nan_grad``
    (segment, element, step): a NaN gradient there at that step, which poisons its blocks
    (absmax NaN, zero codes) and their weights from then on.
    """

    def __init__(self, rule: str, switches: tuple, layout: tuple, sizes: list[int], device="cpu",
                 misaligned: frozenset = frozenset(), seed: int = 0, *, tiny_block: tuple | None = None,
                 nan_grad: tuple | None = None):
        self.rule, self.switches, self.layout = rule, tuple(switches), layout
        self.dtype, self.state_dtype, self.master, self.stochastic = layout
        self.device = torch.device(device)
        self.sizes = list(sizes)
        self.misaligned = misaligned
        self.quantized = self.state_dtype == U8
        self.tiny_block, self.nan_grad = tiny_block, nan_grad
        self.states = used_states(rule, self.switches)
        gen = torch.Generator().manual_seed(seed)
        self.salts = [int(x) for x in torch.randint(-2**62, 2**62, (len(sizes),), generator=gen)]
        self.steps = torch.tensor([float((3 * i) % 5) for i in range(len(sizes))], dtype=torch.float32)
        self.hyper = torch.tensor(HYPER[rule], dtype=torch.float64)
        self.params, self.grads, self.masters = [], [], []
        self.state_buffers: dict[int, list[torch.Tensor]] = {c: [] for c in self.states}
        self.absmax: dict[int, list[torch.Tensor]] = {c: [] for c in self.states} if self.quantized else {}
        for i, n in enumerate(self.sizes):
            value = torch.randn(n, generator=gen)
            self.params.append(self._buffer(i, value, self.dtype))
            self.masters.append(self._buffer(i, value, F32) if self.master else None)
            self.grads.append(self._buffer(i, torch.randn(n, generator=gen), self.dtype))
            for c in self.states:
                r = torch.randn(n, generator=gen)
                # exp_avg_sq / max_exp_avg_sq and square_avg positive, grad_avg small
                positive = (rule == "adamw" and c != B.SEG_S0) or (rule == "rmspropw" and c == B.SEG_S0)
                small = rule == "rmspropw" and c == B.SEG_S1
                r = r.abs() + 1.0 if positive else (0.1 * r if small else r)
                if self.quantized:
                    # the same values, 8-bit: codes and block absmax from the spec's encoder
                    codes, scales = quant.quantize_blockwise(r, signed_state(rule, c))
                    if tiny_block is not None and tiny_block[0] == i:
                        scales[tiny_block[1]] = 1e-39  # subnormal
                    self.state_buffers[c].append(self._buffer(i, codes, U8))
                    self.absmax[c].append(scales.to(self.device))
                else:
                    self.state_buffers[c].append(self._buffer(i, r, self.state_dtype))
        self.steps = self.steps.to(self.device)

    def _buffer(self, i: int, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # always new storage: a copy must never alias the bucket it copies
        if i not in self.misaligned:
            return value.to(device=self.device, dtype=dtype, copy=True)
        base = torch.empty(value.numel() + 1, dtype=dtype, device=self.device)
        base[1:] = value.to(dtype)
        return base[1:]

    def copy(self, device="cpu") -> "LayoutBucket":
        """The same values in new buffers on ``device`` (misaligned alike)."""
        other = object.__new__(LayoutBucket)
        other.__dict__.update(self.__dict__)
        other.device = torch.device(device)

        def same(i, t):
            return None if t is None else other._buffer(i, t.detach().cpu(), t.dtype)

        other.params = [same(i, t) for i, t in enumerate(self.params)]
        other.masters = [same(i, t) for i, t in enumerate(self.masters)]
        other.grads = [same(i, t) for i, t in enumerate(self.grads)]
        other.state_buffers = {c: [same(i, t) for i, t in enumerate(ts)] for c, ts in self.state_buffers.items()}
        other.absmax = {c: [t.detach().to(other.device, copy=True) for t in ts] for c, ts in self.absmax.items()}
        other.steps = self.steps.detach().to(other.device, copy=True)
        return other

    def new_grads(self, t: int) -> None:
        """Fresh gradients for step t, the same in every copy."""
        gen = torch.Generator().manual_seed(1000 + t)
        for i, g in enumerate(self.grads):
            g.copy_(torch.randn(g.shape, generator=gen).to(g.dtype))
        if self.tiny_block is not None:
            seg, block = self.tiny_block
            self.grads[seg][256 * block:256 * (block + 1)] = 0.0
        if self.nan_grad is not None and self.nan_grad[2] == t:
            self.grads[self.nan_grad[0]][self.nan_grad[1]] = float("nan")

    def table(self) -> torch.Tensor:
        """The int64 segment table (docs/design.md#segment-table) of every segment, on the host."""
        rows = torch.zeros(len(self.sizes), B.SEG_COLS, dtype=torch.int64)
        for i, n in enumerate(self.sizes):
            rows[i, B.SEG_P] = self.params[i].data_ptr()
            rows[i, B.SEG_G] = self.grads[i].data_ptr()
            for c in self.states:
                rows[i, c] = self.state_buffers[c][i].data_ptr()
            rows[i, B.SEG_STEP] = self.steps.data_ptr() + i * self.steps.element_size()
            rows[i, B.SEG_N] = n
            rows[i, B.SEG_HP] = i % 2
            rows[i, B.SEG_INDEX] = i
            rows[i, B.SEG_MASTER] = self.masters[i].data_ptr() if self.master else 0
            rows[i, B.SEG_SALT] = self.salts[i]
            for c in self.absmax:
                rows[i, B.ABSMAX_COLUMNS[c - B.SEG_S0]] = self.absmax[c][i].data_ptr()
        return rows

    def buffers(self) -> list[tuple[str, torch.Tensor]]:
        """Every buffer a step may write, named."""
        out = [("steps", self.steps)]
        for i in range(len(self.sizes)):
            out.append((f"param {i}", self.params[i]))
            if self.master:
                out.append((f"master {i}", self.masters[i]))
            out += [(f"state column {c} of {i}", self.state_buffers[c][i]) for c in self.states]
            out += [(f"absmax column {c} of {i}", self.absmax[c][i]) for c in self.absmax]
        return out

    def snapshot(self) -> list[torch.Tensor]:
        return [_bits(x).clone() for _, x in self.buffers()]

    def step_cpu(self, ctl: torch.Tensor | None = None, seed: int = 0) -> None:
        """One step with fusedwd._C, the oracle (the bucket must live on the host)."""
        from fusedwd import _C

        table = self.table()
        states = dict(quantized=True) if self.quantized else dict(state_dtype=dtype_code(self.state_dtype))
        getattr(_C, f"{self.rule}_step")(
            table.data_ptr(), len(self.sizes), self.hyper.data_ptr(), dtype_code(self.dtype), *self.switches, 1,
            master=self.master, stochastic_rounding=self.stochastic, ctl=0 if ctl is None else ctl.data_ptr(),
            seed=seed, **states)


def dtype_code(dtype: torch.dtype) -> int:
    from fusedwd import _C

    return _C.DTYPES[str(dtype).removeprefix("torch.")]


def assert_same_bits(a: LayoutBucket, b: LayoutBucket, what: str) -> None:
    for (name, x), (_, y) in zip(a.buffers(), b.buffers()):
        # A GPU's arithmetic returns its canonical NaN where x86 propagates an operand's payload
        # (or makes its negative default NaN): on a GPU, NaN bits are compared as "a NaN"
        # (docs/backends.md, "NaN bit patterns"); the host emulation and the interpreter keep x86's.
        gpu = "cuda" in (x.device.type, y.device.type)
        bx, by = _bits(x, gpu), _bits(y, gpu)
        if not torch.equal(bx, by):
            differ = (bx != by).nonzero().flatten()
            raise AssertionError(f"{what}: {name} differs in {differ.numel()} of {bx.numel()} elements, first at "
                                 f"{differ[:5].tolist()}: {x.detach().cpu().flatten()[differ[:5]].tolist()} vs "
                                 f"{y.detach().cpu().flatten()[differ[:5]].tolist()}")


def assert_unchanged(bucket: LayoutBucket, snapshot: list[torch.Tensor], what: str) -> None:
    for (name, x), before in zip(bucket.buffers(), snapshot):
        assert torch.equal(_bits(x), before), f"{what}: {name} was written"


# The control blocks of successive steps (1/grad_scale, found_inf, clip) or None (no
# block): no AMP first, then unscaling with clipping, a skipped step, unscaling alone.
CONTROLS = [None, (1 / 1024, 0.0, 0.37), (0.5, 1.0, 0.9), (0.3, 0.0, 1.0)]
SEED = 2**64 - 12345  # above 2^63: the seed's high half matters, and it is not an int64


def assert_close_buckets(a: LayoutBucket, b: LayoutBucket, what: str) -> None:
    """Within the tolerance table (tests/_tolerances.py); step counts exactly."""
    from _helpers import assert_close

    for (name, x), (_, y) in zip(a.buffers(), b.buffers()):
        if name == "steps":
            assert torch.equal(x.cpu(), y.cpu()), f"{what}: step counts differ"
        else:
            assert_close(x.cpu(), y.cpu(), f"{what}: {name}", scale=1.0)


def compare_with_cpu(bucket: LayoutBucket, step, seed: int = SEED, exact: bool = True) -> None:
    """Step ``bucket`` with ``step(ctl, seed)`` (ctl None or a control block on the bucket's device) and a
    host copy with fusedwd._C, through CONTROLS; every buffer bitwise equal (``exact``) or within the
    tolerance table after every step, and a found_inf step writes nothing (step counts included)."""
    ref = bucket.copy("cpu")
    assert not ({x.data_ptr() for _, x in ref.buffers() if x.numel()}
                & {x.data_ptr() for _, x in bucket.buffers() if x.numel()}), "the copy aliases the bucket"
    assert_same_bits(bucket, ref, "before the first step")
    for t, c in enumerate(CONTROLS):
        bucket.new_grads(t)
        ref.new_grads(t)
        before = bucket.snapshot()
        ref.step_cpu(None if c is None else control(*c), seed)
        step(None if c is None else control(*c, device=bucket.device), seed)
        (assert_same_bits if exact else assert_close_buckets)(bucket, ref, f"step {t} (control {c})")
        if c is not None and c[1]:
            assert_unchanged(bucket, before, f"step {t}, found_inf")
