"""fusedwd._C_cuda: the build, the launch geometry, and (on a GPU) the kernels.

Runs everywhere nvcc is installed, GPU or not: the module must build, hold
machine code for every requested architecture, import without a GPU, and its
launch geometry (the same __host__ __device__ functions the kernels run) must
cover every element exactly once. With a GPU, the kernels are checked against
fusedwd.reference and the CPU kernel; those tests are skipped without one.
"""

import ctypes
import itertools
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fusedwd import _cuda_ext

from _helpers import assert_close
from _layouts import (
    LAYOUT_IDS,
    LAYOUTS,
    Q8_LAYOUT_IDS,
    Q8_LAYOUTS,
    LayoutBucket,
    assert_same_bits,
    compare_with_cpu,
    dtype_code,
)
from _rules import OTHER_CASE_IDS, OTHER_CASES, RICHEST, RICHEST_IDS, TWO_PHASE
from test_headers import find_nvcc
from test_ops import CASE_IDS, CASES, DTYPES, Problem, compare_every_step

ROOT = pathlib.Path(__file__).resolve().parents[1]

try:
    import fusedwd._C_cuda as C
except ImportError:
    C = None

needs_module = pytest.mark.skipif(C is None, reason="fusedwd._C_cuda is not built (no nvcc, or FUSEDWD_CUDA=0)")
HAS_GPU = C is not None and C.device_count() > 0 and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU (or torch without CUDA): kernels are not run")

ELEM_SIZES = [2, 4, 8]


# ---------------------------------------------------------------- the build


def test_module_is_built_when_nvcc_is_present():
    if os.environ.get("FUSEDWD_CUDA") == "0":
        pytest.skip("FUSEDWD_CUDA=0: the CUDA extension is not built")
    if find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    # nvcc also compiled every header of csrc/include/fusedwd into this module
    assert C is not None, "nvcc is present but fusedwd._C_cuda did not build: see `pip install -v -e .`"


def find_cuobjdump():
    """cuobjdump from PATH, the toolkit of nvcc, the nvidia-cuda-cuobjdump wheel, or triton."""
    candidates = [shutil.which("cuobjdump")]
    nvcc = find_nvcc()
    if nvcc:
        candidates.append(str(pathlib.Path(os.path.realpath(nvcc)).parent / "cuobjdump"))
    for site in map(pathlib.Path, sys.path):
        candidates += [str(p) for p in site.glob("nvidia/*/bin/cuobjdump")]
        candidates.append(str(site / "triton" / "backends" / "nvidia" / "bin" / "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def cuobjdump(*args):
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found: `pip install nvidia-cuda-cuobjdump` (or the CUDA toolkit's)")
    result = subprocess.run([tool, *args, C.__file__], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_module
def test_machine_code_for_every_requested_arch():
    requested = C.ARCHS.split(";")
    elf = re.findall(r"\.sm_(\w+)\.cubin", cuobjdump("--list-elf"))
    # one cubin per translation unit (csrc/cuda/{f32,f16,bf16,f64,q8}.cu: a group of layouts each, not
    # a rule) and architecture
    assert sorted(elf) == sorted(requested * 5)
    ptx = set(re.findall(r"\.sm_(\w+)\.ptx", cuobjdump("--list-ptx")))
    # PTX of the highest architecture (without an arch-specific suffix), for newer GPUs
    assert ptx == {re.sub(r"[af]$", "", requested[-1])}


# one kernel per storage layout: precision.h's 16 and the 6 layouts of 8-bit states
# (q8_layout_supported), each running every elementwise rule (its id and switch bits are launch
# arguments; csrc/cuda/step.cuh), so that adding a rule adds no kernel; and one two-phase kernel per
# layout without 8-bit states (csrc/cuda/phases.cuh), running every two-phase rule and both phases
KERNELS = 16 + 6 + 16
# step_kernel<Layout<P, S, MASTER, SR>, Q8> and phases_kernel<Layout<P, S, MASTER, SR>>, mangled
KERNEL_NAME = re.compile(r"11step_kernelINS\w+?6LayoutILNS\w+?5DTypeE(\d)ELS\w+?_(\d)ELb([01])ELb([01])EEELb([01])EE")
PHASES_NAME = re.compile(r"13phases_kernelINS\w+?6LayoutILNS\w+?5DTypeE(\d)ELS\w+?_(\d)ELb([01])ELb([01])EEE")


def kernel_of(name):
    """(param DType, state DType, master, stochastic rounding, q8, two-phase) of a kernel's mangled name."""
    found = KERNEL_NAME.search(name)
    if found is None:
        p, s, master, sr = PHASES_NAME.search(name).groups()
        return int(p), int(s), master == "1", sr == "1", False, True
    p, s, master, sr, q8 = found.groups()
    return int(p), int(s), master == "1", sr == "1", q8 == "1", False


@needs_module
def test_every_kernel_within_its_register_budget():
    """KERNELS kernels (one per layout, 8-bit states among them, whatever the rules, and a two-phase
    one per layout without 8-bit states) per architecture, each within its launch bounds without
    spilling: 64 registers per thread, 85 for fp64, 8-bit states and the two-phase kernels (three
    blocks per SM, see csrc/cuda/step.cuh and phases.cuh)."""
    usage = cuobjdump("--dump-resource-usage")
    per_arch = {}
    for block in usage.split("arch = sm_")[1:]:
        arch = block.split()[0]
        for name, regs, stack, local in re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) \S+ LOCAL:(\d+)",
                                                   block):
            per_arch.setdefault(arch, {})[name] = (int(regs), int(stack), int(local))
    assert sorted(per_arch) == sorted(C.ARCHS.split(";"))
    for arch, kernels in per_arch.items():
        assert len(kernels) == KERNELS, arch
        assert len({kernel_of(name) for name in kernels}) == KERNELS, arch
        for name, (regs, stack, local) in kernels.items():
            kernel = kernel_of(name)
            # DType::F64 parameters, 8-bit states, or a two-phase kernel (csrc/cuda/phases.cuh)
            three_per_sm = kernel[0] == 3 or kernel[4] or kernel[5]
            assert regs <= (85 if three_per_sm else 64), (arch, name, regs)
            assert stack == 0 and local == 0, (arch, name, "spills", stack, local)


@needs_module
def test_every_kernel_moves_data_in_128_bit_accesses():
    """The vector path compiles to 16-byte global loads and stores of its widest buffers
    (the gradient's evict-first), and to 8-byte ones of the 16-bit buffers beside fp32
    ones (csrc/cuda/step.cuh kElemSize), never to a split into scalar accesses. Every
    kernel holds a path of a rule with states (AdamW's), so its widest buffer counts them."""
    ptx = cuobjdump("--dump-ptx")
    # each kernel's text runs from its .entry to the next one
    bodies = [part.split("(", 1) for part in ptx.split(".entry ")[1:]]
    assert len(bodies) == KERNELS
    size = {0: 4, 1: 2, 2: 2, 3: 8}  # bytes per element of each DType
    for name, body in bodies:
        p, s, master, _, q8, phases = kernel_of(name)
        if q8 or phases:
            # 8-bit states: one element per thread and quant block, coalesced (test below); the two-phase
            # kernels: one element per access, a warp's lanes on consecutive elements (phases.cuh)
            continue
        widest = max(size[p], 4 if master else 0, size[s])
        g = "v4" if size[p] == widest else "v2"
        assert f"ld.global.cs.{g}.u32" in body, name
        assert "ld.global.ca.v4.u32" in body and "st.global.wb.v4.u32" in body, name
        # a 16-bit buffer beside fp32 ones moves in 8-byte accesses
        assert ("ld.global.ca.v2.u32" in body or "st.global.wb.v2.u32" in body) == (
            widest > 2 and min(size[p], size[s]) == 2), name


@needs_module
def test_q8_kernels_encode_with_ieee_arithmetic_and_shuffles():
    """The 8-bit kernels' encode rounds as the CPU kernel's (docs/quantization.md): no square
    root (the guess starts from y's bit pattern, 0x4F500000 - bits/4, and truncates to the
    candidate code), an IEEE reciprocal of the absmax, no approximate division, no contracted
    multiply-add in fp32; the block absmax by warp butterfly shuffles; byte loads and stores of
    the codes. The only square roots left are the updates' (AdamW, RMSpropW: every kernel holds
    every rule's path)."""
    ptx = cuobjdump("--dump-ptx")
    bodies = [part.split("(", 1) for part in ptx.split(".entry ")[1:]]
    q8 = [(name, body) for name, body in bodies if kernel_of(name)[4]]
    assert len(q8) == 6
    for name, body in q8:
        assert not re.search(r"\b(?:div\.full|div\.approx|sqrt\.approx|rcp\.approx)\.f32|fma\.rn\.f32", body), name
        assert "sqrt.rn.f32" in body, name  # the updates' own roots
        assert "rcp.rn.f32" in body or "div.rn.f32" in body, name
        assert "1330642944" in body and "cvt.rzi.s32.f32" in body, name  # 0x4F500000; floor of the guess
        assert "shfl.sync.bfly.b32" in body, name
        assert re.search(r"ld(?:\.global)?(?:\.nc)?\.u8", body) and re.search(r"st(?:\.global)?\.u8", body), name


# ---------------------------------------------------------------- without a GPU


def test_import_without_a_gpu():
    """Importing fusedwd, its CUDA module and its ops works with no visible GPU."""
    code = (
        "import fusedwd, fusedwd.ops, fusedwd._cuda_ext as x\n"
        "print(x.is_built(), x.device_count(), x.has_cuda())\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(C is not None), "0", "False"]


@needs_module
def test_no_gpu_gives_count_zero_and_clear_errors():
    if HAS_GPU or C.device_count() > 0:
        pytest.skip("a GPU is present")
    assert C.device_count() == 0
    assert C.status().startswith("cudaGetDeviceCount: cudaError")
    with pytest.raises(RuntimeError, match="no usable GPU"):
        _cuda_ext.cuda()
    # a launch reaches the CUDA runtime, whose error becomes a RuntimeError with its message
    table = torch.zeros(1, C.SEG_COLS, dtype=torch.int64)
    table[0, C.SEG_N] = 10
    with pytest.raises(RuntimeError, match=r"fusedwd\._C_cuda\.step\(adamw\): cudaError\w+: "):
        C.step("adamw", table.data_ptr(), 1, table.data_ptr(), 0, (False,), table.data_ptr(), 0)


@needs_module
def test_error_message_names_the_cuda_error():
    assert C.error_message(2, "launch") == "launch: cudaErrorMemoryAllocation: out of memory"


@needs_module
def test_bad_arguments_raise_value_error():
    t = torch.zeros(16, dtype=torch.int64)
    addr = t.data_ptr()
    with pytest.raises(ValueError):
        C.step("adamw", addr, 1, addr, 7, (False,), addr, 0)  # dtype
    with pytest.raises(ValueError):
        C.step("sgdw", addr, -1, addr, 0, (True, False), addr, 0)  # nseg
    with pytest.raises(ValueError):
        C.step("rmspropw", addr, 1, addr, 0, (True, True), 0, 0)  # no arrivals word
    with pytest.raises(ValueError):
        C.step("adamw", addr, 1, addr, 0, (False,), addr, 0, -1)  # blocks
    with pytest.raises(ValueError):
        C.step("adamw", addr, 1, addr, 0, (False,), addr, 0, 2**31)
    with pytest.raises(ValueError, match="unknown rule"):
        C.step("adam", addr, 1, addr, 0, (False,), addr, 0)
    with pytest.raises(ValueError, match="switches"):
        C.step("adamw", addr, 1, addr, 0, (), addr, 0)
    # storage layouts the kernels do not instantiate, as fusedwd._C rejects them (precision.h)
    cpu = pytest.importorskip("fusedwd._C")
    bf16, f16, f32, f64 = (C.DTYPES[n] for n in ("bfloat16", "float16", "float32", "float64"))
    for dtype, kw in [(f32, dict(master=True)), (f16, dict(stochastic_rounding=True)),
                      (bf16, dict(master=True, stochastic_rounding=True)), (f32, dict(state_dtype=f64)),
                      (f64, dict(state_dtype=f32)), (bf16, dict(stochastic_rounding=True, state_dtype=f16)),
                      (f32, dict(state_dtype=9))]:
        with pytest.raises(ValueError, match="unsupported storage layout") as cuda_error:
            C.step("adamw", addr, 1, addr, dtype, (False,), addr, 0, **kw)
        with pytest.raises(ValueError) as cpu_error:
            cpu.step("adamw", addr, 1, addr, dtype, (False,), 1, **kw)
        assert str(cuda_error.value) == str(cpu_error.value)
    # no segments: nothing is launched, null addresses are never read (a two-phase rule's scratch included)
    for rule, info in C.RULES.items():
        C.step(rule, 0, 0, 0, 0, (True,) * len(info["switches"]), 0, 0)


@needs_module
def test_constants_match_the_cpu_module():
    cpu = pytest.importorskip("fusedwd._C")
    for name in ("SEG_P", "SEG_G", "SEG_S0", "SEG_S1", "SEG_S2", "SEG_STEP", "SEG_N", "SEG_HP", "SEG_INDEX",
                 "SEG_MASTER", "SEG_SALT", "SEG_COLS", "CTL_INV_SCALE", "CTL_FOUND_INF", "CTL_CLIP", "CTL_SIZE",
                 "DTYPES", "RULES"):
        assert getattr(C, name) == getattr(cpu, name), name


# ---------------------------------------------------------------- geometry


@needs_module
def test_vector_and_chunk_sizes():
    assert [C.vector_elems(e) for e in ELEM_SIZES] == [8, 4, 2]
    assert all(C.vector_elems(e) * e == C.VECTOR_BYTES == 16 for e in ELEM_SIZES)
    assert all(C.chunk_elems(e) == C.THREADS * C.vector_elems(e) for e in ELEM_SIZES)
    assert [C.chunks_of(n, 1024) for n in (0, 1, 1023, 1024, 1025, 2**40 + 1)] == [0, 1, 1, 1, 2, 2**30 + 1]


@needs_module
def test_first_owned_chunk():
    for begin, grid in itertools.product([0, 1, 5, 999, 2**33 + 7], [1, 2, 7, 528]):
        for block in {0, 1 % grid, grid // 2, grid - 1}:
            c = C.first_owned_chunk(begin, block, grid)
            assert begin <= c < begin + grid and c % grid == block


@needs_module
def test_persistent_grid_and_alignment():
    assert C.persistent_grid(132, 8) == 132 * C.BLOCKS_PER_SM  # H100: capped at BLOCKS_PER_SM
    assert C.persistent_grid(108, 3) == 324  # occupancy below the cap (fp64)
    assert C.persistent_grid(0, 0) == 1
    assert [C.vector_aligned(a) for a in (0, 16, 2**40 + 32, 8, 2**40 + 4)] == [True, True, True, False, False]


def all_block_chunks(sizes, elem_size, grid):
    """Every block's chunks; checks each block's walk on the way."""
    out = []
    for block in range(grid):
        count, chunks = C.block_chunks(sizes, elem_size, grid, block)
        assert count == len(chunks)
        # a block walks its chunks in order: (segment, chunk) ascending
        assert chunks == sorted(chunks)
        out += chunks
    return out


SIZE_LISTS = [
    [],
    [0],
    [0, 0, 0],
    [1],
    [4097, 0, 1, 2048, 2047, 3000],
    [3, 0, 1, 7] * 200,  # many tiny segments, several table tiles of 256
    [1000] * 300,
    [70_000, 5, 0, 131_072],
]


@needs_module
@pytest.mark.parametrize("grid", [1, 2, 3, 7, 64, 1000])
@pytest.mark.parametrize("elem_size", ELEM_SIZES)
@pytest.mark.parametrize("sizes", SIZE_LISTS, ids=lambda s: f"{len(s)}seg-{sum(s)}el")
def test_blocks_cover_every_element_once(sizes, elem_size, grid):
    chunk = C.chunk_elems(elem_size)
    vec = C.vector_elems(elem_size)
    chunks = all_block_chunks(sizes, elem_size, grid)
    # every chunk of every segment exactly once, and nothing else
    expected = [(s, j) for s, n in enumerate(sizes) for j in range(C.chunks_of(n, chunk))]
    assert sorted((s, j) for s, j, _, _ in chunks) == expected
    for s, j, begin, end in chunks:
        # chunks tile [0, n): the j-th starts at j*chunk (a whole number of vectors), the last ends at n
        assert begin == j * chunk and begin % vec == 0
        assert end == min(sizes[s], begin + chunk) and begin < end
    # chunks are dealt round robin: block loads differ by one chunk at most
    counts = [C.block_chunks(sizes, elem_size, grid, b, 0)[0] for b in range(grid)]
    assert max(counts) - min(counts) <= 1


@needs_module
def test_totals_beyond_2_31_elements():
    """64-bit arithmetic: segments of 2^31 and 2^33 elements (not allocated: geometry only)."""
    sizes = [2**31 + 5, 0, 3, 2**33 + 17]
    elem_size, grid = 2, 1056
    chunk = C.chunk_elems(elem_size)
    total = sum(C.chunks_of(n, chunk) for n in sizes)
    counts = [C.block_chunks(sizes, elem_size, grid, b, 0)[0] for b in (0, 1, grid - 1)]
    assert all(total // grid <= c <= total // grid + 1 for c in counts)
    # the block holding the very last chunk ends exactly at the last element
    last_block = (total - 1) % grid
    count, chunks = C.block_chunks(sizes, elem_size, grid, last_block)
    assert count == len(chunks)
    assert chunks[-1] == (3, C.chunks_of(sizes[3], chunk) - 1, (sizes[3] - 1) // chunk * chunk, sizes[3])
    # the first segment's last chunk starts at element 2^31 and holds its 5 last elements
    j = 2**31 // chunk
    _, chunks = C.block_chunks(sizes, elem_size, grid, j % grid)
    assert (0, j, 2**31, 2**31 + 5) in chunks


@needs_module
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("elem_size", ELEM_SIZES)
def test_threads_cover_a_chunk_once(elem_size, aligned):
    chunk, vec = C.chunk_elems(elem_size), C.vector_elems(elem_size)
    begin = 3 * chunk
    for length in sorted({chunk, chunk - 1, 1, vec - 1, vec + 1, 1000 % chunk, 0}):
        owners = C.thread_elements(begin, begin + length, elem_size, aligned)
        assert len(owners) == length
        assert all(0 <= t < C.THREADS for t, _ in owners), "an element with no thread (-1) or two (-2)"
        if aligned:
            # thread t owns the vector at begin + t*vec, whole when it fits
            for k, (t, vectorized) in enumerate(owners):
                assert t == k // vec
                assert vectorized == ((k // vec + 1) * vec <= length)
        else:
            # a misaligned buffer: scalar accesses, consecutive elements on consecutive threads
            for k, (t, vectorized) in enumerate(owners):
                assert t == k % C.THREADS and not vectorized
    with pytest.raises(ValueError):
        C.thread_elements(0, chunk + 1, elem_size, aligned)


# ---------------------------------------------------------------- the kernel, emulated


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    """csrc/cuda/step.cuh's kernel compiled for the CPU against tests/cuda_emulation/ (blocks
    one at a time, threads as std::threads), as a shared library loaded with ctypes. It checks
    the kernel's control flow and index arithmetic without a GPU, not the hardware."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    tmp = tmp_path_factory.mktemp("cuda_emulation")
    flags = ["-std=c++20", "-pthread"]
    probe = tmp / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    if subprocess.run([cxx, *flags, str(probe), "-o", str(tmp / "probe")], capture_output=True).returncode:
        pytest.skip(f"{cxx} has no C++20 <barrier>")
    lib = tmp / "emulated_kernel.so"
    emulation = ROOT / "tests" / "cuda_emulation"
    # -ffp-contract=off: the helpers round as in the CPU and CUDA builds
    cmd = [cxx, *flags, "-O1", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", f"-I{emulation}",
           f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'include'}", str(emulation / "run.cpp"),
           "-o", str(lib)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    dll = ctypes.CDLL(str(lib))
    dll.fusedwd_emulation_self_check.restype = ctypes.c_int
    dll.fusedwd_emulated_step.restype = ctypes.c_int
    dll.fusedwd_emulated_step.argtypes = [
        ctypes.c_int, ctypes.c_uint,  # rule id (csrc/include/fusedwd/rules.h), its switches' bits
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,  # table, nseg, hyper
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,  # dtype, state dtype, master, stochastic
        ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint, ctypes.POINTER(ctypes.c_uint),  # ctl, seed, grid, arrivals
        ctypes.c_int,  # quantized
    ]
    dll.fusedwd_emulated_phases.restype = ctypes.c_int
    dll.fusedwd_emulated_phases.argtypes = [
        ctypes.c_int, ctypes.c_uint, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,  # rule, switches, table...
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,  # dtype, state dtype, master, stochastic
        ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint, ctypes.c_void_p,  # ctl, seed, grid, arrivals (1 + nseg)
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,  # phases, sums (or None), scratch
    ]
    return dll


def test_kernel_on_a_host_emulation(emulation, capfd):
    """The emulated kernel does bit for bit what the shared per-element helpers do: every
    element once with its own segment's scalars, tails, misaligned buffers, empty segments,
    two table tiles, step counts and the arrival counter (single-dtype layouts)."""
    failures = emulation.fusedwd_emulation_self_check()
    out = capfd.readouterr().out
    assert failures == 0 and out.endswith("ALL OK\n"), out


# tails and several chunks in every layout (256 threads x 2..8 elements per chunk), an empty
# segment, and a last one whose buffers are misaligned
EMULATED_SIZES = [1, 37, 1030, 0, 2100, 5]
MISALIGNED = frozenset({5})


def emulated_step(emulation, bucket, grid=3):
    """step(ctl, seed): one emulated launch over the bucket's table, its arrival counter left at zero."""
    arrivals = ctypes.c_uint(0)
    bits = sum(1 << k for k, on in enumerate(bucket.switches) if on)

    # 8-bit states: the state dtype is ignored
    state_code = dtype_code(bucket.dtype if bucket.quantized else bucket.state_dtype)

    def step(ctl, seed):
        table = bucket.table()
        done = emulation.fusedwd_emulated_step(
            C.RULES[bucket.rule]["id"], bits, table.data_ptr(), table.shape[0], bucket.hyper.data_ptr(),
            dtype_code(bucket.dtype), state_code, bucket.master, bucket.stochastic,
            0 if ctl is None else ctl.data_ptr(), seed, grid, ctypes.byref(arrivals), bucket.quantized)
        assert done == 0, done
        assert arrivals.value == 0, "the last block resets the arrival counter (and a skipped launch never arrives)"

    return step


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("rule,switches", RICHEST, ids=RICHEST_IDS)
def test_emulated_kernel_matches_the_cpu_kernel_in_every_layout(emulation, rule, switches, layout):
    """Each storage layout, every state in use, against fusedwd._C bit for bit: through no
    control block, AMP unscaling with clipping, a found_inf step that writes nothing (step
    counts and masters included, no block arrives), and unscaling alone."""
    bucket = LayoutBucket(rule, switches, layout, EMULATED_SIZES, misaligned=MISALIGNED)
    compare_with_cpu(bucket, emulated_step(emulation, bucket))


@pytest.mark.parametrize("layout", [(torch.bfloat16, torch.float32, True, False),
                                    (torch.float32, torch.bfloat16, False, False),
                                    (torch.bfloat16, torch.bfloat16, False, True)],
                         ids=["bf16-f32-master", "f32-bf16", "bf16-sr"])
@pytest.mark.parametrize("rule,switches", OTHER_CASES, ids=OTHER_CASE_IDS)
def test_emulated_kernel_matches_the_cpu_kernel_with_every_switch(emulation, rule, switches, layout):
    # the switches that leave state columns unused, where the geometry follows p and g alone
    bucket = LayoutBucket(rule, switches, layout, EMULATED_SIZES, misaligned=MISALIGNED)
    compare_with_cpu(bucket, emulated_step(emulation, bucket))


def test_emulated_kernel_over_two_table_tiles_with_stochastic_rounding(emulation):
    # 300 segments, mostly tiny: each block walks two tiles; the rounding bits follow each
    # segment's own salt and step, whichever block updates it
    sizes = [(i * 37) % 90 + (1030 if i % 97 == 0 else 0) for i in range(300)]
    bucket = LayoutBucket("adamw", (False,), (torch.bfloat16, torch.float32, False, True), sizes,
                          misaligned=frozenset(range(0, 300, 11)))
    compare_with_cpu(bucket, emulated_step(emulation, bucket, grid=7))


# 8-bit states (issue 6): the emulated q8 kernels against fusedwd._C bit for bit (codes, absmax,
# parameters, masters, step counts). Chunks of 4 quant blocks: segments of 1 to 9 quant blocks
# with partial last ones, short and empty segments, a misaligned one; a block whose states fall
# below the smallest normal (absmax 0) and a NaN gradient at step 1 (absmax NaN from then on).
Q8_SIZES = [1, 300, 1030, 0, 2100, 5]
Q8_EDGES = dict(tiny_block=(2, 1), nan_grad=(4, 1500, 1))


def _assert_q8_edges_reached(bucket):
    for c, scales in bucket.absmax.items():
        assert float(scales[2][1]) == 0.0, c
        assert int(scales[4].isnan().sum()) == 1 and bool(scales[4][1500 // 256].isnan()), c


@pytest.mark.parametrize("layout", Q8_LAYOUTS, ids=Q8_LAYOUT_IDS)
@pytest.mark.parametrize("rule,switches", RICHEST, ids=RICHEST_IDS)
def test_emulated_q8_kernel_matches_the_cpu_kernel_in_every_layout(emulation, rule, switches, layout):
    bucket = LayoutBucket(rule, switches, layout, Q8_SIZES, misaligned=frozenset({5}), **Q8_EDGES)
    compare_with_cpu(bucket, emulated_step(emulation, bucket))
    _assert_q8_edges_reached(bucket)


@pytest.mark.parametrize("layout", [Q8_LAYOUTS[0], Q8_LAYOUTS[3]], ids=[Q8_LAYOUT_IDS[0], Q8_LAYOUT_IDS[3]])
@pytest.mark.parametrize("rule,switches", OTHER_CASES, ids=OTHER_CASE_IDS)
def test_emulated_q8_kernel_matches_the_cpu_kernel_with_every_switch(emulation, rule, switches, layout):
    bucket = LayoutBucket(rule, switches, layout, Q8_SIZES, misaligned=frozenset({5}), **Q8_EDGES)
    compare_with_cpu(bucket, emulated_step(emulation, bucket))
    if bucket.absmax:
        _assert_q8_edges_reached(bucket)


@pytest.mark.parametrize("grid", [1, 5])
def test_emulated_q8_kernel_over_two_table_tiles(emulation, grid):
    # 300 segments: chunks of whole quant blocks dealt round robin over two tiles, so a block
    # moves between segments and quant blocks of one segment go to different blocks
    sizes = [(i * 37) % 90 + (1100 if i % 61 == 0 else 0) for i in range(300)]
    bucket = LayoutBucket("adamw", (True,), Q8_LAYOUTS[1], sizes, misaligned=frozenset(range(0, 300, 11)))
    compare_with_cpu(bucket, emulated_step(emulation, bucket, grid=grid))


# ---------------------------------------------------------------- two-phase rules, emulated
# LAMB and StableAdamW (csrc/cuda/phases.cuh): phase 1 and phase 2 launches over chunks of 1024
# elements, each segment's 64-element chunk sums added in the CPU kernel's order, so every buffer
# is the CPU kernel's bits (fp64 included: the emulation's pow is the host's). Segments of several
# chunks dealt to different blocks (grid 3), partial last chunks, one of exactly a sum chunk, empty
# ones, a misaligned one.
PHASE_SIZES = [4097, 1, 0, 64, 2049, 1030, 3000]
PHASE_MISALIGNED = frozenset({5})


class EmulatedPhases:
    """Launches of the emulated two-phase kernel over a bucket's table, with its scratch (NaN: never
    read before written) and its arrival words (the launch's, then each segment's: every launch
    must leave them zero)."""

    def __init__(self, emulation, bucket, grid=3):
        self.emulation, self.bucket, self.grid = emulation, bucket, grid
        self.k = C.RULES[bucket.rule]["sums"]
        n = len(bucket.sizes)
        size = C.two_phase_scratch_bytes(n, sum(bucket.sizes), self.k)
        self.scratch = torch.full((size // 8,), float("nan"), dtype=torch.float64)
        self.arrivals = torch.zeros(1 + n, dtype=torch.int32)

    def __call__(self, ctl, seed, phases=3, sums=None, rows=None):
        b = self.bucket
        table = b.table()[:rows]
        done = self.emulation.fusedwd_emulated_phases(
            C.RULES[b.rule]["id"], 0, table.data_ptr(), table.shape[0], b.hyper.data_ptr(), dtype_code(b.dtype),
            dtype_code(b.state_dtype), b.master, b.stochastic, 0 if ctl is None else ctl.data_ptr(), seed,
            self.grid, self.arrivals.data_ptr(), phases, None if sums is None else sums.data_ptr(),
            self.scratch.data_ptr())
        assert done == 0, done
        assert int(self.arrivals[0]) == 0, "the last block resets the arrival word (a skipped launch never arrives)"
        assert not self.arrivals[1:].any(), "each segment's last chunk resets its counter"


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("rule", TWO_PHASE)
def test_emulated_two_phase_kernel_matches_the_cpu_kernel_in_every_layout(emulation, rule, layout):
    """Every storage layout through no control block, AMP with clipping, a skipped step (nothing
    written, step counts included) and unscaling alone: every buffer the CPU kernel's bits."""
    bucket = LayoutBucket(rule, (), layout, PHASE_SIZES, misaligned=PHASE_MISALIGNED)
    compare_with_cpu(bucket, EmulatedPhases(emulation, bucket))


@pytest.mark.parametrize("grid", [1, 7])
@pytest.mark.parametrize("rule", TWO_PHASE)
def test_emulated_two_phase_kernel_over_two_table_tiles(emulation, rule, grid):
    # 300 segments, mostly tiny, some of several chunks: two table tiles, a block moving between
    # segments, a segment's chunks on different blocks; bf16 with stochastic rounding
    sizes = [(i * 37) % 90 + (2100 if i % 61 == 0 else 0) for i in range(300)]
    bucket = LayoutBucket(rule, (), (torch.bfloat16, torch.float32, False, True), sizes,
                          misaligned=frozenset(range(0, 300, 11)))
    compare_with_cpu(bucket, EmulatedPhases(emulation, bucket, grid=grid))


@pytest.mark.parametrize("rule", TWO_PHASE)
def test_emulated_two_phase_sums_and_phases_apart(emulation, rule):
    """phases=1 then phases=2 through a sums buffer equal phases=3 (the sums in the scratch);
    phase 1 alone advances no step count, and its sums are the CPU kernel's bit for bit (an empty
    segment's are 0)."""
    from fusedwd import _C

    layout = (torch.float32, torch.float32, False, False)
    together, apart, host = (LayoutBucket(rule, (), layout, PHASE_SIZES, misaligned=PHASE_MISALIGNED)
                             for _ in range(3))
    run_together, run_apart = EmulatedPhases(emulation, together), EmulatedPhases(emulation, apart, grid=5)
    k, n = C.RULES[rule]["sums"], len(PHASE_SIZES)
    sums = torch.full((n, k), float("nan"), dtype=torch.float64)
    cpu_sums = torch.full((n, k), float("nan"), dtype=torch.float64)
    code = dtype_code(torch.float32)
    for t in range(3):
        for b in (together, apart, host):
            b.new_grads(t)
        run_together(None, 0)
        steps = apart.steps.clone()
        run_apart(None, 0, phases=1, sums=sums)
        assert torch.equal(apart.steps, steps), "phase 1 advanced a step count"
        table = host.table()
        _C.step(rule, table.data_ptr(), n, host.hyper.data_ptr(), code, (), 1, sums=cpu_sums.data_ptr(), phases=1)
        assert torch.equal(sums.view(torch.int64), cpu_sums.view(torch.int64)), f"step {t}: sums differ"
        assert float(sums[PHASE_SIZES.index(0)].abs().sum()) == 0.0
        _C.step(rule, table.data_ptr(), n, host.hyper.data_ptr(), code, (), 1, sums=cpu_sums.data_ptr(), phases=2)
        run_apart(None, 0, phases=2, sums=sums)
        assert_same_bits(apart, together, f"step {t}: phases apart")
        assert_same_bits(apart, host, f"step {t}: against the CPU kernel")


@pytest.mark.parametrize("rule", TWO_PHASE)
def test_emulated_two_phase_launches_over_fewer_and_more_segments(emulation, rule):
    # the optimizer launches over this step's segments with gradients, with one scratch and one
    # arrivals buffer sized for the whole bucket: launches over 2, 7, 3 and 7 segments in turn (the
    # scratch's layout moves with the launch's segment count; the counters must not)
    from fusedwd import _C

    layout = (torch.float32, torch.float32, False, False)
    bucket = LayoutBucket(rule, (), layout, PHASE_SIZES, misaligned=PHASE_MISALIGNED)
    host = bucket.copy("cpu")
    run = EmulatedPhases(emulation, bucket)
    for t, rows in enumerate([2, 7, 3, 7]):
        bucket.new_grads(t)
        host.new_grads(t)
        run(None, 0, rows=rows)
        table = host.table()
        _C.step(rule, table.data_ptr(), rows, host.hyper.data_ptr(), dtype_code(torch.float32), (), 1)
        assert_same_bits(bucket, host, f"step {t} over {rows} segments")


@needs_module
@pytest.mark.parametrize("rule", TWO_PHASE)
def test_two_phase_launch_rejects_bad_arguments(rule):
    t = torch.zeros(16, dtype=torch.int64)
    addr = t.data_ptr()
    with pytest.raises(ValueError, match="8-bit states"):
        C.step(rule, addr, 1, addr, 0, (), addr, 0, quantized=True, scratch=addr)
    with pytest.raises(ValueError, match="phases must be 1, 2 or 3"):
        C.step(rule, addr, 1, addr, 0, (), addr, 0, phases=4, sums=addr, scratch=addr)
    with pytest.raises(ValueError, match="phases=1 takes the sums"):
        C.step(rule, addr, 1, addr, 0, (), addr, 0, phases=1, scratch=addr)
    with pytest.raises(ValueError, match="takes scratch="):
        C.step(rule, addr, 1, addr, 0, (), addr, 0)
    with pytest.raises(ValueError, match="elementwise: it takes no sums"):
        C.step("sgdw", addr, 1, addr, 0, (True, False), addr, 0, scratch=addr)
    assert C.two_phase_scratch_bytes(3, 5000, 2) == 3 * 2 * 8 + (5 + 3) * 16 * 2 * 8


# ---------------------------------------------------------------- on a GPU


def device_table(prob, grads):
    """The CUDA problem's int64 segment table on its device (SEG_HP 0: one hyper row)."""
    rows = []
    for i, (p, g) in enumerate(zip(prob.params, grads)):
        row = [0] * C.SEG_COLS
        row[C.SEG_P], row[C.SEG_G] = p.data_ptr(), g.data_ptr()
        for col, tensors in zip((C.SEG_S0, C.SEG_S1, C.SEG_S2), prob.states.values()):
            row[col] = tensors[i].data_ptr() if tensors else 0
        row[C.SEG_STEP], row[C.SEG_N], row[C.SEG_INDEX] = prob.steps[i].data_ptr(), p.numel(), i
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64, device=prob.device)


def launch(prob, table, hyper, arrivals, blocks=0):
    dtype = C.DTYPES[str(prob.dtype).removeprefix("torch.")]
    C.step(prob.rule, table.data_ptr(), table.shape[0], hyper.data_ptr(), dtype, prob.switches, arrivals.data_ptr(),
           torch.cuda.current_stream().cuda_stream, blocks)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule,switches", CASES, ids=CASE_IDS)
def test_cuda_op_matches_reference(rule, switches, dtype):
    kw = dict(decay="independent", maximize=True, lr_max=0.01)
    gpu, ref = Problem(rule, switches, dtype, device="cuda", **kw), Problem(rule, switches, dtype, **kw)
    compare_every_step(gpu, ref, 12, lambda g: gpu.step_op(g, gpu.hyper(device="cuda")),
                       lambda g: ref.step_reference([x.cpu() for x in g]))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule,switches", CASES, ids=CASE_IDS)
def test_cuda_matches_cpu_kernel(rule, switches, dtype):
    """Both kernels run the same helpers without FMA contraction: they agree to the tolerance
    table (the bias corrections' double pow may differ in the last bit between libm and CUDA)."""
    gpu, cpu = Problem(rule, switches, dtype, device="cuda", decay="l2"), Problem(rule, switches, dtype, decay="l2")
    compare_every_step(gpu, cpu, 8, gpu.step_op, lambda g: cpu.step_op([x.cpu() for x in g]))


@needs_gpu
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("rule,switches", RICHEST, ids=RICHEST_IDS)
def test_cuda_matches_cpu_kernel_in_every_layout(rule, switches, layout):
    """As the emulated kernel, on the GPU: to the tolerance table (CUDA's double pow may differ
    in the last bit, and a stochastic rounding then land on the other neighbour); a found_inf
    step exactly untouched."""
    bucket = LayoutBucket(rule, switches, layout, EMULATED_SIZES, device="cuda", misaligned=MISALIGNED)
    arrivals = torch.zeros(1, dtype=torch.int32, device="cuda")

    def step(ctl, seed):
        _cuda_ext.step(rule, bucket.table(), bucket.hyper, dtype_code(bucket.dtype), switches, bucket.device,
                       arrivals, state_dtype=dtype_code(bucket.state_dtype), master=bucket.master,
                       stochastic_rounding=bucket.stochastic, ctl=ctl, seed=seed)
        torch.cuda.synchronize()
        assert arrivals.item() == 0

    compare_with_cpu(bucket, step, exact=False)


@needs_gpu
@pytest.mark.parametrize("blocks", [1, 3, 1000, 0])
@pytest.mark.parametrize("rule,switches", CASES, ids=CASE_IDS)
def test_any_grid_steps_every_element_and_count_once(rule, switches, blocks):
    """Many tiny and empty segments over several table tiles, with grids smaller and larger than
    the work: each element is updated once per launch and each step count advanced once."""
    sizes = [(n,) for n in [3, 0, 1, 7, 4097, 1000, 0, 64] * 70]
    gpu, ref = Problem(rule, switches, torch.float32, sizes, "cuda"), Problem(rule, switches, torch.float32, sizes)
    hyper = gpu.hyper(device="cuda")
    arrivals = torch.zeros(1, dtype=torch.int32, device="cuda")

    def step(grads):
        launch(gpu, device_table(gpu, grads), hyper, arrivals, blocks)

    compare_every_step(gpu, ref, 3, step, lambda g: ref.step_reference([x.cpu() for x in g]))
    assert arrivals.item() == 0, "the last block resets the arrival counter"


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_buffers_take_the_scalar_path(dtype):
    """Views one element into their storage are not 16-byte aligned: the scalar path must be right."""
    shapes = [(4097,), (1000,), (5,)]
    gpu = Problem("adamw", (True,), dtype, shapes, "cuda")
    ref = Problem("adamw", (True,), dtype, shapes)

    def shifted(t):
        base = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = base[1:].view(t.shape)
        view.copy_(t)
        return view

    gpu.params = [shifted(p) for p in gpu.params]
    gpu.states = {k: [shifted(t) for t in ts] for k, ts in gpu.states.items()}
    assert not C.vector_aligned(gpu.params[0].data_ptr())
    compare_every_step(gpu, ref, 4, lambda g: gpu.step_op([shifted(x) for x in g]),
                       lambda g: ref.step_reference([x.cpu() for x in g]))


@needs_gpu
def test_launch_is_graph_capturable():
    """lr, step counts and tables are read from device memory: a captured step replays like eager steps."""
    shapes = [(4097,), (33, 17), (1,)]
    gpu = Problem("adamw", (False,), torch.float32, shapes, "cuda")
    ref = Problem("adamw", (False,), torch.float32, shapes)
    grads = gpu.grads(0)
    table, hyper = device_table(gpu, grads), gpu.hyper(device="cuda")
    arrivals = torch.zeros(1, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: occupancy and SM count get cached
        launch(gpu, table, hyper, arrivals)
    torch.cuda.current_stream().wait_stream(side)
    ref.step_reference([g.cpu() for g in grads])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(gpu, table, hyper, arrivals)
    for lr in (1e-3, 3e-4, 2e-3):
        # a new lr is written into the captured hyper row, as an lr scheduler would
        gpu.hp["lr"] = ref.hp["lr"] = lr
        hyper.copy_(gpu.hyper(device="cuda"))
        graph.replay()
        ref.step_reference([g.cpu() for g in grads])
        torch.cuda.synchronize()
        for (name, x), (_, y) in zip(gpu.tensors(), ref.tensors()):
            assert_close(x.cpu(), y, f"lr {lr} {name}", torch.float32, 4.0)
        assert [float(s) for s in gpu.steps] == [float(s) for s in ref.steps]


@needs_gpu
@pytest.mark.parametrize("rule,switches", CASES, ids=CASE_IDS)
def test_opcheck_on_cuda(rule, switches):
    prob = Problem(rule, switches, torch.float32, shapes=[(3,), (4, 5), (0,)], device="cuda")
    torch.library.opcheck(prob.op().default, prob.op_args(prob.grads(0), prob.hyper(device="cuda")))
