"""`ifcvf sim ...`: run scenarios against the simulated VF."""
from __future__ import annotations

import json
from pathlib import Path

RUN_HELP = """\
Run a scenario file against the simulated IFCVF: one world, one seed, fully
deterministic (the same seed prints the same trace digest in any process).

The scenario's `kind` picks what runs:
  bringup    start a VF with N queue pairs through the HAL, stop it, show the
             negotiated features, queues, vectors and saved ring state
  traffic    a guest behind a VF through the whole vhost-user stack, traffic
             both ways, every frame checked
  migration  the same, and the guest live-migrates to a second VF (pre-copy,
             as QEMU does it); invariants: destination RAM equals source RAM,
             no frame lost or duplicated, source and destination never run
             together.  The exit status is 1 when an invariant fails.

Scenario keys:
"""


def register(subparsers) -> None:
    from sim.scenario import describe_schema

    sim = subparsers.add_parser("sim", help="run scenarios on the simulated VF",
                                description="Deterministic scenarios on the cycle-level IFCVF model.")
    sub = sim.add_subparsers(dest="sim_command", metavar="SUBCOMMAND")
    run = sub.add_parser("run", help="run one scenario file (scenarios/*.toml)",
                         description=RUN_HELP + describe_schema(),
                         formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    run.add_argument("scenario", type=Path, help="the scenario TOML file")
    run.add_argument("--seed", type=int, help="override the scenario's seed")
    run.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    run.add_argument("--plot", type=Path, metavar="FILE.png",
                     help="migration scenarios: write a PNG timeline (dirty pages per iteration, "
                          "throughput over time, the switch-over marked)")
    run.set_defaults(func=cmd_run)
    faults = sub.add_parser(
        "faults", help="the fault matrix: each fault at each phase of a migration",
        description="Inject each fault (a queue that never acknowledges its stop, the front-end "
                    "disconnecting, a log smaller than the memory table, the memory table changed "
                    "while configured, the relay's DMA map failing) at each phase of a simulated "
                    "migration (before logging, during pre-copy, during stop-and-copy, after "
                    "switch-over) and check the outcome, pages and frames lost, and leaks (fds, "
                    "eventfds, threads, IOMMU mappings, logging left on).  Exit status 1 when a "
                    "row is not as expected.")
    faults.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    faults.add_argument("--fault", action="append", help="only this fault (repeatable)")
    faults.set_defaults(func=cmd_faults)
    sim.set_defaults(func=lambda args: sim.print_help() or 2)


def cmd_run(args) -> int:
    from rich.console import Console

    from ifcvf.tools.extras import require

    require("sim", "`ifcvf sim run`")
    if args.plot:
        require("plot", "--plot")

    from sim.scenario import ScenarioError, load

    console = Console()
    err = Console(stderr=True)
    try:
        scenario = load(args.scenario)
    except ScenarioError as e:
        err.print(f"[bold red]error:[/] {e}")
        return 2
    if args.seed is not None:
        scenario = scenario.with_seed(args.seed)
    console.rule(f"[bold]{scenario.name}[/] ({scenario.kind}, seed {scenario.seed})")
    if scenario.description:
        console.print(scenario.description)
    from ifcvf.tools.runs import render
    try:
        result = render.run(scenario, console, plot=args.plot)
    except render.RunFailed as e:
        err.print(f"[bold red]failed:[/] {e}")
        return 1
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"results written to {args.json}")
    return 0 if result.get("ok", True) else 1



def cmd_faults(args) -> int:
    import tempfile

    from rich.console import Console
    from rich.table import Table

    from ifcvf.tools.extras import require

    require("sim", "`ifcvf sim faults`")
    from ifcvf.tools.runs import faults

    unknown = [f for f in args.fault or [] if f not in faults.FAULTS]
    if unknown:
        Console(stderr=True).print(f"[red]unknown fault {unknown[0]!r}[/]; faults: {', '.join(faults.FAULTS)}")
        return 2
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        rows = faults.matrix(faults=args.fault, tmp=Path(tmp))
    table = Table(title="fault matrix")
    for col in ("fault", "phase", "mode", "outcome", "expected", "pages lost", "frames lost", "leaks"):
        table.add_column(col, no_wrap=True)
    table.add_column("reason (first thing logged)", overflow="ellipsis", no_wrap=True, max_width=70)
    for r in rows:
        style = "" if r.ok else "red"
        frames = str(r.frames_lost) + (" (front-end gone)" if r.frames_lost and r.frames_lost_allowed else "")
        table.add_row(r.fault, r.phase, r.mode, r.outcome, r.expected, str(r.pages_lost), frames,
                      "; ".join(r.leaks) or "none", r.reason, style=style)
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"rows": [r.as_json() for r in rows]}, indent=2) + "\n")
        console.print(f"results written to {args.json}")
    return 0 if all(r.ok for r in rows) else 1
