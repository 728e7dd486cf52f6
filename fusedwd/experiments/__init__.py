"""Experiments that show the paper's claims with fusedwd itself, on a CPU in minutes.

``python -m fusedwd.experiments NAME`` (or ``make experiments``) prints a table
and writes ``NAME.json`` and ``NAME.png`` under ``docs/experiments/``; see
docs/experiments.md for what each shows.
"""

from __future__ import annotations

from importlib import import_module

EXPERIMENTS = ("propositions", "equilibrium", "sharing", "spurious", "quantization", "heatmap", "schedules")


def load(name: str):
    """The experiment module: ``run(quick, seed) -> dict``, ``report(dict) -> str``, ``figure(dict)``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"Unknown experiment {name!r} (expected one of {', '.join(EXPERIMENTS)})")
    return import_module(f"{__name__}.{name}")
