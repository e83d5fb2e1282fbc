"""Stand-ins for the device side, to test the guest model and the traffic endpoints alone.

``RingDevice`` is the device half of a ``GuestNet``'s split rings written
plainly in Python from the virtio rules (a frame at a time: for tests, not
speed): it reads RX buffers from the avail ring and writes frames into them
with a net header (num_buffers, merging with MRG_RXBUF), reads TX chains
(single, chained, indirect) and hands their frames on, and suppresses or
sends kicks and interrupts by the rules of the negotiated features.  Tests
may make it misbehave (``corrupt_next``, ``write_used``) to see that the
guest notices.

``LinePort`` is the smallest ``sim.wire.Port`` look-alike: frames leave back
to back at line rate and are handed to the peer's receive handler one event
per batch, with arrival times.
"""
from __future__ import annotations

import math
import os
import struct

from sim import virtio_regs as vr
from sim.frames import WIRE_OVERHEAD, FrameBatch
from sim.ring_layout import need_event
from sim.world import World

DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1


class LinePort:
    """One end of a point-to-point link at ``gbps``, ``latency_ns`` to the other end."""

    def __init__(self, world: World, gbps: float = 100.0, latency_ns: float = 0.0,
                 name: str = "port"):
        self.world = world
        self.name = name
        self.cycles_per_byte = 8 * world.clock_hz / (gbps * 1e9)
        self.latency = world.cycles(latency_ns)
        self.peer: LinePort | None = None
        self.handler = None
        self._free = 0.0
        self.frames = 0
        self.bytes = 0

    def on_receive(self, handler) -> None:
        self.handler = handler

    def transmit(self, batch: FrameBatch, earliest_cycle: int) -> int:
        t = max(float(earliest_cycle), self._free)
        times = batch.times
        if len(times) != len(batch.lengths):
            times = batch.times = type(times)("q", bytes(8 * len(batch.lengths)))
        cpb = self.cycles_per_byte
        for i, length in enumerate(batch.lengths):
            t += (length + WIRE_OVERHEAD) * cpb
            times[i] = math.ceil(t - 1e-9)
        self._free = t
        self.frames += len(batch.lengths)
        self.bytes += len(batch.data)
        done = math.ceil(t - 1e-9)
        peer = self.peer
        if peer is not None and peer.handler is not None and len(batch.lengths):
            arrivals = type(times)("q", (x + self.latency for x in times))
            delivered = FrameBatch(batch.data, batch.lengths, arrivals)
            at = arrivals[-1]
            event = self.world.timeout(at - self.world.now)
            event.callbacks.append(lambda _ev: peer.handler(delivered))
        return done


def link(world: World, gbps: float = 100.0, latency_ns: float = 0.0) -> tuple[LinePort, LinePort]:
    a, b = LinePort(world, gbps, latency_ns, "a"), LinePort(world, gbps, latency_ns, "b")
    a.peer, b.peer = b, a
    return a, b


class _DevQueue:
    def __init__(self, index: int, size: int, desc: int, avail: int, used: int):
        self.index = index
        self.size = size
        self.desc, self.avail, self.used = desc, avail, used
        self.last_avail = 0
        self.used_idx = 0
        self.signalled_used = 0       # used idx at the last interrupt decision
        self.kick_fd = -1
        self.call_fd = -1
        self.kicks = 0
        self.interrupts = 0
        self.interrupts_suppressed = 0
        self.no_notify = False
        self.kick_every = 1            # EVENT_IDX: ask for a kick every n new avail entries


class RingDevice:
    """The device side of a guest's split rings (tests only).

    ``queues``: list of (desc, avail, used) GPAs, RX even / TX odd, all of
    ``size``.  TX frames go to ``tx_port`` (a port, or None to keep them in
    ``tx_frames``); RX frames come from ``deliver`` or, via ``rx_handler``,
    from a port.
    """

    def __init__(self, world: World, memory, queues, size: int, features: int, *,
                 tx_port=None, kick_ns: float = 200.0, irq_ns: float = 500.0,
                 name: str = "dev"):
        self.world = world
        self.memory = memory
        self.view = memory.view
        self.features = features
        self.hdr_len = 12 if features & vr.feature_mask(vr.F_VERSION_1, vr.F_NET_MRG_RXBUF) else 10
        self.mrg = bool(features >> vr.F_NET_MRG_RXBUF & 1)
        self.event_idx = bool(features >> vr.F_EVENT_IDX & 1)
        self.queues = [_DevQueue(i, size, *addr) for i, addr in enumerate(queues)]
        for q in self.queues:
            # Start (or restore) from the used index in memory: buffers the
            # guest made available after it are offered again.
            q.last_avail = q.used_idx = q.signalled_used = self._u16(q.used + 2)
            self._write_avail_event(q)
        self.tx_port = tx_port
        self.tx_frames: list[bytes] = []
        self.kick_delay = world.cycles(kick_ns)
        self.irq_delay = world.cycles(irq_ns)
        self.name = name
        self.rx_dropped = 0
        self.rx_delivered = 0
        self.tx_sent = 0
        self.errors: list[str] = []
        self.corrupt_next = 0          # corrupt the payload of the next n RX frames
        self.running = True
        self.tx_kick_latency = 0

    # --- memory helpers ------------------------------------------------------------
    def _u16(self, gpa: int) -> int:
        return struct.unpack_from("<H", self.view, gpa)[0]

    def _w16(self, gpa: int, value: int) -> None:
        struct.pack_into("<H", self.view, gpa, value & 0xFFFF)

    def _desc(self, table: int, i: int) -> tuple[int, int, int, int]:
        return struct.unpack_from("<QIHH", self.view, table + 16 * i)

    def avail_idx(self, q: _DevQueue) -> int:
        return self._u16(q.avail + 2)

    # --- wiring --------------------------------------------------------------------
    def attach(self, index: int, kick_fd: int, call_fd: int) -> None:
        q = self.queues[index]
        q.kick_fd, q.call_fd = kick_fd, call_fd
        self.world.watch_fd(kick_fd, lambda fd, q=q: self._on_kick(q))

    def set_no_notify(self, index: int, on: bool) -> None:
        """Without EVENT_IDX: VRING_USED_F_NO_NOTIFY in the used ring flags."""
        q = self.queues[index]
        q.no_notify = on
        self._w16(q.used, USED_F_NO_NOTIFY if on else 0)

    def set_kick_every(self, index: int, n: int) -> None:
        """With EVENT_IDX: avail_event = last_avail + n - 1 (kick after n more)."""
        q = self.queues[index]
        q.kick_every = n
        self._write_avail_event(q)

    def _write_avail_event(self, q: _DevQueue) -> None:
        if self.event_idx:
            self._w16(q.used + 4 + 8 * q.size, q.last_avail + q.kick_every - 1)

    def _on_kick(self, q: _DevQueue) -> None:
        try:
            os.eventfd_read(q.kick_fd)
        except BlockingIOError:
            return
        q.kicks += 1
        if q.index % 2 == 1:
            ev = self.world.timeout(self.kick_delay)
            ev.callbacks.append(lambda _e: self.process_tx(q.index))

    # --- interrupts ------------------------------------------------------------------
    def _interrupt(self, q: _DevQueue) -> None:
        old, new = q.signalled_used, q.used_idx
        q.signalled_used = new
        if old == new:
            return
        if self.event_idx:
            want = need_event(self._u16(q.avail + 4 + 2 * q.size), new, old)
        else:
            want = not self._u16(q.avail) & AVAIL_F_NO_INTERRUPT
        if not want:
            q.interrupts_suppressed += 1
            return
        q.interrupts += 1
        if q.call_fd >= 0:
            ev = self.world.timeout(self.irq_delay)
            ev.callbacks.append(lambda _e, fd=q.call_fd: self.world.signal_fd(fd))

    def _push_used(self, q: _DevQueue, entries: list[tuple[int, int]]) -> None:
        for i, (id_, length) in enumerate(entries):
            struct.pack_into("<II", self.view, q.used + 4 + 8 * ((q.used_idx + i) % q.size),
                             id_, length)
        q.used_idx = (q.used_idx + len(entries)) & 0xFFFF
        self._w16(q.used + 2, q.used_idx)

    def write_used(self, index: int, entries: list[tuple[int, int]], interrupt: bool = True) -> None:
        """Publish arbitrary used entries (to test how the guest takes bad ones)."""
        q = self.queues[index]
        self._push_used(q, entries)
        if interrupt:
            self._interrupt(q)

    # --- RX ------------------------------------------------------------------------
    def rx_handler(self, pairs: int = 1):
        """A port receive handler: frame flow % pairs picks the RX queue."""
        def handler(batch: FrameBatch) -> None:
            per_pair: dict[int, list[bytes]] = {}
            for off, length, _t in batch.frames():
                frame = bytes(batch.data[off:off + length])
                flow = struct.unpack_from("<I", frame, 18)[0] if length >= 22 else 0
                per_pair.setdefault(flow % pairs, []).append(frame)
            for p in sorted(per_pair):
                self.deliver(p, per_pair[p])
        return handler

    def _take_rx_buffer(self, q: _DevQueue):
        if q.last_avail == self.avail_idx(q):
            return None
        head = self._u16(q.avail + 4 + 2 * (q.last_avail % q.size))
        q.last_avail = (q.last_avail + 1) & 0xFFFF
        addr, length, flags, _next = self._desc(q.desc, head)
        if not flags & DESC_F_WRITE or flags & (DESC_F_NEXT | DESC_F_INDIRECT):
            self.errors.append(f"rx queue {q.index}: descriptor {head} flags {flags:#x}")
        return head, addr, length

    def deliver(self, pair: int, frames: list[bytes]) -> int:
        """Write frames into RX queue 2*pair; returns how many were delivered."""
        q = self.queues[2 * pair]
        entries: list[tuple[int, int]] = []
        delivered = 0
        hdr = self.hdr_len
        for frame in frames:
            if self.corrupt_next:
                self.corrupt_next -= 1
                frame = bytearray(frame)
                frame[-1] ^= 0xFF
                frame = bytes(frame)
            saved = q.last_avail
            first = self._take_rx_buffer(q)
            if first is None:
                self.rx_dropped += 1
                continue
            pieces = [first]
            need = hdr + len(frame)
            room = first[2]
            while room < need and self.mrg:
                more = self._take_rx_buffer(q)
                if more is None:
                    break
                pieces.append(more)
                room += more[2]
            if room < need:
                q.last_avail = saved        # give the buffers back, drop the frame
                self.rx_dropped += 1
                continue
            data = bytearray(hdr) + frame
            if hdr == 12:
                struct.pack_into("<H", data, 10, len(pieces))
            off = 0
            for head, addr, length in pieces:
                chunk = data[off:off + length]
                self.view[addr:addr + len(chunk)] = chunk
                entries.append((head, len(chunk)))
                off += len(chunk)
            delivered += 1
        if entries:
            self._push_used(q, entries)
            self._write_avail_event(q)
            self._interrupt(q)
        self.rx_delivered += delivered
        return delivered

    # --- TX ------------------------------------------------------------------------
    def _read_chain(self, q: _DevQueue, head: int) -> bytes:
        table, count, i = q.desc, q.size, head
        addr, length, flags, nxt = self._desc(table, i)
        if flags & DESC_F_INDIRECT:
            table, count, i = addr, length // 16, 0
            addr, length, flags, nxt = self._desc(table, i)
        out = bytearray()
        for _ in range(count):
            if flags & DESC_F_WRITE:
                self.errors.append(f"tx queue {q.index}: writable descriptor in a TX chain")
            out += self.view[addr:addr + length]
            if not flags & DESC_F_NEXT:
                break
            addr, length, flags, nxt = self._desc(table, nxt)
        return bytes(out)

    def process_tx(self, index: int, limit: int | None = None) -> int:
        """Send what the guest made available on TX queue ``index``; returns frames."""
        if not self.running:
            return 0
        q = self.queues[index]
        entries = []
        batch = FrameBatch()
        avail = self.avail_idx(q)
        while q.last_avail != avail and (limit is None or len(entries) < limit):
            head = self._u16(q.avail + 4 + 2 * (q.last_avail % q.size))
            q.last_avail = (q.last_avail + 1) & 0xFFFF
            data = self._read_chain(q, head)
            batch.append(data[self.hdr_len:])
            entries.append((head, 0))
        if not entries:
            return 0
        self.tx_sent += len(entries)
        if self.tx_port is not None:
            self.tx_port.transmit(batch, self.world.now)
        else:
            self.tx_frames += [bytes(batch.data[o:o + n]) for o, n, _ in batch.frames()]
        self._push_used(q, entries)
        self._write_avail_event(q)
        self._interrupt(q)
        return len(entries)


__all__ = ["RingDevice", "LinePort", "link"]


class NullDevice:
    """A device that costs nothing, to measure the guest model alone (benchmarks).

    It relies on the guest's in-order buffer recycling: RX buffer i is always
    avail entry i mod size and TX chain heads come back in the order they
    went out, so the used rings are written once and a completion is a store
    of used->idx.  RX buffers are filled once with valid test frames (flow 0,
    sequence number = buffer number: after the first lap the checker counts
    duplicates, but checks every byte as usual).  RX: every ``period_ns``,
    ``batch`` more buffers are completed (fewer if the guest has not made
    them available); TX: a kick completes everything posted.
    """

    def __init__(self, world: World, guest, *, rx_frame_size: int = 1518, batch: int = 64,
                 period_ns: float | None = None, kick_ns: float = 200.0, irq_ns: float = 500.0):
        from sim._native import ffi, lib
        self.world = world
        self.guest = guest
        self.view = guest.memory.view
        self.batch = batch
        length = rx_frame_size - 4
        if period_ns is None:      # line rate at 100 Gb/s
            period_ns = batch * (length + WIRE_OVERHEAD) * 8 / 100.0
        self.period = max(1, world.cycles(period_ns))
        self.kick_delay = world.cycles(kick_ns)
        self.irq_delay = world.cycles(irq_ns)
        self.event_idx = guest.event_idx
        self.queues = []
        hdr = guest.hdr_len
        for lay in guest.layout:
            q = _DevQueue(lay.index, lay.size, lay.desc, lay.avail, lay.used)
            q.last_avail = q.used_idx = q.signalled_used = struct.unpack_from(
                "<H", self.view, lay.used + 2)[0]
            self.queues.append(q)
            if lay.is_tx:
                step = 2 if guest.tx_chain == "split" else 1
                for i in range(lay.size):
                    struct.pack_into("<II", self.view, lay.used + 4 + 8 * i,
                                     (i * step) % (lay.nslots * step), 0)
            else:
                if hdr + length > lay.buf_size:
                    raise ValueError("NullDevice frames must fit one RX buffer")
                for i in range(lay.size):
                    struct.pack_into("<II", self.view, lay.used + 4 + 8 * i, i, hdr + length)
                    at = lay.bufs + i * lay.buf_size
                    self.view[at:at + hdr] = bytes(hdr)
                    if hdr == 12:
                        self.view[at + 10:at + 12] = b"\x01\x00"
                    frame = self.view[at + hdr:at + hdr + length]
                    lib.ifc_frame_fill(ffi.from_buffer(frame), length, ffi.NULL, 0, i)
        self.rx_frames = 0
        self.tx_frames = 0
        self.running = False

    def attach(self, index: int, kick_fd: int, call_fd: int) -> None:
        q = self.queues[index]
        q.kick_fd, q.call_fd = kick_fd, call_fd
        if index % 2:
            self.world.watch_fd(kick_fd, lambda fd, q=q: self._on_kick(q))

    def start(self) -> None:
        self.running = True
        for q in self.queues[0::2]:
            self.world.process(self._rx(q))

    def _u16(self, gpa: int) -> int:
        return struct.unpack_from("<H", self.view, gpa)[0]

    def _publish(self, q: _DevQueue, n: int) -> None:
        q.used_idx = (q.used_idx + n) & 0xFFFF
        struct.pack_into("<H", self.view, q.used + 2, q.used_idx)
        q.last_avail = q.used_idx
        if self.event_idx:
            struct.pack_into("<H", self.view, q.used + 4 + 8 * q.size, q.last_avail)
        old, q.signalled_used = q.signalled_used, q.used_idx
        if self.event_idx:
            want = need_event(self._u16(q.avail + 4 + 2 * q.size), q.used_idx, old)
        else:
            want = not self._u16(q.avail) & AVAIL_F_NO_INTERRUPT
        if want and q.call_fd >= 0:
            q.interrupts += 1
            ev = self.world.timeout(self.irq_delay)
            ev.callbacks.append(lambda _e, fd=q.call_fd: self.world.signal_fd(fd))

    def _rx(self, q: _DevQueue):
        env = self.world.env
        while self.running:
            yield env.timeout(self.period)
            n = min(self.batch, (self._u16(q.avail + 2) - q.used_idx) & 0xFFFF)
            if n:
                self.rx_frames += n
                self._publish(q, n)

    def _on_kick(self, q: _DevQueue) -> None:
        try:
            os.eventfd_read(q.kick_fd)
        except BlockingIOError:
            return
        q.kicks += 1
        ev = self.world.timeout(self.kick_delay)
        ev.callbacks.append(lambda _e: self._complete_tx(q))

    def _complete_tx(self, q: _DevQueue) -> None:
        n = (self._u16(q.avail + 2) - q.used_idx) & 0xFFFF
        if n:
            self.tx_frames += n
            self._publish(q, n)
