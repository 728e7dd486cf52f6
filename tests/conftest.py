import os
import sys

# tests import their helpers (_helpers, _tolerances) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))


def pytest_terminal_summary(terminalreporter):
    """tests/test_torch_registry.py's cases per torch optimizer, and every case it skipped with the
    reason (issue 13: no registry input is dropped silently)."""
    import re
    from collections import Counter, defaultdict

    counts: dict = defaultdict(Counter)
    skipped: dict = defaultdict(list)
    for outcome in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, ()):
            match = re.search(r"test_torch_registry\.py::(test_registry_\w+)\[(.*)\]$", getattr(rep, "nodeid", ""))
            if not match or (outcome == "passed" and rep.when != "call"):
                continue
            kind = "error inputs" if match[1] == "test_registry_error_input" else "inputs"
            target = match[2].split("-")[0]
            counts[(target, kind)][outcome] += 1
            if outcome == "skipped":
                reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
                skipped[reason.removeprefix("Skipped: ")].append(match[2])
    if not counts:
        return
    write = terminalreporter.write_line
    terminalreporter.section("torch.optim registry (tests/test_torch_registry.py)")
    for (target, kind), c in sorted(counts.items()):
        write(f"{target:36s} {kind:13s} " + ", ".join(f"{n} {o}" for o, n in sorted(c.items())))
    for reason, ids in skipped.items():
        write(f"skipped ({len(ids)}): {reason}")
        for case in ids:
            write(f"    {case}")
