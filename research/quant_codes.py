"""Choosing the 8-bit code of the blockwise optimizer states (issue 6), by measurement.

    python -m research.quant_codes                      # every section (about 10 minutes on 2 cores)
    python -m research.quant_codes --only speed         # one section: errors,zeros,drift,train,speed
    python -m research.quant_codes --quick              # a smoke run, not a measurement

Writes /tmp/quant_codes.json (--out); docs/quantization.md quotes the tables.

Every candidate quantizes blocks of 256 elements of the flattened state with
one fp32 absmax per block: ``xn = x * (1/absmax)``, clamped to [-1, 1], then a
256-entry code. Signed codes for m, unsigned for v (or for sqrt(v)).

- ``bnb``:  bitsandbytes' dynamic maps (create_dynamic_map's formula, 7 decades
            of exponent with a shrinking linear fraction), nearest code by
            binary search.
- ``pow2``: a power-law code, |value| = (k/K)^2, K = 127 (signed) or 255
            (unsigned): encode k = rint(K*sqrt(|xn|)), decode by squaring.
- ``pow4``: the same with the fourth power: k = the number of fusedwd.quant's
            thresholds ((j - 1/2)/K)^4 that |xn| reaches, the spec's exact
            definition since issue 17 (``--pow4-encode sqrt``: by two square
            roots, rint(K*sqrt(sqrt(|xn|))), the definition before; the two
            differ only next to a threshold, by one code).
- ``e4m3``, ``e4m4``, ``e5m3``: fp8-style codes on [0, 1] (exponent bias such
            that 1.0 is the top code; subnormals below), encoded by rounding the
            fp32 bit pattern to M mantissa bits (round half to even).

For v the same unsigned codes quantize either v itself (``v:...``) or sqrt(v)
(``sqrtv:...``, decoded by squaring); ``+nz`` is the rule "a positive value
never encodes to the zero code" (it takes the smallest positive code instead).

Sections:
  errors  quantize/dequantize error vs float64 on moments of real AdamW runs
          (digits MLP, a sparse embedding model) and on heavy-tailed synthetic
          moments: per-block relative L2 error of m and v, and the error of the
          Adam direction m/(sqrt(v)+eps) that the step actually uses.
  zeros   8-bit AdamW simulated for 300 steps: how often a positive v decodes to
          0, and how many elements then step by more than the fp32 bound of
          |m_hat|/sqrt(v_hat) (about 7.3 for betas 0.9, 0.999).
  drift   200 steps of 8-bit AdamW against fp32 AdamW from the same start and
          minibatches: parameter relative error.
  train   digits to convergence (3 seeds), final training loss and test accuracy.
  speed   a C++ microbenchmark of the encode (absmax reduction then encode, per
          256-block), ns/element beside a plain fp32 copy, compiled with
          g++ -O3 -fno-math-errno -ffp-contract=off -mavx2 -mfma in /tmp.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import fusedwd

BLOCK = 256
BETAS = (0.9, 0.999)
EPS = 1e-8
LR = 1e-3
WD = 1e-2
MIN_NUMEL = 4096  # smaller tensors keep fp32 states, as the peers do
RESULTS = os.path.join(tempfile.gettempdir(), "quant_codes.json")  # --out to keep it elsewhere


# ----------------------------------------------------------------------------- codes
@dataclass(frozen=True)
class Code:
    """A 256-entry code: ``table[byte]`` is the decoded value of a normalized
    element; ``encode(xn)`` maps normalized fp32 values in [-1, 1] (or [0, 1]) to bytes."""

    name: str
    signed: bool
    table: torch.Tensor  # float32 (256,)
    encode: Callable[[torch.Tensor], torch.Tensor]  # -> int64 bytes


def _nearest_encoder(table: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Nearest entry of a sorted table, ties to the lower one (bitsandbytes' rule)."""
    t64 = table.double()

    def encode(xn: torch.Tensor) -> torch.Tensor:
        hi = torch.searchsorted(t64, xn.double()).clamp(1, len(t64) - 1)
        lo = hi - 1
        x = xn.double()
        return torch.where((x - t64[lo]) <= (t64[hi] - x), lo, hi)

    return encode


def bnb_table(signed: bool) -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8),
    sorted: signed: -0.99297.. at 0, 0 at 127, 1.0 at 255; unsigned: 0 at 0, 1.0 at 255."""
    data = []
    for i in range(7):  # decade 10^(i-6): 2^i (signed) or 2^(i+1) (unsigned) linear steps over [0.1, 1]
        n = 2**i + 1 if signed else 2 ** (i + 1) + 1
        b = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = ((b[:-1] + b[1:]) / 2.0) * 10.0 ** (i - 6)
        data += means.tolist()
        if signed:
            data += (-means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


def bnb_code(signed: bool) -> Code:
    t = bnb_table(signed)
    return Code("bnb", signed, t, _nearest_encoder(t))


# How pow4 encodes: "thresholds" (fusedwd.quant's definition) or "sqrt" (two square roots, the
# definition before issue 17); --pow4-encode sets it, to show that the tables do not move.
POW4_ENCODE = "thresholds"


def pow_code(signed: bool, power: int) -> Code:
    """|value| = (k/K)^power: encode k = rint(K * |xn|^(1/power)) by square roots (pow4: by
    counting fusedwd.quant's thresholds, unless POW4_ENCODE is "sqrt")."""
    K = 127 if signed else 255
    k = torch.arange(256, dtype=torch.float64)
    if signed:  # byte = 127 + sign*k; byte 255 is never produced and decodes to 1.0
        s = (k - 127).clamp(max=127)
        table = (torch.sign(s) * (s.abs() / K) ** power).float()
    else:
        table = ((k / K) ** power).float()

    def encode(xn: torch.Tensor) -> torch.Tensor:
        if power == 4 and POW4_ENCODE == "thresholds":
            from fusedwd.quant import thresholds

            q = torch.searchsorted(thresholds(signed), xn.abs().float().contiguous(), right=True)
            return 127 + torch.sign(xn).long() * q if signed else q
        r = xn.abs().sqrt()
        if power == 4:
            r = r.sqrt()
        q = torch.round(r * K).long()  # torch.round: half to even
        return 127 + torch.sign(xn).long() * q if signed else q

    return Code(f"pow{power}", signed, table, encode)


def fp8_code(signed: bool, E: int, M: int) -> Code:
    """sign (signed codes) + E exponent bits + M mantissa bits on [0, 1], bias B = 2^E - 1
    (1.0 = exponent field B, mantissa 0, the top code), subnormals below 2^(1-B).
    Magnitude index k = e << M | f; signed byte = 127 + sign*k, unsigned byte = k."""
    B = 2**E - 1
    kmax = B << M  # 1.0
    k = torch.arange(kmax + 1, dtype=torch.float64)
    e, f = torch.div(k, 2**M, rounding_mode="floor"), k % 2**M
    mag = torch.where(e == 0, k * 2.0 ** (1 - B - M), 2.0 ** (e - B) * (1 + f / 2**M))
    if signed:
        assert kmax <= 127
        b = torch.arange(256)
        s = (b - 127).clamp(-kmax, kmax)
        table = (torch.sign(s) * mag[s.abs()]).float()
    else:
        table = torch.cat([mag, mag[-1].expand(255 - kmax)]).float()

    def encode(xn: torch.Tensor) -> torch.Tensor:
        y = xn.abs().float()
        bits = y.view(torch.int32).long()
        sh = 23 - M
        r = (bits + (1 << (sh - 1)) - 1 + ((bits >> sh) & 1)) >> sh  # round half to even
        normal = r - ((127 - B) << M)
        sub = torch.round(y.double() * 2.0 ** (B - 1 + M)).long()  # exact scaling, half to even
        q = torch.where(y < 2.0 ** (1 - B), sub, normal).clamp(0, kmax)
        return 127 + torch.sign(xn).long() * q if signed else q

    return Code(f"e{E}m{M}", signed, table, encode)


def signed_codes() -> list[Code]:
    return [bnb_code(True), pow_code(True, 2), pow_code(True, 4), fp8_code(True, 4, 3)]


def unsigned_codes() -> list[Code]:
    return [bnb_code(False), pow_code(False, 2), fp8_code(False, 4, 4), fp8_code(False, 5, 3)]


# ----------------------------------------------------------------- blockwise quantizer
def quantize(x: torch.Tensor, code: Code, nonzero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of 256 of the flattened fp32 tensor (last block partial): (bytes, absmax)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)
    absmax = blocks.abs().amax(1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    xn = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    q = code.encode(xn)
    if nonzero:  # a positive value never takes the zero code
        zero = 127 if code.signed else 0
        q = torch.where((q == zero) & (blocks > 0), torch.full_like(q, zero + 1), q)
    return q.reshape(-1)[:n].to(torch.uint8), absmax


def dequantize(q: torch.Tensor, absmax: torch.Tensor, code: Code, shape) -> torch.Tensor:
    n = q.numel()
    vals = code.table[q.long()]
    scale = absmax.repeat_interleave(BLOCK)[:n]
    return (vals * scale).reshape(shape)


@dataclass(frozen=True)
class VOption:
    """How v is stored: a code applied to v or to sqrt(v), with or without the nonzero rule."""

    code: Code
    sqrt: bool
    nonzero: bool = False

    @property
    def name(self) -> str:
        return ("sqrtv:" if self.sqrt else "v:") + self.code.name + ("+nz" if self.nonzero else "")

    def roundtrip(self, v: torch.Tensor) -> torch.Tensor:
        w = v.sqrt() if self.sqrt else v
        q, a = quantize(w, self.code, self.nonzero)
        w_hat = dequantize(q, a, self.code, v.shape)
        return w_hat * w_hat if self.sqrt else w_hat


def v_options(with_nz: bool = True) -> list[VOption]:
    u = {c.name: c for c in unsigned_codes()}
    opts = []
    for c in unsigned_codes():
        opts += [VOption(c, False), VOption(c, True)]
    opts.append(VOption(pow_code(False, 4), False))  # = sqrtv:pow2 but with the absmax of v
    if with_nz:
        opts += [VOption(u["bnb"], False, True), VOption(u["bnb"], True, True), VOption(u["pow2"], True, True),
                 VOption(u["e4m4"], True, True), VOption(u["e5m3"], True, True),
                 VOption(pow_code(False, 4), False, True)]
    return opts


# ------------------------------------------------------------------- models and data
def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234 + seed))
    tr, te = order[:1437], order[1437:]
    return x[tr], y[tr], x[te], y[te]


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                               torch.nn.ReLU(), torch.nn.Linear(256, 10))


class SparseEmbed(torch.nn.Module):
    """Bag of Zipf-distributed tokens -> mean of embeddings -> linear: the embedding's
    rows see a gradient only on the steps their token occurs, like an LM's vocabulary."""

    VOCAB, DIM, TOKENS = 2048, 64, 16

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(self.VOCAB, self.DIM)
        self.out = torch.nn.Linear(self.DIM, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(tokens).mean(1))


def sparse_data(seed: int, n: int = 4096):
    gen = torch.Generator().manual_seed(99 + seed)
    ranks = torch.arange(1, SparseEmbed.VOCAB + 1, dtype=torch.float64)
    probs = (1.0 / ranks) / (1.0 / ranks).sum()
    tokens = torch.multinomial(probs, n * SparseEmbed.TOKENS, replacement=True, generator=gen).view(n, -1)
    teacher = torch.randn(SparseEmbed.VOCAB, 10, generator=gen)
    y = teacher[tokens].sum(1).argmax(1)
    return tokens, y


class Task:
    """A model, its data and a minibatch stream that is the same for every optimizer."""

    def __init__(self, kind: str, seed: int = 0, batch: int = 64) -> None:
        self.kind, self.seed, self.batch = kind, seed, batch
        if kind == "digits":
            self.x, self.y, self.xt, self.yt = digits(seed)
        else:
            self.x, self.y = sparse_data(seed)
            self.xt, self.yt = self.x[:1024], self.y[:1024]

    def model(self) -> torch.nn.Module:
        return mlp(self.seed) if self.kind == "digits" else SparseEmbed(self.seed)

    def batches(self, steps: int):
        gen = torch.Generator().manual_seed(7 + self.seed)
        for _ in range(steps):
            idx = torch.randint(0, len(self.y), (self.batch,), generator=gen)
            yield self.x[idx], self.y[idx]


def loss_of(model, x, y) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y)


# ------------------------------------------------------------- simulated 8-bit AdamW
class SimAdamW:
    """AdamW (torch's order: decay, moments, step) with m and v re-quantized every step
    for tensors of at least MIN_NUMEL elements: decode with the old absmax, update in
    fp32, step the weight with the unquantized fp32 m and v, re-encode.
    ``m_code=None`` keeps fp32 states (the baseline); ``bf16=True`` rounds states to bf16."""

    def __init__(self, params, m_code: Optional[Code] = None, v_opt: Optional[VOption] = None,
                 bf16: bool = False, lr: float = LR, wd: float = WD) -> None:
        self.params = [p for p in params]
        self.m_code, self.v_opt, self.bf16, self.lr, self.wd = m_code, v_opt, bf16, lr, wd
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0
        self.stats = []  # per step: (positive v encoded, of which decoded 0, elements over the bound)

    def _quantized(self, p) -> bool:
        return (self.m_code is not None or self.bf16) and p.numel() >= MIN_NUMEL

    @torch.no_grad()
    def step(self, ratio_bound: float = 8.0) -> None:
        self.t += 1
        b1, b2 = BETAS
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        pos = zero = over = 0
        for i, p in enumerate(self.params):
            g = p.grad
            p.mul_(1 - self.lr * self.wd)
            m = b1 * self.m[i] + (1 - b1) * g
            v = b2 * self.v[i] + (1 - b2) * g * g
            u = (m / bc1) / ((v / bc2).sqrt() + EPS)
            over += int((u.abs() > ratio_bound).sum())
            p.sub_(self.lr * u)
            if not self._quantized(p):
                self.m[i], self.v[i] = m, v
            elif self.bf16:
                self.m[i], self.v[i] = m.bfloat16().float(), v.bfloat16().float()
            else:
                q, a = quantize(m, self.m_code)
                self.m[i] = dequantize(q, a, self.m_code, m.shape)
                self.v[i] = self.v_opt.roundtrip(v)
                pos += int((v > 0).sum())
                zero += int(((v > 0) & (self.v[i] == 0)).sum())
        self.stats.append((pos, zero, over))


def train_sim(task: Task, steps: int, opt_factory, eval_every: int = 0):
    model = task.model()
    opt = opt_factory(list(model.parameters()))
    for x, y in task.batches(steps):
        model.zero_grad(set_to_none=False)
        loss_of(model, x, y).backward()
        opt.step()
    return model, opt


# --------------------------------------------------------------------------- snapshots
def snapshots(task: Task, at=(10, 100, 300)) -> list[tuple[str, torch.Tensor, torch.Tensor, int]]:
    """(name, exp_avg, exp_avg_sq, step) of every quantized tensor of a fusedwd.AdamW run."""
    model = task.model()
    opt = fusedwd.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    out = []
    for t, (x, y) in enumerate(task.batches(max(at)), 1):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        if t in at:
            for name, p in model.named_parameters():
                if p.numel() >= MIN_NUMEL:
                    s = opt.state[p]
                    out.append((f"{task.kind}/{name}@{t}", s["exp_avg"].clone(), s["exp_avg_sq"].clone(), t))
    return out


def synthetic_moments(seed: int = 0, n: int = 65536, steps: int = 300):
    """Heavy-tailed synthetic moments: EMAs (fp64) of gradients g = s_i * t(df=2) noise + mu_i,
    per-element scales s_i log-normal (sigma 2) and a Zipf-like activity rate per element."""
    gen = torch.Generator().manual_seed(500 + seed)
    s = torch.exp(2.0 * torch.randn(n, generator=gen, dtype=torch.float64))
    mu = 0.3 * s * torch.randn(n, generator=gen, dtype=torch.float64)
    rate = (1.0 / torch.randint(1, 200, (n,), generator=gen)).double()
    m = torch.zeros(n, dtype=torch.float64)
    v = torch.zeros(n, dtype=torch.float64)
    chi = torch.distributions.Chi2(torch.tensor(2.0, dtype=torch.float64))
    b1, b2 = BETAS
    torch.manual_seed(600 + seed)
    for _ in range(steps):
        z = torch.randn(n, generator=gen, dtype=torch.float64) / (chi.sample((n,)) / 2).sqrt()
        active = torch.rand(n, generator=gen, dtype=torch.float64) < rate
        g = torch.where(active, s * z + mu, torch.zeros_like(s))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
    return m.float(), v.float(), steps


def block_rel_l2(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per 256-block ||x_hat - x|| / ||x|| in float64 (blocks that are all zero skipped)."""
    n = x.numel()
    pad = (-n) % BLOCK
    a = torch.nn.functional.pad(x.reshape(-1).double(), (0, pad)).view(-1, BLOCK)
    b = torch.nn.functional.pad(x_hat.reshape(-1).double(), (0, pad)).view(-1, BLOCK)
    num, den = (a - b).norm(dim=1), a.norm(dim=1)
    keep = den > 0
    return num[keep] / den[keep]


def direction(m: torch.Tensor, v: torch.Tensor, t: int) -> torch.Tensor:
    b1, b2 = BETAS
    m, v = m.double(), v.double()
    return (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + EPS)


def q(x: torch.Tensor, p: float) -> float:
    return float(torch.quantile(x.double().flatten()[:16_000_000], p)) if x.numel() else float("nan")


# -------------------------------------------------------------------------- sections
def section_errors(quick: bool) -> dict:
    snaps = []
    tasks = [Task("digits"), Task("sparse")]
    for task in tasks:
        snaps += snapshots(task, at=(10, 100) if quick else (10, 100, 300))
    m, v, t = synthetic_moments(n=8192 if quick else 65536, steps=50 if quick else 300)
    snaps.append(("synthetic/heavy-tailed", m, v, t))
    out = {"m": {}, "v": {}, "direction": {}}
    # m alone (v exact), v alone (m exact), then both with the pairings we consider
    for code in signed_codes():
        errs, dir_err, dir_max = [], [], []
        for _name, m, v, _t in snaps:
            qm, am = quantize(m, code)
            m_hat = dequantize(qm, am, code, m.shape)
            errs.append(block_rel_l2(m, m_hat))
            u, u_hat = direction(m, v, t), direction(m_hat, v, t)
            dir_err.append(float((u_hat - u).norm() / u.norm()))
            dir_max.append(float((u_hat - u).abs().max()))
        e = torch.cat(errs)
        out["m"][code.name] = {"block_rel_l2_median": q(e, 0.5), "block_rel_l2_p99": q(e, 0.99),
                               "block_rel_l2_max": float(e.max()),
                               "direction_rel_l2_median": statistics.median(dir_err),
                               "direction_rel_l2_max": max(dir_err), "direction_abs_max": max(dir_max)}
    for opt in v_options():
        errs, dir_err, dir_max, zeros = [], [], [], []
        for _name, m, v, _t in snaps:
            v_hat = opt.roundtrip(v)
            errs.append(block_rel_l2(v.sqrt(), v_hat.sqrt()))  # the step uses sqrt(v)
            u, u_hat = direction(m, v, t), direction(m, v_hat, t)
            dir_err.append(float((u_hat - u).norm() / u.norm()))
            dir_max.append(float((u_hat - u).abs().max()))
            zeros.append(float(((v > 0) & (v_hat == 0)).sum() / max(1, int((v > 0).sum()))))
        e = torch.cat(errs)
        out["v"][opt.name] = {"sqrt_block_rel_l2_median": q(e, 0.5), "sqrt_block_rel_l2_p99": q(e, 0.99),
                              "sqrt_block_rel_l2_max": float(e.max()),
                              "direction_rel_l2_median": statistics.median(dir_err),
                              "direction_rel_l2_max": max(dir_err), "direction_abs_max": max(dir_max),
                              "v_to_zero_max": max(zeros)}
    for m_code, v_opt in pairings():
        dir_err, dir_max = [], []
        for _name, m, v, _t in snaps:
            qm, am = quantize(m, m_code)
            m_hat = dequantize(qm, am, m_code, m.shape)
            u, u_hat = direction(m, v, t), direction(m_hat, v_opt.roundtrip(v), t)
            dir_err.append(float((u_hat - u).norm() / u.norm()))
            dir_max.append(float((u_hat - u).abs().max()))
        out["direction"][f"{m_code.name} | {v_opt.name}"] = {
            "rel_l2_median": statistics.median(dir_err), "rel_l2_max": max(dir_err), "abs_max": max(dir_max)}
    out["snapshots"] = [name for name, *_ in snaps]
    return out


def pairings() -> list[tuple[Code, VOption]]:
    s = {c.name: c for c in signed_codes()}
    u = {c.name: c for c in unsigned_codes()}
    u4 = pow_code(False, 4)
    return [
        (s["bnb"], VOption(u["bnb"], False)),  # bitsandbytes / torchao AdamW8bit
        (s["bnb"], VOption(u["bnb"], False, True)),
        (s["bnb"], VOption(u["bnb"], True)),
        (s["pow2"], VOption(u["pow2"], True, True)),
        (s["pow4"], VOption(u4, False, True)),
        (s["pow4"], VOption(u["e4m4"], True, True)),
        (s["e4m3"], VOption(u4, False, True)),
        (s["e4m3"], VOption(u["e4m4"], True, True)),
        (s["e4m3"], VOption(u["e5m3"], True, True)),
    ]


def section_zeros(quick: bool) -> dict:
    steps = 60 if quick else 300
    out = {}
    s = {c.name: c for c in signed_codes()}
    for kind in ("digits", "sparse"):
        task = Task(kind)
        _, ref = train_sim(task, steps, lambda ps: SimAdamW(ps))
        res = {"fp32": {"over_bound": sum(o for *_, o in ref.stats)}}
        for v_opt in v_options():
            m_code = {"bnb": s["bnb"], "pow2": s["pow4"], "pow4": s["pow4"]}.get(v_opt.code.name, s["e4m3"])
            _, opt = train_sim(task, steps, lambda ps, m_code=m_code, v_opt=v_opt: SimAdamW(ps, m_code, v_opt))
            rates = [z / p for p, z, _ in opt.stats if p]
            res[v_opt.name] = {"m_code": m_code.name, "v_to_zero_mean": statistics.fmean(rates),
                               "v_to_zero_max": max(rates),
                               "over_bound": sum(o for *_, o in opt.stats),
                               "steps_with_over_bound": sum(1 for *_, o in opt.stats if o)}
        out[kind] = res
    out["steps"] = steps
    return out


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def section_drift(quick: bool) -> dict:
    steps = 50 if quick else 200
    out = {}
    for kind in ("digits", "sparse"):
        task = Task(kind)
        p0 = _params(task.model())
        ref_model, _ = train_sim(task, steps, lambda ps: SimAdamW(ps))
        ref = _params(ref_model)
        # sanity: the simulated fp32 AdamW is fusedwd.AdamW
        fw_model, _ = train_sim(task, steps, lambda ps: fusedwd.AdamW(ps, lr=LR, betas=BETAS, eps=EPS,
                                                                       weight_decay=WD))
        res = {"fusedwd_vs_sim_fp32": float((_params(fw_model) - ref).norm() / ref.norm())}
        runs = [("bf16 states", lambda ps: SimAdamW(ps, bf16=True))]
        runs += [(f"{m.name} | {v.name}", lambda ps, m=m, v=v: SimAdamW(ps, m, v)) for m, v in pairings()]
        for name, factory in runs:
            model, _ = train_sim(task, steps, factory)
            p = _params(model)
            res[name] = {"rel_to_params": float((p - ref).norm() / ref.norm()),
                         "rel_to_displacement": float((p - ref).norm() / (ref - p0).norm())}
        out[kind] = res
    out["steps"] = steps
    return out


def section_train(quick: bool) -> dict:
    seeds = [0] if quick else [0, 1, 2]
    epochs = 3 if quick else 40
    runs = [("fp32", lambda ps: SimAdamW(ps))]
    runs += [(f"{m.name} | {v.name}", lambda ps, m=m, v=v: SimAdamW(ps, m, v)) for m, v in pairings()]
    out = {}
    for name, factory in runs:
        losses, accs = [], []
        for seed in seeds:
            task = Task("digits", seed)
            steps = epochs * len(task.y) // task.batch
            model, _ = train_sim(task, steps, factory)
            with torch.no_grad():
                losses.append(float(loss_of(model, task.x, task.y)))
                accs.append(float((model(task.xt).argmax(1) == task.yt).float().mean()))
        out[name] = {"train_loss": losses, "test_acc": accs, "train_loss_mean": statistics.fmean(losses),
                     "test_acc_mean": statistics.fmean(accs)}
    out["epochs"], out["seeds"] = epochs, seeds
    return out


# ------------------------------------------------------------------ C++ microbenchmark
CPP = r"""
// Encode cost of the candidate 8-bit codes: per 256-block, the absmax reduction,
// then the encode of the block, AVX2 intrinsics (8 lanes), one thread.
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

constexpr int BLOCK = 256;  // a multiple of 32: the benchmark's n is a multiple of BLOCK
alignas(32) static float BNB_S[256], BNB_U[256], MID_S[256], MID_U[256];

static inline __m256 vabs(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }
static inline float block_absmax(const float* x) {
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < BLOCK; i += 8) m = _mm256_max_ps(m, vabs(_mm256_loadu_ps(x + i)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}
static inline float inv_of(float a) { return a > 0.f ? 1.f / a : 0.f; }
// 4 x 8 int32 in [0, 255] -> 32 bytes in order
static inline void store32(uint8_t* c, __m256i a, __m256i b, __m256i d, __m256i e) {
    __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(d, e));
    _mm256_storeu_si256((__m256i*)c, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

// one encoder per code: 8 lanes of x (raw), the block's 1/absmax -> 8 int32 bytes
struct Linear {
    static __m256i enc(__m256 x, __m256 s) {
        __m256 xn = _mm256_mul_ps(x, _mm256_mul_ps(s, _mm256_set1_ps(127.f)));
        return _mm256_add_epi32(_mm256_cvtps_epi32(xn), _mm256_set1_epi32(127));  // cvtps: round half even
    }
};
template <bool SIGNED> struct Bnb {  // nearest code: branchless binary search over the 255 midpoints
    static __m256i enc(__m256 x, __m256 s) {
        const float* mid = SIGNED ? MID_S : MID_U;
        __m256 xn = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, s), _mm256_set1_ps(-1.f)), _mm256_set1_ps(1.f));
        __m256i k = _mm256_setzero_si256();
        for (int step = 128; step >= 1; step >>= 1) {
            __m256i idx = _mm256_add_epi32(k, _mm256_set1_epi32(step - 1));
            __m256 m = _mm256_i32gather_ps(mid, idx, 4);
            __m256i gt = _mm256_castps_si256(_mm256_cmp_ps(xn, m, _CMP_GT_OQ));
            k = _mm256_add_epi32(k, _mm256_and_si256(gt, _mm256_set1_epi32(step)));
        }
        return k;
    }
};
static inline __m256i apply_sign(__m256i k, __m256 x) {  // 127 + sign(x) * k
    __m256i sgn = _mm256_srai_epi32(_mm256_castps_si256(x), 31);
    return _mm256_add_epi32(_mm256_sub_epi32(_mm256_xor_si256(k, sgn), sgn), _mm256_set1_epi32(127));
}
template <bool SIGNED, bool POW4> struct Pow {  // k = rint(K * |xn|^(1/2 or 1/4))
    static __m256i enc(__m256 x, __m256 s) {
        __m256 r = _mm256_sqrt_ps(_mm256_min_ps(_mm256_mul_ps(vabs(x), s), _mm256_set1_ps(1.f)));
        if (POW4) r = _mm256_sqrt_ps(r);
        __m256i k = _mm256_cvtps_epi32(_mm256_mul_ps(r, _mm256_set1_ps(SIGNED ? 127.f : 255.f)));
        return SIGNED ? apply_sign(k, x) : k;
    }
};
template <bool SIGNED, int E, int M> struct Fp8 {  // round the fp32 bits to M mantissa bits
    static __m256i enc(__m256 x, __m256 s) {
        constexpr int B = (1 << E) - 1, SH = 23 - M, KMAX = B << M;
        __m256 y = _mm256_min_ps(_mm256_mul_ps(vabs(x), s), _mm256_set1_ps(1.f));
        __m256i bits = _mm256_castps_si256(y);
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, SH), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32((1 << (SH - 1)) - 1)), odd), SH);
        __m256i normal = _mm256_sub_epi32(r, _mm256_set1_epi32((127 - B) << M));
        __m256i sub = _mm256_cvtps_epi32(_mm256_mul_ps(y, _mm256_set1_ps(std::ldexp(1.f, B - 1 + M))));
        __m256 tiny = _mm256_cmp_ps(y, _mm256_set1_ps(std::ldexp(1.f, 1 - B)), _CMP_LT_OQ);
        __m256i k = _mm256_blendv_epi8(normal, sub, _mm256_castps_si256(tiny));
        k = _mm256_min_epi32(k, _mm256_set1_epi32(KMAX));
        return SIGNED ? apply_sign(k, x) : k;
    }
};

// the pass: per block, absmax then encode; SQRT: the state is sqrt(x) (computed here)
template <class C, bool SQRT>
static void encode(const float* x, float*, uint8_t* c, float* am, long n) {
    alignas(32) float w[BLOCK];
    for (long b = 0; b < n; b += BLOCK) {
        const float* xb = x + b;
        if (SQRT) {
            for (int i = 0; i < BLOCK; i += 8) _mm256_store_ps(w + i, _mm256_sqrt_ps(_mm256_loadu_ps(xb + i)));
            xb = w;
        }
        float a = block_absmax(xb);
        am[b / BLOCK] = a;
        __m256 s = _mm256_set1_ps(inv_of(a));
        for (int i = 0; i < BLOCK; i += 32)
            store32(c + b + i, C::enc(_mm256_loadu_ps(xb + i), s), C::enc(_mm256_loadu_ps(xb + i + 8), s),
                    C::enc(_mm256_loadu_ps(xb + i + 16), s), C::enc(_mm256_loadu_ps(xb + i + 24), s));
    }
}
static void copy_f32(const float* x, float* y, uint8_t*, float*, long n) {
    for (long i = 0; i < n; i += 8) _mm256_storeu_ps(y + i, _mm256_loadu_ps(x + i));
}
static void absmax_only(const float* x, float*, uint8_t*, float* am, long n) {
    for (long b = 0; b < n; b += BLOCK) am[b / BLOCK] = block_absmax(x + b);
}
// decode of any code: table gather times the block's absmax
static void decode(const float*, float* y, uint8_t* c, float* am, long n) {
    for (long b = 0; b < n; b += BLOCK) {
        __m256 a = _mm256_set1_ps(am[b / BLOCK]);
        for (int i = 0; i < BLOCK; i += 8) {
            __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(c + b + i)));
            _mm256_storeu_ps(y + b + i, _mm256_mul_ps(_mm256_i32gather_ps(BNB_S, idx, 4), a));
        }
    }
}

using Fn = void (*)(const float*, float*, uint8_t*, float*, long);
struct Cand { const char* name; Fn fn; bool positive; };

int main(int argc, char** argv) {
    long n = argc > 1 ? std::atol(argv[1]) : (1L << 24);
    int reps = argc > 2 ? std::atoi(argv[2]) : 9;
    n -= n % BLOCK;
    // tables from stdin: 256 signed, 256 unsigned bitsandbytes values
    for (int i = 0; i < 256; ++i) if (std::scanf("%f", &BNB_S[i]) != 1) return 2;
    for (int i = 0; i < 256; ++i) if (std::scanf("%f", &BNB_U[i]) != 1) return 2;
    for (int i = 0; i < 255; ++i) { MID_S[i] = 0.5f * (BNB_S[i] + BNB_S[i + 1]); MID_U[i] = 0.5f * (BNB_U[i] + BNB_U[i + 1]); }
    MID_S[255] = MID_U[255] = 2.f;
    std::vector<float> xs(n), xu(n), y(n), am(n / BLOCK + 1);
    std::vector<uint8_t> c(n);
    uint32_t st = 12345;
    for (long i = 0; i < n; ++i) {  // a heavy-tailed spread: a sign times 2^(-12..0) times a mantissa
        st = st * 1664525u + 1013904223u;
        float mant = 1.f + (st >> 9) * (1.f / 8388608.f);
        float v = std::ldexp(mant, -(int)((st >> 3) % 13));
        xs[i] = (st & 1) ? v : -v;
        xu[i] = v * v;
    }
    Cand cands[] = {
        {"copy fp32", copy_f32, false},
        {"absmax only", absmax_only, false},
        {"decode (table gather)", decode, false},
        {"linear int8", encode<Linear, false>, false},
        {"bnb signed", encode<Bnb<true>, false>, false},
        {"bnb unsigned", encode<Bnb<false>, false>, true},
        {"bnb unsigned of sqrt", encode<Bnb<false>, true>, true},
        {"pow2 signed", encode<Pow<true, false>, false>, false},
        {"pow2 unsigned", encode<Pow<false, false>, false>, true},
        {"pow2 unsigned of sqrt", encode<Pow<false, false>, true>, true},
        {"pow4 signed", encode<Pow<true, true>, false>, false},
        {"e4m3 signed", encode<Fp8<true, 4, 3>, false>, false},
        {"e4m4 unsigned", encode<Fp8<false, 4, 4>, false>, true},
        {"e5m3 unsigned", encode<Fp8<false, 5, 3>, false>, true},
        {"e4m4 unsigned of sqrt", encode<Fp8<false, 4, 4>, true>, true},
    };
    const int nc = sizeof(cands) / sizeof(cands[0]);
    std::vector<std::vector<double>> t(nc);
    for (int r = 0; r < reps; ++r)  // interleaved: every candidate once per round
        for (int k = 0; k < nc; ++k) {
            const float* x = cands[k].positive ? xu.data() : xs.data();
            auto t0 = std::chrono::steady_clock::now();
            cands[k].fn(x, y.data(), c.data(), am.data(), n);
            auto t1 = std::chrono::steady_clock::now();
            t[k].push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / n);
        }
    unsigned sum = 0;
    for (long i = 0; i < n; i += 4097) sum += c[i];
    for (int k = 0; k < nc; ++k) {
        std::sort(t[k].begin(), t[k].end());
        std::printf("%s\t%.4f\t%.4f\n", cands[k].name, t[k][t[k].size() / 2], t[k][0]);
    }
    std::fprintf(stderr, "checksum %u\n", sum);
    return 0;
}
"""

CXXFLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-mavx2", "-mfma", "-std=c++17"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def section_speed(quick: bool) -> dict:
    work = tempfile.mkdtemp(prefix="quant_codes_", dir="/tmp")
    src, exe = os.path.join(work, "encode.cpp"), os.path.join(work, "encode")
    with open(src, "w") as f:
        f.write(CPP)
    subprocess.run(["g++", *CXXFLAGS, src, "-o", exe], check=True)
    tables = " ".join(f"{x:.9g}" for x in bnb_table(True).tolist() + bnb_table(False).tolist())
    out = {"flags": " ".join(CXXFLAGS), "machine": _cpu_name()}
    sizes = {"in_cache_64K": 1 << 16, "memory_16M": 1 << 24} if not quick else {"in_cache_64K": 1 << 16}
    for label, n in sizes.items():
        reps = 5 if quick else (41 if n < 1 << 20 else 9)
        res = subprocess.run([exe, str(n), str(reps)], input=tables, capture_output=True, text=True, check=True)
        out[label] = {ln.split("\t")[0]: {"median_ns": float(ln.split("\t")[1]), "min_ns": float(ln.split("\t")[2])}
                      for ln in res.stdout.strip().splitlines()}
    return out


# ------------------------------------------------------------------------------ main
def _print_table(title: str, rows: dict, cols: list[str]) -> None:
    print(f"\n{title}")
    print("  " + "name".ljust(30) + "".join(c[:22].rjust(24) for c in cols))
    for name, r in rows.items():
        if isinstance(r, dict):
            print("  " + name.ljust(30) + "".join(
                (f"{r[c]:.4g}" if isinstance(r.get(c), (int, float)) else str(r.get(c, ""))).rjust(24) for c in cols))


SECTIONS = {"errors": section_errors, "zeros": section_zeros, "drift": section_drift, "train": section_train,
            "speed": section_speed}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--pow4-encode", choices=["thresholds", "sqrt"], default="thresholds",
                    help="pow4's encode: fusedwd.quant's threshold count (default) or two square roots (before issue 17)")
    args = ap.parse_args(argv)
    global POW4_ENCODE
    POW4_ENCODE = args.pow4_encode
    torch.set_num_threads(1)  # small tensors; keeps the other core for the shared machine
    results = {}
    if os.path.exists(args.out) and not args.quick:
        with open(args.out) as f:
            results = json.load(f)
    for name in args.only.split(","):
        results[name] = SECTIONS[name](args.quick)
        results[name]["when"] = datetime.datetime.now().isoformat(timespec="seconds")
        r = results[name]
        if name == "errors":
            _print_table("m alone (v exact): per-block rel L2 of m; Adam direction error", r["m"],
                         ["block_rel_l2_median", "block_rel_l2_p99", "direction_rel_l2_median", "direction_abs_max"])
            _print_table("v alone (m exact): per-block rel L2 of sqrt(v); direction error", r["v"],
                         ["sqrt_block_rel_l2_median", "sqrt_block_rel_l2_p99", "direction_rel_l2_median",
                          "direction_abs_max", "v_to_zero_max"])
            _print_table("m and v: Adam direction error", r["direction"], ["rel_l2_median", "rel_l2_max", "abs_max"])
        elif name == "zeros":
            for kind in ("digits", "sparse"):
                _print_table(f"{kind}: v -> 0 per step and |update| over the fp32 bound ({r['steps']} steps)",
                             r[kind], ["m_code", "v_to_zero_mean", "v_to_zero_max", "over_bound",
                                       "steps_with_over_bound"])
        elif name == "drift":
            for kind in ("digits", "sparse"):
                print(f"\n{kind}: fusedwd.AdamW vs the simulated fp32 AdamW: {r[kind]['fusedwd_vs_sim_fp32']:.2e}")
                _print_table(f"{kind}: parameters after {r['steps']} steps vs fp32", r[kind],
                             ["rel_to_params", "rel_to_displacement"])
        elif name == "train":
            _print_table(f"digits, {r['epochs']} epochs, seeds {r['seeds']}", r, ["train_loss_mean", "test_acc_mean"])
        elif name == "speed":
            for label in ("in_cache_64K", "memory_16M"):
                if label in r:
                    _print_table(f"encode, ns/element, {label} (one thread)", r[label], ["median_ns", "min_ns"])
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
