"""`ifcvf bench sim`: how fast the simulated datapath runs, and what limits it.

Two parts:

* the full datapath (``--no-full`` skips it): a VF brought up through
  ``ifcvf.hw`` over ``hal.sim`` (as ``ifcvf sim run`` does), the device's
  virtqueue engines and the 100G wire (``sim.engines``, ``sim.wire``), a
  guest virtio-net driver (``sim.guest``) and the traffic endpoints
  (``sim.traffic``): generator -> wire -> device RX engine -> guest, and
  guest -> device TX engine -> wire -> sink, both offered at 100 Gb/s;
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

The guest-side table (the guest and traffic share of the budget) gives frames per wall-clock
second of each component on its own: filling frames (generator), checking
them (sink), the guest's RX and TX ring work in C, and the whole guest model
(simpy process, eventfds, C) against a device that costs nothing.

--json FILE writes {"frames_per_wall_s": {size: ...}, "sim_to_wall_ratio":
{size: ...}, ...}.  Quote medians of several runs: the machine is shared.
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
    the guest's kicks reach the VF's doorbells as through a host notifier (the
    guest's MMIO write lands in the notify page: no relay thread on the path).
    ``wanted`` limits the features the guest accepts (default: all it supports).
    """
    from hal.memory import HostMemory
    from hal.sim import SimFunction
    from ifcvf import ids
    from ifcvf.hw import IfcvfHw, QueueConfig
    from sim.config import IfcvfConfig
    from sim.guest import GuestNet, negotiate, plan_layout
    from sim.ifcvf import IfcvfFunction

    config = config or IfcvfConfig(queue_pairs=pairs, max_queue_size=max(1024, queue_size))
    model = IfcvfFunction(world, config, name="vf0", engine_factory=engine_factory)
    fn = SimFunction(model)
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
            def on_kick(fd, q=q):
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    return
                region.write16(offsets[q], q)
            world.watch_fd(kicks[q], on_kick)
            guest.attach(q, kicks[q], calls[ids.MSIX_QUEUE_VECTOR_BASE + q])
        return Datapath(world, model, fn, hw, memory, guest, features, fds)
    except BaseException:
        fn.close()
        for fd in fds:
            os.close(fd)
        if memory is not None:
            memory.close()
        raise


def steer_by_flow(pairs: int):
    """RX steering for the VF (``fn.datapath.steer``): a batch goes to pair flow % pairs.

    The generator sends each burst from one flow, so every flow stays on one
    RX queue and its frames stay in order."""
    import struct

    def steer(batch) -> int:
        data = batch.data
        if len(data) < 22:
            return 0
        return struct.unpack_from("<I", data, 18)[0] % pairs
    return steer


def run_full(label: int, *, pairs: int, queue_size: int, burst: int, seed: int,
             sim_us: float | None) -> FullResult:
    """Generator -> wire -> VF RX engine -> guest; guest -> VF TX engine -> wire -> sink."""
    from sim.traffic import Generator, Sink
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
# the command
# ======================================================================================
def cmd_sim(args) -> int:
    from rich.console import Console
    from rich.table import Table

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

    if not args.no_full:
        full = []
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
