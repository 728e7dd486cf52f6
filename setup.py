"""Build of fusedwd's compiled kernels. Never imports torch.

The CPU extension ``fusedwd._C`` is always attempted. Its step loops
(csrc/cpu/loops_*.cpp) are compiled once per ISA variant with that variant's
flags and chosen at import from the CPU's features, so the installed module
runs on any x86-64 CPU (no -march=native). If the extension cannot be built,
installation still succeeds and fusedwd falls back to pure PyTorch.
"""

import os
import platform
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
CPU_FLAGS = [
    "-std=c++17",
    "-O3",
    "-fno-math-errno",
    "-ffp-contract=off",
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


def cuda_extensions():
    """The CUDA extension (``FUSEDWD_CUDA``, ``FUSEDWD_CUDA_ARCHS``) is added here
    by a later change; this build makes the CPU extension only."""
    return []


class BuildExt(build_ext):
    """Compiles every translation unit of fusedwd._C in parallel, each ISA
    variant with its own flags, and never fails the installation."""

    def build_extensions(self):
        built = []
        for ext in self.extensions:
            if self._try_build(ext):
                built.append(ext)
        # what failed is neither copied in place nor listed as an output
        self.extensions = built

    def _try_build(self, ext):
        try:
            if ext.name == "fusedwd._C":
                self._build_cpu(ext)
            else:
                self.build_extension(ext)
            return True
        except Exception as exc:  # noqa: BLE001 - any build failure means: install without it
            line = "=" * 78
            print(
                f"\n{line}\nfusedwd: building the extension {ext.name} failed:\n  {exc}\n"
                "fusedwd is installed without it and uses its pure-PyTorch fallback\n"
                f"(slower; it warns once at first use).\n{line}\n",
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
        workers = self.parallel if isinstance(self.parallel, int) and self.parallel > 0 else None
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
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


cpu_extension = Extension(
    "fusedwd._C",
    sources=[
        os.path.join(CSRC, "bindings.cpp"),
        os.path.join(CSRC, "cpu", "dispatch.cpp"),
        BASELINE_LOOPS,
    ],
    language="c++",
)

setup(
    ext_modules=[cpu_extension] + cuda_extensions(),
    cmdclass={"build_ext": BuildExt},
)
