"""`ifcvf bench ...`: benchmarks that print tables (never timed tests)."""
from __future__ import annotations

import importlib

BENCHMARKS = [
    "ifcvf.tools.benchmarks.relay",
    "ifcvf.tools.benchmarks.relay_poll",
    "ifcvf.tools.benchmarks.sim",
]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure the hot paths and print tables",
        description="Benchmarks print rich tables and, with --json, machine-readable results. "
                    "Quote medians of several runs.")
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue  # not built yet
        module.register(sub)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
