"""The PCIe link of one function, as arithmetic: per-direction bandwidth with TLP overhead.

Transaction level, cycle-exact, never ticking.  Each direction (upstream:
device -> host, downstream: host -> device) is a pipe with a "free at" time;
a transfer reserves it for its bytes on the wire and returns when it is done.
Latency is pure delay: it does not occupy the pipe.  All queues of the
function share the link, in the order their rounds reserve it.

Time inside is kept in integer *ticks* so fractional byte times stay exact:
one cycle is ``tpc`` ticks and one byte on the link ``tpb`` ticks (a reduced
fraction of the effective bytes per cycle); results are rounded up to cycles.

Bytes on the link per TLP (facts from the PCIe base spec as summarised by
Neugebauer et al., SIGCOMM'18, and their pcie-bench model):

- framing: 8 B per TLP (Gen3 STP token with sequence number 4 B, LCRC 4 B);
- header: 4 B common + 12 B for a 64-bit-address memory read or write
  (so 24 B per MRd request and 24 B + payload per MWr), 4 B + 8 B for a
  completion with data (20 B + payload per CplD);
- writes are split into TLPs of at most MPS bytes at MPS-aligned addresses
  (which also keeps them inside 4 KiB pages); reads into requests of at most
  MRRS; their data comes back in completions of at most MPS (or RCB bytes
  when ``pcie_completions_at_rcb``), aligned likewise.
- data link layer: ACK and flow-control-update DLLPs (8 B each) at the
  spec's recommended intervals for the link width and MPS, plus SKP ordered
  sets (4 B every 1538 B): they are taken off the raw bandwidth (Gen3 x16 at
  MPS 256: 2 x 8/168 + 4/1538 = 9.8 %, so 113.7 Gb/s of TLP bandwidth from
  the 126 Gb/s left after 128b/130b coding).

Counting the TLPs of a batch (how many requests, completions and write TLPs,
how many payload bytes) is done by the C ring code, which sees the addresses;
this class turns counts into time (with the pipes' state in C,
``struct ifc_link`` in csrc/sim/simdp.c).

Rounds compute their whole timeline when they start, so a transfer may be
reserved in the future while a later-computed one (another queue's small
read, the next round's avail read) wants the pipe earlier: a reservation
fills the idle gaps from its start time on, in order, as a fluid (TLPs of
different transfers interleave on a real link), and ends when its last byte
is through.
"""
from __future__ import annotations

from fractions import Fraction

from sim._native import ffi, lib
from sim.world import World

REQ_BYTES = 24          # MRd with 64-bit address: framing 8 + header 16
WRITE_OVERHEAD = 24     # MWr with 64-bit address: framing 8 + header 16, plus payload
CPL_OVERHEAD = 20       # CplD: framing 8 + header 12, plus payload
DLLP_BYTES = 8          # one ACK or UpdateFC DLLP on the wire
SKP_INTERVAL, SKP_BYTES = 1538, 4

GT_PER_S = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0}
# ACK / UpdateFC spacing in bytes (PCIe base spec 5.0 tables 3-7..3-9 and
# 2-46..2-48; the same numbers for Gen3 and later, used for Gen1/2 as well,
# which differ by a few percent), by lanes then MPS.
_DLLP_SPACING_GEN3 = {
    1: {128: 333, 256: 512, 512: 655, 1024: 1167, 2048: 2191, 4096: 4239},
    2: {128: 224, 256: 313, 512: 385, 1024: 641, 2048: 1153, 4096: 2177},
    4: {128: 169, 256: 214, 512: 250, 1024: 378, 2048: 634, 4096: 1146},
    8: {128: 163, 256: 203, 512: 182, 1024: 246, 2048: 374, 4096: 630},
    16: {128: 144, 256: 168, 512: 182, 1024: 246, 2048: 374, 4096: 630},
    32: {128: 129, 256: 141, 512: 148, 1024: 180, 2048: 244, 4096: 372},
}


def raw_bytes_per_second(gen: int, lanes: int) -> Fraction:
    """Bytes per second per direction after line coding (8b/10b up to Gen2, 128b/130b after)."""
    coding = Fraction(8, 10) if gen <= 2 else Fraction(128, 130)
    return Fraction(int(GT_PER_S[gen] * 1000), 1000) * 10**9 * lanes * coding / 8


def dllp_overhead(lanes: int, mps: int) -> Fraction:
    """Share of the link taken by ACK + UpdateFC DLLPs and SKP ordered sets."""
    spacing = _DLLP_SPACING_GEN3[lanes][mps]
    return Fraction(2 * DLLP_BYTES, spacing) + Fraction(SKP_BYTES, SKP_INTERVAL)


class PcieLink:
    """Upstream and downstream pipes of one function's link (the state lives in C:
    ``struct ifc_link``, so a round's timing costs a few C calls)."""

    def __init__(self, world: World, *, gen: int = 3, lanes: int = 16, mps: int = 256,
                 mrrs: int = 512, rcb: int = 64, completions_at_rcb: bool = False,
                 read_latency_ns: int = 500, write_latency_ns: int = 250):
        self.world = world
        self.gen, self.lanes, self.mps, self.mrrs, self.rcb = gen, lanes, mps, mrrs, rcb
        self.cpl_unit = rcb if completions_at_rcb else mps
        self.raw = raw_bytes_per_second(gen, lanes)
        self.efficiency = 1 - dllp_overhead(lanes, mps)
        # Ticks: small enough that 2^64 ticks are > 10^4 simulated seconds.
        per_cycle = (self.raw * self.efficiency / world.clock_hz).limit_denominator(1 << 16)
        self.tpc = per_cycle.numerator      # ticks per cycle
        self.tpb = per_cycle.denominator    # ticks per byte
        self.read_latency = world.cycles(read_latency_ns)
        self.write_latency = world.cycles(write_latency_ns)
        c = self.c = ffi.new("struct ifc_link *")
        c.tpc, c.tpb, c.mps = self.tpc, self.tpb, mps
        c.rd_lat = self.read_latency * self.tpc
        c.wr_lat_cycles = self.write_latency

    @property
    def gbps(self) -> float:
        """TLP-layer bandwidth per direction, Gb/s (after coding and DLLPs)."""
        return float(self.raw * self.efficiency * 8 / 10**9)

    def read(self, cycle: int, reqs: int, payload: int, cpls: int,
             control: bool = False) -> tuple[int, int]:
        """A DMA read issued at ``cycle``: ``reqs`` requests up, ``cpls`` completions down.

        Returns (tick the last completion byte is in, the same rounded up to a cycle).
        Bulk reads queue behind what is reserved on each pipe.  ``control``
        reads (avail index, avail ring, descriptors: small, issued from the
        engine's descriptor-prefetch tags ahead of its bulk data) take one
        latency plus their own bytes, unqueued; their bytes are still
        reserved on the pipes, so bulk transfers reserved after them yield
        the bandwidth.
        """
        end = lib.ifc_link_read(self.c, self.world.env.now, cycle, reqs, payload, cpls,
                                1 if control else 0)
        return end, -(-end // self.tpc)

    def fetch(self, cycle: int, r) -> int:
        """The control reads of one engine round (``struct ifc_dp_round`` r), each
        waiting for the one before: avail->idx (2 B), the avail ring entries, then
        ``desc_levels`` dependent descriptor reads.  Returns the cycle they are in."""
        return lib.ifc_link_fetch(self.c, self.world.env.now, cycle, r)

    def write(self, cycle: int, tlps: int, payload: int) -> int:
        """Posted writes issued from ``cycle``; the cycle the last byte has left the
        device (add ``write_latency`` for when it is visible in host memory)."""
        return lib.ifc_link_write(self.c, self.world.env.now, cycle, tlps, payload)

    def used_write(self, cycle: int, vq, in_flight: int, n: int) -> int:
        """n used elements (after ``in_flight`` unpublished ones) and used->idx,
        issued from ``cycle``; the cycle they are visible in host memory."""
        return lib.ifc_link_used_write(self.c, self.world.env.now, cycle, vq, in_flight, n)

    @staticmethod
    def chunks(addr: int, length: int, unit: int) -> int:
        """Pieces of [addr, addr+length) split at multiples of ``unit``."""
        if length <= 0:
            return 0
        return (addr + length - 1) // unit - addr // unit + 1

    @property
    def up_bytes(self) -> int:
        return self.c.up_bytes

    @property
    def down_bytes(self) -> int:
        return self.c.down_bytes

    def bytes_per_cycle(self) -> float:
        return self.tpc / self.tpb

    def utilisation(self, since_cycle: int, bytes_then: tuple[int, int] = (0, 0)) -> tuple[float, float]:
        """(upstream, downstream) busy share since ``since_cycle``; pass the
        ``(up_bytes, down_bytes)`` taken then to measure a window."""
        span = (self.world.now - since_cycle) * self.tpc / self.tpb
        if span <= 0:
            return 0.0, 0.0
        return ((self.c.up_bytes - bytes_then[0]) / span,
                (self.c.down_bytes - bytes_then[1]) / span)

    def busy_until(self) -> tuple[int, int]:
        """(upstream, downstream) cycle from which each pipe has nothing reserved."""
        c = self.c
        up = c.up.end[c.up.n - 1] if c.up.n else 0
        down = c.down.end[c.down.n - 1] if c.down.n else 0
        return -(-up // self.tpc), -(-down // self.tpc)


def describe(link: PcieLink) -> str:
    return (f"PCIe Gen{link.gen} x{link.lanes} MPS {link.mps} MRRS {link.mrrs}: "
            f"{float(link.raw) * 8 / 1e9:.1f} Gb/s raw, {link.gbps:.1f} Gb/s for TLPs, "
            f"read latency {link.read_latency} cycles")


__all__ = ["PcieLink", "REQ_BYTES", "WRITE_OVERHEAD", "CPL_OVERHEAD",
           "raw_bytes_per_second", "dllp_overhead", "describe"]
