"""The simulated datapath run flat out, both directions at once (``run_full``) and one
direction at a time (``run_direction``): rates on the wire, PCIe and guest
utilisation, and what binds.

Rates are taken from simulated time (deterministic for a seed); wall-clock time
is read here only to report how fast the simulator itself went.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ifcvf.tools.benchmarks.stack import build_stack, frame_size


def rate(frames: int, seconds: float) -> float:
    return frames / seconds if seconds > 0 else 0.0


@dataclass
class FullResult:
    label: int
    frame_size: int
    sim_us: float
    wall_s: float
    delivered: int                 # frames checked end to end (guest RX + sink)
    wire_frames: int               # frames that crossed the wire (both directions)
    rx_mpps: float                 # wire -> guest direction, on the VF's RX wire
    rx_gbps: float
    tx_mpps: float
    tx_gbps: float
    utilisation: dict = field(default_factory=dict)   # wire / pcie / guest -> 0..1
    binds: str = "wire"
    clean: bool = True
    notes: list = field(default_factory=list)
    rx_dropped: int = 0            # frames the device had no RX buffer (or FIFO room) for
    offered_rx: int = 0            # frames the generator sent

    @property
    def frames_per_wall_s(self) -> float:
        return rate(self.delivered, self.wall_s)

    @property
    def sim_to_wall(self) -> float:
        return self.sim_us / 1e6 / self.wall_s if self.wall_s else 0.0


def tester_endpoints(world, stack, pairs: int, flows: int, burst: int, size: int):
    """The far end of the VF's wire (the tester port), a sink for the guest's frames
    and a 100 Gb/s generator towards it, steered over ``pairs`` RX queues by flow."""
    from sim.traffic import Generator, Sink, steer_by_flow
    from sim.wire import Port, connect

    fn = stack.model
    tester = Port(world, "tester", fn.config.wire_gbps)
    connect(fn.port, tester)
    fn.datapath.steer = steer_by_flow(pairs)
    sink = Sink(world, tester, flows=flows, flow_base=stack.guest.tx_flow_base)
    # Bursts of ~32 KiB, each from one flow: big enough that small frames cost
    # little Python each, small enough not to be an mmap'd allocation.
    gen_burst = max(burst, min(512, 32768 // size))
    gen = Generator(world, tester, size, rate_gbps=100.0, burst=gen_burst, flows=flows,
                    flow_run=gen_burst)
    return tester, sink, gen


def run_full(label: int, *, pairs: int, queue_size: int, burst: int, seed: int,
             sim_us: float | None) -> FullResult:
    """Generator -> wire -> VF RX engine -> guest; guest -> VF TX engine -> wire -> sink."""
    from sim.world import World

    size = frame_size(label)
    if sim_us is None:
        sim_us = 10_000.0
    world = World(seed)
    flows = 4 * pairs
    stack = build_stack(world, pairs=pairs, queue_size=queue_size, burst=burst,
                        tx_rate_gbps=100.0, tx_sizes=size, tx_flows=4, rx_flows=flows)
    try:
        guest, fn = stack.guest, stack.model
        tester, sink, gen = tester_endpoints(world, stack, pairs, flows, burst, size)
        pcie0 = fn.datapath.stats()["pcie"]
        guest.start()
        gen.start()
        start = world.now
        t0 = time.perf_counter()
        world.run_until(start + world.cycles(sim_us * 1000))
        wall = time.perf_counter() - t0
        gen.stop()
        elapsed_s = (world.now - start) / world.clock_hz
        rx = guest.rx_counts()
        snk = sink.counts()
        line_mpps = tester.line_rate_pps(size) / 1e6
        rx_mpps = rx.frames / elapsed_s / 1e6
        tx_mpps = snk.frames / elapsed_s / 1e6
        stats = fn.datapath.stats()
        pcie_bytes = max(stats["pcie"]["up_bytes"] - pcie0["up_bytes"],
                         stats["pcie"]["down_bytes"] - pcie0["down_bytes"])
        # busiest direction: bytes on the link (TLP overhead included) over its capacity
        pcie = pcie_bytes * 8 / elapsed_s / (fn.datapath.link.gbps * 1e9)
        util = {"wire": max(rx_mpps, tx_mpps) / line_mpps, "pcie": pcie,
                "guest": max(guest.utilisation(start))}
        # Both directions are offered at line rate: if both got (nearly) all of it,
        # the wire is the limit; otherwise the busier of the PCIe link and the
        # guest's cores is.
        if min(rx_mpps, tx_mpps) >= 0.95 * line_mpps:
            binds = "wire"
        else:
            binds = "pcie" if util["pcie"] >= util["guest"] else "guest"
        dropped = sum(q["dropped"] for q in stats["queues"].values() if q["kind"] == "rx")
        notes = list(guest.errors) + list(fn.errors)
        return FullResult(label, size, sim_us, wall, rx.frames + snk.frames,
                          gen.frames + guest.tx_frames(), rx_mpps,
                          rx.bytes * 8 / elapsed_s / 1e9, tx_mpps,
                          snk.bytes * 8 / elapsed_s / 1e9, util, binds,
                          clean=not (rx.corrupted or snk.corrupted or rx.duplicates
                                     or snk.duplicates or rx.out_of_order or snk.out_of_order
                                     or notes),
                          notes=notes, rx_dropped=dropped, offered_rx=gen.frames)
    finally:
        stack.close()


# ======================================================================================
# one direction at a time
# ======================================================================================
# A guest whose CPU costs (next to) nothing: what the device and PCIe alone allow.
# (Not zero: a poll that finds nothing must still take a cycle, or the core
# would spin at one instant.)
FREE_GUEST = dict(irq_ns=1, poll_ns=1, rx_frame_ns=0, tx_batch_ns=1, tx_frame_ns=0, kick_ns=0)
WARM_US = 200.0          # rings filled, pipelines busy, before the window opens


@dataclass
class DirResult:
    """One direction on its own, measured over a window after a warm-up."""

    label: int
    frame_size: int
    direction: str                 # "rx" (generator -> VF -> guest) or "tx" (guest -> VF -> sink)
    window_us: float
    wall_s: float
    frames: int                    # checked end to end in the window
    mpps: float
    gbps: float                    # Gb/s of frame bytes (no FCS, preamble, IFG)
    wire_gbps: float               # Gb/s on the wire (layer 1: FCS, preamble, IFG included)
    line_mpps: float
    pcie_up: float                 # busy share of each PCIe direction in the window
    pcie_down: float
    up_per_frame: float            # PCIe bytes (TLP overhead included) per frame
    down_per_frame: float
    pcie_gbps: float               # TLP bandwidth per direction
    pcie_ceiling_mpps: float       # the link full in the busier direction at these bytes/frame
    guest: float                   # busiest guest core, busy share in the window
    guest_ceiling_mpps: float      # the rate scaled to the busiest core at 100 %
    binds: str
    dropped: int = 0
    clean: bool = True
    free_guest: "DirResult | None" = None
    notes: list = field(default_factory=list)

    @property
    def of_line(self) -> float:
        return self.mpps / self.line_mpps if self.line_mpps else 0.0

    @property
    def frames_per_wall_s(self) -> float:
        return rate(self.frames, self.wall_s)

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in (
            "frame_size", "window_us", "frames", "mpps", "gbps", "wire_gbps", "line_mpps",
            "of_line", "binds", "pcie_up", "pcie_down", "up_per_frame", "down_per_frame",
            "pcie_gbps", "pcie_ceiling_mpps", "guest", "guest_ceiling_mpps", "dropped", "clean",
            "wall_s", "frames_per_wall_s")}
        if self.free_guest is not None:
            out["free_guest"] = self.free_guest.as_dict()
        return out


def run_direction(label: int, direction: str, *, pairs: int = 4, queue_size: int = 256,
                  burst: int = 64, seed: int = 1, window_us: float = 2000.0,
                  warm_us: float = WARM_US, free_guest: bool = False) -> DirResult:
    """Only RX (generator -> wire -> VF RX engine -> guest) or only TX (guest -> VF TX
    engine -> wire -> sink), offered at 100 Gb/s; rates over ``window_us`` after ``warm_us``.

    ``free_guest``: the guest's CPU costs next to nothing (``FREE_GUEST``), so
    what binds is the device, PCIe or the wire."""
    from sim.guest import GuestCosts
    from sim.world import World

    if direction not in ("rx", "tx"):
        raise ValueError(f"direction must be rx or tx, not {direction!r}")
    size = frame_size(label)
    world = World(seed)
    flows = 4 * pairs
    kw = {"costs": GuestCosts(**FREE_GUEST)} if free_guest else {}
    stack = build_stack(world, pairs=pairs, queue_size=queue_size, burst=burst,
                        tx_rate_gbps=100.0 if direction == "tx" else 0.0, tx_sizes=size,
                        tx_flows=4, rx_flows=flows, **kw)
    try:
        guest, fn = stack.guest, stack.model
        tester, sink, gen = tester_endpoints(world, stack, pairs, flows, burst, size)
        guest.start()
        if direction == "rx":
            gen.start()
        world.run_until(world.now + world.cycles(warm_us * 1000))

        def taken():
            counts = guest.rx_counts() if direction == "rx" else sink.counts()
            pcie = fn.datapath.stats()["pcie"]
            return (counts.frames, counts.bytes, pcie["up_bytes"], pcie["down_bytes"],
                    [p.busy_cycles for p in guest.pairs], _rx_dropped(fn))

        before = taken()
        start = world.now
        t0 = time.perf_counter()
        world.run_until(start + world.cycles(window_us * 1000))
        wall = time.perf_counter() - t0
        after = taken()
        gen.stop()
        span = world.now - start
        seconds = span / world.clock_hz
        frames, nbytes = after[0] - before[0], after[1] - before[1]
        up, down = after[2] - before[2], after[3] - before[3]
        link = fn.datapath.link
        link_bytes_s = link.gbps * 1e9 / 8
        mpps = frames / seconds / 1e6
        line_mpps = tester.line_rate_pps(size) / 1e6
        guest_busy = max((b - a) / span for a, b in zip(before[4], after[4]))
        up_pf, down_pf = up / max(frames, 1), down / max(frames, 1)
        pcie_up, pcie_down = up / seconds / link_bytes_s, down / seconds / link_bytes_s
        # Within 1 % of line rate: the wire binds; else the busier of the PCIe
        # link (its busier direction) and the guest (its busiest core).
        if mpps >= 0.99 * line_mpps:
            binds = "wire"
        else:
            binds = "pcie" if max(pcie_up, pcie_down) >= guest_busy else "guest"
        counts = guest.rx_counts() if direction == "rx" else sink.counts()
        notes = list(guest.errors) + list(fn.errors)
        result = DirResult(
            label, size, direction, window_us, wall, frames, mpps, nbytes * 8 / seconds / 1e9,
            (nbytes + frames * _wire_overhead()) * 8 / seconds / 1e9, line_mpps, pcie_up,
            pcie_down, up_pf, down_pf, link.gbps,
            link_bytes_s / max(up_pf, down_pf, 1e-9) / 1e6, guest_busy,
            mpps / guest_busy if guest_busy > 0 else float("inf"), binds,
            dropped=after[5] - before[5],
            clean=not (counts.corrupted or counts.duplicates or counts.out_of_order or notes),
            notes=notes)
    finally:
        stack.close()
    return result


def _rx_dropped(fn) -> int:
    return sum(q["dropped"] for q in fn.datapath.stats()["queues"].values() if q["kind"] == "rx")


def _wire_overhead() -> int:
    from sim.frames import WIRE_OVERHEAD
    return WIRE_OVERHEAD


def run_directions(label: int, *, pairs: int, queue_size: int, burst: int, seed: int,
                   window_us: float) -> dict:
    """RX alone and TX alone; where the guest is not what lets them reach line rate
    either, once more with a guest that costs nothing (what PCIe allows)."""
    out = {}
    for direction in ("rx", "tx"):
        r = run_direction(label, direction, pairs=pairs, queue_size=queue_size, burst=burst,
                          seed=seed, window_us=window_us)
        if r.binds == "guest":
            r.free_guest = run_direction(label, direction, pairs=pairs, queue_size=queue_size,
                                         burst=burst, seed=seed,
                                         window_us=min(window_us, 500.0), free_guest=True)
        out[direction] = r
    return out
