"""Automatic receive steering of a multiqueue virtio-net device without RSS.

virtio 1.1 5.1.6.5.5: once the driver has set more than one queue pair in
use, the device sends a flow's received packets to the receiveq of the pair
through which that flow's most recent packet was transmitted, and uses no
receiveq beyond the pairs in use.  ``FlowSteering`` is that rule for one
VF's ``Datapath`` (``datapath.steering``): the TX engines call ``learn``
with every batch they put on the wire, the datapath calls ``split`` with
every batch from the wire and delivers each part to its pair's RX queue.

A flow is what the guest sees as one conversation: its own MAC, the peer's
MAC and, when present, the IPv4/IPv6 addresses, the protocol and the
L4 ports, each as (local, remote).  A transmitted frame's local side is its
source; a received frame's is its destination, so an answer finds the
flow its request was sent on.  Frames are guest- or wire-controlled bytes:
anything short or malformed keys on what could be read (the MACs, or no
key at all for a runt, which steers by the fallback).

A flow never learned, or learned on a pair not in use any more, goes to a
pair picked by a CRC-32 of its key over the pairs in use: deterministic in
every process (never ``hash()``, which depends on PYTHONHASHSEED), and
stable while the pairs in use stay the same.

Pairs in use: what the driver last wrote to the LM block's MQ register
(IFCVF's version of VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET; the whole VF's pairs
when there is no LM block or nothing was written), and of those only the
pairs whose RX queue runs: a queue the driver stopped receives nothing.

The table of learned flows is bounded (``max_flows``, least recently
transmitted flows evicted first), so a guest that sends from ever new
addresses costs the device a fixed amount of memory.
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from typing import Callable, Sequence

from sim.frames import FrameBatch

ETH_HLEN = 14
VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)   # 802.1Q, 802.1ad, the old QinQ value
MAX_VLAN_TAGS = 2
ETH_P_IPV4, ETH_P_IPV6 = 0x0800, 0x86DD
IPV6_HLEN = 40
# Protocols whose L4 header starts with a 16-bit source and destination port.
PORT_PROTOCOLS = frozenset((6, 17, 33, 132, 136))   # TCP, UDP, DCCP, SCTP, UDP-Lite
# The most a key reads of a frame: 2 VLAN tags, an IPv4 header with every
# option (60 B) and the ports; IPv6 (40 B) reads less.
HEADER_BYTES = ETH_HLEN + MAX_VLAN_TAGS * 4 + 60 + 4
DEFAULT_MAX_FLOWS = 4096


def flow_key(frame: bytes, outgoing: bool) -> bytes | None:
    """The flow of ``frame`` from the guest's side (local first), or None for a runt.

    ``outgoing``: the guest transmitted it (local = source), else it was received."""
    n = len(frame)
    if n < ETH_HLEN:
        return None
    dst, src = frame[0:6], frame[6:12]
    key = src + dst if outgoing else dst + src
    off = 12
    ethertype = frame[12] << 8 | frame[13]
    for _ in range(MAX_VLAN_TAGS):
        if ethertype not in VLAN_TPIDS or n < off + 8:
            break
        off += 4
        ethertype = frame[off] << 8 | frame[off + 1]
    off += 2
    if ethertype == ETH_P_IPV4:
        return key + _ipv4(frame, off, outgoing)
    if ethertype == ETH_P_IPV6:
        return key + _ipv6(frame, off, outgoing)
    return key


def _ipv4(frame: bytes, off: int, outgoing: bool) -> bytes:
    n = len(frame)
    if n < off + 20 or frame[off] >> 4 != 4:
        return b""
    ihl = (frame[off] & 0x0F) * 4
    if ihl < 20 or n < off + ihl:
        return b""
    proto = frame[off + 9]
    src, dst = frame[off + 12:off + 16], frame[off + 16:off + 20]
    key = b"\x04" + (src + dst if outgoing else dst + src) + bytes((proto,))
    # Fragments carry no ports after the first: a fragmented datagram keys on
    # its addresses only, every fragment of it alike (MF or an offset set).
    fragmented = (frame[off + 6] & 0x3F) << 8 | frame[off + 7]
    if not fragmented:
        key += _ports(frame, off + ihl, proto, outgoing)
    return key


def _ipv6(frame: bytes, off: int, outgoing: bool) -> bytes:
    if len(frame) < off + IPV6_HLEN or frame[off] >> 4 != 6:
        return b""
    proto = frame[off + 6]          # next header: extension headers are not walked
    src, dst = frame[off + 8:off + 24], frame[off + 24:off + 40]
    key = b"\x06" + (src + dst if outgoing else dst + src) + bytes((proto,))
    return key + _ports(frame, off + IPV6_HLEN, proto, outgoing)


def _ports(frame: bytes, off: int, proto: int, outgoing: bool) -> bytes:
    if proto not in PORT_PROTOCOLS or len(frame) < off + 4:
        return b""
    src, dst = frame[off:off + 2], frame[off + 2:off + 4]
    return src + dst if outgoing else dst + src


def pairs_in_use(fn) -> Callable[[], tuple[int, ...]]:
    """The pairs an ``IfcvfFunction`` may receive on now (see the module doc), as a callable."""
    queues = fn.queues
    total = fn.config.queue_pairs
    lm = fn.lm

    def current() -> tuple[int, ...]:
        pairs = total
        if lm is not None and lm.mq >= 1:
            pairs = min(total, lm.mq)
        return tuple(p for p in range(pairs) if queues[2 * p].running)

    return current


class FlowSteering:
    """Learned flow -> pair, and the RX pick; see the module doc."""

    def __init__(self, in_use: Callable[[], Sequence[int]], max_flows: int = DEFAULT_MAX_FLOWS):
        if max_flows < 1:
            raise ValueError(f"max_flows must be >= 1, not {max_flows}")
        self.in_use = in_use
        self.max_flows = max_flows
        self.flows: OrderedDict[bytes, int] = OrderedDict()
        self.learned = 0        # frames whose flow was (re)learned
        self.evicted = 0        # flows dropped from a full table
        self.hits = 0           # received frames that went to their learned pair
        self.fallbacks = 0      # received frames placed by the hash (never learned, pair not in use)

    # --- TX ---------------------------------------------------------------------------
    def learn(self, pair: int, batch: FrameBatch) -> None:
        """The frames of ``batch`` leave through ``pair``: their flows now belong to it."""
        flows = self.flows
        view = memoryview(batch.data)
        off = 0
        for length in batch.lengths:
            key = flow_key(bytes(view[off:off + min(length, HEADER_BYTES)]), True)
            off += length
            if key is None:
                continue
            self.learned += 1
            if key in flows:
                flows.move_to_end(key)
            elif len(flows) >= self.max_flows:
                flows.popitem(last=False)
                self.evicted += 1
            flows[key] = pair

    # --- RX ---------------------------------------------------------------------------
    def pick(self, frame: bytes, active: Sequence[int]) -> int:
        """The pair a received ``frame`` goes to, given the pairs in use (``active``)."""
        if not active:
            return 0          # nothing receives: pair 0's queue counts the drop
        key = flow_key(frame, False)
        if key is None:
            key = b""
        pair = self.flows.get(key)
        if pair is not None and pair in active:
            self.hits += 1
            return pair
        self.fallbacks += 1
        return active[zlib.crc32(key) % len(active)]

    def split(self, batch: FrameBatch) -> list[tuple[int, FrameBatch]]:
        """``batch`` as (pair, frames for it) parts, each in arrival order, pairs ascending.

        A batch that goes to one pair is passed on as it is (no copy); with one pair
        in use (or none) no frame is looked at: there is nothing to choose."""
        active = tuple(self.in_use())
        if len(active) <= 1:
            return [(active[0] if active else 0, batch)] if len(batch.lengths) else []
        view = memoryview(batch.data)
        lengths = batch.lengths
        picks = []
        off = 0
        for length in lengths:
            picks.append(self.pick(bytes(view[off:off + min(length, HEADER_BYTES)]), active))
            off += length
        if not picks:
            return []
        if picks.count(picks[0]) == len(picks):
            return [(picks[0], batch)]
        parts: dict[int, FrameBatch] = {}
        off = 0
        for pair, length, time in zip(picks, lengths, batch.times):
            part = parts.get(pair)
            if part is None:
                part = parts[pair] = FrameBatch()
            part.append(view[off:off + length], time)
            off += length
        return sorted(parts.items())

    def counters(self) -> dict:
        return {"flows": len(self.flows), "learned": self.learned, "evicted": self.evicted,
                "hits": self.hits, "fallbacks": self.fallbacks}


def install(fn, max_flows: int = DEFAULT_MAX_FLOWS) -> FlowSteering:
    """Give an ``IfcvfFunction`` automatic receive steering (``fn.datapath.steering``)."""
    steering = FlowSteering(pairs_in_use(fn), max_flows)
    fn.datapath.steering = steering
    return steering


__all__ = ["FlowSteering", "flow_key", "install", "pairs_in_use", "DEFAULT_MAX_FLOWS"]
