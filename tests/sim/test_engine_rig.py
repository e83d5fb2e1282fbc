"""A VF started the way the driver starts it, with rings the test writes itself.

Model -> HAL (hal.sim) -> register layer (ifcvf.hw), guest memory in a memfd
mapped with IOVA = GPA, rings laid out by ``sim.testing.splitring.SplitRing`` so a
test can make them as hostile as it likes, the VF's port connected to a
capture port (what the VF sends) that can also send to it.

Imported by the engine, wire and dirty-logging tests (tests/property adds
this directory to sys.path); the tests at the end check the rig itself.
"""
from __future__ import annotations

import os
import struct
from array import array

from hal.memory import HostMemory
from hal.sim import SimFunction
from ifcvf import ids
from ifcvf.hw import IfcvfHw, QueueConfig
from sim.config import IfcvfConfig
from sim.frames import FrameBatch
from sim.ifcvf import IfcvfFunction
from sim.testing.splitring import (DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, SplitRing)
from sim.wire import Port, connect
from sim.world import World

F = ids.Feature
BASE_FEATURES = ids.bit(F.VERSION_1) | ids.bit(F.NET_MAC) | ids.bit(F.NET_MQ) | ids.bit(F.NET_CTRL_VQ)
EVENT_IDX = ids.bit(F.RING_EVENT_IDX)
INDIRECT = ids.bit(F.RING_INDIRECT_DESC)
MRG = ids.bit(F.NET_MRG_RXBUF)
VERSION_1 = ids.bit(F.VERSION_1)
ALL = BASE_FEATURES | EVENT_IDX | INDIRECT | MRG

RING_BASE = 0x10_0000
BUF_BASE = 0x40_0000
SLOT = 4096                       # one buffer slot per ring entry


def frame(n: int, seq: int = 0) -> bytes:
    """A recognisable Ethernet frame of n bytes (no FCS)."""
    head = bytes.fromhex("525400000001020000000002") + b"\x88\xb5" + struct.pack("<I", seq)
    body = bytes((seq * 7 + i) & 0xFF for i in range(max(0, n - len(head))))
    return (head + body)[:n]


class Capture:
    """The far end of the VF's link: records what arrives, sends on request."""

    def __init__(self, world: World, vf_port: Port, propagation_ns: float = 0.0):
        self.port = Port(world, "peer")
        self.batches: list[FrameBatch] = []
        self.port.on_receive(self.batches.append)
        connect(vf_port, self.port, propagation_ns)

    def frames(self) -> list[bytes]:
        out = []
        for b in self.batches:
            for off, length, _t in b.frames():
                out.append(bytes(b.data[off:off + length]))
        return out

    def times(self) -> list[int]:
        return [t for b in self.batches for t in b.times]

    def send(self, frames: list[bytes], earliest: int = 0) -> FrameBatch:
        batch = FrameBatch()
        for f in frames:
            batch.append(f)
        self.port.transmit(batch, earliest)
        return batch


class Rig:
    def __init__(self, *, config: IfcvfConfig | None = None, pairs: int = 1, size: int = 256,
                 mem_mib: int = 32, seed: int = 1, world: World | None = None,
                 name: str = "vf0", index: int = 0, capture: bool = True,
                 mapped_mib: int | None = None):
        """``mapped_mib``: map only the first part of guest memory; the rest is
        filled with a canary (``canary_intact()``) the device must never touch."""
        self.world = world or World(seed)
        self.config = config or IfcvfConfig(queue_pairs=pairs)
        self.model = IfcvfFunction(self.world, self.config, name=name)
        self.fn = SimFunction(self.model, index)
        self.mem = HostMemory(mem_mib << 20, f"{name}-ram")
        self.mapped = (mapped_mib << 20) if mapped_mib else self.mem.size
        self.fn.dma_map(0, self.mem, 0, self.mapped)
        self._canary = bytes(range(251)) * ((self.mem.size - self.mapped) // 251 + 1)
        self._canary = self._canary[:self.mem.size - self.mapped]
        self.mem.view[self.mapped:] = self._canary
        self.hw = IfcvfHw(self.fn)
        # vector 0: config changes; vector 1 + q: queue q (as the driver routes them)
        self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                         for _ in range(2 * pairs + 2)]
        self.fn.set_msix(self.eventfds)
        self.pairs = pairs
        self.size = size
        self.rings = [SplitRing(self.mem.view, RING_BASE + q * 0x2_0000, size)
                      for q in range(2 * pairs)]
        self.capture = Capture(self.world, self.model.port) if capture else None
        self.features = 0
        self.hdr = 12
        self.next_slot = [0] * (2 * pairs)

    # --- bring-up -----------------------------------------------------------------
    def start(self, features: int = ALL, bases: dict[int, int] | None = None,
              queues: list[int] | None = None, init_rings: bool = True) -> int:
        """Start the VF; ``init_rings`` writes avail/used idx = base into the rings
        (False: the rings in memory are already what the guest has)."""
        bases = bases or {}
        qs = []
        for q in (queues if queues is not None else range(2 * self.pairs)):
            ring = self.rings[q]
            base = bases.get(q, 0)
            if init_rings:
                ring.start_at(base)
            qs.append(QueueConfig(q, self.size, ring.desc, ring.avail, ring.used,
                                  last_avail=base, last_used=base, vector=1 + q))
        self.features = self.hw.start(features, qs, mq_pairs=self.pairs)
        self.hdr = 12 if self.features & (VERSION_1 | MRG) else 10
        return self.features

    def stop(self, queues: list[int] | None = None):
        return self.hw.stop(queues if queues is not None else list(range(2 * self.pairs)))

    def run_ns(self, ns: float) -> None:
        self.world.advance_ns(ns)

    def kick(self, q: int) -> None:
        self.hw.kick(q)

    def interrupts(self, q: int) -> int:
        return self.model.msix.delivered[1 + q]

    def slot_addr(self, q: int, slot: int) -> int:
        return BUF_BASE + (q * self.size + slot % self.size) * SLOT

    # --- TX -------------------------------------------------------------------------
    def post_tx(self, q: int, frames: list[bytes], layout: str = "single", publish: bool = True,
                kick: bool = True) -> list[int]:
        """Post one chain per frame: "single" (header + frame in one buffer), "split"
        (header, then frame: two descriptors) or "indirect" (a two-entry table)."""
        ring, heads = self.rings[q], []
        for data in frames:
            slot = self.next_slot[q] % self.size
            self.next_slot[q] += 1
            buf = self.slot_addr(q, slot)
            hdr = bytes(self.hdr)
            if layout == "single":
                self.write(buf, hdr + data)
                ring.set_desc(slot, buf, self.hdr + len(data))
            elif layout == "split":
                # descriptor slot: header; the table's last half holds data descriptors
                other = (slot + self.size // 2) % self.size
                self.write(buf, hdr)
                self.write(buf + 64, data)
                ring.set_desc(slot, buf, self.hdr, DESC_F_NEXT, other)
                ring.set_desc(other, buf + 64, len(data))
            elif layout == "indirect":
                table = buf + 2048
                self.write(buf, hdr)
                self.write(buf + 64, data)
                ring.set_desc(0, buf, self.hdr, DESC_F_NEXT, 1, table=table)
                ring.set_desc(1, buf + 64, len(data), 0, 0, table=table)
                ring.set_desc(slot, table, 32, DESC_F_INDIRECT)
            else:
                raise ValueError(layout)
            ring.post(slot)
            heads.append(slot)
        if publish:
            ring.publish()
        if kick:
            self.kick(q)
        return heads

    # --- RX -------------------------------------------------------------------------
    def post_rx(self, q: int, count: int, buf_len: int = 2048, *, pieces: int = 1,
                publish: bool = True, kick: bool = True) -> list[int]:
        """Post ``count`` writable chains of ``pieces`` descriptors of ``buf_len`` bytes."""
        ring, heads = self.rings[q], []
        for _ in range(count):
            slot = self.next_slot[q] % self.size
            self.next_slot[q] += 1
            buf = self.slot_addr(q, slot)
            if pieces == 1:
                ring.set_desc(slot, buf, buf_len, DESC_F_WRITE)
            else:
                table = buf + SLOT - 16 * pieces
                part = buf_len // pieces
                for i in range(pieces):
                    flags = DESC_F_WRITE | (DESC_F_NEXT if i + 1 < pieces else 0)
                    ring.set_desc(i, buf + i * part, part, flags, i + 1, table=table)
                ring.set_desc(slot, table, 16 * pieces, DESC_F_INDIRECT)
            ring.post(slot)
            heads.append(slot)
        if publish:
            ring.publish()
        if kick:
            self.kick(q)
        return heads

    def rx_frames(self, q: int) -> list[tuple[bytes, int]]:
        """(frame, num_buffers) per received frame, merging buffers as a driver does."""
        ring, out = self.rings[q], []
        pending: list[tuple[int, int]] = ring.take_used()
        i = 0
        while i < len(pending):
            head, length = pending[i]
            data = self.gather(q, head, length)
            hdr = data[:self.hdr]
            nbuf = struct.unpack_from("<H", hdr, 10)[0] if self.hdr == 12 else 1
            body = data[self.hdr:]
            for j in range(1, nbuf):
                h2, l2 = pending[i + j]
                body += self.gather(q, h2, l2)
            out.append((body, nbuf))
            i += max(1, nbuf)
        return out

    def gather(self, q: int, head: int, length: int) -> bytes:
        """The first ``length`` bytes of the chain at ``head``."""
        ring, out, table, i = self.rings[q], b"", None, head
        while len(out) < length:
            addr, blen, flags, nxt = ring.desc_at(i, table)
            if flags & DESC_F_INDIRECT:
                table, i = addr, 0
                continue
            out += ring.read(addr, min(blen, length - len(out)))
            if not flags & DESC_F_NEXT:
                break
            i = nxt
        return out

    # --- memory ---------------------------------------------------------------------
    def write(self, gpa: int, data: bytes) -> None:
        self.mem.view[gpa:gpa + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.mem.view[gpa:gpa + length])

    def canary_intact(self) -> bool:
        return bytes(self.mem.view[self.mapped:]) == self._canary

    def close(self) -> None:
        self.fn.close()
        self.mem.close()
        for fd in self.eventfds:
            os.close(fd)


def lengths_of(batch: FrameBatch) -> list[int]:
    return list(array("I", batch.lengths))


# --- the rig itself ------------------------------------------------------------------

def test_rig_starts_a_vf_with_datapath_engines():
    rig = Rig()
    try:
        rig.start()
        from sim.engines import RxEngine, TxEngine
        assert isinstance(rig.model.queue(0).engine, RxEngine)
        assert isinstance(rig.model.queue(1).engine, TxEngine)
        assert rig.model.queue(0).running and rig.model.queue(1).running
        assert not rig.model.needs_reset
    finally:
        rig.close()


def test_rig_ring_accessor_round_trips():
    rig = Rig()
    try:
        ring = rig.rings[1]
        ring.set_desc(3, 0x1234, 56, DESC_F_NEXT, 4)
        assert ring.desc_at(3) == (0x1234, 56, DESC_F_NEXT, 4)
        ring.post(3)
        ring.publish()
        assert struct.unpack_from("<H", rig.mem.view, ring.avail + 2)[0] == 1
    finally:
        rig.close()
