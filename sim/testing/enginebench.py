"""Micro-benchmark of the device side alone: engines + PCIe timing + wire.

``python -m sim.testing.enginebench [--sizes 64,1518] [--frames N]`` runs, per frame
size, three set-ups and prints wall-clock ns per simulated frame and what the
simulated traffic achieved:

- ``tx``:   guest rings -> VF TX engine -> wire -> a port that only counts;
- ``rx``:   a line-rate source port -> wire -> VF RX engine -> guest rings;
- ``loop``: VF0 TX -> wire -> VF1 RX (two VFs back to back).

The "guest" here is the cheapest possible driver (``FastGuest``): static
descriptors, avail entries written in bulk, no frame checking, polling every
``poll_us`` of simulated time with interrupts suppressed, so the time
measured is the engines', the PCIe model's and the wire's, plus one
control-plane bring-up.  VFs are started directly through their registers
(no driver package: sim/ never imports it).

Only this harness reads the wall clock (in ``main``); the model never does.
"""
from __future__ import annotations

import argparse
from array import array

from sim import virtio_regs as vr
from sim.config import IfcvfConfig
from sim.engines import header_length
from sim.frames import FrameBatch
from sim.ifcvf import IfcvfFunction
from sim.testing.splitring import DESC_F_WRITE, SplitRing, need_event
from sim.wire import Port, connect
from sim.world import World

FEATURES = vr.feature_mask(vr.F_VERSION_1, vr.F_EVENT_IDX, vr.F_INDIRECT_DESC,
                           vr.F_NET_MRG_RXBUF, vr.F_NET_MAC)
RING_BASE = 0x10_0000
BUF_BASE = 0x100_0000
SLOT = 2048


def _common(fn: IfcvfFunction, name: str) -> int:
    return vr.COMMON_REGISTERS[name][0]


def bring_up(fn: IfcvfFunction, memory: bytearray, queues: dict[int, SplitRing],
             features: int = FEATURES) -> None:
    """The virtio start sequence straight on the registers (what ifcvf.hw does)."""
    bar = fn.layout.common.bar
    base = fn.layout.common.offset

    def w(name, value, width=None):
        off, size = vr.COMMON_REGISTERS[name]
        fn.mmio_write(bar, base + off, width or size, value)

    fn.config_write(0x04, 2, 0x6)                 # memory decode + bus master
    fn.iommu.map(0, memory, len(memory))
    w("device_status", 0)
    w("device_status", vr.STATUS_ACKNOWLEDGE | vr.STATUS_DRIVER)
    for sel in (0, 1):
        w("guest_feature_select", sel)
        w("guest_feature", features >> (32 * sel) & 0xFFFF_FFFF)
    w("device_status", vr.STATUS_ACKNOWLEDGE | vr.STATUS_DRIVER | vr.STATUS_FEATURES_OK)
    for q, ring in queues.items():
        w("queue_select", q)
        w("queue_size", ring.size)
        for reg, addr in (("desc", ring.desc), ("avail", ring.avail), ("used", ring.used)):
            w(f"queue_{reg}_lo", addr & 0xFFFF_FFFF)
            w(f"queue_{reg}_hi", addr >> 32)
        w("queue_enable", 1)
    w("device_status", vr.STATUS_ACKNOWLEDGE | vr.STATUS_DRIVER | vr.STATUS_FEATURES_OK
      | vr.STATUS_DRIVER_OK)


class FastGuest:
    """Keeps one ring full: static descriptors, bulk avail writes, polling."""

    def __init__(self, world: World, fn: IfcvfFunction, memory: bytearray, q: int, size: int,
                 *, tx: bool, frame_len: int, poll_us: float):
        self.world, self.fn, self.q, self.size = world, fn, q, size
        self.ring = SplitRing(memory, RING_BASE + q * 0x4_0000, size)
        self.mem = memoryview(memory)
        hdr = header_length(FEATURES)
        buf0 = BUF_BASE + q * size * SLOT
        frame = bytes(range(256)) * (frame_len // 256 + 1)
        frame = bytes.fromhex("525400000001020000000002") + b"\x88\xb5" + frame[:frame_len - 14]
        for i in range(size):
            addr = buf0 + i * SLOT
            if tx:
                memory[addr:addr + hdr + frame_len] = bytes(hdr) + frame
                self.ring.set_desc(i, addr, hdr + frame_len)
            else:
                self.ring.set_desc(i, addr, SLOT, DESC_F_WRITE)
        self._pattern = array("H", list(range(size)) * 2).tobytes()
        self.poll = world.cycles(poll_us * 1000)
        self.posted = 0

    def refill(self) -> None:
        ring, size = self.ring, self.size
        used = ring.used_idx
        free = size - ((self.posted - used) & 0xFFFF)
        if free <= 0:
            return
        slot = self.posted % size
        start = ring.avail + 4 + 2 * slot
        first = min(free, size - slot)
        self.mem[start:start + 2 * first] = self._pattern[2 * slot:2 * (slot + first)]
        if free > first:           # wrapped: the rest from the start of the ring
            head = ring.avail + 4
            self.mem[head:head + 2 * (free - first)] = self._pattern[0:2 * (free - first)]
        old = self.posted
        self.posted = (self.posted + free) & 0xFFFF
        ring.shadow_avail = self.posted
        ring.publish()
        if need_event(ring.avail_event, self.posted, old):
            self.fn.mmio_write(2, self.q * self.fn.config.notify_off_multiplier, 2, self.q)

    def run(self):
        while True:
            self.refill()
            yield self.world.timeout(self.poll)


def _vf(world: World, name: str, queues: dict[int, int], size: int, frame_len: int,
        poll_us: float, config: IfcvfConfig):
    memory = bytearray(BUF_BASE + 4 * size * SLOT)
    fn = IfcvfFunction(world, config, name=name)
    guests = {q: FastGuest(world, fn, memory, q, size, tx=bool(q % 2), frame_len=frame_len,
                           poll_us=poll_us) for q in queues}
    bring_up(fn, memory, {q: g.ring for q, g in guests.items()})
    for g in guests.values():
        world.process(g.run())
    return fn, guests


class LineSource:
    """A port sending the same frames back to back at line rate, a burst per wake-up."""

    def __init__(self, world: World, port: Port, frame_len: int, burst: int):
        self.world, self.port = world, port
        data = bytearray()
        frame = bytes.fromhex("525400000001020000000002") + b"\x88\xb5" + bytes(frame_len - 14)
        for _ in range(burst):
            data += frame
        self.data = data
        self.lengths = array("I", [frame_len] * burst)
        self.frames = 0

    def run(self):
        world = self.world
        while True:
            batch = FrameBatch(self.data, self.lengths, array("q", bytes(8 * len(self.lengths))))
            done = self.port.transmit(batch, world.now)
            self.frames += len(self.lengths)
            yield world.timeout(max(1, done - world.now))


def run(mode: str, frame_size: int, sim_us: float, *, size: int = 1024, poll_us: float = 2.0,
        burst: int = 64, config: IfcvfConfig | None = None, seed: int = 1, clock=None) -> dict:
    """One set-up for ``sim_us`` simulated us; ``clock`` (a wall-clock reader) times it."""
    frame_len = frame_size - 4
    config = config or IfcvfConfig(queue_pairs=1, max_queue_size=max(1024, size))
    world = World(seed)
    window = {"from": None, "to": None, "frames": 0}

    def count(batch):
        lo, hi = window["from"], window["to"]
        times = batch.times
        if lo is None or not len(times):
            return
        if lo < times[0] and times[-1] <= hi:
            window["frames"] += len(times)
        else:
            window["frames"] += sum(1 for t in times if lo < t <= hi)

    if mode == "tx":
        fn, _ = _vf(world, "vf0", {1: 1}, size, frame_len, poll_us, config)
        peer = Port(world, "sink")
        peer.on_receive(count)
        connect(fn.port, peer)
        measured = fn.port
    elif mode == "rx":
        fn, _ = _vf(world, "vf0", {0: 0}, size, frame_len, poll_us, config)
        src = Port(world, "source")
        connect(src, fn.port)
        source = LineSource(world, src, frame_len, burst)
        world.process(source.run())
        measured = src
    elif mode == "loop":
        fn, _ = _vf(world, "vf0", {1: 1}, size, frame_len, poll_us, config)
        fn1, _ = _vf(world, "vf1", {0: 0}, size, frame_len, poll_us, config)
        connect(fn.port, fn1.port)
        measured = fn.port
    else:
        raise ValueError(mode)
    world.advance_ns(5_000)                 # warm up: rings full, pipelines busy
    start, frames0 = world.now, measured.tx_frames
    link = fn.datapath.link
    bytes0 = (link.up_bytes, link.down_bytes)
    rx0 = fn.datapath.stats()["queues"].get(0, {}).get("frames", 0)
    end = start + world.cycles(sim_us * 1000)
    window["from"], window["to"] = start, end
    t0 = clock() if clock else 0.0
    world.run_until(end)
    wall = (clock() - t0) if clock else 0.0
    seconds = (world.now - start) / world.clock_hz
    sent = measured.tx_frames - frames0
    if mode == "rx":
        done = fn.datapath.stats()["queues"][0]["frames"] - rx0
    elif mode == "loop":
        done = fn1.datapath.stats()["queues"][0]["frames"]
    else:
        world.run_until(end + world.cycles(20_000))    # frames that left by ``end`` arrive
        done = window["frames"]
    wire_bytes = (frame_len + 24) * (done if mode == "tx" else sent)
    up, down = link.utilisation(start, bytes0)
    return {"mode": mode, "frame": frame_size, "frames": done, "wall_s": wall,
            "ns_per_frame": wall / max(1, done) * 1e9,
            "frames_per_wall_s": done / wall if wall else 0.0,
            "sim_mpps": done / seconds / 1e6, "wire_gbps": wire_bytes * 8 / seconds / 1e9,
            "line_mpps": measured.line_rate_pps(frame_size) / 1e6,
            "pcie_up": up, "pcie_down": down,
            "dropped": fn.datapath.stats()["queues"].get(0, {}).get("dropped", 0),
            "digest": world.digest(), "trace_events": world.trace.count}


def main(argv=None) -> int:
    import time

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64,1518")
    p.add_argument("--modes", default="tx,rx,loop")
    p.add_argument("--frames", type=int, default=400_000, help="simulated frames per run")
    p.add_argument("--batch", type=int, default=None, help="engine_batch")
    args = p.parse_args(argv)
    print(f"{'mode':5} {'frame':>5} {'frames':>8} {'ns/frame':>9} {'Mframes/wall-s':>14} "
          f"{'sim Mpps':>9} {'line Mpps':>9} {'PCIe up':>8} {'down':>6}  binds")
    for size in (int(s) for s in args.sizes.split(",")):
        for mode in args.modes.split(","):
            per_frame_ns = (size + 20) * 8 / 100
            sim_us = args.frames * per_frame_ns / 1000
            config = None
            if args.batch:
                config = IfcvfConfig(queue_pairs=1, max_queue_size=1024, engine_batch=args.batch)
            r = run(mode, size, sim_us, config=config, clock=time.perf_counter,
                    poll_us=2.0 if size < 200 else 8.0)
            util = {"wire": r["sim_mpps"] / r["line_mpps"], "PCIe up": r["pcie_up"],
                    "PCIe down": r["pcie_down"]}
            binds = max(util, key=util.get)
            print(f"{mode:5} {size:5} {r['frames']:8} {r['ns_per_frame']:9.0f} "
                  f"{r['frames_per_wall_s'] / 1e6:14.2f} {r['sim_mpps']:9.2f} {r['line_mpps']:9.2f} "
                  f"{r['pcie_up']:8.1%} {r['pcie_down']:6.1%}  {binds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["run", "bring_up", "FastGuest", "LineSource"]
