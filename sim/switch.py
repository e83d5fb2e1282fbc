"""The network around the VFs: an L2 switch with MAC learning and aging.

Endpoints (traffic generators and sinks, VF ports) are cabled to switch ports
with ``switch.attach(endpoint_port)``.  Each frame that comes in teaches the
switch where its source MAC lives (IEEE 802.1D learning: a MAC seen on
another port moves there at once); it leaves on the port its destination MAC
was learned on, unless that entry has aged out (``aging_s`` since the MAC was
last seen as a source, 300 s by default, 802.1D's default) or the destination
is a group address (broadcast, multicast) or unknown: then it is flooded to
every port but the one it came in on.  A frame whose destination lives on its
own ingress port is filtered (dropped, counted).

Timing: store and forward.  A frame may leave once it has fully arrived and
the egress port is free (``sim.wire.Port.forward``), and reaches the far end
``latency_ns`` (the switch's pipeline) plus the cable's propagation later.
The switch acts a run of frames at a time: frames of a batch that share their
addresses (``ifc_frames_mac_runs``, in C) are learned and forwarded together,
so a generator's burst costs one lookup.

Observation (for reports): every move of a MAC from one port to another is
recorded (``moves``, and the trace), and for the MACs given to ``watch`` the
switch counts, per egress port, the frames addressed to that MAC it sent
there, with the arrival time of the first and last at the far end.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from functools import partial

from sim._native import ffi, lib
from sim.frames import U8S, U32S, FrameBatch
from sim.wire import DEFAULT_GBPS, Port, connect
from sim.world import World


BROADCAST = b"\xff" * 6
DEFAULT_AGING_S = 300.0        # IEEE 802.1D's default ageing time
DEFAULT_LATENCY_NS = 500.0     # a store-and-forward 100G switch's pipeline


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@dataclass
class Delivery:
    """Frames addressed to a watched MAC that one switch port sent out."""

    frames: int = 0
    first: int | None = None       # cycle the first one reached the far end
    last: int = 0
    marks: dict = field(default_factory=dict)   # name -> frames counted at mark()


@dataclass(frozen=True)
class Move:
    mac: bytes
    from_port: int | None          # None: first learned
    to_port: int
    cycle: int
    by_ethertype: int              # the frame that taught it (0x0806: ARP, ...)


class Switch:
    """An Ethernet switch: ``attach`` endpoints, frames are learned and forwarded."""

    def __init__(self, world: World, name: str = "switch", *, rate_gbps: float = DEFAULT_GBPS,
                 latency_ns: float = DEFAULT_LATENCY_NS, aging_s: float = DEFAULT_AGING_S):
        if latency_ns < 0:
            raise ValueError("a switch's latency cannot be negative")
        if not aging_s > 0:
            raise ValueError(f"the ageing time must be positive, not {aging_s}")
        self.world = world
        self.name = name
        self.rate_gbps = rate_gbps
        self.latency = world.cycles(latency_ns)
        self.aging = world.cycles(aging_s * 1e9)
        self.ports: list[Port] = []
        self.names: list[str] = []
        self.table: dict[bytes, tuple[int, int]] = {}    # mac -> (port, last seen cycle)
        self.moves: list[Move] = []
        self.watched: dict[bytes, list[Delivery]] = {}
        self.forwarded = 0          # frame copies sent out
        self.flooded = 0            # frames flooded (group or unknown destination)
        self.filtered = 0           # frames whose destination is on their ingress port
        self.aged_out = 0           # lookups that found an entry too old
        self._ends = array("I", [0]) * 64
        self._ends_p = ffi.from_buffer("uint32_t[]", self._ends)   # (kept: one per batch otherwise)
        self.listeners: list = []   # f(dst, port, frames, first arrival) for watched MACs

    # --- set-up -----------------------------------------------------------------------
    def attach(self, endpoint: Port, propagation_ns: float = 0.0, name: str | None = None) -> int:
        """Cable ``endpoint`` to a new switch port (at the endpoint's rate); returns its number."""
        index = len(self.ports)
        port = Port(self.world, f"{self.name}.{index}", endpoint.rate_gbps or self.rate_gbps)
        connect(port, endpoint, propagation_ns)
        port.propagation += self.latency          # the pipeline, before the cable
        port.on_receive(partial(self._ingress, index))
        self.ports.append(port)
        self.names.append(name or endpoint.name)
        for deliveries in self.watched.values():
            deliveries.append(Delivery())
        return index

    def watch(self, mac: bytes) -> list[Delivery]:
        """Count, per port, the frames addressed to ``mac`` sent out there."""
        return self.watched.setdefault(bytes(mac), [Delivery() for _ in self.ports])

    def mark(self, name: str) -> None:
        """Remember every watched counter now (``Delivery.marks[name]``)."""
        for deliveries in self.watched.values():
            for d in deliveries:
                d.marks[name] = d.frames

    def port_of(self, mac: bytes) -> int | None:
        """Where ``mac`` is learned now (None: unknown or aged out)."""
        entry = self.table.get(bytes(mac))
        if entry is None or self.world.now - entry[1] > self.aging:
            return None
        return entry[0]

    # --- forwarding -------------------------------------------------------------------
    def _runs(self, batch: FrameBatch) -> array:
        n = len(batch.lengths)
        if n == 1:
            return array("I", [1])
        if len(self._ends) < n:
            self._ends = array("I", [0]) * n
            self._ends_p = ffi.from_buffer("uint32_t[]", self._ends)
        data = batch.data
        got = lib.ifc_frames_mac_runs(ffi.from_buffer(U8S, data), len(data),
                                      ffi.from_buffer(U32S, batch.lengths), n,
                                      self._ends_p, n)
        return self._ends[:got]

    def _ingress(self, port: int, batch: FrameBatch) -> None:
        data, lengths, times = batch.data, batch.lengths, batch.times
        now = self.world.now
        ends = self._runs(batch)
        if len(ends) == 1 and ends[0] == len(lengths):
            # One run, the whole batch (a burst from one host to another: the
            # common case): what the loop below does for it, minus its sums.
            if lengths[0] >= 12:
                head = bytes(data[:12])
                src = head[6:]
                if not src[0] & 1:
                    entry = self.table.get(src)
                    if entry is not None and entry[0] == port:
                        self.table[src] = (port, times[-1])     # seen again where it was
                    else:
                        self._learn(src, port, times[-1], data, 0, lengths[0])
                self._forward(port, head[:6], batch, now)
            return
        start = off = 0
        for end in ends:
            size = sum(lengths[start:end]) if end - start > 1 else lengths[start]
            if lengths[start] >= 12:
                head = bytes(data[off:off + 12])
                dst, src = head[:6], head[6:]
                if not src[0] & 1:
                    self._learn(src, port, times[end - 1], data, off, lengths[start])
                run = (batch if start == 0 and end == len(lengths) else
                       FrameBatch(memoryview(data)[off:off + size], lengths[start:end],
                                  times[start:end]))
                self._forward(port, dst, run, now)
            start, off = end, off + size

    def _learn(self, mac: bytes, port: int, cycle: int, data, off: int, length: int) -> None:
        entry = self.table.get(mac)
        if entry is None or entry[0] != port:
            ethertype = int.from_bytes(data[off + 12:off + 14], "big") if length >= 14 else 0
            old = None if entry is None or cycle - entry[1] > self.aging else entry[0]
            self.moves.append(Move(mac, old, port, cycle, ethertype))
            self.world.record(self.name, "mac_learned" if old is None else "mac_moved",
                              mac=mac_text(mac), port=port, was=-1 if old is None else old,
                              ethertype=ethertype)
        self.table[mac] = (port, cycle)

    def _forward(self, ingress: int, dst: bytes, run: FrameBatch, now: int) -> None:
        out = None
        if not dst[0] & 1:
            entry = self.table.get(dst)
            if entry is not None:
                if now - entry[1] > self.aging:
                    self.aged_out += 1
                else:
                    out = entry[0]
        n = len(run.lengths)
        if out == ingress:
            self.filtered += n
            return
        if out is not None:
            targets = (out,)
        else:
            targets = [i for i in range(len(self.ports)) if i != ingress]
            self.flooded += n
        watched = self.watched.get(dst)
        ports = self.ports
        for i in targets:
            got = ports[i].forward(run)
            self.forwarded += n
            if watched is not None:
                d = watched[i]
                arrivals = got.times
                if d.first is None:
                    d.first = arrivals[0]
                d.frames += n
                d.last = arrivals[n - 1]
                for listener in self.listeners:
                    listener(dst, i, n, arrivals[0])

    def counters(self) -> dict:
        return {"forwarded": self.forwarded, "flooded": self.flooded, "filtered": self.filtered,
                "aged_out": self.aged_out, "moves": len(self.moves),
                "table": {mac_text(m): p for m, (p, _) in sorted(self.table.items())}}


__all__ = ["Switch", "Delivery", "Move", "BROADCAST", "DEFAULT_AGING_S", "DEFAULT_LATENCY_NS",
           "mac_text"]
