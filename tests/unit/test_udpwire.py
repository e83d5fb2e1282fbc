"""sim.udpwire: a simulated port's far end as a UDP socket on loopback.

The socket side is real (two UDP sockets on 127.0.0.1); the simulated side is
a ``World`` the test advances, first with a bare port, then with the whole
stack (QEMU role -> back-end -> driver -> simulated VF -> guest model), where
the guest's checker verifies every byte of the frames that came over UDP.
"""
import select
import socket

import pytest

from ifcvf.tools.runs.stack import SimHost, Vm
from sim.config import IfcvfConfig
from sim.frames import FrameBatch
from sim.realtime import RealtimeClock
from sim.traffic import Checker, SizeDist, Stream
from sim.udpwire import RX_BURST, UdpWire, WireSpecError, parse_wire
from sim.wire import Port
from sim.world import World

TIMEOUT = 10.0
US = 1_000


@pytest.fixture
def peer():
    """The host end: a UDP socket on loopback the wire sends to."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(TIMEOUT)
    yield sock
    sock.close()


def wire_for(world, port, peer):
    return UdpWire(world, port, 0, peer.getsockname()[1], name="test.udp")


def wait_readable(wire) -> None:
    """Block until the wire's socket holds a datagram (a real condition, with a timeout)."""
    ready, _, _ = select.select([wire.sock], [], [], TIMEOUT)
    assert ready, "the datagram never reached the wire's socket"


def frames(*payloads: bytes) -> FrameBatch:
    batch = FrameBatch()
    for p in payloads:
        batch.append(p)
    return batch


@pytest.mark.parametrize("spec, expected", [("udp:5001:5002", (5001, 5002)),
                                            ("udp:0:65535", (0, 65535))])
def test_parse_wire(spec, expected):
    assert parse_wire(spec) == expected


@pytest.mark.parametrize("spec, why", [("tcp:1:2", "only udp"), ("udp:1", "two numbers"),
                                       ("udp:1:2:3", "two numbers"), ("udp:a:2", "two numbers"),
                                       ("udp:1:0", "1-65535"), ("udp:70000:1", "1-65535"),
                                       ("udp:-1:2", "two numbers")])
def test_parse_wire_refuses(spec, why):
    with pytest.raises(WireSpecError, match=why):
        parse_wire(spec)


def test_frames_the_port_sends_leave_as_datagrams_byte_for_byte(peer):
    world = World(seed=1)
    vf = Port(world, "vf")
    wire = wire_for(world, vf, peer)
    try:
        sent = [bytes(range(60)), b"\xaa" * 1514, bytes(14)]
        last = vf.transmit(frames(*sent), world.now)
        # Nothing leaves before the simulated arrival of the batch's last frame.
        world.run_until(last - 1)
        assert wire.tx_datagrams == 0
        world.run_until(last + wire.port.propagation)
        got = [peer.recvfrom(65536) for _ in sent]
        assert [g[0] for g in got] == sent
        assert {g[1] for g in got} == {wire.local}
        assert wire.tx_datagrams == 3 and wire.tx_errors == 0 and vf.lost == 0
    finally:
        wire.close()


def test_datagrams_received_enter_the_port_at_the_current_time(peer):
    world = World(seed=1)
    vf = Port(world, "vf")
    seen = []
    vf.on_receive(lambda batch: seen.append((bytes(batch.data), list(batch.lengths),
                                             list(batch.times))))
    wire = wire_for(world, vf, peer)
    try:
        world.advance_ns(5 * US)
        start = world.now
        peer.sendto(b"\x01" * 64, wire.local)
        peer.sendto(b"\x02" * 100, wire.local)
        peer.sendto(b"", wire.local)          # no frame: counted, not delivered
        wait_readable(wire)
        world.wake_readable()                 # what the real-time loop does each round
        while wire.rx_datagrams + wire.rx_empty < 3:
            wait_readable(wire)
            world.wake_readable()
        assert seen == []                     # the frames are on the wire, not yet in
        world.advance_ns(1 * US)
        assert len(seen) >= 1
        data = b"".join(s[0] for s in seen)
        assert data == b"\x01" * 64 + b"\x02" * 100
        assert [n for s in seen for n in s[1]] == [64, 100]
        # Serialized from the time they were taken in, at the port's line rate.
        times = [t for s in seen for t in s[2]]
        assert start < times[0] < times[1] <= world.now
        assert wire.rx_empty == 1 and wire.port.tx_frames == 2
    finally:
        wire.close()


def test_a_flood_is_taken_a_burst_at_a_time(peer):
    world = World(seed=1)
    vf = Port(world, "vf")
    got = []
    vf.on_receive(lambda batch: got.append(len(batch)))
    wire = wire_for(world, vf, peer)
    try:
        wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        total = RX_BURST + 10
        for i in range(total):
            peer.sendto(i.to_bytes(4, "big") * 16, wire.local)
        wait_readable(wire)
        world.wake_readable()
        assert wire.rx_datagrams <= RX_BURST      # one wake-up never drains without bound
        while wire.rx_datagrams < total:
            wait_readable(wire)
            world.wake_readable()
        world.advance_ns(100 * US)
        assert sum(got) == total
    finally:
        wire.close()


def test_close_unwatches_and_releases_the_port(peer):
    world = World(seed=1)
    vf = Port(world, "vf")
    wire = wire_for(world, vf, peer)
    fd = wire.sock.fileno()
    assert fd in world.watched_fds() and vf.peer is wire.port
    wire.close()
    wire.close()                              # idempotent
    assert fd not in world.watched_fds() and vf.peer is None
    assert wire.sock.fileno() == -1


def test_a_taken_local_port_is_an_error(peer):
    world = World(seed=1)
    vf = Port(world, "vf")
    with pytest.raises(OSError):
        UdpWire(world, vf, peer.getsockname()[1], 9)
    assert world.watched_fds() == [] and vf.peer is None


def test_a_port_already_cabled_is_refused(peer):
    world = World(seed=1)
    vf = Port(world, "vf")
    first = wire_for(world, vf, peer)
    try:
        with pytest.raises(ValueError, match="already connected"):
            wire_for(world, vf, peer)
        assert world.watched_fds() == [first.sock.fileno()] and vf.peer is first.port
    finally:
        first.close()


# --- through the whole stack ----------------------------------------------------------
def test_a_simulated_guest_talks_over_udp_through_the_vf(peer):
    """Guest TX -> VF -> UDP datagrams; UDP datagrams -> VF -> guest RX, all checked."""
    host = SimHost(seed=3)
    vf = host.add_vf(IfcvfConfig(queue_pairs=1))
    vm = Vm(host, pairs=1, queue_size=256, tx_rate_gbps=1.0, tx_sizes=256, tx_flows=1, rx_flows=1)
    wire = wire_for(host.world, vf.model.port, peer)
    try:
        vm.plug(vf)
        assert vf.backend.configured
        clock = RealtimeClock(host.world)
        # Guest -> host: every frame the guest sends arrives as one datagram.
        vm.guest.start()
        host.world.advance_ns(50 * US)
        vm.guest.stop_tx()
        host.world.advance_ns(50 * US)
        sent = vm.guest.tx_frames()
        assert sent > 0
        checker = Checker(flows=1, flow_base=vm.guest.tx_flow_base)
        batch = FrameBatch()
        for _ in range(sent):
            batch.append(peer.recv(65536))
        assert checker.check(batch) == 0
        counts = checker.counts()
        assert counts.good == counts.in_order == sent and counts.frames == sent
        assert wire.tx_datagrams == sent

        # Host -> guest: checked test frames, sent as UDP, placed by the VF's RX engine.
        stream = Stream(SizeDist.fixed(128), flows=1)
        out = stream.batch(40)
        for offset, length, _ in out.frames():
            peer.sendto(out.data[offset:offset + length], wire.local)
        while wire.rx_datagrams < 40:
            wait_readable(wire)
            clock.sync()                          # the serve loop's step: poll watched fds, run
        host.world.advance_ns(100 * US)
        rx = vm.guest.rx_counts()
        assert rx.frames == rx.good == rx.in_order == 40, rx.as_dict()
        assert rx.clean
        assert not vm.guest.errors and not vf.model.errors
    finally:
        wire.close()
        host.close()
