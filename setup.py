"""Build of fusedwd's compiled kernels. Never imports torch.

The CPU extension ``fusedwd._C`` is always attempted. Its step loops
(csrc/cpu/loops_*.cpp) are compiled once per ISA variant with that variant's
flags and chosen at import from the CPU's features, so the installed module
runs on any x86-64 CPU (no -march=native). If the extension cannot be built,
installation still succeeds and fusedwd falls back to pure PyTorch.

The CUDA extension ``fusedwd._C_cuda`` is built when nvcc is found (CUDA_HOME,
PATH, or /usr/local/cuda*). FUSEDWD_CUDA=0 skips it, FUSEDWD_CUDA=1 requires it
(the install fails if nvcc is missing or the build fails); by default a failed
CUDA build leaves the rest of the install intact. FUSEDWD_CUDA_ARCHS lists the
GPU architectures ("80;90" by default: machine code for each, plus PTX of the
highest so newer GPUs can JIT it).
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from pybind11 import get_include
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "csrc"
INCLUDE_DIRS = [CSRC, os.path.join(CSRC, "include"), get_include()]

# -fno-math-errno: without it GCC keeps sqrt scalar (errno), 5x slower.
# -ffp-contract=off: no FMA contraction, so every ISA variant rounds alike and
#   gives bitwise identical results (the loops are memory bound; FMA buys nothing).
# -fno-trapping-math: the selects of the 8-bit codes, the fp16 conversions and the
#   stochastic rounding are if-converted only when GCC may assume that no floating
#   point exception traps (neither we nor torch unmask one; a process that enables
#   FP traps itself could see one from a discarded lane); without it those loops
#   stayed scalar wherever AVX-512's masked operations are missing (AVX2: every
#   8-bit step, fp16 parameters, stochastic rounding; the 8-bit AdamW step 3x
#   slower). No finite result changes (same IEEE operations and roundings); where
#   two NaNs meet, which one's sign survives may.
CPU_FLAGS = [
    "-std=c++17",
    "-O3",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-fno-trapping-math",
    "-fopenmp",
    "-fvisibility=hidden",
    "-Wall",
    "-Wextra",
    # Python's CFLAGS carry -g: debug info would triple the module's size
    "-g0",
]
CPU_LINK_FLAGS = ["-fopenmp"]

# The loop translation unit of each ISA variant and its extra flags; the
# baseline is plain x86-64 (or the target's default elsewhere).
BASELINE_LOOPS = os.path.join(CSRC, "cpu", "loops_baseline.cpp")
ISA_VARIANTS = {
    "avx2": (os.path.join(CSRC, "cpu", "loops_avx2.cpp"), ["-mavx2", "-mfma", "-mf16c"]),
    "avx512": (
        os.path.join(CSRC, "cpu", "loops_avx512.cpp"),
        [
            "-mavx2",
            "-mfma",
            "-mf16c",
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            # GCC's generic tuning would otherwise stay on 256-bit vectors
            "-mprefer-vector-width=512",
        ],
    ),
}


def is_x86_64():
    return platform.machine().lower() in ("x86_64", "amd64")


# ------------------------------------------------------------------ CUDA
# a fixed set of translation units (csrc/cuda/{f32,f16,bf16,f64,q8}.cu: the kernels of each
# group of storage layouts, every rule in each), compiled in parallel
CUDA_SOURCES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
CUDA_BINDINGS = os.path.join(CSRC, "cuda", "bindings.cpp")
DEFAULT_CUDA_ARCHS = "80;90"
# where toolkits keep libcudart_static.a (the targets/ ones are what lib64 links to)
CUDA_LIB_DIRS = ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                 os.path.join("targets", "sbsa-linux", "lib"))

# No --use_fast_math: divisions and square roots stay IEEE round-to-nearest.
# --fmad=false: no multiply-add contraction, so the kernels round exactly as the
#   CPU kernel (-ffp-contract=off) does; the step is memory bound, FMA buys nothing.
# -Xptxas -v: registers, spills and shared memory per kernel, printed with the build.
NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "--fmad=false",
    "-Xptxas=-v",
    "-Xcompiler=-fPIC,-fvisibility=hidden",
    # the kernels' inline host helpers get their own symbols (see common.h)
    "-DFUSEDWD_ISA_NS=nvcc",
]


def cuda_mode():
    """FUSEDWD_CUDA: "0" skip, "1" require, unset or empty: build if nvcc is found."""
    value = os.environ.get("FUSEDWD_CUDA", "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"FUSEDWD_CUDA must be 0, 1 or unset, got {value!r}")
    return {"": "auto", "0": "off", "1": "required"}[value]


def find_nvcc():
    """nvcc from CUDA_HOME / CUDA_PATH, then PATH, then the newest /usr/local/cuda*."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    if shutil.which("nvcc"):
        candidates.append(shutil.which("nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")

    def version(path):
        found = re.search(r"cuda-(\d+)\.(\d+)", path)
        return (int(found.group(1)), int(found.group(2))) if found else (0, 0)

    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), key=version, reverse=True)
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def cuda_home_of(nvcc):
    """The toolkit nvcc belongs to; nvcc may be a wrapper script (as /usr/local/bin/nvcc
    often is), so ask nvcc itself, and fall back on the directory above its bin/."""
    try:
        # --dryrun prints nvcc's environment (TOP=<toolkit>) and compiles nothing
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        found = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    except (OSError, subprocess.SubprocessError):
        found = None
    top = found.group(1).strip() if found else os.path.join(os.path.dirname(os.path.realpath(nvcc)), "..")
    return os.path.realpath(top)


def cuda_archs():
    """FUSEDWD_CUDA_ARCHS ("80;90", "8.0 9.0", "90a", ...) as sorted arch names like "90a"."""
    text = os.environ.get("FUSEDWD_CUDA_ARCHS", "").strip() or DEFAULT_CUDA_ARCHS
    archs = []
    for item in re.split(r"[;,\s]+", text):
        if not item:
            continue
        found = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d)?([af]?)", item)
        if not found:
            raise SystemExit(f"FUSEDWD_CUDA_ARCHS: cannot read {item!r} (expected e.g. \"80;90\")")
        arch = found.group(1) + (found.group(2) or "") + found.group(3)
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise SystemExit("FUSEDWD_CUDA_ARCHS names no architecture")
    return sorted(archs, key=lambda a: (int(re.sub(r"\D", "", a)), a))


def gencode_flags(archs):
    """Machine code (SASS) for every arch, plus PTX of the highest for newer GPUs."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # PTX of an arch-specific target (90a) loads on that GPU only: ship the plain one
    top = re.sub(r"[af]$", "", archs[-1])
    flags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
    return flags


def cuda_extensions():
    """The CUDA extension, when FUSEDWD_CUDA and the presence of nvcc allow it."""
    mode = cuda_mode()
    if mode == "off":
        return []
    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "required":
            raise SystemExit(
                "FUSEDWD_CUDA=1 but nvcc was not found: set CUDA_HOME to the CUDA toolkit, "
                "put nvcc on PATH, or install the toolkit under /usr/local/cuda"
            )
        print("fusedwd: nvcc not found; building without the CUDA extension", file=sys.stderr)
        return []
    ext = Extension("fusedwd._C_cuda", sources=[CUDA_BINDINGS] + CUDA_SOURCES, language="c++")
    ext.nvcc = nvcc
    ext.cuda_home = cuda_home_of(nvcc)
    ext.cuda_archs = cuda_archs()
    ext.cuda_required = mode == "required"
    return [ext]


class BuildExt(build_ext):
    """Compiles every translation unit of fusedwd._C (each ISA variant with its
    own flags) and of fusedwd._C_cuda (nvcc for the kernels) in parallel, and
    never fails the installation, unless FUSEDWD_CUDA=1 asked for the CUDA one."""

    def build_extensions(self):
        # the extensions build side by side, each compiling its own files in parallel:
        # nvcc's front end is mostly serial, so the cores are kept busy either way
        with ThreadPoolExecutor(max_workers=max(1, len(self.extensions))) as pool:
            ok = list(pool.map(self._try_build, self.extensions))
        # what failed is neither copied in place nor listed as an output
        self.extensions = [ext for ext, built in zip(self.extensions, ok) if built]

    def _try_build(self, ext):
        try:
            if ext.name == "fusedwd._C":
                self._build_cpu(ext)
            elif ext.name == "fusedwd._C_cuda":
                self._build_cuda(ext)
            else:
                self.build_extension(ext)
            return True
        except Exception as exc:  # noqa: BLE001 - any build failure means: install without it
            if getattr(ext, "cuda_required", False):
                raise RuntimeError(f"FUSEDWD_CUDA=1 and building {ext.name} failed: {exc}") from exc
            line = "=" * 78
            fallback = (
                "backend='cuda' is unavailable (FUSEDWD_CUDA=1 makes this an error)"
                if ext.name == "fusedwd._C_cuda"
                else "fusedwd uses its pure-PyTorch fallback\n(slower; it warns once at first use)"
            )
            print(
                f"\n{line}\nfusedwd: building the extension {ext.name} failed:\n  {exc}\n"
                f"fusedwd is installed without it; {fallback}.\n{line}\n",
                file=sys.stderr,
            )
            return False

    def _compile(self, source, extra_flags, macros):
        return self.compiler.compile(
            [source],
            output_dir=self.build_temp,
            macros=macros,
            include_dirs=INCLUDE_DIRS,
            debug=self.debug,
            extra_postargs=CPU_FLAGS + extra_flags,
        )

    def _build_cpu(self, ext):
        variants = ISA_VARIANTS if is_x86_64() else {}
        macros = [(f"FUSEDWD_HAVE_{name.upper()}", "1") for name in variants]
        jobs = [(src, [], macros) for src in ext.sources]
        jobs += [(src, flags, []) for src, flags in variants.values()]
        with ThreadPoolExecutor(max_workers=self._workers()) as pool:
            objects = [obj for objs in pool.map(lambda job: self._compile(*job), jobs) for obj in objs]
        self.compiler.link_shared_object(
            objects,
            self.get_ext_fullpath(ext.name),
            libraries=self.get_libraries(ext),
            library_dirs=ext.library_dirs,
            extra_postargs=CPU_LINK_FLAGS,
            export_symbols=self.get_export_symbols(ext),
            debug=self.debug,
            build_temp=self.build_temp,
            target_lang="c++",
        )

    def _workers(self):
        workers = self.parallel if isinstance(self.parallel, int) and self.parallel > 0 else None
        return workers or os.cpu_count() or 1

    def _nvcc(self, ext, source):
        """Compiles one .cu file; returns its object and nvcc's report (ptxas -v)."""
        obj = os.path.join(self.build_temp, os.path.splitext(source)[0] + ".o")
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        include = [f"-I{d}" for d in INCLUDE_DIRS]
        cmd = [ext.nvcc, "-x", "cu", *NVCC_FLAGS, *gencode_flags(ext.cuda_archs), *include,
               "-c", source, "-o", obj]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        report = f"$ {' '.join(cmd)}\n{result.stdout}{result.stderr}"
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source}:\n{report}")
        return obj, report

    def _build_cuda(self, ext):
        cuda_include = os.path.join(ext.cuda_home, "include")
        lib_dirs = [os.path.join(ext.cuda_home, sub) for sub in CUDA_LIB_DIRS]
        cuda_lib = next((d for d in lib_dirs if os.path.isfile(os.path.join(d, "libcudart_static.a"))), None)
        if cuda_lib is None:
            raise RuntimeError(f"libcudart_static.a not found under {ext.cuda_home}")
        archs = ";".join(ext.cuda_archs)
        cu_sources = [src for src in ext.sources if src.endswith(".cu")]
        cpp_sources = [src for src in ext.sources if not src.endswith(".cu")]
        with ThreadPoolExecutor(max_workers=self._workers()) as pool:
            cu_jobs = [pool.submit(self._nvcc, ext, src) for src in cu_sources]
            cpp_objects = pool.submit(
                self.compiler.compile,
                cpp_sources,
                output_dir=self.build_temp,
                macros=[("FUSEDWD_CUDA_ARCHS", f'"{archs}"')],
                include_dirs=INCLUDE_DIRS + [cuda_include],
                debug=self.debug,
                extra_postargs=["-std=c++17", "-O2", "-fvisibility=hidden", "-Wall", "-Wextra", "-g0"],
            ).result()
            results = [job.result() for job in cu_jobs]
        # registers and spills per kernel: pip shows them with -v, and they stay in build_temp
        report = "\n".join(r for _, r in results)
        with open(os.path.join(self.build_temp, "ptxas_report.txt"), "w") as f:
            f.write(report)
        print(report)
        self.compiler.link_shared_object(
            cpp_objects + [obj for obj, _ in results],
            self.get_ext_fullpath(ext.name),
            library_dirs=[cuda_lib],
            # cudart linked statically: no libcudart.so needed at import, any driver
            # (or none) at import time; librt/libdl/libpthread are what it uses
            libraries=["cudart_static", "rt", "dl", "pthread"],
            export_symbols=self.get_export_symbols(ext),
            debug=self.debug,
            build_temp=self.build_temp,
            target_lang="c++",
        )


cpu_extension = Extension(
    "fusedwd._C",
    sources=[
        os.path.join(CSRC, "bindings.cpp"),
        os.path.join(CSRC, "gather.cpp"),
        os.path.join(CSRC, "cpu", "dispatch.cpp"),
        BASELINE_LOOPS,
    ],
    language="c++",
)

setup(
    ext_modules=[cpu_extension] + cuda_extensions(),
    cmdclass={"build_ext": BuildExt},
)
