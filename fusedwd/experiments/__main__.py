"""python -m fusedwd.experiments NAME [--quick] [--out DIR] [--seed N]"""

from __future__ import annotations

import argparse
import time

from . import EXPERIMENTS, load
from ._common import DEFAULT_OUT, save


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedwd.experiments", description=__doc__)
    parser.add_argument("names", nargs="+", choices=EXPERIMENTS + ("all",), metavar="NAME",
                        help=f"one or more of: {', '.join(EXPERIMENTS)}, or all")
    parser.add_argument("--quick", action="store_true", help="the reduced version the tests run")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"where JSON and PNG go (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = EXPERIMENTS if "all" in args.names else args.names
    for name in names:
        module = load(name)
        start = time.perf_counter()
        result = module.run(quick=args.quick, seed=args.seed)
        result["seconds"] = time.perf_counter() - start
        paths = save(name, result, args.out, module.figure(result))
        print(f"== {name} ({result['seconds']:.0f} s) -> {', '.join(paths.values())}")
        print(module.report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
