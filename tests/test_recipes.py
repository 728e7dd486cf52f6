"""Runs every ```python block of docs/recipes.md, so the page cannot rot.

Each block is a whole program, written to a file in an empty directory and run
in a fresh interpreter (no state leaks between recipes or into other tests),
with fusedwd importable from this checkout and the Hugging Face hub offline.
The HTML comments above a block that change how it runs are documented at the
top of docs/recipes.md; this file is their only reader.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "recipes.md"
TIMEOUT_S = 120  # per block; torchrun blocks included

DIRECTIVE = re.compile(r"<!--\s*recipe:\s*(?P<body>.*?)\s*-->")
FENCE = re.compile(r"^(?P<ticks>`{3,})(?P<lang>[\w+-]*)\s*$")

# Appended to torchrun scripts. torch 2.13's gloo threads now and then meet the
# interpreter's exit-time destructors with std::terminate (SIGABRT, "terminate called
# without an active exception": 3 runs in 20 of the DDP recipe here, with
# torch.optim.AdamW as with fusedwd), after the script's last line has run. Leaving
# through os._exit skips them, as tests/test_distributed.py's workers do.
TORCHRUN_EPILOGUE = """

# appended by tests/test_recipes.py: skip the exit-time destructors (see docs/recipes.md)
import os as _os, sys as _sys
_sys.stdout.flush()
_sys.stderr.flush()
_os._exit(0)
"""


@dataclass
class Recipe:
    line: int  # of the opening fence, 1-based
    heading: str
    code: str
    torchrun: Optional[list[str]] = None
    requires: list[str] = field(default_factory=list)

    def modules(self) -> list[str]:
        """Top-level modules the block imports, then those its comments require."""
        names = []
        for node in ast.walk(ast.parse(self.code)):
            if isinstance(node, ast.Import):
                names += [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.append(node.module.split(".")[0])
        return list(dict.fromkeys(names + self.requires))


def parse(text: str) -> tuple[list[Recipe], list[str]]:
    """The page's python blocks with their directives, and the errors in its directives."""
    recipes, errors = [], []
    lines = text.splitlines()
    heading, pending, i = "", [], 0
    while i < len(lines):
        line = lines[i]
        directive = DIRECTIVE.fullmatch(line.strip())
        fence = FENCE.match(line)
        if directive:
            pending.append((i + 1, directive["body"]))
        elif fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence["ticks"]), None)
            if end is None:
                errors.append(f"line {i + 1}: a code block that is never closed")
                break
            if fence["lang"] == "python":
                recipe = Recipe(i + 1, heading, "\n".join(lines[i + 1:end]) + "\n")
                for at, body in pending:
                    word, *args = shlex.split(body) or [""]
                    if word == "torchrun" and args:
                        recipe.torchrun = args
                    elif word == "requires" and args:
                        recipe.requires += args
                    else:
                        errors.append(f"line {at}: unknown recipe directive {body!r}")
                recipes.append(recipe)
            elif pending:
                errors.append(f"line {pending[0][0]}: a recipe directive above a {fence['lang'] or 'plain'} block")
            pending, i = [], end
        elif line.strip():
            if pending:  # only directives may stand between a directive and its block
                errors.append(f"line {pending[0][0]}: a recipe directive not followed by a ```python block")
                pending = []
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
        i += 1
    if pending:
        errors.append(f"line {pending[0][0]}: a recipe directive at the end of the page")
    return recipes, errors


def _slug(recipe: Recipe) -> str:
    words = re.findall(r"[a-z0-9]+", recipe.heading.lower())
    return "-".join(words[:4] or ["top"]) + f"-L{recipe.line}"


RECIPES, PAGE_ERRORS = parse(PAGE.read_text())


def test_page_directives_are_valid():
    assert not PAGE_ERRORS, "docs/recipes.md: " + "; ".join(PAGE_ERRORS)
    assert len(RECIPES) >= 10, f"only {len(RECIPES)} python blocks found in docs/recipes.md"


def test_parse_reads_directives_and_imports():
    page = "\n".join([
        "# A",
        "<!-- recipe: torchrun --nproc_per_node 2 -->",
        "<!-- recipe: requires accelerate -->",
        "```python",
        "import torch.distributed as dist",
        "from transformers import Trainer",
        "```",
        "```bash",
        "not run",
        "```",
        "<!-- recipe: tourchrun -->",
        "```python",
        "pass",
        "```",
        "<!-- recipe: requires x -->",
        "text between",
        "```python",
        "```",
    ])
    recipes, errors = parse(page)
    assert [r.line for r in recipes] == [4, 12, 17]
    assert recipes[0].torchrun == ["--nproc_per_node", "2"] and recipes[0].heading == "A"
    assert recipes[0].modules() == ["torch", "transformers", "accelerate"]
    assert recipes[1].torchrun is None and recipes[2].requires == []
    assert errors == ["line 11: unknown recipe directive 'tourchrun'",
                      "line 15: a recipe directive not followed by a ```python block"]


def _run(cmd: list[str], cwd: Path) -> tuple[int, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # the recipes' tensors are tiny: one thread each (torchrun does the same for its workers)
    # keeps them from spinning against each other and the rest of a busy 2-core machine
    env.setdefault("OMP_NUM_THREADS", "1")
    # a session of its own, so a timeout also ends torchrun's workers
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -1, f"timed out after {TIMEOUT_S} s\n{out}"
    return proc.returncode, out


@pytest.mark.parametrize("recipe", RECIPES, ids=_slug)
def test_recipe_runs(recipe: Recipe, tmp_path):
    missing = [m for m in recipe.modules() if m != "fusedwd" and importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"docs/recipes.md:{recipe.line} needs {', '.join(missing)}, not installed "
                    f"(pip install {' '.join(missing)})")
    script = tmp_path / "recipe.py"
    if recipe.torchrun is not None:
        import torch.distributed

        if not torch.distributed.is_available():
            pytest.skip("torch.distributed is not available in this torch build")
        script.write_text(recipe.code + TORCHRUN_EPILOGUE)
        cmd = [sys.executable, "-m", "torch.distributed.run", *recipe.torchrun, str(script)]
    else:
        script.write_text(recipe.code)
        cmd = [sys.executable, str(script)]
    code, out = _run(cmd, tmp_path)
    assert code == 0, f"docs/recipes.md:{recipe.line} ({recipe.heading}) exited {code}:\n{out[-6000:]}"
