"""`ifcvf bench sim`: how fast the simulated datapath runs, and what limits it.

Three parts:

* the full datapath (``--no-full`` skips it): a VF brought up through
  ``ifcvf.hw`` over ``hal.sim`` (as ``ifcvf sim run`` does), the device's
  virtqueue engines and the 100G wire (``sim.engines``, ``sim.wire``), a
  guest virtio-net driver (``sim.guest``) and the traffic endpoints
  (``sim.traffic``): generator -> wire -> device RX engine -> guest, and
  guest -> device TX engine -> wire -> sink, both offered at 100 Gb/s;
* the same, one direction at a time (``--no-directions`` skips it), with
  what binds each and why, in numbers (PCIe TLP arithmetic, guest CPU);
* the guest side alone (``--no-micro`` skips it): the C kernels per frame
  and the guest model against a device that costs nothing.

This module is the command (options, tables, JSON).  The rest lives beside it:
``stack`` (the VF and guest under test), ``measure`` (the full and
one-direction runs), ``micro`` (the guest side alone), ``tlp`` (PCIe
arithmetic and the explanations).  Wall-clock time is read there, never in the model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ifcvf.tools.benchmarks.copylimit import copy_limit_frames_per_s, memcpy_bytes_per_s
from ifcvf.tools.benchmarks.measure import WARM_US, run_directions, run_full
from ifcvf.tools.benchmarks.micro import run_micro
from ifcvf.tools.benchmarks.stack import frame_size
from ifcvf.tools.benchmarks.tlp import default_link, explain, explain_link

HELP = """\
Run the simulated IFCVF datapath flat out and report how fast the simulation
itself goes and what limits the simulated traffic.

For each frame size (--sizes; "1500" means an MTU of 1500, i.e. 1518-byte
frames, any other number a frame size with FCS) both directions are offered
at 100 Gb/s (layer 1, line rate): a generator sends into the VF's wire port
and the guest sends from its TX queues.  Every frame is checked end to end
(flow, sequence number, every payload byte) by the guest's RX consumer and by
the sink behind the VF's TX port.

Columns:
  frames/wall-s   frames delivered end to end (checked by the guest or the
                  sink) per wall-clock second: the speed of the simulator
  sim/wall        simulated seconds per wall-clock second
  Mpps, Gb/s      achieved on the wire, per direction (Gb/s of frame bytes)
  binds           which limit the simulated traffic hit: the wire (both
                  directions got line rate), else the busier of PCIe (the
                  device's DMA, busiest direction of the link) and the guest
                  (its busiest core); each one's utilisation follows

At 1500 B the full run shows PCIe, not the wire, binding TX: both
directions at line rate need more than Gen3 x16's 113.7 Gb/s of TLP
bandwidth upstream (RX's data writes, ~1680 B per 1518-byte frame, plus
TX's read requests, ~85 B per frame: 8.127 Mpps x 1765 B x 8 = ~115 Gb/s),
and TX's read requests wait behind RX's posted writes.  A real effect of a
virtio VF on that link, not of the simulator.

The one-direction table runs RX alone (generator -> VF -> guest) and TX
alone (guest -> VF -> sink), each over --dir-us of simulated time after a
200 us warm-up:
  Mpps, of line   frames checked per simulated second, and their share of
                  line rate (8.127 Mpps at 1518 B, 148.81 Mpps at 64 B)
  Gb/s wire (L1)  the same on the wire (FCS, preamble and IFG included:
                  100 at line rate); Gb/s frames: frame bytes only
  binds           wire when within 1 % of line rate, else the busier of PCIe
                  (busier direction) and the guest (busiest core)
  PCIe B/fr       PCIe bytes per frame, TLP framing and headers included,
                  upstream / downstream (data, used ring, ring reads)
  PCIe max Mpps   the rate at which those bytes fill the busier direction
  free guest      where the guest binds, the same run with a guest CPU that
                  costs nothing: the rate and limit of the device and PCIe
An explanation of what binds and why, in numbers, follows the table.

The guest-side table (the guest and traffic share of the budget) gives frames
per wall-clock second of each component on its own: filling frames
(generator), checking them (sink), the guest's RX and TX ring work in C, and
the whole guest model (simpy events, eventfds, C) against a device that costs
nothing.

Under the full table, "copy limit" is the most frames per wall-clock second
this machine's memcpy bandwidth (measured in the same run) allows for the
bytes each delivered frame moves through memory in the simulator (made once,
copied once by the device's DMA, checked once: 4 L + 12 bytes for an L-byte
frame); "reached" is the pipeline's share of it.  At large frames moving bytes
is what binds.

--json FILE writes {"frames_per_wall_s": {size: ...}, "sim_to_wall_ratio":
{size: ...}, "copy_limit_frames_per_s": {size: ...}, "memcpy_bytes_per_s": ...,
"full": {...}, "directions": {size: {"rx": {...}, "tx": {...}}},
"explanation": {"pcie": ..., size: ...}, ...}; frames_per_wall_s and
sim_to_wall_ratio are the full run's.  Quote medians of several runs: the
machine is shared.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("sim", help="simulated datapath: sim speed and binding limits",
                              description=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64,1500",
                   help="comma-separated frame sizes (default 64,1500; 1500 = 1518-byte frames)")
    p.add_argument("--sim-us", type=float, default=None,
                   help="simulated time per size in us (default 10000)")
    p.add_argument("--pairs", type=int, default=4, help="queue pairs (default 4)")
    p.add_argument("--queue-size", type=int, default=256, help="ring entries (default 256)")
    p.add_argument("--burst", type=int, default=64,
                   help="frames per generator burst / guest TX batch / NAPI budget (default 64)")
    p.add_argument("--seed", type=int, default=1, help="world seed (default 1)")
    p.add_argument("--no-full", action="store_true", help="skip the full datapath")
    p.add_argument("--no-directions", action="store_true",
                   help="skip the one-direction-at-a-time runs")
    p.add_argument("--dir-us", type=float, default=2000.0,
                   help="simulated window per one-direction run in us, after a 200 us "
                        "warm-up (default 2000)")
    p.add_argument("--no-micro", action="store_true", help="skip the guest-side table")
    p.add_argument("--micro-frames", type=int, default=200_000,
                   help="frames per guest-side kernel measurement (default 200000)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    p.set_defaults(func=cmd_sim)


# ======================================================================================
# the command: run what was asked, render the tables, write the JSON
# ======================================================================================


def cmd_sim(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ifcvf.tools.extras import require

    require("sim", "`ifcvf bench sim`")

    console = Console()
    err = Console(stderr=True)
    try:
        labels = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        err.print(f"[bold red]error:[/] --sizes {args.sizes!r}: comma-separated integers")
        return 2
    if not labels or any(frame_size(s) < 64 or frame_size(s) > 9018 for s in labels):
        err.print("[bold red]error:[/] frame sizes must lie in 64..9018 bytes")
        return 2
    if args.pairs < 1 or args.queue_size < 2 or args.queue_size & (args.queue_size - 1):
        err.print("[bold red]error:[/] --pairs >= 1 and --queue-size a power of two >= 2")
        return 2
    results: dict = {"frames_per_wall_s": {}, "sim_to_wall_ratio": {}}
    status = 0

    full: list = []
    if not args.no_full:
        with console.status("full datapath") as st:
            for label in labels:
                st.update(f"full datapath, {label} B")
                full.append(run_full(label, pairs=args.pairs, queue_size=args.queue_size,
                                     burst=args.burst, seed=args.seed, sim_us=args.sim_us))
            st.update("memcpy bandwidth")
            copy_bps = memcpy_bytes_per_s()
        limits = {r.label: copy_limit_frames_per_s(r.frame_size - 4, copy_bps) for r in full}
        table = Table(title=f"simulated datapath: {args.pairs} queue pairs, ring {args.queue_size}, "
                            "100 Gb/s offered each way")
        table.add_column("")
        for r in full:
            table.add_column(f"{r.label} B", justify="right")

        def row(name, fmt):
            table.add_row(name, *(fmt(r) for r in full))
        row("frames/wall-s", lambda r: f"{r.frames_per_wall_s:,.0f}")
        row("copy limit", lambda r: f"{limits[r.label]:,.0f}")
        row("  reached", lambda r: f"{r.frames_per_wall_s / limits[r.label]:.0%}")
        row("sim/wall", lambda r: f"{r.sim_to_wall:.2e}")
        row("simulated", lambda r: f"{r.sim_us:,.0f} us in {r.wall_s:.2f} s")
        row("RX (wire->guest)", lambda r: f"{r.rx_mpps:.2f} Mpps {r.rx_gbps:.1f} Gb/s")
        row("TX (guest->wire)", lambda r: f"{r.tx_mpps:.2f} Mpps {r.tx_gbps:.1f} Gb/s")
        row("RX dropped by VF", lambda r: f"{r.rx_dropped / r.offered_rx:.0%}" if r.offered_rx
            else "-")
        row("binds", lambda r: r.binds)
        for key, name in (("wire", "  wire"), ("pcie", "  PCIe"), ("guest", "  guest")):
            row(name, lambda r, key=key: f"{r.utilisation[key]:.0%}")
        row("frames checked", lambda r: "ok" if r.clean else "[red]BAD[/]")
        for r in full:
            results["frames_per_wall_s"][str(r.label)] = r.frames_per_wall_s
            results["sim_to_wall_ratio"][str(r.label)] = r.sim_to_wall
            if not r.clean:
                status = 1
                for note in r.notes[:5]:
                    err.print(f"[red]{r.label} B:[/] {note}")
        console.print(table)
        console.print(f"copy limit: memcpy here moves {copy_bps / 1e9:.1f} GB/s; each delivered "
                      "frame of L bytes is written when made, copied by the device's DMA and "
                      "read when checked: 4 L + 12 bytes of memory traffic, two memcpy's of L",
                      highlight=False)
        results["memcpy_bytes_per_s"] = copy_bps
        results["copy_limit_frames_per_s"] = {str(k): v for k, v in limits.items()}
        results["pipeline"] = "full"
        results["full"] = {str(r.label): {
            "frames_per_wall_s": r.frames_per_wall_s, "sim_to_wall_ratio": r.sim_to_wall,
            "delivered": r.delivered, "wire_frames": r.wire_frames,
            "rx_mpps": r.rx_mpps, "rx_gbps": r.rx_gbps, "tx_mpps": r.tx_mpps,
            "tx_gbps": r.tx_gbps, "rx_dropped": r.rx_dropped, "offered_rx": r.offered_rx,
            "utilisation": r.utilisation, "binds": r.binds, "clean": r.clean,
            "wall_s": r.wall_s, "sim_us": r.sim_us} for r in full}

    if not args.no_directions:
        dirs: dict = {}
        with console.status("one direction at a time") as st:
            for label in labels:
                st.update(f"one direction at a time, {label} B")
                dirs[label] = run_directions(label, pairs=args.pairs, queue_size=args.queue_size,
                                             burst=args.burst, seed=args.seed,
                                             window_us=max(10.0, args.dir_us))
        table = Table(title=f"one direction at a time ({args.dir_us:,.0f} us after {WARM_US:.0f} "
                            "us warm-up)\nRX: generator -> VF -> guest; TX: guest -> VF -> sink")
        table.add_column("")
        cols = [(label, d) for label in labels for d in ("rx", "tx")]
        for label, d in cols:
            table.add_column(f"{label} B {d.upper()}", justify="right")

        def drow(name, fmt):
            table.add_row(name, *(fmt(dirs[label][d]) for label, d in cols))
        drow("Mpps", lambda r: f"{r.mpps:.3f}")
        drow("  of line", lambda r: f"{r.of_line:.1%}")
        drow("Gb/s wire (L1)", lambda r: f"{r.wire_gbps:.1f}")
        drow("Gb/s frames", lambda r: f"{r.gbps:.1f}")
        drow("binds", lambda r: r.binds)
        drow("  PCIe up/down", lambda r: f"{r.pcie_up:.0%} / {r.pcie_down:.0%}")
        drow("  guest", lambda r: f"{r.guest:.0%}")
        drow("PCIe B/fr up/dn", lambda r: f"{r.up_per_frame:.0f} / {r.down_per_frame:.0f}")
        drow("PCIe max Mpps", lambda r: f"{r.pcie_ceiling_mpps:.1f}")
        drow("free guest Mpps", lambda r: f"{r.free_guest.mpps:.1f} ({r.free_guest.binds})"
             if r.free_guest is not None else "-")
        drow("frames/wall-s", lambda r: f"{r.frames_per_wall_s:,.0f}")
        drow("checked", lambda r: "ok" if r.clean else "[red]BAD[/]")
        console.print(table)
        link = default_link()
        explanations = {"pcie": explain_link(link)}
        console.print(explanations["pcie"], highlight=False)
        full_by_label = {r.label: r for r in full} if not args.no_full else {}
        for label in labels:
            text = explain(label, dirs[label], full_by_label.get(label), pairs=args.pairs,
                           link=link, budget=args.burst)
            explanations[str(label)] = text
            console.print(text, highlight=False)
            for r in dirs[label].values():
                if not r.clean:
                    status = 1
                    for note in r.notes[:5]:
                        err.print(f"[red]{label} B {r.direction}:[/] {note}")
        results["directions"] = {str(label): {d: r.as_dict() for d, r in dirs[label].items()}
                                 for label in labels}
        results["explanation"] = explanations

    if not args.no_micro:
        with console.status("guest side") as st:
            micro = run_micro(labels, progress=st.update, frames=max(1000, args.micro_frames))
        table = Table(title="guest side alone: frames per wall-clock second")
        cols = [("fill", "generator fill"), ("check", "sink check"),
                ("guest_rx_ring", "guest RX ring (C)"), ("guest_tx_ring", "guest TX ring (C)"),
                ("guest_model", "guest model, both ways")]
        table.add_column("size", justify="right")
        for _, title in cols:
            table.add_column(title, justify="right")
        table.add_column("ns/frame, model", justify="right")
        for label, row in micro.items():
            table.add_row(f"{label} B", *(f"{row[k] / 1e6:.2f} M" for k, _ in cols),
                          f"{1e9 / row['guest_model']:.0f}")
        console.print(table)
        results["guest_side"] = micro
        if "pipeline" not in results:
            # --no-full: the guest model's own numbers stand in, and say so.
            for label, row in micro.items():
                results["frames_per_wall_s"][label] = row["guest_model"]
                results["sim_to_wall_ratio"][label] = row["guest_model_sim_to_wall"]
            results["pipeline"] = "guest model against a null device (--no-full)"

    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"results written to {args.json}")
    return status
