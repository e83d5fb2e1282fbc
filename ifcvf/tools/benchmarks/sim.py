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

Wall-clock time is read here, never in the model.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

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

The guest-side table (the guest and traffic share of the budget) gives frames per wall-clock
second of each component on its own: filling frames (generator), checking
them (sink), the guest's RX and TX ring work in C, and the whole guest model
(simpy events, eventfds, C) against a device that costs nothing.

--json FILE writes {"frames_per_wall_s": {size: ...}, "sim_to_wall_ratio":
{size: ...}, "full": {...}, "directions": {size: {"rx": {...}, "tx": {...}}},
"explanation": {"pcie": ..., size: ...}, ...}; frames_per_wall_s and
sim_to_wall_ratio are the full run's.  Quote medians of several runs: the
machine is shared.
"""

SIZE_LABELS = {1500: 1518}     # "1500 B traffic" = MTU 1500 = 1518-byte frames


def frame_size(label: int) -> int:
    return SIZE_LABELS.get(label, label)


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
# guest side on its own
# ======================================================================================
def _features() -> int:
    from sim import virtio_regs as vr
    return vr.feature_mask(vr.F_VERSION_1, vr.F_NET_MRG_RXBUF, vr.F_EVENT_IDX,
                           vr.F_INDIRECT_DESC)


def _rate(frames: int, seconds: float) -> float:
    return frames / seconds if seconds > 0 else 0.0


def micro_kernels(size: int, frames: int = 200_000, batch: int = 64) -> dict:
    """Frames per wall second of the C kernels: fill (generator), check (sink)."""
    from sim.traffic import Checker, SizeDist, Stream
    stream = Stream(SizeDist.fixed(size), flows=16)
    checker = Checker(16)
    rounds = max(1, frames // batch)
    fill = check = 0.0
    clock = time.perf_counter
    for _ in range(rounds):
        t0 = clock()
        b = stream.batch(batch)          # a fresh FrameBatch, as the generator makes them
        t1 = clock()
        checker.check(b)
        fill += t1 - t0
        check += clock() - t1
    assert checker.counts().good == rounds * batch
    return {"fill": _rate(rounds * batch, fill), "check": _rate(rounds * batch, check)}


def micro_rings(size: int, frames: int = 200_000, batch: int = 64, queue_size: int = 256) -> dict:
    """Frames per wall second of the guest's ring work in C, a batch per call."""
    from hal.memory import HostMemory
    from ifcvf._native import lib
    from sim.guest import GuestNet
    from sim.guest_testdev import NullDevice
    from sim.world import World
    world = World(0)
    with HostMemory(64 << 20, "bench-guest") as mem:
        guest = GuestNet(world, mem, features=_features(), queue_size=queue_size,
                         tx_sizes=size, rx_buffer_size=2048, tx_buffer_size=2048)
        NullDevice(world, guest, rx_frame_size=size)     # used rings written once
        rx, tx = guest.queues[0], guest.queues[1]
        used_idx = memoryview(mem.mmap)[rx.layout.used + 2:rx.layout.used + 4].cast("H")
        tx_used_idx = memoryview(mem.mmap)[tx.layout.used + 2:tx.layout.used + 4].cast("H")
        rounds = max(1, frames // batch)
        rx_c, tx_c, ck, st, stream = rx.c, tx.c, guest.checker.c, rx.stats, tx.stream.c
        t0 = time.perf_counter()
        for _ in range(rounds):
            used_idx[0] = (used_idx[0] + batch) & 0xFFFF        # the device completed a batch
            lib.ifc_gvq_rx(rx_c, batch, ck, st)
            lib.ifc_gvq_refill(rx_c, queue_size)
            lib.ifc_gvq_publish(rx_c)
        t1 = time.perf_counter()
        for _ in range(rounds):
            lib.ifc_gvq_tx_reclaim(tx_c)
            lib.ifc_gvq_tx_post(tx_c, batch, stream)
            lib.ifc_gvq_publish(tx_c)
            tx_used_idx[0] = (tx_used_idx[0] + batch) & 0xFFFF  # the device sent them
        t2 = time.perf_counter()
        good = guest.rx_counts().good
        used_idx.release()
        tx_used_idx.release()
        assert good == rounds * batch, (good, rounds * batch)
    return {"guest_rx_ring": _rate(rounds * batch, t1 - t0),
            "guest_tx_ring": _rate(rounds * batch, t2 - t1)}


def micro_guest_model(size: int, sim_us: float = 2000.0, pairs: int = 1,
                      queue_size: int = 256, batch: int = 64) -> dict:
    """The whole guest model (both directions at 100 Gb/s) against a device that costs nothing."""
    from hal.memory import HostMemory
    from sim.guest import GuestCosts, GuestNet
    from sim.guest_testdev import NullDevice
    from sim.world import World
    world = World(0)
    fds: list[int] = []
    with HostMemory(64 << 20, "bench-guest") as mem:
        # Cheap guest CPU, so the guest is not what limits the frame count here.
        costs = GuestCosts(irq_ns=100, poll_ns=50, rx_frame_ns=5, tx_batch_ns=50, tx_frame_ns=5,
                           kick_ns=0)
        guest = GuestNet(world, mem, features=_features(), queue_pairs=pairs,
                         queue_size=queue_size, tx_rate_gbps=100.0 * pairs, tx_sizes=size,
                         rx_buffer_size=2048, tx_buffer_size=2048, costs=costs,
                         napi_budget=batch, tx_batch=batch)
        dev = NullDevice(world, guest, rx_frame_size=size, batch=batch)
        try:
            for q in range(guest.num_queues):
                kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                fds += [kick, call]
                guest.attach(q, kick, call)
                dev.attach(q, kick, call)
            guest.start()
            dev.start()
            t0 = time.perf_counter()
            world.run_until(world.cycles(sim_us * 1000))
            wall = time.perf_counter() - t0
        finally:
            for fd in fds:
                os.close(fd)
        frames = guest.rx_counts().frames + guest.tx_frames()
        bad = guest.rx_counts().corrupted
        guest.detach()
    if bad:
        raise RuntimeError(f"guest model benchmark: {bad} corrupted frames")
    return {"guest_model": _rate(frames, wall), "guest_model_sim_to_wall": sim_us / 1e6 / wall}


def run_micro(labels: list[int], progress=None, frames: int = 200_000) -> dict:
    out = {}
    for label in labels:
        size = frame_size(label)
        if progress:
            progress(f"guest side, {label} B")
        row = {}
        row.update(micro_kernels(size, frames))
        row.update(micro_rings(size, frames))
        # simulated time for about `frames` frames each way at line rate
        sim_us = max(50.0, frames * (size + 20) * 8 / 100.0 / 1000 / 4)
        row.update(micro_guest_model(size, sim_us=sim_us))
        out[str(label)] = row
    return out


# ======================================================================================
# the full datapath
# ======================================================================================
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
        return _rate(self.delivered, self.wall_s)

    @property
    def sim_to_wall(self) -> float:
        return self.sim_us / 1e6 / self.wall_s if self.wall_s else 0.0


@dataclass
class Datapath:
    """A VF started through ifcvf.hw over hal.sim, with a guest on its rings."""

    world: object
    model: object
    fn: object
    hw: object
    memory: object
    guest: object
    features: int
    fds: list

    def close(self) -> None:
        self.guest.detach()
        self.fn.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.memory.close()


def build_datapath(world, *, pairs: int, queue_size: int, burst: int = 64,
                   engine_factory=None, config=None, wanted: int | None = None,
                   **guest_kw) -> Datapath:
    """Bring a VF up the way the driver does and put a GuestNet on its queues.

    The guest's rings are programmed into the VF (IOVA = GPA, guest RAM mapped
    whole), queue q's MSI-X vector 1 + q is the guest's call eventfd for q, and
    the guest's kicks reach the VF's doorbells through a host notifier (the
    guest's MMIO write lands in the notify page: no eventfd or relay thread on
    the path; the kick eventfds exist but are not signalled).
    ``wanted`` limits the features the guest accepts (default: all it supports).
    """
    from hal.memory import HostMemory
    from ifcvf import ids
    from ifcvf.hw import IfcvfHw, QueueConfig
    from ifcvf.tools.functions import SIM, open_function
    from sim.config import IfcvfConfig
    from sim.guest import GuestNet, negotiate, plan_layout

    config = config or IfcvfConfig(queue_pairs=pairs, max_queue_size=max(1024, queue_size))
    fn = open_function(SIM, world=world, config=config, engine_factory=engine_factory)
    model = fn.model
    fds: list[int] = []
    memory = None
    try:
        hw = IfcvfHw(fn)
        offered = hw.device_features()
        features = negotiate(offered) if wanted is None else negotiate(offered, wanted)
        guest_kw.setdefault("rx_buffer_size", 2048)
        guest_kw.setdefault("tx_buffer_size", 2048)
        _, end = plan_layout(pairs, queue_size, rx_buffer_size=guest_kw["rx_buffer_size"],
                             tx_buffer_size=guest_kw["tx_buffer_size"],
                             tx_chain=guest_kw.get("tx_chain", "single"),
                             tx_flows=guest_kw.get("tx_flows", 1))
        memory = HostMemory(((end >> 20) + 2) << 20, "guest-ram")
        guest = GuestNet(world, memory, features=features, queue_pairs=pairs,
                         queue_size=queue_size, napi_budget=burst, tx_batch=burst, **guest_kw)
        fn.dma_map(0, memory, 0, memory.size)
        nq = 2 * pairs
        calls = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(nq + 1)]
        kicks = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(nq)]
        fds += calls + kicks
        fn.set_msix(calls)
        queues = []
        for q in range(nq):
            desc, avail, used = guest.queue_addresses(q)
            queues.append(QueueConfig(q, queue_size, desc, avail, used,
                                      vector=ids.MSIX_QUEUE_VECTOR_BASE + q))
        hw.start(features, queues, mq_pairs=pairs)
        offsets = [hw.notify_offset(q) for q in range(nq)]
        region = fn.region(hw.caps.notify.bar)
        for q in range(nq):
            # A host notifier: the guest's kick is its MMIO write landing in
            # the VF's notify page (no eventfd, no relay thread on the path).
            def notify(q=q, offset=offsets[q], write16=region.write16):
                write16(offset, q)
            guest.attach(q, kicks[q], calls[ids.MSIX_QUEUE_VECTOR_BASE + q], notify=notify)
        return Datapath(world, model, fn, hw, memory, guest, features, fds)
    except BaseException:
        fn.close()
        for fd in fds:
            os.close(fd)
        if memory is not None:
            memory.close()
        raise


def run_full(label: int, *, pairs: int, queue_size: int, burst: int, seed: int,
             sim_us: float | None) -> FullResult:
    """Generator -> wire -> VF RX engine -> guest; guest -> VF TX engine -> wire -> sink."""
    from sim.traffic import Generator, Sink, steer_by_flow
    from sim.wire import Port, connect
    from sim.world import World

    size = frame_size(label)
    if sim_us is None:
        sim_us = 10_000.0
    world = World(seed)
    flows = 4 * pairs
    dp = build_datapath(world, pairs=pairs, queue_size=queue_size, burst=burst,
                        tx_rate_gbps=100.0, tx_sizes=size, tx_flows=4, rx_flows=flows)
    try:
        guest, fn = dp.guest, dp.model
        tester = Port(world, "tester", fn.config.wire_gbps)
        connect(fn.port, tester)
        fn.datapath.steer = steer_by_flow(pairs)
        sink = Sink(world, tester, flows=flows, flow_base=guest.tx_flow_base)
        # Bursts of ~32 KiB, each from one flow: big enough that small frames cost
        # little Python each, small enough not to be an mmap'd allocation.
        gen_burst = max(burst, min(512, 32768 // size))
        gen = Generator(world, tester, size, rate_gbps=100.0, burst=gen_burst, flows=flows,
                        flow_run=gen_burst)
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
        dp.close()


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
        return _rate(self.frames, self.wall_s)

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
    from sim.traffic import Generator, Sink, steer_by_flow
    from sim.wire import Port, connect
    from sim.world import World

    if direction not in ("rx", "tx"):
        raise ValueError(f"direction must be rx or tx, not {direction!r}")
    size = frame_size(label)
    world = World(seed)
    flows = 4 * pairs
    kw = {"costs": GuestCosts(**FREE_GUEST)} if free_guest else {}
    dp = build_datapath(world, pairs=pairs, queue_size=queue_size, burst=burst,
                        tx_rate_gbps=100.0 if direction == "tx" else 0.0, tx_sizes=size,
                        tx_flows=4, rx_flows=flows, **kw)
    try:
        guest, fn = dp.guest, dp.model
        tester = Port(world, "tester", fn.config.wire_gbps)
        connect(fn.port, tester)
        fn.datapath.steer = steer_by_flow(pairs)
        sink = Sink(world, tester, flows=flows, flow_base=guest.tx_flow_base)
        gen_burst = max(burst, min(512, 32768 // size))
        gen = Generator(world, tester, size, rate_gbps=100.0, burst=gen_burst, flows=flows,
                        flow_run=gen_burst)
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
        dp.close()
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


def tlp_bytes(link, hdr_len: int, size: int) -> dict:
    """PCIe bytes per frame for its data alone (header + frame, no rings), by the
    TLP rules of sim.pcie_link: RX = posted writes split at MPS; TX = read
    requests split at MRRS upstream, completions split at MPS (or RCB) downstream."""
    from sim.pcie_link import CPL_OVERHEAD, REQ_BYTES, WRITE_OVERHEAD
    n = hdr_len + size - 4
    writes = -(-n // link.mps)
    reqs = -(-n // link.mrrs)
    cpls = -(-n // link.cpl_unit)
    return {"bytes": n, "writes": writes, "rx_up": n + WRITE_OVERHEAD * writes,
            "reqs": reqs, "tx_up": REQ_BYTES * reqs, "cpls": cpls,
            "tx_down": n + CPL_OVERHEAD * cpls, "write_overhead": WRITE_OVERHEAD,
            "req_bytes": REQ_BYTES, "cpl_overhead": CPL_OVERHEAD}


def explain_link(link) -> str:
    """The PCIe capacity every explanation refers to."""
    return (f"PCIe Gen{link.gen} x{link.lanes} leaves {link.gbps:.1f} Gb/s per direction for "
            f"TLPs ({float(link.raw) * 8 / 1e9:.1f} Gb/s after 128b/130b coding, minus "
            f"ACK/UpdateFC DLLPs and SKP ordered sets at MPS {link.mps}); a memory write TLP "
            f"costs 24 B beside its payload, a read request 24 B, a completion 20 B.")


def explain(label: int, dirs: dict, full: "FullResult | None", *, pairs: int,
            hdr_len: int = 12, link=None, costs=None, budget: int = 64) -> str:
    """Why each direction gets what it gets, in numbers (printed under the table, in --json)."""
    from sim.guest import GuestCosts
    rx, tx = dirs["rx"], dirs["tx"]
    costs = costs or GuestCosts()
    link = link or _default_link()
    t = tlp_bytes(link, hdr_len, rx.frame_size)
    s_w = "s" if t["writes"] > 1 else ""
    s_c = "s" if t["cpls"] > 1 else ""
    rx_why = (f"{rx.up_per_frame:.0f} B upstream per frame: {t['bytes']} B of header + frame in "
              f"{t['writes']} write TLP{s_w} = {t['rx_up']} B, the rest used-ring writes and "
              f"ring/descriptor reads")
    tx_why = (f"{tx.down_per_frame:.0f} B downstream per frame: {t['cpls']} completion{s_c} "
              f"= {t['tx_down']} B, the rest descriptor and ring reads; plus "
              f"{tx.up_per_frame:.0f} B of read requests upstream")
    if rx.binds == "wire" and tx.binds == "wire":
        text = (f"{label} B: each direction alone reaches line rate, RX {rx.mpps:.3f} and TX "
                f"{tx.mpps:.3f} Mpps ({rx.of_line:.1%} and {tx.of_line:.1%} of "
                f"{rx.line_mpps:.3f} Mpps = 100 Gb/s on the wire): the wire binds.  RX costs "
                f"{rx_why}: {rx.pcie_up:.0%} of upstream.  TX costs {tx_why}: "
                f"{tx.pcie_down:.0%} of downstream.")
        need = rx.line_mpps * 1e6 * (rx.up_per_frame + tx.up_per_frame) * 8 / 1e9
        if need > rx.pcie_gbps:
            text += (f"  Both at once need ({rx.up_per_frame:.0f} + {tx.up_per_frame:.0f}) B "
                     f"upstream x {rx.line_mpps:.3f} Mpps = {need:.1f} Gb/s > "
                     f"{rx.pcie_gbps:.1f} Gb/s: upstream saturates, RX's posted writes go "
                     f"first and TX's read requests queue behind them, so TX falls short")
            if full is not None:
                text += (f" (full run: RX {full.rx_mpps:.2f} Mpps, TX {full.tx_mpps:.2f} Mpps "
                         f"= {full.tx_gbps:.1f} Gb/s of frames)")
            text += "."
        return text
    parts = []
    for r, name in ((rx, "RX"), (tx, "TX")):
        if r.binds == "wire":
            parts.append(f"{label} B {name} alone: {r.mpps:.3f} Mpps, line rate.")
            continue
        if r.binds == "guest":
            frame_ns, batch_ns = ((costs.rx_frame_ns, costs.poll_ns) if name == "RX"
                                  else (costs.tx_frame_ns, costs.tx_batch_ns))
            per_frame = frame_ns + batch_ns / budget
            text = (f"{label} B {name} alone: {r.mpps:.1f} Mpps, the guest's CPU binds (busiest "
                    f"core {r.guest:.0%}; {frame_ns:g} ns per frame + {batch_ns:g} ns per "
                    f"{'poll' if name == 'RX' else 'batch'} of up to {budget} = "
                    f"~{1e3 / per_frame:.1f} Mpps per core, x {pairs} pairs).")
        else:
            text = f"{label} B {name} alone: {r.mpps:.1f} Mpps, PCIe binds."
        text += (f"  PCIe would stop it at {r.pcie_ceiling_mpps:.0f} Mpps "
                 f"({rx_why if name == 'RX' else tx_why})")
        if r.pcie_ceiling_mpps < r.line_mpps:
            text += f", below the {r.line_mpps:.1f} Mpps line rate"
        text += "."
        free = r.free_guest
        if free is not None:
            text += (f"  With a guest that costs nothing: {free.mpps:.1f} Mpps, {free.binds} "
                     f"binds")
            if free.binds == "pcie":
                text += f" ({max(free.pcie_up, free.pcie_down):.0%} busy)"
            text += "."
        parts.append(text)
    if all(r.binds != "wire" and r.pcie_ceiling_mpps < r.line_mpps for r in (rx, tx)):
        parts.append(f"So {label} B traffic is guest-bound here, and with a faster guest it "
                     f"would be PCIe-bound, never wire-bound.")
    return "  ".join(parts)


def _default_link():
    from sim.config import IfcvfConfig
    from sim.pcie_link import PcieLink
    from sim.world import World
    cfg = IfcvfConfig()
    return PcieLink(World(0), gen=cfg.pcie_gen, lanes=cfg.pcie_lanes, mps=cfg.pcie_mps,
                    mrrs=cfg.pcie_mrrs, rcb=cfg.pcie_rcb,
                    completions_at_rcb=cfg.pcie_completions_at_rcb)


# ======================================================================================
# the command
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
        table = Table(title=f"simulated datapath: {args.pairs} queue pairs, ring {args.queue_size}, "
                            "100 Gb/s offered each way")
        table.add_column("")
        for r in full:
            table.add_column(f"{r.label} B", justify="right")

        def row(name, fmt):
            table.add_row(name, *(fmt(r) for r in full))
        row("frames/wall-s", lambda r: f"{r.frames_per_wall_s:,.0f}")
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
        link = _default_link()
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
