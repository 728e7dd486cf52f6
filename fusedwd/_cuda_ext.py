"""Loads the compiled CUDA module, keeping the ImportError to re-raise on use.

Like fusedwd/_ext.py for the CPU module: importing fusedwd never fails because
``fusedwd._C_cuda`` is missing (built without nvcc, ``FUSEDWD_CUDA=0``) or
because there is no GPU. The module links cudart statically and imports on a
machine without a driver; ``device_count()`` is 0 there. ``cuda()`` raises a
RuntimeError saying which of the two is missing.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Optional

import torch

_cuda: Optional[ModuleType] = None
_cuda_error: Optional[BaseException] = None

try:
    from . import _C_cuda as _cuda  # type: ignore[attr-defined, no-redef]
except ImportError as exc:  # built without nvcc, FUSEDWD_CUDA=0, or a broken build
    _cuda_error = exc


def is_built() -> bool:
    """Whether the compiled CUDA module (fusedwd._C_cuda) was built and imports."""
    return _cuda is not None


def device_count() -> int:
    """CUDA devices the module can launch on: 0 when it is not built, without a driver or without a GPU."""
    return _cuda.device_count() if _cuda is not None else 0


def has_cuda() -> bool:
    """Whether backend='cuda' can run here: the module is built and sees a GPU."""
    return device_count() > 0


_probed: dict[int, Optional[str]] = {}
_warned_reference = False


def unusable(device: "torch.device") -> Optional[str]:
    """Why backend='cuda' cannot step tensors on ``device``, or None when it can.

    Probed once per device: the module must be built, see a GPU, and hold machine
    code or PTX the device runs (a V100 or T4, sm_70/sm_75, runs none of the default
    sm_80/sm_90 + compute_90 build: its first launch would fail with
    cudaErrorNoKernelImageForDevice).
    """
    if _cuda is None:
        return f"fusedwd._C_cuda failed to import ({_cuda_error!r})"
    if _cuda.device_count() == 0:
        return f"fusedwd._C_cuda found no usable GPU: {_cuda.status() or 'no CUDA device'}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _probed:
        reason = _cuda.probe(index)
        if reason:
            major, minor = torch.cuda.get_device_capability(index)
            reason = (f"fusedwd._C_cuda holds no code for cuda:{index} (compute capability {major}.{minor}): it was "
                      f"built for sm_{_cuda.ARCHS.replace(';', ', sm_')}; rebuild with FUSEDWD_CUDA_ARCHS="
                      f"{major}{minor} (docs/backends.md#build-switches). {reason}")
        _probed[index] = reason or None
    return _probed[index]


def warn_reference_once(device: "torch.device", why: str) -> None:
    """One RuntimeWarning per process when backend='auto' steps CUDA tensors with the reference."""
    global _warned_reference
    if not _warned_reference:
        _warned_reference = True
        warnings.warn(
            f"fusedwd: no compiled kernel can step parameters on {device} ({why}); backend='auto' falls back to the "
            "pure-torch reference, which is correct but one tensor at a time.",
            RuntimeWarning,
            stacklevel=4,
        )


def cuda() -> ModuleType:
    """The compiled CUDA module, or a RuntimeError that says why backend='cuda' cannot run."""
    if _cuda is None:
        raise RuntimeError(
            "backend='cuda' needs the compiled extension fusedwd._C_cuda, which failed to import "
            f"({_cuda_error!r}). Reinstall with the CUDA toolkit's nvcc available "
            "(`FUSEDWD_CUDA=1 pip install .` fails loudly if it is not) or use backend='reference'."
        ) from _cuda_error
    if _cuda.device_count() == 0:
        raise RuntimeError(
            f"backend='cuda' found no usable GPU: {_cuda.status() or 'no CUDA device'}. "
            f"fusedwd._C_cuda was built for sm_{_cuda.ARCHS.replace(';', ', sm_')} with CUDA runtime "
            f"{_cuda.CUDART_VERSION // 1000}.{_cuda.CUDART_VERSION % 1000 // 10}."
        )
    return _cuda


def step(rule: str, table: "torch.Tensor", hyper: "torch.Tensor", dtype_code: int, switches: tuple,
         device: "torch.device", arrivals: Optional["torch.Tensor"] = None, **precision) -> None:
    """One ``step(rule, ...)`` launch on torch's current stream of ``device``, from tables anywhere.

    ``table`` and ``hyper`` may live on the host: they are copied to the device
    first, into temporaries freed after the call, which the caching allocator
    reuses only for work queued after this launch on the same stream (a host
    ``table`` from pageable memory: the copy waits for the stream). The
    optimizers keep their tables on the device and call :func:`launch`.
    Arguments as :func:`launch`.
    """
    table_dev = table.to(device, non_blocking=True)
    hyper_dev = hyper.to(device, non_blocking=True).contiguous()
    sums = cuda().RULES[rule]["sums"] if rule in cuda().RULES else 0
    if arrivals is None:
        # a two-phase rule: each segment's arrival counter after the launch's word
        arrivals = torch.zeros(1 + (table.shape[0] if sums else 0), dtype=torch.int32, device=device)
    if sums and precision.get("scratch") is None:
        # a two-phase rule's scratch for these segments (reads the sizes on the host: a helper, not a hot path)
        elements = int(table[:, cuda().SEG_N].sum())
        precision["scratch"] = scratch(table.shape[0], elements, sums, device)
    launch(rule, table_dev, table.shape[0], hyper_dev, dtype_code, switches, device, arrivals, **precision)


def scratch(nseg: int, elements: int, sums: int, device: "torch.device") -> "torch.Tensor":
    """A two-phase launch's scratch (csrc/cuda/phases.cuh) over ``nseg`` segments of at most ``elements``
    elements in all, for a rule of ``sums`` sums (each launch writes it before reading it)."""
    size = cuda().two_phase_scratch_bytes(nseg, elements, sums)
    return torch.zeros(-(-size // 8), dtype=torch.float64, device=device)


def launch(rule: str, table: "torch.Tensor", nseg: int, hyper: "torch.Tensor", dtype_code: int, switches: tuple,
           device: "torch.device", arrivals: "torch.Tensor", *, state_dtype: int = -1, master: bool = False,
           stochastic_rounding: bool = False, ctl: Optional["torch.Tensor"] = None, seed: int = 0,
           quantized: bool = False, sums: Optional["torch.Tensor"] = None, phases: int = 3,
           scratch: Optional["torch.Tensor"] = None) -> None:
    """One ``step(rule, ...)`` launch over tables already on ``device``, on torch's current stream there.

    ``table``: int64, at least ``nseg`` rows of SEG_COLS; ``hyper``: contiguous float64 rows;
    ``arrivals``: one zero int32 on the device, left at zero by the kernel, kept by the caller
    across steps. Nothing is copied, so a CUDA graph may capture the launch. ``state_dtype``
    (a DTYPES code, -1: the parameters'), ``master``, ``stochastic_rounding``, ``seed`` and
    ``quantized`` (8-bit blockwise states: codes at ``SEG_S*``, fp32 block absmax at ``SEG_A*``)
    are passed on as they are; ``ctl``, the float32 control block (1/grad_scale, found_inf,
    clip coefficient), must already be on ``device``: the kernel reads it there, so a skipped
    or scaled step needs no host read.

    A two-phase rule (LAMB, StableAdamW) takes ``arrivals`` of 1 + ``nseg`` zeros (each segment's
    arrival counter after the launch's word, all left zero), ``scratch`` (:func:`scratch`, sized
    for the segments: the kernel cannot check it), ``sums`` (float64 [nseg, sums] on the device, or None:
    in the scratch) and ``phases`` (3: both, two launches; 1: phase 1, which writes ``sums``; 2:
    phase 2, which reads them), as fusedwd._C.step takes them.
    """
    ext = cuda()
    with torch.cuda.device(device):
        here = torch.device("cuda", torch.cuda.current_device())  # "cuda" names the current device
        for name, t, dtype in (("table", table, torch.int64), ("hyper", hyper, torch.float64),
                               ("arrivals", arrivals, torch.int32)):
            if t.device != here or t.dtype != dtype or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous {dtype} tensor on {here}, "
                                 f"got {t.dtype} {tuple(t.shape)} on {t.device}")
        if table.numel() < nseg * ext.SEG_COLS:
            raise ValueError(f"table holds {table.numel()} words, fewer than {nseg} rows of {ext.SEG_COLS}")
        if ctl is not None and (ctl.device != here or ctl.dtype != torch.float32 or ctl.numel() < ext.CTL_SIZE
                                or not ctl.is_contiguous()):
            raise ValueError(f"ctl must be a contiguous float32 tensor of {ext.CTL_SIZE} elements on {here}, "
                             f"got {ctl.dtype} {tuple(ctl.shape)} on {ctl.device}")
        k = ext.RULES[rule]["sums"] if rule in ext.RULES else 0
        if k and arrivals.numel() < 1 + nseg:
            raise ValueError(f"arrivals must hold 1 + nseg = {1 + nseg} zero words for rule {rule!r} (each "
                             f"segment's arrival counter after the launch's), got {arrivals.numel()}")
        if sums is not None and (sums.device != here or sums.dtype != torch.float64 or not sums.is_contiguous()
                                 or sums.numel() < nseg * k):
            raise ValueError(f"sums must be a contiguous float64 [{nseg}, {k}] tensor on {here}, "
                             f"got {sums.dtype} {tuple(sums.shape)} on {sums.device}")
        if scratch is not None and (scratch.device != here or not scratch.is_contiguous()):
            raise ValueError(f"scratch must be a contiguous tensor on {here}, got one on {scratch.device}")
        ext.step(rule, table.data_ptr(), nseg, hyper.data_ptr(), dtype_code, switches, arrivals.data_ptr(),
                 torch.cuda.current_stream(device).cuda_stream, state_dtype=state_dtype, master=master,
                 stochastic_rounding=stochastic_rounding, ctl=0 if ctl is None else ctl.data_ptr(), seed=seed,
                 quantized=quantized, sums=0 if sums is None else sums.data_ptr(), phases=phases,
                 scratch=0 if scratch is None else scratch.data_ptr())
