"""Experiments that show the paper's claims with fusedwd itself, on a CPU in minutes.

``python -m fusedwd.experiments NAME`` (or ``make experiments``) prints a table
and writes ``NAME.json`` and ``NAME.png`` under ``docs/experiments/``; see
docs/experiments.md for what each shows. They need matplotlib and
scikit-learn, which ``pip install fusedwd`` does not install:
``pip install "fusedwd[experiments]"``.
"""

from __future__ import annotations

from importlib import import_module

# the modules the experiments need beyond fusedwd's, and the packages that provide them
EXTRAS = {"matplotlib": "matplotlib", "sklearn": "scikit-learn"}

EXPERIMENTS = ("propositions", "equilibrium", "sharing", "spurious", "quantization", "heatmap", "schedules")


def require_extras() -> None:
    """A ModuleNotFoundError naming the ``experiments`` extra when a package it installs is missing."""
    missing = []
    for module, package in EXTRAS.items():
        try:
            import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ModuleNotFoundError(
            f"fusedwd.experiments needs {' and '.join(missing)}, which `pip install fusedwd` does not install: "
            'pip install "fusedwd[experiments]"'
        )


def load(name: str):
    """The experiment module: ``run(quick, seed) -> dict``, ``report(dict) -> str``, ``figure(dict)``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"Unknown experiment {name!r} (expected one of {', '.join(EXPERIMENTS)})")
    require_extras()
    return import_module(f"{__name__}.{name}")
