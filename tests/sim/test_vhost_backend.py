"""The back-end state machine and driver ops over a real socket, against the model.

Front-end (sim.frontend, QEMU 7.2 and DPDK virtio-user orders) -> server ->
back-end -> vDPA driver -> HAL -> simulated VF.  Traffic tests live with the
datapath; these check the control plane: configuration, ring state, and that
hostile messages are refused without changing anything.
"""
import os
import socket

import pytest

from hal.memory import HostMemory
from ifcvf import ids
from ifcvf.tools.runs.bringup import GUEST_FEATURES
from ifcvf.vring import split_ring_layout
from ifcvf.tools.fuzz.common import open_fds
from ifcvf.tools.runs.stack import SimHost
from ifcvf.vhost import protocol as p
from ifcvf.vhost.channel import recv_message, send_message
from sim.config import IfcvfConfig
from sim.frontend import DPDK_VIRTIO_USER, QEMU_7_2, Region, RingAddresses

R = p.Request
MiB = 1 << 20


@pytest.fixture
def host():
    h = SimHost(seed=3)
    yield h
    h.close()


def rings_for(pairs, size=256, base=0x10_0000):
    rings = []
    for q in range(2 * pairs):
        desc, avail, used, base = split_ring_layout(base, size)
        rings.append(RingAddresses(q, size, desc, avail, used))
    return rings


def region(mem):
    return Region(0, mem.size, mem.fd, mem.address)


def start(host, ram, *, pairs=2, style=QEMU_7_2, status=True, bases=None, enabled_pairs=None):
    vf = host.vfs[0] if host.vfs else host.add_vf(IfcvfConfig(queue_pairs=pairs))
    fe = host.connect(vf, style=style, status=status)
    rings = rings_for(pairs)
    fe.connect(len(rings))
    features = fe.features & (GUEST_FEATURES | 1 << p.F_PROTOCOL_FEATURES)
    fe.start(features, [region(ram)], rings, bases=bases, enabled_pairs=enabled_pairs)
    return vf, fe, rings


def raw(fe, request, flags, payload=b"", fds=()):
    """Send bytes the codec would never produce, then let the back-end run."""
    send_message(fe.sock, p.encode_raw(int(request), flags, payload), fds)
    fe.pump()


def ack_of(fe, request):
    frame = recv_message(fe.sock, 1.0)
    reply = p.parse_reply(frame.header, frame.payload, request)
    return reply


@pytest.mark.parametrize("style, status", [(QEMU_7_2, True), (QEMU_7_2, False), (DPDK_VIRTIO_USER, True)])
def test_vf_configured_when_the_guest_is_ready(host, ram, style, status):
    vf, fe, rings = start(host, ram, style=style, status=status)
    assert vf.backend.configured
    assert vf.model.status & ids.Status.DRIVER_OK
    for ring in rings:
        q = vf.model.queue(ring.index)
        # The back-end translated front-end addresses (our mmap) to guest-physical.
        assert (q.desc, q.avail, q.used, q.size) == (ring.desc, ring.avail, ring.used, ring.size)
        assert q.enabled and q.msix_vector == 1 + ring.index
    assert vf.model.lm.mq == 2
    # No ACCESS_PLATFORM towards the guest; accepted towards the device.
    assert not fe.features >> ids.Feature.ACCESS_PLATFORM & 1
    assert vf.model.driver_features >> ids.Feature.ACCESS_PLATFORM & 1


def test_ring_state_survives_stop_and_restart(host, ram):
    vf, fe, rings = start(host, ram, bases={0: 100, 1: 65535, 2: 7, 3: 0})
    assert vf.model.queue(1).ring_state & 0xFFFF == 65535
    bases = fe.stop(rings)
    assert bases == {0: 100, 1: 65535, 2: 7, 3: 0}
    assert not vf.backend.configured and not vf.model.status
    # The destination-style restart resumes from what the source returned.
    features = fe.acked_features
    fe.start(features, [region(ram)], rings, bases=bases)
    assert vf.backend.configured
    assert fe.stop(rings) == bases


def test_interrupts_reach_the_call_eventfd_and_kicks_reach_the_doorbell(host, ram):
    vf, fe, rings = start(host, ram)
    vf.model.raise_queue_interrupt(2)
    host.world.advance(host.world.cycles(10_000))
    assert os.eventfd_read(fe.call_fds[2]) == 1
    with pytest.raises(BlockingIOError):
        os.eventfd_read(fe.call_fds[0])
    before = vf.model.queue(3).doorbells
    host.world.signal_fd(fe.kick_fds[3])   # the guest kicks TX queue 1
    host.world.advance(host.world.cycles(20_000))
    assert vf.model.queue(3).doorbells == before + 1


def test_queue_pairs_enabled_and_disabled_at_run_time(host, ram):
    vf, fe, rings = start(host, ram, pairs=4, enabled_pairs=1)
    assert [vf.model.queue(i).enabled for i in range(8)] == [True, True] + [False] * 6
    assert vf.model.lm.mq == 1
    fe.set_queue_pairs(rings, 4)          # ethtool -L combined 4
    assert all(vf.model.queue(i).enabled for i in range(8)) and vf.model.lm.mq == 4
    fe.set_queue_pairs(rings, 2)
    assert [vf.model.queue(i).enabled for i in range(8)] == [True] * 4 + [False] * 4
    assert vf.model.lm.mq == 2


# --- hostile front-ends -----------------------------------------------------------

def connected(host, ram):
    vf = host.add_vf(IfcvfConfig(queue_pairs=2))
    fe = host.connect(vf)
    fe.connect(4)
    return vf, fe


def test_bad_memory_tables_are_refused_and_change_nothing(host, ram):
    vf, fe = connected(host, ram)
    good = p.MemoryRegion(0, ram.size, ram.address, 0)
    cases = {
        "overlap": (p.MemoryTable((good, p.MemoryRegion(ram.size - 4096, 8192, ram.address + 1, 0))), 2),
        "past the fd": (p.MemoryTable((p.MemoryRegion(0, ram.size * 2, ram.address, 0),)), 1),
        "offset past the fd": (p.MemoryTable((p.MemoryRegion(0, 4096, ram.address, ram.size),)), 1),
        "missing fd": (p.MemoryTable((good,)), 0),
        "extra fd": (p.MemoryTable((good,)), 2),
    }
    for name, (table, nfds) in cases.items():
        fds = [os.dup(ram.fd) for _ in range(nfds)]
        try:
            raw(fe, R.SET_MEM_TABLE, p.VERSION | p.FLAG_NEED_REPLY, table.pack(), fds)
        finally:
            for fd in fds:
                os.close(fd)
        assert ack_of(fe, R.SET_MEM_TABLE).failed, name
        assert vf.backend.memory is None, name
    fe.set_memory([region(ram)])  # and a good one still works on the same connection
    assert vf.backend.memory is not None


def test_memory_that_cannot_be_mapped_is_refused_without_leaking_its_fd(host, ram):
    """A sparse memfd can claim any size: a region or a log that passes every
    check against the file and then fails mmap (more than the address space)
    is refused, and the duplicate fd made to map it is closed, not leaked one
    per message until the daemon runs out of fds."""
    vf, fe = connected(host, ram)
    huge = os.memfd_create("huge", os.MFD_CLOEXEC)
    try:
        os.ftruncate(huge, 1 << 62)
        before = open_fds()
        table = p.MemoryTable((p.MemoryRegion(0, 1 << 62, ram.address, 0),))
        raw(fe, R.SET_MEM_TABLE, p.VERSION | p.FLAG_NEED_REPLY, table.pack(), [huge])
        assert ack_of(fe, R.SET_MEM_TABLE).failed
        assert vf.backend.memory is None
        # A table that ends at 2**62 takes a log of 2**47 bytes, more than a
        # process can map.
        far = p.MemoryRegion(1 << 62, 4096, ram.address, 0)
        raw(fe, R.SET_MEM_TABLE, p.VERSION | p.FLAG_NEED_REPLY, p.MemoryTable((far,)).pack(), [ram.fd])
        assert not ack_of(fe, R.SET_MEM_TABLE).failed
        log = p.Log(p.log_size((1 << 62) + 4096), 0)
        raw(fe, R.SET_LOG_BASE, p.VERSION | p.FLAG_NEED_REPLY, log.pack(), [huge])
        ack_of(fe, R.SET_LOG_BASE)   # (acknowledged even when refused: QEMU 7.2 would abort)
        assert vf.backend.log_mapping is None
        fe.close()
        host.pump()
        assert open_fds() <= before
    finally:
        os.close(huge)


def test_ring_outside_memory_and_bad_indexes_are_refused(host, ram):
    vf, fe = connected(host, ram)
    fe.set_memory([region(ram)])
    fe.send(R.SET_VRING_NUM, p.VringState(0, 256))
    outside = p.VringAddr(0, 0, ram.address + ram.size - 64, ram.address, ram.address + 4096, 0)
    raw(fe, R.SET_VRING_ADDR, p.VERSION | p.FLAG_NEED_REPLY, outside.pack())
    assert ack_of(fe, R.SET_VRING_ADDR).failed
    assert vf.backend.vrings[0].addr is None
    misaligned = p.VringAddr(0, 0, ram.address + 8, ram.address + 8192, ram.address + 4096, 0)
    raw(fe, R.SET_VRING_ADDR, p.VERSION | p.FLAG_NEED_REPLY, misaligned.pack())
    assert ack_of(fe, R.SET_VRING_ADDR).failed
    for request, payload in [(R.SET_VRING_NUM, p.VringState(9, 256)),
                             (R.SET_VRING_BASE, p.VringState(200, 1)),
                             (R.SET_VRING_ENABLE, p.VringState(64, 1)),
                             (R.SET_VRING_NUM, p.VringState(1, 100)),      # not a power of two
                             (R.SET_VRING_NUM, p.VringState(1, 4096))]:    # above the VF's max
        raw(fe, request, p.VERSION | p.FLAG_NEED_REPLY, payload.pack())
        assert ack_of(fe, request).failed, (request, payload)
    assert [v.num for v in vf.backend.vrings] == [256, 0, 0, 0]


def test_features_never_offered_are_refused(host, ram):
    vf, fe = connected(host, ram)
    raw(fe, R.SET_FEATURES, p.VERSION | p.FLAG_NEED_REPLY, p.U64(1 << 63).pack())
    assert ack_of(fe, R.SET_FEATURES).failed
    assert not vf.backend.features_set


def test_log_smaller_than_memory_is_refused(host, ram):
    vf, fe = connected(host, ram)
    fe.set_memory([region(ram)])
    small = HostMemory(4096, "log")
    try:
        fe.set_log_base(small.fd, 16)  # 16 bytes cover 512 KiB; the guest has 16 MiB
    finally:
        small.close()
    assert vf.backend.log_mapping is None
    # LOG_ALL without a usable log is still acknowledged (QEMU 7.2 would abort
    # the VM on a refusal): the driver keeps the VF stopped instead
    # (tests/sim/test_relay_switch.py).
    fe.acked_features = fe.features & GUEST_FEATURES
    fe.set_log_all(True, [])
    assert vf.backend.features >> ids.Feature.LOG_ALL & 1


def test_truncated_oversized_and_unknown_messages_drop_only_that_connection(host, ram):
    victims = []
    for garbage in (p.encode_raw(int(R.SET_VRING_NUM), p.VERSION, b"\x01\x02", size=8),   # truncated
                    p.encode_raw(int(R.SET_VRING_NUM), p.VERSION, b"", size=100_000),     # oversized
                    p.encode_raw(77, p.VERSION, b""),                                     # unknown, no ack
                    p.encode_raw(int(R.GET_VRING_BASE), p.VERSION, p.VringState(99, 0).pack())):
        vf, fe = connected(host, ram)
        send_message(fe.sock, garbage)
        if garbage.startswith(p.encode_raw(int(R.SET_VRING_NUM), p.VERSION, b"", size=8)[:12]):
            fe.sock.shutdown(socket.SHUT_WR)  # the rest never comes
        fe.pump()
        victims.append((vf, fe))
    survivor_vf = host.add_vf(IfcvfConfig(queue_pairs=2))
    survivor = host.connect(survivor_vf)
    survivor.connect(4)
    for vf, fe in victims:
        assert fe.sock.recv(1, socket.MSG_DONTWAIT) == b""  # closed by the back-end
    assert len(host.server.connections) == 1
    assert survivor.get_u64(R.GET_FEATURES) == survivor.features


def test_memory_hotplug_while_running_stops_remaps_and_reconfigures(host, ram):
    vf, fe, rings = start(host, ram)
    extra = HostMemory(4 * MiB, "hotplug")
    try:
        fe.set_memory([region(ram), Region(1 << 32, extra.size, extra.fd, extra.address)])
        assert vf.backend.configured  # stopped, remapped, reconfigured after the reply
        assert vf.model.iommu.mappings() == [(0, ram.size), (1 << 32, extra.size)]
        assert fe.stop(rings) == {0: 0, 1: 0, 2: 0, 3: 0}
    finally:
        extra.close()


def test_a_memory_table_beyond_the_iova_space_leaves_no_memory_behind(ram, caplog):
    """Found by `ifcvf fuzz backend`: a table beyond the IOMMU's 48-bit IOVA
    space is taken, the VF stops and cannot be configured again, and an error
    says why.  That error, kept by a log handler (as caplog and the fuzzer keep
    records), held the refused mapping's buffer through its chain of causes:
    after the front-end left, the guest memory stayed mapped and its fd open."""
    before = open_fds()
    host = SimHost(seed=3)
    try:
        vf, fe, rings = start(host, ram)
        fe.set_memory([Region(1 << 62, ram.size, ram.fd, ram.address)])
        assert not vf.backend.configured
        assert "ends beyond the 48-bit IOVA space" in caplog.text
        fe.close()
        host.pump()
    finally:
        host.close()
    assert open_fds() == before

def test_host_notifiers_offered_after_setup_and_config_changes_forwarded(host, ram, monkeypatch):
    """Where the HAL has a notify area (VFIO), each enabled vring's doorbell page is
    offered to QEMU over the back-end channel once the set-up is acknowledged; the
    VF's config interrupt reaches QEMU as BACKEND_CONFIG_CHANGE."""
    from hal.api import NotifyArea

    page = HostMemory(4096, "doorbells")
    try:
        vf = host.add_vf(IfcvfConfig(queue_pairs=2))
        monkeypatch.setattr(vf.fn, "notify_area",
                            lambda bar, offset: NotifyArea(page.fd, offset & ~0xFFF, 4096))
        vf, fe, rings = start(host, ram)
        notifiers = [m for m in fe.backend_requests
                     if m.request is p.BackendRequest.VRING_HOST_NOTIFIER_MSG]
        assert sorted(m.payload.index for m in notifiers) == [0, 1, 2, 3]
        assert all(m.payload.size == 4096 and not m.payload.nofd for m in notifiers)
        vf.model.set_link(False)
        host.world.advance_ns(50_000)
        host.pump()
        fe.service_backend_channel()
        assert any(m.request is p.BackendRequest.CONFIG_CHANGE_MSG for m in fe.backend_requests)
    finally:
        page.close()
