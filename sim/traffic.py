"""Traffic endpoints of the simulated datapath: a seeded generator and a checking sink.

Test frames identify themselves, so a checker needs no copy of what was sent::

    0   destination MAC (6)
    6   source MAC (6)
    12  ethertype 0x88B5 (IEEE 802 local experimental ethertype 1), big-endian
    14  magic 0x46434649 ("IFCF"), u32 little-endian
    18  flow id, u32 LE
    22  sequence number within the flow, u64 LE
    30  the frame's own length (buffer bytes, without FCS), u32 LE
    34  payload: 64-bit LE words w_k = mix(flow, seq) + k * 0x9E3779B97F4A7C15

The same format is written by the generator on the wire and by the guest's TX
producer into its buffers; the sink on the wire and the guest's RX consumer
check it with the same C checker (``csrc/sim/guest_frames.c``): per flow, in
order / out of order (a late frame filling a gap) / duplicate / lost (gaps not
filled), and every byte of every frame (runt, foreign, bad length, bad flow,
bad payload).  Frames are filled and checked a whole batch per C call.

Sizes follow ``sim.frames``: quoted with FCS ("64 B", "1518 B"), stored in
buffers without it (60, 1514 bytes).
"""
from __future__ import annotations

import math
import struct
from array import array
from dataclasses import dataclass, fields
from typing import Iterable

from sim._native import ffi, lib
from sim.frames import FCS_BYTES, U32S, WIRE_OVERHEAD, FrameBatch, buffer_length
from sim.wire import BufferPool
from sim.world import World


ETHERTYPE = lib.IFC_TF_ETHERTYPE
MAGIC = lib.IFC_TF_MAGIC
HEADER_LEN = lib.IFC_TF_HDR_LEN            # Ethernet + test header, bytes
MIN_FRAME_SIZE = 64                        # Ethernet minimum, with FCS
MAX_FRAME_SIZE = 16384 + FCS_BYTES         # what a size table may hold
_ZERO_U32 = array("I", [0])
_ZERO_I64 = array("q", [0])

# Simple IMIX, Ethernet sizes with FCS: 7 x 64, 4 x 594 (576 B IP), 1 x 1518.
IMIX = ((64, 7), (594, 4), (1518, 1))

DEFAULT_DST_MAC = bytes.fromhex("525400000001")   # the VF's default MAC (sim.config)
DEFAULT_SRC_MAC = bytes.fromhex("020000000002")   # a locally administered tester

REASONS = {lib.IFC_TF_OK: "ok", lib.IFC_TF_RUNT: "runt", lib.IFC_TF_NOT_TEST: "not_test",
           lib.IFC_TF_BAD_LENGTH: "bad_length", lib.IFC_TF_BAD_FLOW: "bad_flow",
           lib.IFC_TF_BAD_PAYLOAD: "bad_payload"}


def mac_bytes(mac: str | bytes) -> bytes:
    """``"52:54:00:00:00:01"`` or 6 bytes -> 6 bytes."""
    if isinstance(mac, str):
        mac = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    mac = bytes(mac)
    if len(mac) != 6:
        raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
    return mac


# --- sizes --------------------------------------------------------------------------
class SizeDist:
    """Frame sizes as a table of buffer lengths that sources cycle through.

    Random distributions are drawn once, at construction, from a named seeded
    stream, so the C fill loop never calls back into Python and the sizes are
    the same for the same seed in any process.
    """

    def __init__(self, frame_sizes: Iterable[int], name: str = "sizes"):
        sizes = [int(s) for s in frame_sizes]
        if not sizes:
            raise ValueError("a size distribution needs at least one size")
        for s in sizes:
            if not MIN_FRAME_SIZE <= s <= MAX_FRAME_SIZE:
                raise ValueError(f"frame size {s} B is outside {MIN_FRAME_SIZE}..{MAX_FRAME_SIZE} "
                                 "(Ethernet sizes with FCS)")
        self.name = name
        self.table = array("I", (buffer_length(s) for s in sizes))
        self.mean_length = sum(self.table) / len(self.table)
        self.max_length = max(self.table)
        self.min_length = min(self.table)

    @property
    def mean_wire_bytes(self) -> float:
        """Average byte times per frame on the wire (FCS, preamble, IFG included)."""
        return self.mean_length + WIRE_OVERHEAD

    @classmethod
    def fixed(cls, size: int) -> "SizeDist":
        return cls([size], f"{size}")

    @classmethod
    def sequence(cls, sizes: Iterable[int]) -> "SizeDist":
        sizes = list(sizes)
        return cls(sizes, ",".join(str(s) for s in sizes))

    @classmethod
    def uniform(cls, low: int, high: int, rng, count: int = 4096) -> "SizeDist":
        if low > high:
            raise ValueError(f"size range {low}-{high} is empty")
        return cls([rng.randint(low, high) for _ in range(count)], f"{low}-{high}")

    @classmethod
    def imix(cls, rng, mix=IMIX, repeat: int = 64) -> "SizeDist":
        """Exact proportions, shuffled: ``repeat`` copies of the mix in a random order."""
        sizes = [size for size, weight in mix for _ in range(weight)] * repeat
        rng.shuffle(sizes)
        return cls(sizes, "imix")

    @classmethod
    def parse(cls, spec: str | int, rng=None) -> "SizeDist":
        """``64``, ``"64,1518"`` (cycled), ``"64-1518"`` (uniform), ``"imix"``."""
        if isinstance(spec, int):
            return cls.fixed(spec)
        text = spec.strip().lower()
        if text == "imix":
            return cls.imix(_need_rng(rng, spec))
        if "-" in text:
            low, high = (int(x) for x in text.split("-", 1))
            return cls.uniform(low, high, _need_rng(rng, spec))
        if "," in text:
            return cls.sequence(int(x) for x in text.split(","))
        return cls.fixed(int(text))

    def __repr__(self) -> str:
        return f"SizeDist({self.name!r}, mean {self.mean_length + FCS_BYTES:.1f} B)"


def _need_rng(rng, spec):
    if rng is None:
        raise ValueError(f"size distribution {spec!r} is random: give it a seeded rng")
    return rng


# --- sources ------------------------------------------------------------------------
class Stream:
    """A frame source in C (``ifc_stream``): flows round robin, sizes cycled.

    ``seq`` may point at memory the caller owns (the guest keeps its TX
    sequence numbers in guest RAM); by default the stream allocates its own.
    """

    def __init__(self, sizes: SizeDist, *, flows: int = 1, flow_base: int = 0, flow_run: int = 1,
                 dst_mac: bytes | str = DEFAULT_DST_MAC, src_mac: bytes | str = DEFAULT_SRC_MAC,
                 seq=None):
        if flows < 1 or flow_run < 1 or not 0 <= flow_base <= 0xFFFF_FFFF - flows + 1:
            raise ValueError(f"bad flows={flows} flow_base={flow_base} flow_run={flow_run}")
        self.sizes = sizes
        self.flows = flows
        self.flow_base = flow_base
        self._sizes_buf = ffi.from_buffer("uint32_t[]", sizes.table)
        self._seq = ffi.new("uint64_t[]", flows) if seq is None else seq
        self.c = ffi.new("ifc_stream *")
        c = self.c
        c.macs = mac_bytes(dst_mac) + mac_bytes(src_mac)
        c.flow_base, c.nflows, c.flow_run = flow_base, flows, flow_run
        c.seq, c.sizes, c.nsizes = self._seq, self._sizes_buf, len(sizes.table)

    @property
    def frames(self) -> int:
        return self.c.frames

    @property
    def bytes(self) -> int:
        return self.c.bytes

    def sent_per_flow(self) -> list[int]:
        """Frames produced per flow so far (= the next sequence number of each)."""
        return [self._seq[i] for i in range(self.flows)]

    def batch(self, n: int, pool: BufferPool | None = None) -> FrameBatch:
        """The next ``n`` frames as a FrameBatch (times left 0 for the transmitter).

        With a ``pool`` (``sim.wire.BufferPool``), the frames are written into
        pooled memory and ``data`` is a memoryview of exactly them."""
        table = self.sizes.table
        total = n * table[0] if len(table) == 1 else lib.ifc_stream_peek_bytes(self.c, n)
        lengths = _ZERO_U32 * n
        if pool is not None and total <= pool.size:
            buf, ptr = pool.take()
            got = lib.ifc_stream_fill(self.c, ptr, total, ffi.from_buffer(U32S, lengths), n)
            data = memoryview(buf)[:total]
        else:
            data = bytearray(total)
            got = lib.ifc_stream_fill(self.c, ffi.from_buffer(data), total,
                                      ffi.from_buffer(U32S, lengths), n)
        if got != n:
            raise RuntimeError(f"stream fill returned {got} for {n} frames")
        return FrameBatch(data, lengths, _ZERO_I64 * n)


# --- checking -----------------------------------------------------------------------
@dataclass
class CheckCounts:
    """What a checker saw (see ``ifc_check_stats`` in csrc/sim/sim_native.h)."""

    frames: int = 0
    bytes: int = 0
    good: int = 0
    corrupted: int = 0
    runt: int = 0
    not_test: int = 0
    bad_length: int = 0
    bad_flow: int = 0
    bad_payload: int = 0
    in_order: int = 0
    out_of_order: int = 0
    duplicates: int = 0
    stale: int = 0
    lost: int = 0

    @classmethod
    def of(cls, st) -> "CheckCounts":
        return cls(*[getattr(st, name) for name in _COUNT_NAMES])

    def __add__(self, other: "CheckCounts") -> "CheckCounts":
        return CheckCounts(*[getattr(self, name) + getattr(other, name) for name in _COUNT_NAMES])

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in _COUNT_NAMES}

    @property
    def clean(self) -> bool:
        """No corruption, duplicates, reordering or loss."""
        return not (self.corrupted or self.duplicates or self.stale or self.out_of_order
                    or self.lost)


# (the field names once: runs sample the counters every few simulated us)
_COUNT_NAMES = tuple(f.name for f in fields(CheckCounts))


class Checker:
    """Per-flow sequence state for flows ``flow_base .. flow_base + flows - 1``.

    Several stat blocks may share one checker (the guest's RX queues each
    count their own frames, the flows are one table).
    """

    def __init__(self, flows: int, flow_base: int = 0):
        if flows < 1:
            raise ValueError("a checker needs at least one flow")
        self.flows = flows
        self.flow_base = flow_base
        self._flows = ffi.new("ifc_flow[]", flows)
        self.c = ffi.new("ifc_checker *")
        self.c.flow_base, self.c.nflows, self.c.flows = flow_base, flows, self._flows
        self.stats = ffi.new("ifc_check_stats *")

    def new_stats(self):
        return ffi.new("ifc_check_stats *")

    def check(self, batch: FrameBatch, stats=None) -> int:
        """Check every frame of ``batch``; returns how many failed."""
        n = len(batch.lengths)
        if not n:
            return 0
        bad = lib.ifc_frames_check(ffi.from_buffer(batch.data), len(batch.data),
                                   ffi.from_buffer(U32S, batch.lengths), n, self.c,
                                   self.stats if stats is None else stats)
        if bad < 0:
            raise ValueError("frame batch lengths exceed its data")
        return bad

    def counts(self, stats=None) -> CheckCounts:
        return CheckCounts.of(self.stats if stats is None else stats)

    def received_per_flow(self) -> list[int]:
        """Highest sequence number + 1 seen per flow."""
        return [self._flows[i].next for i in range(self.flows)]

    def missing(self, sent_per_flow: list[int]) -> int:
        """Sequence numbers sent but never received, counting the tail not yet arrived
        (``lost`` counts only gaps below a later frame).  Needs every stat block."""
        if len(sent_per_flow) != self.flows:
            raise ValueError(f"{len(sent_per_flow)} flows sent, checker has {self.flows}")
        tail = sum(max(0, sent - self._flows[i].next) for i, sent in enumerate(sent_per_flow))
        return tail

    @staticmethod
    def last_bad(stats) -> tuple[str, int, int]:
        """(reason, flow, seq) of the last frame that failed."""
        return REASONS.get(stats.last_bad_reason, "?"), stats.last_bad_flow, stats.last_bad_seq


# --- when low-rate sources send ----------------------------------------------------------
PATTERNS = ("constant", "poisson")


class Arrivals:
    """When a low-rate or bursty source sends: arrival times in cycles, seeded.

    Real guests mostly see little traffic: a few pings a second, a request
    now and then, bursts separated by idle gaps far longer than any poll
    period.  ``pps`` frames per second on average while the source is on;
    each arrival carries ``burst`` frames back to back, so arrivals come
    ``pps / burst`` times a second.  ``pattern``: ``"constant"`` (evenly
    spaced) or ``"poisson"`` (exponential gaps: now and then a gap many times
    the mean).  ``on_us`` / ``off_us`` > 0: on-off traffic, arrivals only
    during on periods of ``on_us``, each followed by ``off_us`` of silence.
    The arrival process runs on on-time and is mapped onto the clock, so the
    rate during on periods is ``pps`` whatever the duty cycle.
    """

    def __init__(self, world: World, pps: float, *, pattern: str = "constant", burst: int = 1,
                 on_us: float = 0.0, off_us: float = 0.0, start: int | None = None,
                 name: str = "arrivals"):
        if not pps > 0:
            raise ValueError(f"an arrival rate must be positive, not {pps}")
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, not {pattern!r}")
        if burst < 1:
            raise ValueError("burst must be at least 1 frame")
        if on_us < 0 or off_us < 0 or (off_us > 0 and on_us <= 0):
            raise ValueError(f"on_us={on_us} off_us={off_us}: an off period needs an on period")
        self.world = world
        self.pps = pps
        self.pattern = pattern
        self.burst = burst
        self._rng = world.rng(name)
        self._gap = world.clock_hz * burst / pps          # mean cycles between arrivals (on-time)
        self._on = world.cycles(on_us * 1000) if off_us > 0 else 0
        self._off = world.cycles(off_us * 1000) if off_us > 0 else 0
        self._start = world.now if start is None else start
        self._tau = 0.0                                    # on-time of the next arrival
        self._next = 0
        self._advance(first=True)

    def _advance(self, first: bool = False) -> None:
        if self.pattern == "poisson":
            step = self._rng.expovariate(1.0 / self._gap)
        else:
            step = self._gap
        # A constant source starts one gap after its start; a Poisson one
        # after an exponential wait (memoryless, as if it had been running).
        self._tau += step
        tau = int(self._tau)
        if self._on:
            tau = tau // self._on * (self._on + self._off) + tau % self._on
        self._next = self._start + tau

    def next_at(self) -> int:
        """Cycle of the next arrival."""
        return self._next

    def take(self, now: int) -> int:
        """Frames of every arrival up to ``now`` (inclusive), consumed."""
        n = 0
        while self._next <= now:
            n += self.burst
            self._advance()
        return n

    def mean_gap_ns(self) -> float:
        """Mean time between frames while on, ns."""
        return 1e9 / self.pps

    @property
    def off_ns(self) -> float:
        return self._off * 1e9 / self.world.clock_hz


# --- the wire-side endpoints ---------------------------------------------------------
class Generator:
    """Sends test frames into a wire port at a rate, in bursts, seeded.

    The port interface (``sim.wire.Port``): ``port.transmit(batch, earliest)``
    schedules the frames back to back at line rate from ``max(earliest, port
    free)``, fills ``batch.times`` with departure cycles and returns when the
    last one finishes.

    Rate: ``rate_gbps`` is the offered rate on the wire (layer 1: preamble,
    IFG and FCS included, so 100 at 100 GbE is line rate) or ``pps`` frames
    per second.  Frames leave in bursts of ``burst`` back-to-back frames (one
    simpy wake-up and one FrameBatch per burst); bursts start one burst-time
    at the offered rate apart, so the average is the offered rate and, below
    line rate, each burst is followed by an idle gap.  A generator never
    queues more than one burst ahead of its port.
    """

    def __init__(self, world: World, port, sizes: SizeDist | str | int = 64, *,
                 rate_gbps: float | None = 100.0, pps: float | None = None, burst: int = 64,
                 flows: int = 1, flow_base: int = 0, flow_run: int = 1,
                 dst_mac: bytes | str = DEFAULT_DST_MAC, src_mac: bytes | str = DEFAULT_SRC_MAC,
                 max_frames: int | None = None, name: str = "gen",
                 arrivals: "Arrivals | None" = None):
        if burst < 1:
            raise ValueError("burst must be at least 1 frame")
        if arrivals is not None:
            rate_gbps, pps, burst = None, arrivals.pps, arrivals.burst
        elif (rate_gbps is None) == (pps is None):
            raise ValueError("give exactly one of rate_gbps and pps")
        if (rate_gbps is not None and rate_gbps <= 0) or (pps is not None and pps <= 0):
            raise ValueError("the offered rate must be positive")
        self.world = world
        self.port = port
        self.name = name
        if not isinstance(sizes, SizeDist):
            sizes = SizeDist.parse(sizes, world.rng(f"{name}.sizes"))
        self.sizes = sizes
        self.stream = Stream(sizes, flows=flows, flow_base=flow_base, flow_run=flow_run,
                             dst_mac=dst_mac, src_mac=src_mac)
        self.burst = burst
        self.arrivals = arrivals
        self.max_frames = max_frames
        # Burst data in reused memory (frames written once, no zero-fill first).
        self._pool = BufferPool(burst * sizes.max_length)
        # Offered bytes-on-the-wire per cycle.
        if rate_gbps is not None:
            self.wire_bytes_per_cycle = rate_gbps * 1e9 / 8 / world.clock_hz
        else:
            self.wire_bytes_per_cycle = pps * sizes.mean_wire_bytes / world.clock_hz
        self.batches = 0
        self.first_departure: int | None = None
        self.last_departure = 0
        self._running = False

    @property
    def frames(self) -> int:
        return self.stream.frames

    @property
    def bytes(self) -> int:
        return self.stream.bytes

    def sent_per_flow(self) -> list[int]:
        return self.stream.sent_per_flow()

    def start(self, at_cycle: int | None = None) -> None:
        if self._running:
            return
        self._running = True
        self.world.record(self.name, "gen_start", sizes=self.sizes.name, burst=self.burst,
                          flows=self.stream.flows)
        start = self.world.now if at_cycle is None else at_cycle
        # A chain of callbacks, one per burst, scheduled exactly where a simpy
        # process would resume (its first step urgent, then one timeout per
        # burst) without a generator to resume each time.
        self.world.call_first(lambda _ev: self._begin(start))

    def stop(self) -> None:
        """Stop after the burst in progress (the process ends at its next wake-up)."""
        if self._running:
            self._running = False
            self.world.record(self.name, "gen_stop", frames=self.frames, bytes=self.bytes)

    def _begin(self, start: int) -> None:
        if start > self.world.env._now:
            self.world.call_at(start, lambda _ev: self._bursts(start))
        else:
            self._bursts(start)

    def _bursts(self, next_start: int) -> None:
        """Send bursts until one ends in the future; come back then."""
        env = self.world.env
        if self.arrivals is not None:
            self._arrive()
            return
        bpc = self.wire_bytes_per_cycle
        stream, port = self.stream, self.port
        while self._running:
            n = self.burst
            if self.max_frames is not None:
                n = min(n, self.max_frames - self.frames)
                if n <= 0:
                    self.stop()
                    return
            batch = stream.batch(n, self._pool)
            now = env._now
            earliest = next_start if next_start > now else now
            done = port.transmit(batch, earliest)
            self.batches += 1
            if self.first_departure is None and len(batch.times):
                self.first_departure = batch.times[0]
            self.last_departure = done
            wire = len(batch.data) + WIRE_OVERHEAD * n
            next_start = earliest + math.ceil(wire / bpc)
            wake = next_start if next_start > done else done
            if wake > now:
                self.world.call_with(wake, self._bursts, next_start)
                return

    def _arrive(self) -> None:
        """Arrivals mode: one burst per arrival, at its time (an idle gap otherwise)."""
        arrivals, env = self.arrivals, self.world.env
        while self._running:
            at = arrivals.next_at()
            if at > env._now:
                self.world.call_at(at, lambda _ev: self._arrive())
                return
            n = arrivals.take(at)
            if self.max_frames is not None:
                n = min(n, self.max_frames - self.frames)
                if n <= 0:
                    self.stop()
                    return
            batch = self.stream.batch(n, self._pool if n <= self.burst else None)
            self.last_departure = self.port.transmit(batch, env._now)
            self.batches += 1
            if self.first_departure is None and len(batch.times):
                self.first_departure = batch.times[0]

    def offered_gbps(self) -> float:
        return self.wire_bytes_per_cycle * 8 * self.world.clock_hz / 1e9


class Sink:
    """Receives frames from a wire port and checks every one of them.

    ``port.on_receive(handler)``: the port calls ``handler(batch)`` with
    arrival times filled.  One C call per batch.
    """

    def __init__(self, world: World, port=None, *, flows: int = 1, flow_base: int = 0,
                 name: str = "sink", trace_batches: bool = False):
        self.world = world
        self.name = name
        self.checker = Checker(flows, flow_base)
        self.batches = 0
        self.first_arrival: int | None = None
        self.last_arrival = 0
        self.trace_batches = trace_batches
        self._reported_bad = 0
        self.on_frames: list = []      # callbacks(frames) after each checked batch (Responder)
        if port is not None:
            port.on_receive(self.receive)

    def receive(self, batch: FrameBatch) -> None:
        n = len(batch.lengths)
        if not n:
            return
        bad = self.checker.check(batch)
        self.batches += 1
        if self.first_arrival is None:
            self.first_arrival = batch.times[0]
        self.last_arrival = batch.times[n - 1]
        if self.trace_batches:
            self.world.record(self.name, "sink_batch", frames=n, bad=bad)
        if bad:
            reason, flow, seq = Checker.last_bad(self.checker.stats)
            self.world.record(self.name, "frames_bad", count=bad, reason=reason, flow=flow,
                              seq=seq)
        for callback in self.on_frames:
            callback(n)

    def counts(self) -> CheckCounts:
        return self.checker.counts()

    def totals(self) -> tuple[int, int]:
        """(frames, bytes) checked so far: ``counts()``'s two, without building it."""
        st = self.checker.stats
        return st.frames, st.bytes

    def rate(self) -> tuple[float, float]:
        """(Mpps, Gb/s of buffer bytes) between the first and the last arrival."""
        c = self.checker.stats
        if self.first_arrival is None or self.last_arrival <= self.first_arrival:
            return 0.0, 0.0
        seconds = (self.last_arrival - self.first_arrival) / self.world.clock_hz
        return c.frames / seconds / 1e6, c.bytes * 8 / seconds / 1e9


class Responder:
    """The far end answers: one frame back to the guest for each frame it sent.

    Like a peer answering pings (or a reflector), ``delay_us`` after each
    batch the sink received, the same number of test frames of its own
    stream leave ``port`` towards the guest (so the guest's RX load follows
    its TX, with the TX path's timing).  Hook it up with
    ``sink.on_frames.append(responder.answer)``.
    """

    def __init__(self, world: World, port, sizes: SizeDist | str | int = 98, *,
                 delay_us: float = 20.0, flows: int = 1, flow_base: int = 0,
                 dst_mac: bytes | str = DEFAULT_DST_MAC, src_mac: bytes | str = DEFAULT_SRC_MAC,
                 name: str = "responder"):
        if delay_us < 0:
            raise ValueError("a reply delay cannot be negative")
        self.world = world
        self.port = port
        self.name = name
        if not isinstance(sizes, SizeDist):
            sizes = SizeDist.parse(sizes, world.rng(f"{name}.sizes"))
        self.stream = Stream(sizes, flows=flows, flow_base=flow_base, dst_mac=dst_mac,
                             src_mac=src_mac)
        self.delay = world.cycles(delay_us * 1000)
        self.running = True
        self.answered = 0

    @property
    def frames(self) -> int:
        return self.stream.frames

    def sent_per_flow(self) -> list[int]:
        return self.stream.sent_per_flow()

    def answer(self, n: int) -> None:
        if self.running and n > 0:
            self.world.call_at(self.world.now + self.delay, lambda _ev: self._send(n))

    def _send(self, n: int) -> None:
        if not self.running:
            return
        self.port.transmit(self.stream.batch(n), self.world.env._now)
        self.answered += n

    def stop(self) -> None:
        self.running = False


# --- steering -------------------------------------------------------------------------
FLOW_OFFSET = 18                           # the flow id in a test frame (layout above)
_FLOW_ID = struct.Struct("<I")


def steer_by_flow(pairs: int | list[int]):
    """RX steering for a VF (``model.datapath.steer``) by the test frames' flow id.

    ``pairs`` is a number of queue pairs (a flow goes to pair ``flow % pairs``)
    or a list of pair indexes (to ``pairs[flow % len(pairs)]``) that the caller
    may change while traffic runs, as a migration run does when the guest
    enables more pairs.  A batch goes where its first frame's flow says: a
    generator burst comes from one flow, so each flow stays on one RX queue and
    in order.  A batch too short to carry a flow id, or an empty list, goes to
    pair 0.
    """
    active = list(range(pairs)) if isinstance(pairs, int) else pairs

    def steer(batch) -> int:
        data = batch.data
        if len(data) < FLOW_OFFSET + _FLOW_ID.size or not active:
            return 0
        return active[_FLOW_ID.unpack_from(data, FLOW_OFFSET)[0] % len(active)]
    return steer


__all__ = ["SizeDist", "Stream", "Checker", "CheckCounts", "Generator", "Sink", "IMIX",
           "Arrivals", "Responder", "PATTERNS",
           "ETHERTYPE", "MAGIC", "HEADER_LEN", "FLOW_OFFSET", "mac_bytes", "steer_by_flow"]
