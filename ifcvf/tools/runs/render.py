"""Run a scenario by kind and render its results with rich."""
from __future__ import annotations

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn)
from rich.table import Table

from hal.api import HalError
from ifcvf import ids
from ifcvf.hw import HwError


class RunFailed(Exception):
    pass


def run(scenario, console, plot=None) -> dict:
    if scenario.kind == "bringup":
        from ifcvf.tools.runs import bringup
        try:
            with console.status("bringing the VF up") as status:
                result = bringup.run(scenario, progress=lambda phase: status.update(phase))
        except (HwError, HalError) as e:
            raise RunFailed(str(e)) from None
        show_bringup(result, console)
        return result.to_json()
    from ifcvf.tools.runs import migration
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("starting", total=None)

        def on_phase(phase, info):
            if phase == "copy":     # pages of the current pass sent so far
                progress.update(task, description=f"{info['what']}: pages sent",
                                completed=info["done"], total=info["total"])
                return
            it = info.get("iteration")
            what = (f"iteration {it.index}: copied {it.pages_copied} pages, {it.remaining_pages} dirty"
                    if it else phase)
            progress.update(task, description=what)

        result = migration.MigrationRun(scenario, on_phase).run()
    show_migration(result, console)
    if plot:
        from ifcvf.tools.runs.plot import plot_migration
        plot_migration(result, plot)
        console.print(f"timeline plotted to {plot}")
    return result


def show_bringup(result, console) -> None:
    feats = Table(title="negotiated features", show_header=False)
    feats.add_row("written to the device", f"{result.features:#x}")
    feats.add_row("", " ".join(ids.feature_names(result.features)))
    feats.add_row("offered by the device", f"{result.offered:#x}")
    feats.add_row("MAC", result.mac)
    feats.add_row("LM block (BAR 4)", "yes" if result.lm_block else "no")
    console.print(feats)
    queues = Table(title="queues (saved ring state after stop)")
    for col in ("queue", "role", "size", "MSI-X vector", "last_avail", "last_used"):
        queues.add_column(col, justify="right")
    for q in result.queues:
        queues.add_row(str(q["index"]), "RX" if q["index"] % 2 == 0 else "TX", str(q["size"]),
                       str(q["vector"]), str(q["last_avail"]), str(q["last_used"]))
    console.print(queues)
    console.print(f"simulated time {result.elapsed_ns / 1000:.1f} us, "
                  f"{result.trace_events} trace events, trace digest [bold]{result.trace_digest}[/]")


def _mark(ok) -> str:
    if ok is None:
        return "[dim]n/a[/]"
    return "[green]yes[/]" if ok else "[bold red]NO[/]"


def show_migration(result: dict, console) -> None:
    t = result["traffic"]
    rates = Table(title="throughput delivered (Gb/s)")
    for col in ("", "before", "during", "after"):
        rates.add_column(col, justify="right")
    for d in ("rx", "tx"):
        rates.add_row("to the guest" if d == "rx" else "from the guest",
                      *(f"{t[w][f'{d}_gbps']:.2f}" for w in ("before", "during", "after")))
    for d in ("rx", "tx"):
        if any(t[w].get(f"{d}_pps") for w in ("before", "during", "after")):
            rates.add_row("  frames/s " + ("to the guest" if d == "rx" else "from the guest"),
                          *(f"{t[w].get(f'{d}_pps', 0):.0f}" for w in ("before", "during", "after")))
    console.print(rates)
    mig = result.get("migration")
    if mig:
        # (a word per header line, the leg only when there are several: nine
        # columns of numbers fit an 80-column terminal whole)
        legs = mig["legs"] > 1
        its = Table(title=f"pre-copy ({mig['mode']} dirty logging)")
        for col in ("leg",) * legs + ("iteration", "pages sent", "zero pages", "stream MiB",
                                      "dirty log", "dirty CPU", "remaining", "ms"):
            its.add_column(col.replace(" ", "\n"), justify="right", overflow="fold")
        for it in mig["per_iteration"]:
            its.add_row(*(str(it["leg"]),) * legs, str(it["iteration"]), str(it["pages_copied"]),
                        str(it["zero_pages"]), f"{it['stream_bytes'] / (1 << 20):.1f}",
                        str(it["dirty_log_pages"]), str(it["dirty_cpu_pages"]),
                        str(it["remaining_pages"]), f"{it['duration_us'] / 1000:.3f}")
        console.print(its)
        summary = Table(show_header=False, title="migration")
        summary.add_row("legs / iterations", f"{mig['legs']} / {mig['iterations']}")
        summary.add_row("converged", _mark(mig["converged"]))
        summary.add_row("cancelled", "yes" if mig["cancelled"] else "no")
        summary.add_row("total time", f"{mig['total_time_us'] / 1000:.3f} ms")
        summary.add_row("downtime", f"{mig['downtime_us'] / 1000:.3f} ms")
        summary.add_row("stop-and-copy pages", str(mig["stop_copy_pages"]))
        console.print(summary)
    show_network(result.get("network"), console)
    inv = result["invariants"]
    checks = Table(title="invariants", show_header=False)
    checks.add_row("destination RAM equals source RAM", _mark(inv["memory_equal"]))
    checks.add_row("frames lost (beyond VF drops)", str(inv["frames_lost"]))
    checks.add_row("frames duplicated", str(inv["frames_duplicated"]))
    checks.add_row("frames in order", _mark(inv["in_order"]))
    checks.add_row("source and destination never ran together", _mark(inv["exclusive"]))
    if "live" in inv:
        checks.add_row(f"RX never stalled beyond {inv['max_rx_gap_us'] / 1000:g} ms (liveness)",
                       _mark(inv["live"]))
    console.print(checks)
    console.print(f"frames: guest sent {t['tx_sent_by_guest']}, left on a wire {t['tx_frames']}; "
                  f"offered to the guest {t['rx_offered']}, delivered {t['rx_frames']}, "
                  f"dropped by the VFs {t['rx_dropped_by_vf'] or 0}")
    for problem in result["problems"]:
        console.print(f"[bold red]problem:[/] {problem}")
    console.print(f"simulated {result['simulated_us'] / 1000:.3f} ms in {result['wall_s']:.2f} s, "
                  f"trace digest [bold]{result['trace_digest']}[/]")


def _us(value) -> str:
    return "[bold red]never[/]" if value is None else f"{value:,.1f} us"


def show_network(net: dict | None, console) -> None:
    """The switch and the RX blackout after each switch-over."""
    if not net or not net.get("blackout"):
        return
    # A row per measure and a column per leg: whole in an 80-column terminal.
    table = Table(title=f"RX blackout after switch-over (guest {net['guest_mac']}, GUEST_ANNOUNCE "
                        f"{'acked' if net['guest_announce'] else 'not acked'})")
    table.add_column("leg")
    legs = net["blackout"]
    for b in legs:
        table.add_column(b["leg"], justify="right", overflow="fold")
    rows = (("frames to the old port", lambda b: str(b["frames_to_old_port"])),
            ("MAC moved", lambda b: _us(b["mac_moved_us"])),
            ("  by", lambda b: b["mac_moved_by"] or "-"),
            ("first frame at the destination", lambda b: _us(b["first_frame_at_destination_us"])),
            ("first delivery to the guest", lambda b: _us(b["first_delivery_to_guest_us"])),
            ("announce rounds (ms)",
             lambda b: ", ".join(f"{r / 1000:g}" for r in b["announce_rounds_us"]) or "none"),
            ("QEMU's RARP", lambda b: ", ".join(b["self_announce"])))
    for label, cell in rows:
        table.add_row(label, *(cell(b) for b in legs))
    console.print(table)
