"""Run a scenario by kind and render its results with rich."""
from __future__ import annotations

from rich.table import Table

from ifcvf import ids
from ifcvf.hw import HwError
from hal.api import HalError


class RunFailed(Exception):
    pass


def run(scenario, console) -> dict:
    if scenario.kind == "bringup":
        from ifcvf.runs import bringup
        try:
            with console.status("bringing the VF up") as status:
                result = bringup.run(scenario, progress=lambda phase: status.update(phase))
        except (HwError, HalError) as e:
            raise RunFailed(str(e)) from None
        show_bringup(result, console)
        return result.to_json()
    raise RunFailed(f"scenario kind {scenario.kind!r} is not implemented yet")


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
