"""What every experiment shares: a progress bar, a printed table, JSON and a PNG."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any, Iterable, Optional, Sequence

import torch

DEFAULT_OUT = os.path.join("docs", "experiments")


def progress(iterable: Iterable, total: Optional[int] = None, desc: str = "") -> Iterable:
    """tqdm on stderr when installed and wanted; the bare iterable otherwise."""
    if os.environ.get("FUSEDWD_NO_PROGRESS"):
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, numbers in 4 significant digits."""

    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    cells = [[cell(x) for x in r] for r in rows]
    widths = [max(len(h), *(len(r[k]) for r in cells)) for k, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def save(name: str, result: dict, out_dir: str, figure=None) -> dict:
    """Write ``<name>.json`` (with the machine and versions) and ``<name>.png``; return paths."""
    os.makedirs(out_dir, exist_ok=True)
    result = dict(result)
    result["meta"] = {
        "experiment": name,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    paths = {"json": os.path.join(out_dir, f"{name}.json")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2)
    if figure is not None:
        paths["png"] = os.path.join(out_dir, f"{name}.png")
        figure.savefig(paths["png"], dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(figure)
    return paths


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display here or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
