"""`ifcvf sim ...`: run scenarios against the simulated VF."""
from __future__ import annotations

import json
import shutil
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


SWEEP_HELP = """\
Run many points of a scenario: every combination of a grid of scenario keys,
each with every seed.  The sweep file:

  base = "blackout-announce.toml"        # relative to the sweep file
  seeds = [1, 2, 3]
  [grid]
  "traffic.rx_pps" = [20000.0, 100000.0]
  "driver.guest_announce" = [true, false]

Keys and values are checked as in a scenario file before anything runs.
Points run on a local process pool (--workers), or on a Dask distributed
cluster (--scheduler ADDRESS of a running dask scheduler).  A point that fails
is reported with its error and the others go on; the exit status is 1 if any
point failed or broke an invariant.  A point's trace digest is the same
wherever it ran.  --json writes {"points": [{"params", "seed", "ok",
"trace_digest", ...headline metrics}]}.
"""


def register(subparsers) -> None:
    from sim.scenario import describe_schema

    sim = subparsers.add_parser("sim", help="run scenarios on the simulated VF",
                                description="Deterministic scenarios on the cycle-level IFCVF model.")
    sub = sim.add_subparsers(dest="sim_command", metavar="SUBCOMMAND")
    run = sub.add_parser("run", help="run one scenario file (scenarios/*.toml)",
                         # (wrapped as argparse wraps the rest: the terminal's width - 2)
                         description=RUN_HELP + describe_schema(
                             max(60, shutil.get_terminal_size().columns - 2)),
                         formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    run.add_argument("scenario", type=Path, help="the scenario TOML file")
    run.add_argument("--seed", type=int, help="override the scenario's seed")
    run.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    run.add_argument("--plot", type=Path, metavar="FILE.png",
                     help="migration scenarios: write a PNG timeline (dirty pages per iteration, "
                          "throughput over time, the switch-over marked)")
    run.set_defaults(func=cmd_run)
    sweep = sub.add_parser("sweep", help="run many points of a scenario: seeds times a grid of keys",
                           description=SWEEP_HELP,
                           formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    sweep.add_argument("sweep", type=Path, help="the sweep TOML file")
    sweep.add_argument("--workers", type=int, metavar="N",
                       help="local worker processes (default: one per core, at most one per point; "
                            "0: run in this process)")
    sweep.add_argument("--scheduler", metavar="ADDRESS",
                       help="run on a Dask distributed cluster, e.g. tcp://10.0.0.5:8786 "
                            "(needs the `dask` extra)")
    sweep.add_argument("--json", type=Path, metavar="FILE", help="write every point as JSON")
    sweep.add_argument("--csv", type=Path, metavar="FILE", help="write every point as CSV")
    sweep.add_argument("--plot", type=Path, metavar="FILE.png", help="plot --y against --x")
    sweep.add_argument("--x", metavar="PARAM", help="the grid key on the plot's x axis")
    sweep.add_argument("--y", metavar="METRIC", help="the metric on the plot's y axis")
    sweep.set_defaults(func=cmd_sweep)
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



# metric -> column title in the printed table (the files have every metric)
SWEEP_TABLE = {"seed": "seed", "ok": "ok", "downtime_us": "downtime us", "rx_frames": "rx frames",
               "frames_to_old_port": "to old port", "mac_moved_us": "MAC moved us",
               "first_frame_at_destination_us": "1st rx at dst us", "wall_s": "wall s",
               "trace_digest": "digest"}
SWEEP_WIDE_ONLY = ("wall_s", "trace_digest")   # shown from SWEEP_WIDE terminal columns up
SWEEP_WIDE = 110


def _cell(value) -> str:
    """A sweep table cell: whole floats without their ".0", others to 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.4g}"
    return str(value)


def cmd_sweep(args) -> int:
    from rich import box
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)
    from rich.table import Table

    from ifcvf.tools.extras import require

    require("sim", "`ifcvf sim sweep`")
    if args.scheduler:
        require("dask", "--scheduler")
    if args.plot:
        require("plot", "--plot")
    from sim.scenario import ScenarioError
    from ifcvf.tools.runs import sweep as sw

    console = Console()
    err = Console(stderr=True)
    try:
        sweep = sw.load_sweep(args.sweep)
    except ScenarioError as e:
        err.print(f"[bold red]error:[/] {e}")
        return 2
    params = list(sweep.grid)
    if args.plot and (not args.x or not args.y):
        err.print("[bold red]error:[/] --plot needs --x PARAM and --y METRIC")
        return 2
    if args.plot and args.x not in params:
        err.print(f"[bold red]error:[/] --x {args.x!r} is not a grid key; grid keys: {', '.join(params)}")
        return 2
    where = (f"Dask cluster {args.scheduler}" if args.scheduler else
             "this process" if args.workers == 0 else f"{args.workers or 'one per core'} local workers")
    console.rule(f"[bold]{sweep.name}[/]: {len(sweep.points)} points on {where}")
    failed = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("points", total=len(sweep.points))

        def on_done(entry):
            progress.advance(task)
            if not entry.get("ok"):
                failed.append(entry)
                why = entry.get("error") or "; ".join(entry.get("problems", []))[:200]
                progress.console.print(f"[bold red]point failed[/] {entry['params']} seed "
                                       f"{entry['seed']}: {why}")
        try:
            entries = sw.run_sweep(sweep, workers=args.workers, scheduler=args.scheduler,
                                   on_done=on_done)
        except OSError as e:
            err.print(f"[bold red]error:[/] cannot reach the scheduler {args.scheduler}: {e}")
            return 2
    cols = sw.columns(entries, params)
    # A grid key with one value is the same on every row: it goes in the
    # caption, so the columns that vary fit an 80-column terminal.
    fixed = [p for p in params if len(sweep.grid[p]) == 1]
    caption = [", ".join(f"{p} = {_cell(sweep.grid[p][0])}" for p in fixed)]
    shown = [c for c in cols if (c in params and c not in fixed) or c in SWEEP_TABLE]
    if console.width < SWEEP_WIDE:
        shown = [c for c in shown if c not in SWEEP_WIDE_ONLY]
        caption.append("wall s and digest: --json, --csv or a wider terminal")
    table = Table(title=f"{sweep.name} ({sweep.base.name}; every metric in --json/--csv)", box=box.SIMPLE_HEAD,
                  caption="; ".join(filter(None, caption)) or None)
    for c in shown:
        # (a word per header line: columns as narrow as their longest word)
        header = SWEEP_TABLE.get(c) or c.rpartition(".")[2].replace("_", " ")
        table.add_column(header.replace(" ", "\n"), justify="right")
    for e in entries:
        cells = []
        for c, v in zip(cols, sw.row(e, cols, params)):
            if c not in shown:
                continue
            if c == "trace_digest" and v:
                v = v[:8]
            if c == "ok":
                cells.append("[green]yes[/]" if v else "[bold red]NO[/]")
            else:
                cells.append(_cell(v))
        table.add_row(*cells)
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(sw.to_json(sweep, entries), indent=2) + "\n")
        console.print(f"points written to {args.json}")
    if args.csv:
        sw.write_csv(entries, params, args.csv)
        console.print(f"points written to {args.csv}")
    if args.plot:
        sw.plot(entries, params, args.x, args.y, args.plot)
        console.print(f"{args.y} against {args.x} plotted to {args.plot}")
    if failed:
        console.print(f"[bold red]{len(failed)} of {len(entries)} points failed[/]")
    return 1 if failed else 0


FAULTS_WIDE = 160     # terminal columns from which the fault matrix is one table


def _losses(row) -> tuple[str, str, str]:
    """A fault row's pages lost, frames lost and leaks, as both layouts print them."""
    frames = str(row.frames_lost) + (" (front-end gone)" if row.frames_lost and row.frames_lost_allowed else "")
    return str(row.pages_lost), frames, "; ".join(row.leaks) or "none"


def _print_faults_narrow(rows, console) -> None:
    """The fault matrix for a narrow terminal: a table per fault, each phase's reason
    whole under it (the one-table layout needs FAULTS_WIDE columns)."""
    from rich import box
    from rich.padding import Padding
    from rich.table import Table

    for fault in dict.fromkeys(r.fault for r in rows):
        mine = [r for r in rows if r.fault == fault]
        table = Table(title=f"fault matrix: {fault}", title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("phase", "mode", "outcome", "pages lost", "frames lost", "leaks"):
            table.add_column(col.replace(" ", "\n"), overflow="fold")
        for r in mine:
            outcome = r.outcome if r.outcome == r.expected else f"{r.outcome} (expected {r.expected})"
            table.add_row(r.phase, r.mode, outcome, *_losses(r), style="" if r.ok else "red")
        console.print(table)
        for r in mine:
            console.print(Padding(f"{r.phase}: {r.reason or '(nothing logged)'}", (0, 0, 0, 2)),
                          markup=False, highlight=False)
        console.print()


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
    if console.width >= FAULTS_WIDE:
        table = Table(title="fault matrix")
        for col in ("fault", "phase", "mode", "outcome", "expected", "pages lost", "frames lost", "leaks"):
            table.add_column(col, no_wrap=True)
        table.add_column("reason (first thing logged)", overflow="ellipsis", no_wrap=True, max_width=70)
        for r in rows:
            table.add_row(r.fault, r.phase, r.mode, r.outcome, r.expected, *_losses(r), r.reason,
                          style="" if r.ok else "red")
        console.print(table)
    else:
        _print_faults_narrow(rows, console)
    if args.json:
        args.json.write_text(json.dumps({"rows": [r.as_json() for r in rows]}, indent=2) + "\n")
        console.print(f"results written to {args.json}")
    return 0 if all(r.ok for r in rows) else 1
