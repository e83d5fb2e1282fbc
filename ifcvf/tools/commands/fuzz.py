"""`ifcvf fuzz TARGET --budget SECONDS [--json FILE]` and `ifcvf fuzz --list`."""
from __future__ import annotations

import json
from pathlib import Path

HELP = """\
Structure-aware fuzzing with a coverage-guided engine: atheris (libFuzzer)
drives a hypothesis property per target, whose strategies build structured
inputs and whose body asserts what must hold.  Each target runs in child
processes: a hang (no progress on one input for --hang-timeout s) or a native
crash ends that child, is counted and kept, and a new child takes the rest of
the budget.  An exception from the property is a failure; failures are told
apart by exception type and the line that raised it.

Prints cases, cases per second, crashes (failing cases), hangs and unique
failures per target; --json writes
{"targets": [{"name", "cases", "seconds", "crashes", "hangs",
"unique_failures", ...}]}
with each unique failure's input (hex: feed it to the target's
PROPERTY.hypothesis.fuzz_one_input to replay it).  Exit status 1 when
anything failed.
"""


def register(subparsers) -> None:
    import argparse

    parser = subparsers.add_parser("fuzz", help="fuzz the parsers and engines (atheris + hypothesis)",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", help="a target (see --list), or `all` to run each for the budget")
    parser.add_argument("--list", action="store_true", help="name the targets and what each fuzzes")
    parser.add_argument("--budget", type=float, default=60.0, metavar="SECONDS",
                        help="wall-clock seconds per target (default 60)")
    parser.add_argument("--hang-timeout", type=int, default=10, metavar="SECONDS",
                        help="one input running longer than this is a hang (default 10)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.set_defaults(func=cmd_fuzz)


def cmd_fuzz(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ifcvf.tools.fuzz import TARGETS

    console = Console()
    if args.list:
        table = Table(title="fuzz targets")
        table.add_column("target")
        table.add_column("what it fuzzes")
        for t in TARGETS.values():
            table.add_row(t.name, t.description)
        console.print(table)
        return 0
    if not args.target:
        console.print("[red]name a target, `all`, or --list[/]")
        return 2
    names = list(TARGETS) if args.target == "all" else [args.target]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        console.print(f"[red]unknown target {unknown[0]!r}[/]; targets: {', '.join(TARGETS)}, all")
        return 2
    if args.budget <= 0:
        console.print("[red]--budget must be positive[/]")
        return 2
    from ifcvf.tools.extras import require

    require("fuzz", "`ifcvf fuzz`")
    for name in names:
        if name in ("backend", "engines", "scenario"):
            require("sim", f"the {name} target")
    from ifcvf.tools.fuzz import engine
    from ifcvf.tools.fuzz.sanitized import SanitizerUnavailable, check_available

    for name in [n for n in names if TARGETS[n].sanitized]:
        try:
            check_available()
        except SanitizerUnavailable as err:
            if args.target != "all":
                console.print(f"[red]{name}: {err}[/]")
                return 2
            console.print(f"[yellow]{name} left out: {err}[/]")
            names.remove(name)
    results = []
    for name in names:
        console.print(f"fuzzing [bold]{name}[/] for {args.budget:g} s ...")
        results.append(engine.run(name, args.budget, hang_timeout=args.hang_timeout,
                                  log=lambda m: console.print(f"  {m}")))
    table = Table(title="fuzzing")
    for col in ("target", "cases", "seconds", "cases/s", "crashes", "hangs", "unique failures"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for r in results:
        table.add_row(r.name, str(r.cases), f"{r.seconds:.1f}", f"{r.cases_per_second:.0f}",
                      str(r.crashes), str(r.hangs), str(r.unique_failures))
    console.print(table)
    for r in results:
        for f in r.failures:
            console.print(f"[red]{r.name}[/]: {f.signature} (x{f.count}): {f.message}")
    if args.json:
        args.json.write_text(json.dumps({"targets": [r.as_json() for r in results]}, indent=2) + "\n")
        console.print(f"results written to {args.json}")
    return 1 if any(r.crashes or r.hangs for r in results) else 0
