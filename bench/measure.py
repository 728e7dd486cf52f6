"""Interleaved timing of several providers of one case."""

from __future__ import annotations

import gc
import os
import time
from typing import Callable

import torch


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    """A function timing one call in seconds, waiting for the device to finish."""
    if device.type == "cuda":

        def timed_cuda(fn: Callable[[], None]) -> float:
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            return time.perf_counter() - t0

        return timed_cuda

    def timed(fn: Callable[[], None]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return timed


def initialise(steps: dict[str, Callable[[], None]], device: torch.device) -> tuple[dict[str, float], dict[str, str]]:
    """Take each provider's first step, which allocates and initialises its state.

    Returns the seconds each step took and, for the providers whose step
    raised (say torch's fused kernel rejecting a dtype), the error.
    """
    timed = _timer(device)
    seconds: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name, step in steps.items():
        try:
            seconds[name] = timed(step)
        except Exception as exc:  # report the provider as skipped and time the others
            errors[name] = f"{type(exc).__name__}: {exc}"
    return seconds, errors


def plan_repeats(warm_s: float, repeats: int, budget_s: float, min_repeats: int) -> int:
    """How many timed steps a provider gets: ``repeats``, or fewer when that would exceed the budget."""
    if warm_s * repeats <= budget_s:
        return repeats
    return max(min(min_repeats, repeats), int(budget_s / warm_s))


def interleaved(
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    warmup: int,
    repeats: int,
    budget_s: float,
    min_repeats: int,
    on_round: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Per provider, the seconds of each timed step.

    Each provider first runs ``warmup`` untimed steps (after ``initialise``);
    the last one sets how many timed steps it gets (``plan_repeats``). Then,
    round by round, every provider still owed a sample takes one step,
    starting from a different provider each round, so that drifts of the
    machine (clock, a neighbour's load) fall on all of them alike rather than
    on whichever ran last.
    """
    timed = _timer(device)
    names = list(steps)
    warm_s: dict[str, float] = {}
    for name in names:
        for _ in range(max(1, warmup)):  # at least one: it sets the repeats
            warm_s[name] = timed(steps[name])
    planned = {n: plan_repeats(warm_s[n], repeats, budget_s, min_repeats) for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    rounds = max(planned.values())
    # The collector would otherwise run inside whichever step crossed its threshold (timeit does the same).
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                if len(samples[name]) < planned[name]:
                    samples[name].append(timed(steps[name]))
            on_round()
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def _cpu_busy_s() -> float | None:
    """CPU seconds all processes of this machine (or VM) have spent busy, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10])  # already counted in user and nice
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


class Contention:
    """The share of the machine's CPU capacity other processes used during a ``with`` block.

    A step that runs one OpenMP region per tensor waits at every region's
    barrier for a thread the scheduler gave to someone else, so a neighbour's
    compile can make it 10x or 100x slower while a single-pass kernel barely
    notices: numbers taken on a busy machine are not comparable.
    """

    share: float | None = None

    def __enter__(self) -> "Contention":
        self._wall, self._busy, self._own = time.perf_counter(), _cpu_busy_s(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc) -> None:
        busy = _cpu_busy_s()
        if busy is None or self._busy is None:
            return
        wall = time.perf_counter() - self._wall
        other = (busy - self._busy) - (sum(os.times()[:2]) - self._own)
        self.share = max(0.0, other / (wall * (os.cpu_count() or 1)))
