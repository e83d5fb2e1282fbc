"""The L2 switch around the VFs (sim/switch.py): learning, flooding, moves, aging, timing."""
from __future__ import annotations

import pytest

from sim.frames import FrameBatch
from sim.switch import BROADCAST, Switch
from sim.wire import Port
from sim.world import World

A = bytes.fromhex("020000000001")
B = bytes.fromhex("020000000002")
C = bytes.fromhex("020000000003")


def frame(dst: bytes, src: bytes, size: int = 60, ethertype: int = 0x88B5) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big") + bytes(size - 14)


class Host:
    def __init__(self, world, name):
        self.port = Port(world, name)
        self.got: list[tuple[bytes, int]] = []
        self.port.on_receive(self.receive)

    def receive(self, batch):
        for off, length, t in batch.frames():
            self.got.append((bytes(batch.data[off:off + length]), t))

    def send(self, *frames):
        batch = FrameBatch()
        for f in frames:
            batch.append(f)
        self.port.transmit(batch, 0)


def rig(**kw):
    world = World(1)
    sw = Switch(world, **kw)
    hosts = [Host(world, n) for n in ("a", "b", "c")]
    for h in hosts:
        sw.attach(h.port)
    return world, sw, hosts


def test_unknown_destination_floods_then_learned_goes_to_one_port():
    world, sw, (a, b, c) = rig()
    a.send(frame(B, A))
    world.advance_ns(10_000)
    assert len(b.got) == 1 and len(c.got) == 1 and not a.got      # flooded, not back to a
    assert sw.port_of(A) == 0
    b.send(frame(A, B))
    world.advance_ns(10_000)
    assert len(a.got) == 1 and len(c.got) == 1                     # A known: only to a
    a.send(frame(B, A), frame(B, A), frame(BROADCAST, A))
    world.advance_ns(10_000)
    assert len(b.got) == 4 and len(c.got) == 2                     # two unicast, one broadcast
    assert sw.flooded == 2 and sw.counters()["table"] == {"02:00:00:00:00:01": 0,
                                                          "02:00:00:00:00:02": 1}


def test_a_mac_moves_when_it_is_seen_on_another_port():
    world, sw, (a, b, c) = rig()
    a.send(frame(B, A))
    c.send(frame(B, C))
    world.advance_ns(10_000)
    b.send(frame(A, B))
    world.advance_ns(10_000)

    def to_a(host):
        return sum(f[:6] == A for f, _ in host.got)
    assert to_a(a) == 1 and to_a(c) == 0
    c.send(frame(BROADCAST, A, ethertype=0x0806))   # A announces itself from port 2
    world.advance_ns(10_000)
    b.send(frame(A, B))
    world.advance_ns(10_000)
    assert to_a(a) == 1 and to_a(c) == 1
    move = sw.moves[-1]
    assert (move.mac, move.from_port, move.to_port, move.by_ethertype) == (A, 0, 2, 0x0806)


def test_a_frame_for_its_own_port_is_filtered():
    world, sw, (a, b, c) = rig()
    a.send(frame(B, A))
    world.advance_ns(10_000)
    a.send(frame(A, A[:5] + b"\x09"))
    world.advance_ns(10_000)
    assert sw.filtered == 1 and not a.got


def test_entries_age_out_and_traffic_floods_again():
    world, sw, (a, b, c) = rig(aging_s=0.001)
    a.send(frame(B, A))
    world.advance_ns(10_000)
    b.send(frame(A, B))
    world.advance_ns(10_000)
    assert len(c.got) == 1
    world.advance_ns(2_000_000)
    b.send(frame(A, B))
    world.advance_ns(10_000)
    assert len(c.got) == 2 and sw.aged_out == 1


def test_store_and_forward_timing_and_mixed_batches():
    world, sw, (a, b, c) = rig(latency_ns=1000)
    a.send(frame(B, A))
    b.send(frame(A, B))
    c.send(frame(A, C))
    world.advance_ns(10_000)
    a.got.clear(), b.got.clear(), c.got.clear()
    t0 = world.now
    # a batch mixing two destinations: split into runs, each to its port
    a.send(frame(B, A, 1514), frame(B, A, 1514), frame(C, A, 1514), frame(B, A, 1514))
    world.advance_ns(10_000)
    assert [f[:6] for f, _ in b.got] == [B, B, B] and [f[:6] for f, _ in c.got] == [C]
    # at 100G a 1514-byte frame takes 1538 byte times = 123.04 ns; the first
    # reaches b after its own time on two links plus the switch's 1 us
    first = world.ns(b.got[0][1] - t0)
    assert first == pytest.approx(2 * 123.04 + 1000, abs=2)
    times = [t for _, t in b.got]
    assert times == sorted(times)


def test_watch_counts_frames_per_egress_port():
    world, sw, (a, b, c) = rig()
    seen = sw.watch(A)
    a.send(frame(B, A))
    world.advance_ns(10_000)
    sw.mark("before")
    b.send(frame(A, B), frame(A, B))
    world.advance_ns(10_000)
    assert seen[0].frames == 2 and seen[0].marks["before"] == 0 and seen[2].frames == 0
    assert seen[0].first is not None and seen[0].last >= seen[0].first
