"""Static checks of fusedwd's GPU kernels, no GPU needed (docs/backends.md#static-checks).

    python -m bench.gpu_static                       # every kernel, sm_80 and sm_90: a table and OK/BAD lines
    python -m bench.gpu_static --json report.json --dump ptx/ --arch 90 --only triton --jobs 2

Every Triton kernel variant (the generic kernel for each rule of the registry
x switches x storage layout, 8-bit states included) is compiled ahead of time for each architecture with Triton's own
toolchain (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``,
its bundled ptxas), and every kernel of the built ``fusedwd._C_cuda`` (one per
storage layout, holding a path per rule and switch combination) is read from the
module (``cuobjdump --dump-resource-usage`` and its SASS). Per variant (CUDA: per
kernel, its expected wide accesses summed over its paths) and architecture it
reports registers, spill bytes (the machine code's local stores; with its stack
frame and local memory: must be 0), shared memory, stack frame, the 128-bit (and 64-bit)
global loads and stores of the machine code against the buffers the aligned
fast path touches, and, for Triton, the layout conversions left in that fast
path (``ttg.convert_layout``: each moves data between threads through shared
memory; must be 0), with the PTX properties the kernels' rounding relies on
(IEEE division and square root, no contracted multiply-add, the release
arrival after the stores, the logical shifts of stochastic rounding and the square-root-free
8-bit encode). ``problems()`` turns an entry into the list of what is wrong
with it; tests/test_gpu_static.py runs this module and asserts on it.

Compiling the ~120 Triton variants twice takes minutes on two cores: results
are kept in Triton's cache under ``build/gpu_static_cache`` (``--cache``),
keyed by the kernels' source, Triton's version, options and target, so an
unchanged kernel is never compiled twice.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import multiprocessing
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusedwd import rules as _rules  # noqa: E402  (after the path above)

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
DEFAULT_CACHE = ROOT / "build" / "gpu_static_cache"
# The Triton kernels name the condition of their aligned, unmasked path `vector` (fusedwd/triton/_kernels.py):
# TTGIR names its value after it (%vector...), which is how the fast path's region is found.
FAST_PATH_CONDITION = "vector"

# every elementwise rule of the registry (fusedwd/rules), and its switch combinations in the rule's
# order (Rule.structures), less those its validation rejects: SGDW's nesterov needs momentum
RULES = tuple(name for name, rule in _rules.RULES.items() if not rule.reduces)
# the two-phase rules (LAMB, StableAdamW): two Triton kernels each (phase 1 and 2, fusedwd/triton/_phases.py),
# no switches, no 8-bit states; on CUDA one phases_kernel per layout runs them all (csrc/cuda/phases.cuh)
TWO_PHASE_RULES = tuple(name for name, rule in _rules.RULES.items() if rule.reduces)
_INVALID = {"sgdw": [(False, True)]}
SWITCHES = {name: [s for s in _rules.get(name).structures() if s not in _INVALID.get(name, [])] for name in RULES}
# the combination that keeps every state
RICHEST = {name: (True,) * len(_rules.get(name).switches) for name in RULES}
_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64", "uint8": "q8"}
_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "uint8": 1}
ELEMENTS_PER_THREAD = 8  # Triton: BLOCK_SIZE 1024 over 4 warps (fusedwd/triton/_launch.py)


# ---------------------------------------------------------------------- variants
@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel: a rule, its switches and a storage layout (dtype names as torch spells them)."""

    rule: str
    switches: tuple
    p: str  # parameters and gradients
    s: str  # states ("uint8": 8-bit codes with fp32 block absmax)
    master: bool
    sr: bool  # stochastic rounding
    phase: int = 0  # a two-phase rule's kernel (1: moments and sums, 2: the update); 0: the generic kernel

    @property
    def q8(self) -> bool:
        return self.s == "uint8"

    @property
    def name(self) -> str:
        layout = f"{_SHORT[self.p]}-{_SHORT[self.s]}" + ("-master" if self.master else "") + ("-sr" if self.sr else "")
        if self.phase:
            return f"{self.rule}-phase{self.phase} {layout}"
        return f"{self.rule}-{''.join('1' if x else '0' for x in self.switches)} {layout}"

    def states(self) -> int:
        """How many states the rule keeps under these switches."""
        return sum(slot is not None for slot in _rules.get(self.rule).slots(self.switches))

    def buffers(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(read, written) buffers of the aligned fast path as (name, dtype); with 8-bit states the
        codes are uint8 and each state also reads and writes its fp32 block absmax (one per 256)."""
        states = [(f"state{k}", self.s) for k in range(self.states())]
        param = [("master", "float32")] if self.master else [("param", self.p)]
        written_param = [("param", self.p)] + ([("master", "float32")] if self.master else [])
        if self.phase == 1:  # the states and the sums' terms (p: LAMB always, StableAdamW with L2)
            return param + [("grad", self.p)] + states, states
        if self.phase == 2:  # the update from p and the states phase 1 stored
            return param + states, written_param
        reads = param + [("grad", self.p)] + states
        writes = written_param + states
        return reads, writes

    def widths(self) -> set[int]:
        """Element sizes of every float buffer the variant touches (8-bit codes and their absmax aside)."""
        reads, writes = self.buffers()
        return {_SIZE[d] for _, d in reads + writes if d != "uint8"}

    def mixed_width(self) -> bool:
        """Buffers whose natural per-thread widths differ: left to itself, Triton would give each buffer as
        many contiguous elements per thread as fill 16 bytes (at most the block's ELEMENTS_PER_THREAD)
        and convert between the layouts through shared memory (issue 14 defect 6; the kernels now set
        one width, fusedwd/triton/_kernels.py _vector_width). fp32 beside 16-bit or 8-bit buffers
        differ (4 against 8 per thread); 16-bit parameters beside 8-bit codes do not (8 and 8)."""
        reads, writes = self.buffers()
        return len({min(ELEMENTS_PER_THREAD, 16 // _SIZE[d]) for _, d in reads + writes}) > 1


def layouts() -> tuple[list[tuple], list[tuple]]:
    """The storage layouts the launchers accept, derived from their own checks
    (fusedwd/triton/_launch.py, precision.h): (p, s, master, sr) and 8-bit ones."""
    import torch

    from fusedwd.triton import _launch

    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    plain, q8 = [], []
    for p, s, master, sr in itertools.product(dtypes, dtypes, (False, True), (False, True)):
        try:
            _launch._check_layout(p, s, master, sr)
        except ValueError:
            continue
        plain.append((p, s, master, sr))
    for p, master, sr in itertools.product(dtypes, (False, True), (False, True)):
        try:
            _launch._check_q8_layout(p, None, master, sr)
        except ValueError:
            continue
        q8.append((p, torch.uint8, master, sr))
    return plain, q8


def triton_variants() -> list[Variant]:
    """Every switch combination in the single-dtype layouts and in 8-bit states of fp32 parameters;
    in every other layout the switches that use every state."""
    plain, q8 = layouts()
    out = []
    for p, s, master, sr in plain + q8:
        names = (str(p).removeprefix("torch."), str(s).removeprefix("torch."))
        every = (p == s and not (master or sr)) or (names == ("float32", "uint8"))
        for rule in RULES:
            for switches in SWITCHES[rule] if every else [RICHEST[rule]]:
                out.append(Variant(rule, switches, names[0], names[1], master, sr))
    for p, s, master, sr in plain:
        for rule in TWO_PHASE_RULES:
            for phase in (1, 2):
                out.append(Variant(rule, (), str(p).removeprefix("torch."), str(s).removeprefix("torch."), master, sr,
                                   phase))
    return out


# ---------------------------------------------------------------------- tools
def find_tool(name: str) -> Optional[str]:
    """cuobjdump / nvdisasm from PATH, the CUDA toolkit, or Triton's NVIDIA backend."""
    candidates = [shutil.which(name)]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", name))
    for site in map(pathlib.Path, sys.path):
        candidates.append(str(site / "triton" / "backends" / "nvidia" / "bin" / name))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


_RESOURCES = re.compile(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cuobjdump: str, binary: str) -> dict[str, dict[str, dict[str, int]]]:
    """Per architecture ("80", "90a", ...) and function: registers, stack, shared and local bytes."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    text = _run([cuobjdump, "--dump-resource-usage", binary])
    # a fat binary lists each architecture's functions after "arch = sm_..."; a lone cubin has no such line
    blocks = text.split("arch = sm_")[1:] if "arch = sm_" in text else ["cubin " + text]
    for block in blocks:
        arch = block.split()[0]
        for name, reg, stack, shared, local in _RESOURCES.findall(block):
            out.setdefault(arch, {})[name] = dict(registers=int(reg), stack_bytes=int(stack),
                                                  shared_bytes=int(shared), local_bytes=int(local))
    return out


def sass_accesses(sass: str) -> dict[str, int]:
    """Global loads and stores of a function's SASS by width (128-, 64-bit and narrower), and the
    bytes its local stores write (STL: register spills, as ptxas -v counts "spill stores")."""
    counts = dict(loads_128=0, stores_128=0, loads_64=0, stores_64=0, loads_narrow=0, stores_narrow=0,
                  spill_bytes=0)
    for op, mods in re.findall(r"\b(LDG|STG|STL)((?:\.[A-Z0-9_]+)*)", sass):
        width = "128" if ".128" in mods else "64" if ".64" in mods else "narrow"
        if op == "STL":
            counts["spill_bytes"] += {"128": 16, "64": 8}.get(width, 4)
            continue
        counts[f"{'loads' if op == 'LDG' else 'stores'}_{width}"] += 1
    return counts


def sass_by_function(cuobjdump: str, binary: str) -> dict[str, dict[str, str]]:
    """Per architecture and function: its SASS text."""
    out: dict[str, dict[str, str]] = {}
    arch = None
    for part in re.split(r"(?m)^(?=\s*(?:arch = sm_\w+|Function : \S+))", _run([cuobjdump, "-sass", binary])):
        head = part.strip().split("\n", 1)[0]
        if head.startswith("arch = sm_"):
            arch = head.split("sm_")[1].split()[0]
        elif head.startswith("Function : ") and arch is not None:
            out.setdefault(arch, {})[head.split(" : ", 1)[1].strip()] = part
    return out


# ---------------------------------------------------------------------- Triton
def fast_path_conversions(ttgir: str) -> list[str]:
    """The layout conversions inside the aligned fast path (the then-region of `scf.if %vector...`),
    each as "dtype: src layout -> dst layout" (sizePerThread spelled out)."""
    layouts = {name: body for name, body in re.findall(r"^(#\w+) = #ttg\.\w+<(.*)>\s*$", ttgir, flags=re.M)}

    def describe(layout: str) -> str:
        spt = re.search(r"sizePerThread = \[([\d, ]+)\]", layouts.get(layout, ""))
        return f"{layout}({spt.group(1)}/thread)" if spt else layout

    lines = ttgir.splitlines()
    # (a path that returns values, as a two-phase rule's phase 1: `%3:2 = scf.if %vector_41 -> (...) {`)
    start = next((k for k, line in enumerate(lines)
                  if re.search(rf"scf\.if %{FAST_PATH_CONDITION}\w*(?:\s*->\s*\(.*\))?\s*\{{", line)), None)
    if start is None:
        raise ValueError(f"no `scf.if %{FAST_PATH_CONDITION}...` in the TTGIR: has the kernel's fast path been renamed?"
                         " (bench/gpu_static.py FAST_PATH_CONDITION)")
    depth, found = 0, []
    for line in lines[start:]:
        depth += line.count("{") - line.count("}")
        if depth == 0 or (depth == 1 and line.strip().startswith("} else {")):
            break
        m = re.search(r"ttg\.convert_layout %\S+ : tensor<[\dx]+x?(\w+), (#\w+)> -> tensor<[^,]+, (#\w+)>", line)
        if m:
            found.append(f"{m.group(1)}: {describe(m.group(2))} -> {describe(m.group(3))}")
    return found


def _prologue(ptx: str) -> dict[str, int]:
    """What a program does before its first data load: along the shortest path (in instructions) of
    the PTX's control flow from the kernel's entry to its first vector global load (the aligned fast
    path's first load of a buffer: only data moves in vectors), its instructions, global loads,
    atomics and barriers. A loop on the way counts as if taken zero times (the binary search the
    kernels did before issue 14 defect 5 added log2(nseg) iterations to it)."""
    def op(instruction: str) -> str:
        words = instruction.split()
        return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]  # after a predicate

    # basic blocks: a label starts one, a branch ends one
    blocks: list[list[str]] = [[]]
    labels: dict[str, int] = {}
    for line in ptx[ptx.index(".entry"):].splitlines():
        words = line.strip().split()
        if len(words) >= 1 and words[0].endswith(":") and not words[0].startswith("//"):
            if blocks[-1]:
                blocks.append([])
            labels[words[0][:-1]] = len(blocks) - 1
        elif words and line.rstrip().endswith(";") and not words[0].startswith(("//", ".")):
            blocks[-1].append(line.strip())  # an instruction (declarations and directives start with ".")
            if op(line.strip()).startswith("bra"):
                blocks.append([])

    def is_data_load(instruction: str) -> bool:
        return op(instruction).startswith("ld.global") and (".v2." in op(instruction) or ".v4." in op(instruction))

    import heapq

    best, queue = {0: 0}, [(0, 0, [0])]
    while queue:
        cost, k, path = heapq.heappop(queue)
        if cost > best.get(k, cost):
            continue
        body = blocks[k]
        hit = next((i for i, ins in enumerate(body) if is_data_load(ins)), None)
        if hit is not None:
            executed = [ins for b in path[:-1] for ins in blocks[b]] + body[:hit]
            return dict(prologue_instructions=len(executed),
                        prologue_loads=sum(op(i).startswith("ld.global") for i in executed),
                        prologue_atomics=sum(op(i).startswith("atom.") for i in executed),
                        prologue_barriers=sum(op(i).startswith(("bar.", "barrier.")) for i in executed))
        successors = []
        if body and op(body[-1]).startswith("bra"):
            successors.append(labels[body[-1].rstrip(";").split()[-1]])
        last = op(body[-1]) if body else ""
        if not (last.startswith(("bra", "ret", "exit")) and not body[-1].startswith("@")) and k + 1 < len(blocks):
            successors.append(k + 1)  # falls through
        for nxt in successors:
            if cost + len(body) < best.get(nxt, 1 << 60):
                best[nxt] = cost + len(body)
                heapq.heappush(queue, (cost + len(body), nxt, path + [nxt]))
    raise ValueError("no vector global load in the PTX")


def ptx_properties(ptx: str, variant: Variant) -> dict[str, Any]:
    """What the kernels' rounding relies on, read from the PTX."""
    has_states = variant.states() > 0
    return {
        # IEEE division and square root, no contracted multiply-add (enable_fp_fusion=False)
        "approximate_math": sorted(set(re.findall(r"\b(?:div\.full|div\.approx|sqrt\.approx|rcp\.approx)\.\S+", ptx))),
        "fma": len(re.findall(r"\bfma\.\S+", ptx)),
        # the step counts' arrival (fusedwd/triton/_kernels.py _arrive): a release add by every program,
        # an acquire exchange by the last
        "arrival": "atom.global.gpu.release.add" in ptx and "atom.global.gpu.acquire.exch" in ptx,
        # what runs before the first global load of a buffer's data (_prologue)
        **_prologue(ptx),
        # stochastic rounding's hash in uint32: logical shifts, as C++'s
        "arithmetic_shift": bool(variant.sr and "shr.s32" in ptx),
        # the 8-bit encode without square roots (fusedwd/triton/_kernels.py _q8_level): the guess
        # from y's bit pattern (0x4F500000 - bits/4) truncated to the candidate code; SGDW's
        # update has no square root of its own, so its 8-bit variants have none at all
        "q8_encode": bool(not (variant.q8 and has_states)
                          or ("1330642944" in ptx and re.search(r"cvt\.rzi\.s32\.f32", ptx)
                              and (variant.rule != "sgdw" or "sqrt" not in ptx))),
    }


def _machine_code(cubin: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """(resource usage, SASS access counts) of one kernel's cubin, read with cuobjdump once and kept
    next to Triton's cache, keyed by the cubin's hash (a warm run then starts no tool at all)."""
    import hashlib

    folder = pathlib.Path(os.environ.get("TRITON_CACHE_DIR", DEFAULT_CACHE)) / "gpu_static"
    cached = folder / (hashlib.sha256(cubin).hexdigest() + ".json")
    if cached.exists():
        usage, accesses = json.loads(cached.read_text())
        return usage, accesses
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (Triton's NVIDIA backend ships one)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = next(iter(next(iter(resource_usage(cuobjdump, path).values())).values()))
        accesses = sass_accesses(_run([cuobjdump, "-sass", path]))
    folder.mkdir(parents=True, exist_ok=True)
    tmp_file = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_file.write_text(json.dumps([usage, accesses]))
    tmp_file.replace(cached)  # atomic: parallel workers may write the same entry
    return usage, accesses


def _compile_triton(job: tuple[Variant, int, Optional[str]]) -> dict[str, Any]:
    """Compile one variant for one architecture and read its machine code (runs in a worker)."""
    variant, arch, dump = job
    import torch  # noqa: F401  (fusedwd imports it; here first, before triton)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fusedwd.triton import _kernels, _launch, _phases

    dtype = {str(k).removeprefix("torch."): k for k in _launch._STORAGE}
    tables = {"seg_ptr": "*i64", "program_ptr": "*i64", "arrivals_ptr": "*i64", "hp_ptr": "*fp64", "nseg": "i32",
              "ctl_ptr": "*fp32", "seed_ptr": "*i64"}
    assert set(tables) == set(_kernels._TABLE_ARGS)
    if variant.phase:
        # a two-phase rule's kernel of this phase, with its constants exactly as a launch passes them
        first, second = _launch.phase_constants(variant.rule, dtype[variant.p], dtype[variant.s], variant.master,
                                                variant.sr)
        kernel, consts = (_phases._moments_kernel, first) if variant.phase == 1 else (_phases._apply_kernel, second)
        tables.update({"partials_ptr": "*fp64", "sums_ptr": "*fp64"} if variant.phase == 1 else {"sums_ptr": "*fp64"})
    else:
        # the generic kernel's constants for this rule, exactly as a launch passes them
        kernel = _kernels._step_kernel
        consts = _launch.constants(variant.rule, variant.switches, dtype[variant.p],
                                   None if variant.q8 else dtype[variant.s], variant.master, variant.sr, variant.q8)
    t0 = time.perf_counter()
    source = ASTSource(kernel, dict(tables, **{k: "constexpr" for k in consts}), constexprs=consts)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=_launch.NUM_WARPS, enable_fp_fusion=False))
    seconds = time.perf_counter() - t0
    usage, accesses = _machine_code(compiled.asm["cubin"])
    if dump:
        folder = pathlib.Path(dump) / f"sm_{arch}"
        folder.mkdir(parents=True, exist_ok=True)
        stem = variant.name.replace(" ", "_")
        (folder / f"{stem}.ptx").write_text(compiled.asm["ptx"])
        (folder / f"{stem}.ttgir").write_text(compiled.asm["ttgir"])
    reads, writes = variant.buffers()
    # every buffer in accesses of the kernel's one width (_vector_width: 16 bytes of its widest element),
    # ELEMENTS_PER_THREAD // vec of them per thread: fp32 128-bit, 16-bit beside fp32 64-bit
    vec = _kernels._vector_width(consts["P"], consts["S"], variant.master, variant.q8)

    def count(buffers, width):
        return sum(ELEMENTS_PER_THREAD // vec for _, d in buffers if _SIZE[d] * vec == width)

    return dict(
        kind="triton", variant=variant.name, rule=variant.rule, switches=list(variant.switches), phase=variant.phase,
        layout=dict(p=variant.p, s=variant.s, master=variant.master, sr=variant.sr, q8=variant.q8), arch=arch,
        **dict(usage, shared_bytes=usage["shared_bytes"] + compiled.metadata.shared),
        static_shared_bytes=usage["shared_bytes"], dynamic_shared_bytes=compiled.metadata.shared,
        **accesses,
        vector_width=vec, expected_loads_128=count(reads, 16), expected_stores_128=count(writes, 16),
        expected_loads_64=count(reads, 8), expected_stores_64=count(writes, 8),
        buffers_read=[f"{n}:{d}" for n, d in reads], buffers_written=[f"{n}:{d}" for n, d in writes],
        fast_path_conversions=fast_path_conversions(compiled.asm["ttgir"]), mixed_width=variant.mixed_width(),
        ptx=ptx_properties(compiled.asm["ptx"], variant), compile_s=round(seconds, 2),
    )


def triton_report(archs=ARCHS, jobs: int = 1, dump: Optional[str] = None, cache: Optional[str] = None,
                  variants: Optional[list[Variant]] = None, progress=None) -> list[dict[str, Any]]:
    """Compile every Triton variant for every architecture; one entry each."""
    variants = triton_variants() if variants is None else variants
    todo = [(v, arch, dump) for v in variants for arch in archs]
    env = {"TRITON_CACHE_DIR": str(cache or DEFAULT_CACHE)}
    os.environ.update(env)  # read by workers at their first compile
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, never interpret
    if jobs <= 1:
        results = []
        for job in todo:
            results.append(_compile_triton(job))
            if progress:
                progress(results[-1])
        return results
    # spawned workers: each imports Triton afresh (no state forked from a process that may hold threads)
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = []
        for entry in pool.map(_compile_triton, todo):
            results.append(entry)
            if progress:
                progress(entry)
    return results


# ---------------------------------------------------------------------- CUDA
# step_kernel<Layout<P, S, MASTER, SR>, Q8>, mangled (as tests/test_cuda_ext.py reads it): one kernel per
# storage layout, whose rule and switches are launch arguments (csrc/cuda/step.cuh), so no rule in the name;
# phases_kernel<Layout<P, S, MASTER, SR>>: the two-phase rules' kernel of each layout without 8-bit states
_KERNEL_NAME = re.compile(r"11step_kernelINS\w+?6LayoutILNS\w+?5DTypeE(\d)ELS\w+?_(\d)ELb([01])ELb([01])EEELb([01])EE")
_PHASES_NAME = re.compile(r"13phases_kernelINS\w+?6LayoutILNS\w+?5DTypeE(\d)ELS\w+?_(\d)ELb([01])ELb([01])EEE")
_DTYPE = {0: "float32", 1: "float16", 2: "bfloat16", 3: "float64"}


@dataclasses.dataclass(frozen=True)
class CudaKernel:
    """One CUDA kernel: a storage layout, with a path per rule of the registry and switch combination
    (``phases``: the two-phase kernel, a path per two-phase rule and phase)."""

    p: str
    s: str  # "uint8": 8-bit codes with fp32 block absmax
    master: bool
    sr: bool
    phases: bool = False

    @property
    def q8(self) -> bool:
        return self.s == "uint8"

    @property
    def name(self) -> str:
        layout = Variant("", (), self.p, self.s, self.master, self.sr).name.split(" ", 1)[1]
        return ("phases " if self.phases else "step ") + layout

    def paths(self) -> list[Variant]:
        """The (rule, switches) paths the kernel holds: every GPU rule's valid switch combinations (the
        two-phase kernel: both phases of every two-phase rule)."""
        if self.phases:
            return [Variant(rule, (), self.p, self.s, self.master, self.sr, phase)
                    for rule in TWO_PHASE_RULES for phase in (1, 2)]
        return [Variant(rule, switches, self.p, self.s, self.master, self.sr)
                for rule in RULES for switches in SWITCHES[rule]]


def cuda_kernel(mangled: str) -> Optional[CudaKernel]:
    m = _KERNEL_NAME.search(mangled)
    if m is None:
        m = _PHASES_NAME.search(mangled)
        if m is None:
            return None
        p, s, master, sr = m.groups()
        return CudaKernel(_DTYPE[int(p)], _DTYPE[int(s)], master == "1", sr == "1", phases=True)
    p, s, master, sr, q8 = m.groups()
    return CudaKernel(_DTYPE[int(p)], "uint8" if q8 == "1" else _DTYPE[int(s)], master == "1", sr == "1")


def cuda_kernels() -> list[CudaKernel]:
    """The kernels the CUDA build instantiates: one per storage layout the launchers accept, and a
    two-phase one per layout without 8-bit states."""
    plain, q8 = layouts()
    return ([CudaKernel(str(p).removeprefix("torch."), str(s).removeprefix("torch."), master, sr)
             for p, s, master, sr in plain + q8]
            + [CudaKernel(str(p).removeprefix("torch."), str(s).removeprefix("torch."), master, sr, phases=True)
               for p, s, master, sr in plain])

def _module_code(module: str) -> tuple[dict, dict]:
    """(resource usage, SASS access counts) per architecture and function of a fat binary, read once
    per build of it (cached by its hash, as _machine_code)."""
    import hashlib

    data = pathlib.Path(module).read_bytes()
    folder = pathlib.Path(os.environ.get("TRITON_CACHE_DIR", DEFAULT_CACHE)) / "gpu_static"
    cached = folder / ("module-" + hashlib.sha256(data).hexdigest() + ".json")
    if cached.exists():
        usage, accesses = json.loads(cached.read_text())
        return usage, accesses
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (install the CUDA toolkit, or Triton, which ships one)")
    usage = resource_usage(cuobjdump, module)
    sass = sass_by_function(cuobjdump, module)
    accesses = {arch: {name: sass_accesses(sass.get(arch, {}).get(name, "")) for name in functions}
                for arch, functions in usage.items()}
    folder.mkdir(parents=True, exist_ok=True)
    tmp_file = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_file.write_text(json.dumps([usage, accesses]))
    tmp_file.replace(cached)
    return usage, accesses


def cuda_report(module: Optional[str] = None) -> list[dict[str, Any]]:
    """Every kernel of the built fusedwd._C_cuda, for every architecture it holds machine code for.
    A kernel holds one aligned vector path per (rule, switches): the 128-bit (64-bit) accesses it
    must have are the sum over its paths of what each path's buffers need."""
    if module is None:
        import importlib.util

        spec = importlib.util.find_spec("fusedwd._C_cuda")
        if spec is None or spec.origin is None:
            return []
        module = spec.origin
    usage, accesses = _module_code(module)
    out = []
    for arch, functions in sorted(usage.items()):
        for name, use in sorted(functions.items()):
            kernel = cuda_kernel(name)
            if kernel is None:
                continue
            expected = dict(loads_128=0, stores_128=0, loads_64=0, stores_64=0)
            for variant in kernel.paths():
                if variant.q8 or kernel.phases:
                    # 8-bit states move one element per thread and quant block; the two-phase kernels one
                    # element per access, a warp's lanes on consecutive elements (csrc/cuda/phases.cuh)
                    continue
                reads, writes = variant.buffers()
                widest = max(variant.widths())

                def count(buffers, size):
                    return sum(1 for _, d in buffers if d != "uint8" and _SIZE[d] == size)

                # one 16-byte vector per thread of the widest buffer, 8 bytes of a 16-bit one beside fp32
                # (csrc/cuda/step.cuh kElemSize)
                expected["loads_128"] += count(reads, widest)
                expected["stores_128"] += count(writes, widest)
                if widest != 2:
                    expected["loads_64"] += count(reads, widest // 2)
                    expected["stores_64"] += count(writes, widest // 2)
            richest = [v for v in kernel.paths() if kernel.phases or v.switches == RICHEST[v.rule]]
            reads = sorted({f"{n}:{d}" for v in richest for n, d in v.buffers()[0]})
            writes = sorted({f"{n}:{d}" for v in richest for n, d in v.buffers()[1]})
            out.append(dict(
                kind="cuda", variant=kernel.name, rules=list(TWO_PHASE_RULES if kernel.phases else RULES),
                paths=len(kernel.paths()),
                layout=dict(p=kernel.p, s=kernel.s, master=kernel.master, sr=kernel.sr, q8=kernel.q8),
                arch=arch, **use, **accesses[arch][name],
                **{f"expected_{k}": v for k, v in expected.items()},
                buffers_read=reads, buffers_written=writes,
                fast_path_conversions=[], mixed_width=False,
            ))
    return out


# ---------------------------------------------------------------------- verdicts
def problems(entry: dict[str, Any]) -> dict[str, list[str]]:
    """What is wrong with one entry, by check: spills, vector widths, conversions, ptx."""
    out: dict[str, list[str]] = {"spills": [], "vectors": [], "conversions": [], "ptx": []}
    if entry["spill_bytes"] or entry["stack_bytes"] or entry["local_bytes"]:
        out["spills"].append(f"{entry['spill_bytes']} bytes of spill stores, {entry['stack_bytes']} bytes of stack "
                             f"frame, {entry['local_bytes']} of local memory")
    for what, buffers in (("loads", entry["buffers_read"]), ("stores", entry["buffers_written"])):
        for width in ("128", "64"):
            expected = entry.get(f"expected_{what}_{width}")
            if expected is not None and entry[f"{what}_{width}"] < expected:
                out["vectors"].append(f"{entry[what + '_' + width]} {width}-bit global {what}, expected at least "
                                      f"{expected} ({', '.join(buffers)})")
    if entry["fast_path_conversions"]:
        out["conversions"].append(f"{len(entry['fast_path_conversions'])} layout conversions in the aligned fast "
                                  f"path: {'; '.join(entry['fast_path_conversions'])}")
    ptx = entry.get("ptx")
    if ptx:
        if ptx["approximate_math"]:
            out["ptx"].append(f"approximate math: {ptx['approximate_math']}")
        if ptx["fma"]:
            out["ptx"].append(f"{ptx['fma']} contracted multiply-adds")
        if not ptx["arrival"]:
            out["ptx"].append("no release arrival with an acquire exchange by the last arriver")
        if ptx.get("prologue_atomics") or ptx.get("prologue_barriers"):
            out["ptx"].append(f"{ptx['prologue_atomics']} atomics and {ptx['prologue_barriers']} barriers before the "
                              "first data load")
        if ptx["arithmetic_shift"]:
            out["ptx"].append("arithmetic shifts in stochastic rounding's hash")
        if not ptx["q8_encode"]:
            out["ptx"].append("no square-root-free 8-bit encode (bit-pattern guess, truncation)")
    return out


def _row(entry: dict[str, Any]) -> str:
    return (f"{entry['kind']:6} sm_{entry['arch']:<4} {entry['variant']:34} reg {entry['registers']:3}  "
            f"spill {entry['spill_bytes']:3}  smem {entry['shared_bytes']:6}  stack {entry['stack_bytes']:3}  "
            f"ld128 {entry['loads_128']:2}/{entry['expected_loads_128']:<2} st128 {entry['stores_128']:2}/"
            f"{entry['expected_stores_128']:<2} conv {len(entry['fast_path_conversions'])}")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_static", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities for Triton (80,90)")
    ap.add_argument("--only", choices=["triton", "cuda"], default=None)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="Triton compiles in parallel")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--dump", default=None, help="write every Triton variant's PTX and TTGIR under this folder")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="Triton's cache folder for these compiles")
    ap.add_argument("--filter", default=None, help="only the Triton variants whose name matches this regex")
    ap.add_argument("--quiet", action="store_true", help="print only the BAD lines and the summary")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before anything imports Triton: compile, never interpret
    os.environ["TRITON_CACHE_DIR"] = args.cache
    archs = tuple(int(a) for a in args.arch.split(",") if a.strip())
    t0 = time.perf_counter()

    def show(entry):
        if not args.quiet:
            print(_row(entry), flush=True)

    entries: list[dict[str, Any]] = []
    if args.only in (None, "triton"):
        variants = [v for v in triton_variants() if not args.filter or re.search(args.filter, v.name)]
        entries += triton_report(archs, args.jobs, args.dump, args.cache, variants, progress=show)
    if args.only in (None, "cuda"):
        cuda = cuda_report()
        for entry in cuda:
            show(entry)
        entries += cuda
    bad = 0
    for entry in entries:
        for check, found in problems(entry).items():
            for text in found:
                bad += 1
                print(f"BAD {entry['kind']} sm_{entry['arch']} {entry['variant']}: {check}: {text}")
    seconds = time.perf_counter() - t0
    print(f"{'OK' if not bad else 'BAD'}: {len(entries)} kernels x architectures, {bad} problems, {seconds:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(archs=list(archs), seconds=round(seconds, 1), entries=entries), f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
