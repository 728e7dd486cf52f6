"""The launcher: one Triton launch per bucket per step, over all of its segments.

``step(rule, ...)`` takes exactly what the C++ kernel takes, the bucket's gathered
int64 segment rows and the float64 hyperparameter table, both on the host,
and the same keyword-only precision options (storage dtype of the states,
master weights, stochastic rounding, the control block, the seed). It
derives the program map (each program's segment and rank in it, a few
vectorized operations), packs rows, map, zeroed arrival counters,
hyperparameters, the seed and a default control block into ONE int64 buffer,
copies it to the device in one transfer, and launches one grid of one program
per block.

The optimizers keep that buffer (the launch *image* and its arrival
counters) on the device instead, re-uploaded only when it changes
(fusedwd/optim/_graphs.py), and launch through ``launch_image``, which
copies nothing: a CUDA graph can capture it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import torch
import triton.language as tl
from torch import Tensor

from .. import quant, rules
from .._buckets import CTL_CLIP, CTL_INV_SCALE, CTL_SIZE, SEG_COLS, SEG_HP, SEG_N
from ._kernels import UPDATES, _step_kernel
from ._phases import CHUNK, PHASES, _apply_kernel, _moments_kernel

# Elements per program and warps per program, fixed for every rule (no
# autotuning: the kernels update in place, so a tuner's trial runs would
# advance the optimizer several times). 1024 elements over 4 warps gives each
# thread 8 contiguous elements: two 128-bit accesses per fp32 buffer.
BLOCK_SIZE = 1024
NUM_WARPS = 4
# 8-bit states: a program owns whole quant blocks, counted from its tensor's first element
assert BLOCK_SIZE % quant.BLOCK_SIZE == 0
# two-phase rules: a block's chunk sums (csrc/cpu/kernels.h kSumChunk elements each), added 16 at a time
CHUNKS_PER_BLOCK = BLOCK_SIZE // CHUNK.value
assert CHUNKS_PER_BLOCK == 16

_STORAGE = {
    torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64,
}


_HALF = (torch.float16, torch.bfloat16)
# the kernel's switch arguments (SW0, SW1): a rule has at most this many
_MAX_SWITCHES = 2
# int64 words of the packed buffer holding the default control block (CTL_SIZE float32s)
_CTL_WORDS = (CTL_SIZE + 1) // 2


class _Views(NamedTuple):
    """A launch image's parts on the device (see image_words)."""
    segments: Tensor  # int64 [capacity * SEG_COLS]
    programs: Tensor  # int64 [program capacity]: the program map
    arrivals: Tensor  # int64 [capacity], zeros, left at zero by every launch
    seed: Tensor  # int64 [1]: the seed's bits
    ctl: Tensor  # float32 [>= CTL_SIZE]: the control block of no AMP and no clipping
    partials: Tensor  # float64 [program room * CHUNKS_PER_BLOCK * sums]: two-phase rules' chunk sums (else empty)
    sums: Tensor  # float64 [capacity * sums]: two-phase rules' per-segment sums (else empty)


# A launch reads, besides the hyperparameter table, one int64 buffer: the launch *image*
# [seed | default control block | program count | segment rows (capacity) | program map
# (program capacity)], written on the host by fill_image, followed on the device by one
# arrival counter per segment, which the kernels leave at zero. The map has one word per
# program: its segment | its rank among the segment's programs << 32. The optimizers keep
# the buffer on the device across steps (fusedwd/optim/_graphs.py) and upload the image
# only when it changes. A two-phase rule's buffer goes on with float64 scratch the kernels
# own: the chunk sums of at most ``program_room`` programs (one block each), then each
# segment's sums (docs/design.md#per-tensor-reductions).
_HEADER_WORDS = 1 + _CTL_WORDS + 1


def programs(sizes: Tensor) -> Tensor:
    """Programs of a launch per segment of these sizes (int64): ceil(n / BLOCK_SIZE), at least 1 (an
    empty tensor still gets one fully masked block, which advances its step count)."""
    return torch.div(sizes + (BLOCK_SIZE - 1), BLOCK_SIZE, rounding_mode="floor").clamp_(min=1)


def program_capacity(sizes: Sequence[int]) -> int:
    """Room for the program map of any launch over a subset of segments of these sizes."""
    return int(programs(torch.tensor(list(sizes), dtype=torch.int64)).sum()) if len(sizes) else 0


def image_words(capacity: int, program_room: int) -> int:
    """int64 words of the host image of a launch over at most ``capacity`` segments and
    ``program_room`` programs (program_capacity)."""
    return _HEADER_WORDS + capacity * SEG_COLS + program_room


def buffer_words(capacity: int, program_room: int, sums: int = 0) -> int:
    """int64 words of the device buffer: the image, the arrival counters and, for a rule with
    ``sums`` per-tensor sums, its chunk sums (of at most ``program_room`` blocks) and segment sums."""
    return image_words(capacity, program_room) + capacity + (program_room * CHUNKS_PER_BLOCK + capacity) * sums


def _views(buffer: Tensor, capacity: int, sums: int = 0) -> _Views:
    """The parts of a device buffer of buffer_words(capacity, any program room, sums)."""
    head, segments, rest = buffer.split([_HEADER_WORDS, capacity * SEG_COLS, buffer.numel() - _HEADER_WORDS
                                         - capacity * SEG_COLS])
    seed, ctl, _ = head.split([1, _CTL_WORDS, 1])
    # rest = room + capacity + (room * CHUNKS_PER_BLOCK + capacity) * sums
    room = (rest.numel() - capacity - capacity * sums) // (1 + CHUNKS_PER_BLOCK * sums)
    if buffer.numel() != buffer_words(capacity, room, sums):
        raise ValueError(f"a launch buffer of {buffer.numel()} words is no buffer_words({capacity}, program_room, "
                         f"{sums}): the rule's sums and the buffer disagree")
    program_map, arrivals, scratch = rest.split([room, capacity, rest.numel() - room - capacity])
    partials, segment_sums = scratch.view(torch.float64).split([room * CHUNKS_PER_BLOCK * sums, capacity * sums])
    return _Views(segments, program_map, arrivals, seed, ctl.view(torch.float32), partials, segment_sums)


def segment_rows(buffer: Tensor, capacity: int) -> Tensor:
    """The int64 [capacity, SEG_COLS] segment rows of a device buffer (the uploaded image's)."""
    return buffer[_HEADER_WORDS:_HEADER_WORDS + capacity * SEG_COLS].view(capacity, SEG_COLS)


def sums_view(buffer: Tensor, capacity: int, sums: int) -> Tensor:
    """The float64 [capacity, sums] segment sums of a two-phase rule's device buffer: what phase 1
    writes and phase 2 reads (a cross-rank reduction goes between ``phases=1`` and ``phases=2``)."""
    return _views(buffer, capacity, sums).sums.view(capacity, sums)


def fill_image(image: Tensor, segments: Tensor, seed: int, capacity: int) -> int:
    """Write the host image of a launch over ``segments`` (int64 [nseg, SEG_COLS], nseg at most
    ``capacity``) with the stochastic-rounding ``seed`` into ``image`` (image_words(capacity, room)
    words); returns the launch's program count. Words past nseg and past the programs are zeroed,
    so the image is a function of (segments, seed) alone.

    The program map depends only on the segments' sizes: an image this function filled (or a
    zeroed one) whose program count and first nseg sizes equal the new ones already holds it
    (a different nseg with the same sizes would change the count: every segment has a program),
    so a step whose sizes did not change rewrites only the rows, O(nseg) and not O(programs)."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    room = image.numel() - _HEADER_WORDS - capacity * SEG_COLS
    nseg = segments.shape[0]
    if nseg > capacity or room < 0:
        raise ValueError(f"an image of {image.numel()} words has no room for {nseg} segments (capacity {capacity})")
    head, seg_part, map_part = image.split([_HEADER_WORDS, capacity * SEG_COLS, room])
    seed_part, ctl_part, count_part = head.split([1, _CTL_WORDS, 1])
    seed_part[0] = seed - (1 << 64) if seed >= 1 << 63 else seed  # the uint64's bits
    ctl = ctl_part.view(torch.float32)
    ctl.zero_()  # found_inf 0: the step is taken
    ctl[CTL_INV_SCALE] = ctl[CTL_CLIP] = 1.0
    rows = seg_part.view(capacity, SEG_COLS)
    sizes = segments[:, SEG_N]
    per_segment = programs(sizes)
    total = int(per_segment.sum())
    if total > room:
        raise ValueError(f"a launch over these {nseg} segments has {total} programs, more than the image's room "
                         f"({room}): was it sized with program_capacity of the bucket's sizes?")
    same_map = int(count_part[0]) == total and torch.equal(rows[:nseg, SEG_N], sizes)
    rows[:nseg].copy_(segments)
    rows[nseg:].zero_()
    if not same_map:
        segment = torch.repeat_interleave(torch.arange(nseg, dtype=torch.int64), per_segment)
        firsts = torch.cumsum(per_segment, 0) - per_segment
        rank = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(firsts, per_segment)
        torch.bitwise_or(segment, rank << 32, out=map_part[:total])
        map_part[total:].zero_()
        count_part[0] = total
    return total


def _check_layout(dtype: torch.dtype, state_dtype: torch.dtype, master: bool, stochastic: bool) -> None:
    """The storage combinations the kernels support: csrc/include/fusedwd/precision.h layout_supported."""
    half_p, half_s = dtype in _HALF, state_dtype in _HALF
    if master:
        ok = half_p and not stochastic and (state_dtype == torch.float32 or half_s)
    elif stochastic:
        ok = dtype == torch.bfloat16 and state_dtype in (torch.bfloat16, torch.float32)
    else:
        ok = state_dtype == dtype or (dtype == torch.float32 and half_s) or (half_p and state_dtype == torch.float32)
    if not ok:
        raise ValueError(f"unsupported storage layout: params {dtype}, states {state_dtype}"
                         + (", fp32 master weights" if master else "")
                         + (", stochastic rounding" if stochastic else ""))


def _check_q8_layout(dtype: torch.dtype, state_dtype: Optional[torch.dtype], master: bool, stochastic: bool) -> None:
    """8-bit states: precision.h q8_layout_supported (fp32 p; 16-bit p with an fp32 master; bf16 p
    rounded stochastically; 16-bit p rounded to nearest)."""
    if master:
        ok = dtype in _HALF and not stochastic
    elif stochastic:
        ok = dtype == torch.bfloat16
    else:
        ok = dtype == torch.float32 or dtype in _HALF
    if not ok or state_dtype not in (None, torch.uint8):
        raise ValueError(f"unsupported storage layout: params {dtype}, 8-bit states"
                         + (f" (state_dtype {state_dtype})" if state_dtype not in (None, torch.uint8) else "")
                         + (", fp32 master weights" if master else "")
                         + (", stochastic rounding" if stochastic else ""))


def _check_tables(segments: Tensor, hyper: Tensor, hp_cols: int, device: torch.device) -> None:
    """Validate the host tables of a ``step`` call."""
    if segments.dtype != torch.int64 or segments.dim() != 2 or segments.shape[1] != SEG_COLS:
        raise ValueError(
            f"segments must be an int64 [nseg, {SEG_COLS}] table, got {segments.dtype} {tuple(segments.shape)}"
        )
    if hyper.dtype != torch.float64 or hyper.dim() != 2 or hyper.shape[1] != hp_cols:
        raise ValueError(f"hyper must be a float64 [groups, {hp_cols}] table, got {hyper.dtype} {tuple(hyper.shape)}")
    if segments.device.type != "cpu":
        raise ValueError("the segment table is read on the host; pass a CPU tensor")
    # capturable=True builds the hyperparameter rows on the device: they are never read on the host
    if hyper.device.type != "cpu" and hyper.device != device:
        raise ValueError(f"hyper must be on the host or on {device}, got a tensor on {hyper.device}")
    hp_rows = segments[:, SEG_HP]
    if segments.shape[0] and (int(hp_rows.min()) < 0 or int(hp_rows.max()) >= hyper.shape[0]):
        raise ValueError(f"a segment names a hyperparameter row outside [0, {hyper.shape[0]})")


def _check_options(rule: rules.Rule, switches: tuple, dtype: torch.dtype, state_dtype: Optional[torch.dtype],
                   master: bool, stochastic_rounding: bool, ctl: Optional[Tensor], quantized: bool,
                   device: torch.device) -> Optional[torch.dtype]:
    """Validate the switches and precision options; returns the states' storage dtype (None with 8-bit states)."""
    if len(switches) != len(rule.switches):
        raise ValueError(f"rule {rule.name!r} takes {len(rule.switches)} switches, got {len(switches)}")
    if len(rule.switches) > _MAX_SWITCHES:
        raise ValueError(f"the Triton kernel takes at most {_MAX_SWITCHES} switches; rule {rule.name!r} has "
                         f"{len(rule.switches)}")
    if dtype not in _STORAGE:
        raise TypeError(f"the Triton kernels take {', '.join(map(str, _STORAGE))} parameters, got {dtype}")
    if quantized:
        _check_q8_layout(dtype, state_dtype, master, stochastic_rounding)
        state_dtype = None
    else:
        state_dtype = dtype if state_dtype is None else state_dtype
        if state_dtype not in _STORAGE:
            raise TypeError(f"the Triton kernels take {', '.join(map(str, _STORAGE))} states, got {state_dtype}")
        _check_layout(dtype, state_dtype, master, stochastic_rounding)
    # "cuda" names whichever CUDA device is current
    same_device = ctl is not None and ctl.device.type == device.type and device.index in (None, ctl.device.index)
    if ctl is not None and (ctl.dtype != torch.float32 or ctl.numel() < CTL_SIZE or not ctl.is_contiguous()
                            or not same_device):
        raise ValueError(f"ctl must be a contiguous float32 tensor of {CTL_SIZE} elements on {device}, got "
                         f"{ctl.dtype} {tuple(ctl.shape)} on {ctl.device}")
    return state_dtype


def constants(rule: str, switches: Sequence[bool], dtype: torch.dtype, state_dtype: Optional[torch.dtype],
              master: bool, stochastic_rounding: bool, quantized: bool) -> dict[str, Any]:
    """The generic kernel's constexpr arguments for one rule, switch combination and storage layout
    (``state_dtype`` None with 8-bit states): what a launch passes, and what bench/gpu_static.py
    compiles ahead of time."""
    spec = rules.get(rule)
    switches = tuple(bool(s) for s in switches)
    kept = [slot is not None for slot in spec.slots(switches)] + [False] * (3 - len(spec.states))
    signed = [state.signed for state in spec.states] + [False] * (3 - len(spec.states))
    sw = switches + (False,) * (_MAX_SWITCHES - len(switches))
    return dict(P=_STORAGE[dtype], S=tl.uint8 if quantized else _STORAGE[state_dtype],
                MATH=tl.float64 if dtype == torch.float64 else tl.float32, MASTER=bool(master),
                SR=bool(stochastic_rounding), BLOCK_SIZE=BLOCK_SIZE, Q8=bool(quantized),
                UPDATE=UPDATES[rule], HP_COLS=len(spec.columns), KEEP0=kept[0], KEEP1=kept[1], KEEP2=kept[2],
                SIGNED0=signed[0], SIGNED1=signed[1], SIGNED2=signed[2], NSW=len(switches), SW0=sw[0], SW1=sw[1])


def phase_constants(rule: str, dtype: torch.dtype, state_dtype: torch.dtype, master: bool,
                    stochastic_rounding: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The constexpr arguments of a two-phase rule's kernels (phase 1, phase 2) for one storage layout:
    what a launch passes, and what bench/gpu_static.py compiles ahead of time."""
    spec = rules.get(rule)
    reads_p, moments, terms, apply_scalars, apply = PHASES[rule]
    common = dict(P=_STORAGE[dtype], S=_STORAGE[state_dtype], MATH=tl.float64 if dtype == torch.float64 else tl.float32,
                  MASTER=bool(master), BLOCK_SIZE=BLOCK_SIZE, HP_COLS=len(spec.columns), K=len(spec.sums))
    return (dict(common, READS_P=reads_p, MOMENTS=moments, TERMS=terms),
            dict(common, SR=bool(stochastic_rounding), APPLY_SCALARS=apply_scalars, APPLY=apply))


def _enqueue(rule: str, views: _Views, hyper: Tensor, nseg: int, num_programs: int, device: torch.device,
             dtype: torch.dtype, state_dtype: Optional[torch.dtype], master: bool, stochastic_rounding: bool,
             ctl: Optional[Tensor], quantized: bool, switches: tuple, phases: int = 3,
             sums: Optional[Tensor] = None) -> None:
    """The launches of the rule over ``nseg`` segments whose tables are on ``device``: one, or a
    two-phase rule's ``phases`` (1, 2 or both) reading and writing ``sums`` (else the buffer's)."""
    table_args = (views.segments, views.programs, views.arrivals, hyper, nseg, views.ctl if ctl is None else ctl,
                  views.seed)
    options = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)
    if rule in PHASES:
        first, second = phase_constants(rule, dtype, state_dtype, master, stochastic_rounding)
        sums = views.sums if sums is None else sums
        launches = []
        if phases & 1:
            launches.append((_moments_kernel, (*table_args, views.partials, sums), first))
        if phases & 2:
            launches.append((_apply_kernel, (*table_args, sums), second))
    else:
        launches = [(_step_kernel, table_args,
                     constants(rule, switches, dtype, state_dtype, master, stochastic_rounding, quantized))]
    for kernel, args, constexprs in launches:
        if device.type == "cuda":
            with torch.cuda.device(device):  # Triton launches on the current device
                kernel[(num_programs,)](*args, **constexprs, **options)
        else:
            kernel[(num_programs,)](*args, **constexprs, **options)


def _check_phases(spec: rules.Rule, phases: int, sums: Optional[Tensor], nseg: int, quantized: bool,
                  device: torch.device, buffer_sums: bool = False) -> None:
    """A two-phase rule's ``phases`` and ``sums`` (csrc/bindings.cpp's rules; ``buffer_sums``: the sums
    are the launch buffer's, launch_image); an elementwise rule takes neither."""
    if not spec.reduces:
        if sums is not None or phases != 3:
            raise ValueError(f"rule {spec.name!r} is elementwise: it takes no sums and no phases")
        return
    if quantized:
        raise ValueError(f"rule {spec.name!r} does not take 8-bit states: its sums are not implemented on decoded "
                         "codes")
    if phases not in (1, 2, 3):
        raise ValueError(f"phases must be 1, 2 or 3, got {phases}")
    if phases != 3 and sums is None and not buffer_sums:
        raise ValueError(f"phases={phases} takes the sums buffer (sums=)")
    k = len(spec.sums)
    same_device = sums is not None and sums.device.type == device.type and device.index in (None, sums.device.index)
    if sums is not None and (sums.dtype != torch.float64 or sums.shape != (nseg, k) or not sums.is_contiguous()
                             or not same_device):
        raise ValueError(f"sums must be a contiguous float64 [{nseg}, {k}] tensor on {device}, got {sums.dtype} "
                         f"{tuple(sums.shape)} on {sums.device}")


def launch_image(rule: str, buffer: Tensor, capacity: int, nseg: int, num_programs: int, hyper: Tensor,
                 device: torch.device, dtype: torch.dtype, switches: Sequence[bool], *,
                 state_dtype: Optional[torch.dtype] = None, master: bool = False, stochastic_rounding: bool = False,
                 ctl: Optional[Tensor] = None, seed: int = 0, quantized: bool = False, phases: int = 3) -> None:
    """One launch (two for a two-phase rule) over tables already on ``device``: ``buffer``
    (buffer_words(capacity, room, len(rule.sums)) int64) holds the image fill_image wrote (``nseg``
    segments, ``num_programs`` programs: what it returned), the arrival counters and a two-phase
    rule's scratch, whose segment sums (sums_view) phase 1 writes and phase 2 reads (``phases``:
    1, 2 or 3, both); ``hyper`` is the float64 [groups, cols] table on ``device``. The other
    arguments are ``step``'s. The seed was written into the image (``seed`` is accepted for
    ``step``'s keyword set and ignored). Nothing is copied from the host: a CUDA graph may capture
    these launches."""
    del seed
    device = torch.device(device)
    spec = rules.get(rule)
    switches = tuple(bool(s) for s in switches)
    master, stochastic_rounding, quantized = bool(master), bool(stochastic_rounding), bool(quantized)
    state_dtype = _check_options(spec, switches, dtype, state_dtype, master, stochastic_rounding, ctl,
                                 quantized, device)
    _check_phases(spec, phases, None, nseg, quantized, device, buffer_sums=True)
    if nseg == 0:
        return
    views = _views(buffer, capacity, len(spec.sums))
    if views.programs.numel() < num_programs:
        raise ValueError(f"the buffer's program map has room for {views.programs.numel()} programs, but the launch "
                         f"has {num_programs} (buffer_words(capacity, program_room, sums))")
    _enqueue(rule, views, hyper.reshape(-1), nseg, num_programs, device, dtype, state_dtype, master,
             stochastic_rounding, ctl, quantized, switches, phases)


def step(rule: str, segments: Tensor, hyper: Tensor, device: torch.device, dtype: torch.dtype,
         switches: Sequence[bool], *, state_dtype: Optional[torch.dtype] = None, master: bool = False,
         stochastic_rounding: bool = False, ctl: Optional[Tensor] = None, seed: int = 0,
         quantized: bool = False, sums: Optional[Tensor] = None, phases: int = 3) -> None:
    """One step of ``rule`` over every segment of a bucket, in one launch, or two for a two-phase
    rule (docs/math.md#<rule>, docs/design.md#per-tensor-reductions).

    Args:
        rule: the rule's name (fusedwd.rules).
        segments: int64 ``[nseg, SEG_COLS]`` on the host: the bucket's rows for this
            step (docs/design.md#segment-table); every address points into ``device``.
        hyper: float64 ``[groups, len(columns)]`` on the host (or on ``device``: capturable=True),
            one row per param group in the rule's column order.
        device: where the tensors the rows point to live (CPU only under
            ``TRITON_INTERPRET=1``).
        dtype: the storage dtype of every parameter and gradient.
        switches: the rule's structural switches, one bool each, in its order; the rows carry
            the states they keep.
        state_dtype: the storage dtype of every state; None: ``dtype``. fp32 parameters
            may keep 16-bit states, 16-bit parameters fp32 ones.
        master: 16-bit parameters have an fp32 master copy at ``SEG_MASTER``: the update
            reads it, and writes it exactly and the parameter rounded to nearest even.
        stochastic_rounding: round bf16 parameters (without a master) stochastically,
            with bits keyed by ``seed``, the segment's ``SEG_SALT`` and its step.
        ctl: float32 ``[CTL_SIZE]`` on ``device``: 1/grad_scale, found_inf (nonzero: the
            launch writes nothing, step counts included) and the clip coefficient,
            read by the kernel; None: no scaling, no clipping.
        seed: the stochastic-rounding seed, in [0, 2^64).
        quantized: 8-bit blockwise states (docs/quantization.md): ``SEG_S*`` hold uint8 codes and
            ``SEG_A*`` each state's fp32 block absmax, blocks of 256 from each tensor's first element;
            ``state_dtype`` is then None (or torch.uint8). Layouts: fp32 parameters, 16-bit ones with
            ``master``, bf16 ones with ``stochastic_rounding``, 16-bit ones rounded to nearest.
        sums: two-phase rules: float64 ``[nseg, len(rule.sums)]`` on ``device``, each segment's sums,
            written by phase 1 and read by phase 2; None: scratch (``phases`` 3 only).
        phases: two-phase rules: 3 both, 1 phase 1 only (the step counts unchanged), 2 phase 2
            only, from ``sums``.

    The host tables, the arrival counters and the hyperparameters are packed into one buffer and
    copied to ``device`` in one asynchronous transfer.
    """
    spec = rules.get(rule)
    switches = tuple(bool(s) for s in switches)
    master, stochastic_rounding, quantized = bool(master), bool(stochastic_rounding), bool(quantized)
    device = torch.device(device)
    state_dtype = _check_options(spec, switches, dtype, state_dtype, master, stochastic_rounding, ctl, quantized,
                                 device)
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    _check_tables(segments, hyper, len(spec.columns), device)
    nseg = segments.shape[0]
    _check_phases(spec, phases, sums, nseg, quantized, device)
    if nseg == 0:
        return
    k = len(spec.sums)
    room = program_capacity(segments[:, SEG_N].tolist())
    words = buffer_words(nseg, room, k)
    hyper_on_host = hyper.device.type == "cpu"
    # pinned, so the one host-to-device copy below is asynchronous: a step never
    # waits for the GPU. The caching host allocator keeps the buffer until the copy is done.
    packed = torch.empty(words + hyper.numel(), dtype=torch.int64, pin_memory=device.type == "cuda")
    packed[:_HEADER_WORDS].zero_()  # no program count: fill_image writes the program map
    num_programs = fill_image(packed[: image_words(nseg, room)], segments, int(seed), nseg)
    packed[image_words(nseg, room): words].zero_()  # the arrival counters
    if hyper_on_host:
        packed[words:].view(torch.float64).copy_(hyper.reshape(-1))
    if device.type != "cpu":
        packed = packed.to(device, non_blocking=True)
    hyper_part = packed[words:].view(torch.float64)
    if not hyper_on_host:
        hyper_part.copy_(hyper.reshape(-1))  # device to device, queued after the upload
    _enqueue(rule, _views(packed[:words], nseg, k), hyper_part, nseg, num_programs, device, dtype, state_dtype,
             master, stochastic_rounding, ctl, quantized, switches, phases, sums)
