"""The wire: 100 GbE ports joined point to point, frames moved a batch at a time.

A ``Port`` is one end of a full-duplex link: a VF's MAC (``fn.port``), a
traffic generator or sink (``sim.traffic``), anything with frames to send.
``connect(a, b, propagation_ns)`` joins two ports; each direction is
independent.

Sending: ``port.transmit(batch, earliest_cycle, ready=None) -> int``
schedules the frames of a ``FrameBatch`` back to back at the port's line
rate, starting at max(earliest_cycle, now, the port is free); frame i also
waits for ``ready[i]`` when given (a per-frame "data is in the MAC" cycle:
the device engines use it; the argument is an extension, optional, so the
two-argument form works as before).  Each frame occupies its buffer bytes,
padded to the 60-byte Ethernet minimum, plus FCS, preamble + SFD and the
inter-frame gap (``sim.frames.WIRE_OVERHEAD`` = 24 byte times).  It fills
``batch.times`` with each frame's departure cycle (the cycle its last bit
leaves, rounded up), hands the batch to the peer and returns the departure
cycle of the last frame.  Time is kept in exact fractional byte times
inside, so many small frames do not accumulate rounding: 64 B frames leave
at 148.81 Mpps, 1518 B frames at 8.127 Mpps.

Receiving: ``port.on_receive(handler)``.  The handler gets
``handler(batch)`` once per transmitted batch, **at the cycle the last
frame of the batch has fully arrived** (its departure + propagation), with
``batch.times`` holding every frame's arrival cycle, all <= ``world.now``.
So a receiver never sees a frame before its last bit is in (causal), and a
batch costs one simulation event.  The delivered batch shares ``data`` and
``lengths`` with the sender's (nobody mutates a batch once sent) and has its
own ``times``.  Frames sent from an unconnected port, or to a port without
a handler, are counted in ``lost``.
"""
from __future__ import annotations

import sys
from array import array
from collections import deque
from fractions import Fraction
from typing import Callable

from sim._native import ffi, lib
from sim.frames import I64S, U32S, WIRE_OVERHEAD, FrameBatch
from sim.world import World

MIN_FRAME = 60          # Ethernet minimum without FCS: shorter frames are padded on the wire
DEFAULT_GBPS = 100
_ZERO = array("q", [0])
_schedule = lib.ifc_wire_schedule
_from_buffer = ffi.from_buffer
_CDATA = ffi.CData
_NULL = ffi.NULL


class Port:
    """One end of a point-to-point Ethernet link."""

    def __init__(self, world: World, name: str = "port", rate_gbps: float = DEFAULT_GBPS):
        if rate_gbps <= 0:
            raise ValueError("a port's rate must be positive")
        self.world = world
        self.name = name
        self.rate_gbps = rate_gbps
        per_cycle = (Fraction(rate_gbps).limit_denominator(1000) * 10**9
                     / (8 * world.clock_hz)).limit_denominator(1 << 20)
        self._tpc = per_cycle.numerator      # ticks per cycle
        self._tpb = per_cycle.denominator    # ticks per byte time
        self._free = ffi.new("uint64_t *")
        self.peer: Port | None = None
        self.propagation = 0                 # cycles to the peer
        self._handler: Callable[[FrameBatch], None] | None = None
        self.tx_frames = 0
        self.tx_bytes = 0                    # buffer bytes (no FCS)
        self.tx_wire_bytes = 0               # byte times on the wire, overhead included
        self.tx_batches = 0
        self.rx_frames = 0
        self.rx_bytes = 0
        self.rx_batches = 0
        self.lost = 0                        # frames nobody received
        self.first_departure: int | None = None
        self.last_departure = 0

    # --- set-up ---------------------------------------------------------------
    def on_receive(self, handler: Callable[[FrameBatch], None] | None) -> None:
        """``handler(batch)`` is called once per arriving batch (see the module doc)."""
        self._handler = handler

    @property
    def connected(self) -> bool:
        return self.peer is not None

    @property
    def free_cycle(self) -> int:
        """The first cycle at which the port has nothing left to send."""
        return -(-self._free[0] // self._tpc)

    def frame_cycles(self, length: int) -> float:
        """Cycles one frame of ``length`` buffer bytes occupies (fractional)."""
        return (max(length, MIN_FRAME) + WIRE_OVERHEAD) * self._tpb / self._tpc

    def line_rate_pps(self, frame_size: int) -> float:
        """Frames per second at line rate for Ethernet frames of ``frame_size`` (with FCS)."""
        return self.rate_gbps * 1e9 / 8 / (max(frame_size - 4, MIN_FRAME) + WIRE_OVERHEAD)

    # --- sending --------------------------------------------------------------
    def transmit(self, batch: FrameBatch, earliest_cycle: int, ready=None) -> int:
        """Send ``batch``; fills ``batch.times`` with departures; returns the last one."""
        lengths = batch.lengths
        n = len(lengths)
        now = self.world.env._now
        earliest = int(earliest_cycle)
        if earliest < now:
            earliest = now
        if n == 0:
            return max(earliest, self.free_cycle)
        times = batch.times
        if len(times) != n or times.typecode != "q":
            times = batch.times = _ZERO * n
        peer = self.peer
        deliver = peer is not None and peer._handler is not None
        if ready is not None:
            if len(ready) < n:
                raise ValueError(f"{self.name}: {len(ready)} ready times for {n} frames")
            ready_p = ready if isinstance(ready, _CDATA) else _from_buffer(I64S, ready)
        else:
            ready_p = _NULL
        if deliver:
            arrivals = _ZERO * n
            arrivals_p = _from_buffer(I64S, arrivals)
        else:
            arrivals = None
            arrivals_p = _NULL
        last = _schedule(_from_buffer(U32S, lengths), n, ready_p, earliest,
                         _from_buffer(I64S, times), arrivals_p, self.propagation,
                         self._free, self._tpc, self._tpb, WIRE_OVERHEAD, MIN_FRAME)
        data = batch.data
        self._sent(n, len(data), times[0], last,
                   FrameBatch(data, lengths, arrivals) if deliver else None)
        return last

    def forward(self, batch: FrameBatch) -> FrameBatch:
        """Send frames that arrived elsewhere at ``batch.times`` (a switch's egress).

        Each frame leaves once it is fully in (its time) and the port is free:
        store and forward, so frame i's departure may lie before ``now`` while
        the last one cannot (it arrived now at the latest).  ``batch`` keeps
        its own times; returns the frames as the peer gets them, ``times``
        holding arrival cycles (departure + propagation), whether or not a
        peer takes them.  (A switch hop per batch: one array and one C call,
        the departures are written over by the arrivals.)"""
        lengths = batch.lengths
        n = len(lengths)
        arrivals = _ZERO * n
        out = FrameBatch(batch.data, lengths, arrivals)
        if not n:
            return out
        arrivals_p = _from_buffer(I64S, arrivals)
        last = _schedule(_from_buffer(U32S, lengths), n, _from_buffer(I64S, batch.times), 0,
                         arrivals_p, arrivals_p, self.propagation, self._free, self._tpc,
                         self._tpb, WIRE_OVERHEAD, MIN_FRAME)
        self._sent(n, len(batch.data), arrivals[0] - self.propagation, last, out)
        return out

    def _sent(self, n: int, nbytes: int, first: int, last: int,
              delivered: FrameBatch | None) -> None:
        """Count ``n`` frames sent (departures ``first`` .. ``last``) and hand
        ``delivered`` (arrival times) to the peer at its last arrival; frames
        nobody receives are lost."""
        self.tx_frames += n
        self.tx_bytes += nbytes
        self.tx_wire_bytes += nbytes + n * WIRE_OVERHEAD  # frames >= 60 B (padding not counted)
        self.tx_batches += 1
        if self.first_departure is None:
            self.first_departure = first
        self.last_departure = last
        peer = self.peer
        if delivered is not None and peer is not None and peer._handler is not None:
            self.world.call_with(delivered.times[n - 1], peer._arrive, delivered)
        else:
            self.lost += n

    def _arrive(self, batch: FrameBatch) -> None:
        handler = self._handler
        n = len(batch.lengths)
        if handler is None:
            self.lost += n
            return
        self.rx_frames += n
        self.rx_bytes += len(batch.data)
        self.rx_batches += 1
        handler(batch)

    # --- measurement ----------------------------------------------------------
    def tx_gbps(self) -> float:
        """Layer-1 rate of what this port sent between its first and last departure.

        Counts every frame after the first (the first's own time precedes the window)."""
        if self.first_departure is None or self.last_departure <= self.first_departure:
            return 0.0
        seconds = (self.last_departure - self.first_departure) / self.world.clock_hz
        per_frame = self.tx_wire_bytes / self.tx_frames
        return (self.tx_frames - 1) * per_frame * 8 / seconds / 1e9

    def counters(self) -> dict:
        return {"tx_frames": self.tx_frames, "tx_bytes": self.tx_bytes,
                "rx_frames": self.rx_frames, "rx_bytes": self.rx_bytes, "lost": self.lost}


class BufferPool:
    """Reusable memory for the frame data of batches a producer sends and forgets.

    A fresh ``bytearray`` per batch costs a zero-fill (and, as the heap
    grows and shrinks, page faults), and copying frames out of a C buffer
    into one a second copy; with a pool the producer's C code writes each
    frame once, into memory that outlives the batch.  The batch gets
    ``memoryview(buffer)[:n]``, exactly the bytes written (the rest of a
    buffer is never exposed).  A buffer is handed out again only when
    nothing outside the pool refers to it any more, by CPython's reference
    count (deterministic): a receiver that keeps a batch, or a view of it,
    keeps its bytes.  At most ``max_buffers`` are kept; beyond that ``take``
    returns fresh memory.
    """

    # References to a free buffer: the pool's entry, its C pointer (a buffer
    # export), getrefcount's argument.
    _FREE = 3

    def __init__(self, size: int, max_buffers: int = 256):
        self.size = size
        self.max_buffers = max_buffers
        self._order: deque = deque()    # entries, in the order they were handed out

    def take(self) -> tuple[bytearray, object]:
        """(buffer of ``size`` bytes nobody else holds, a ``uint8_t *`` to it)."""
        order = self._order
        if order:
            # Two looks, no search: the newest (a batch the receiver dropped on
            # arrival is free by the time the next one is made), then the
            # oldest (receivers that queue batches release them in order).
            entry = order[-1]
            if sys.getrefcount(entry[0]) == self._FREE:
                return entry
            entry = order[0]
            if sys.getrefcount(entry[0]) == self._FREE:
                order.rotate(-1)
                return entry
        buf = bytearray(self.size)
        entry = (buf, ffi.from_buffer("uint8_t[]", buf))
        if len(order) < self.max_buffers:
            order.append(entry)
        return entry

    def __len__(self) -> int:
        return len(self._order)


def connect(a: Port, b: Port, propagation_ns: float = 0.0) -> None:
    """Join two ports with a full-duplex link of ``propagation_ns`` one way (>= 0)."""
    if a is b:
        raise ValueError("a port cannot be connected to itself")
    if propagation_ns < 0:
        raise ValueError("propagation delay must be >= 0")
    for port in (a, b):
        if port.peer is not None:
            raise ValueError(f"port {port.name} is already connected to {port.peer.name}")
    if a.world is not b.world:
        raise ValueError("ports of different worlds cannot be connected")
    delay = a.world.cycles(propagation_ns)
    a.peer, b.peer = b, a
    a.propagation = b.propagation = delay
    a.world.record("wire", "connect", a=a.name, b=b.name, propagation=delay)


def disconnect(port: Port) -> None:
    """Cut the link (frames in flight still arrive)."""
    peer = port.peer
    if peer is None:
        return
    port.peer = peer.peer = None
    port.world.record("wire", "disconnect", a=port.name, b=peer.name)


__all__ = ["Port", "BufferPool", "connect", "disconnect", "MIN_FRAME"]
