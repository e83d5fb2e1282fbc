"""The guest virtio-net driver model against a plain Python device (sim.testing.guest_testdev)."""
import os
import struct
import subprocess
import sys
import textwrap

import pytest

from hal.memory import HostMemory
from sim import virtio_regs as vr
from sim._native import lib
from sim.guest import GuestCosts, GuestNet, negotiate, net_header_len, plan_layout
from sim.testing.guest_testdev import RingDevice, link
from sim.traffic import Generator, Sink, SizeDist, Stream
from sim.world import World

V1, MRG, EVT, IND = vr.F_VERSION_1, vr.F_NET_MRG_RXBUF, vr.F_EVENT_IDX, vr.F_INDIRECT_DESC
MODERN = vr.feature_mask(V1, MRG, EVT, IND)
LEGACY_LIKE = 0          # no VERSION_1, no MRG_RXBUF: 10-byte header, flags suppression
TX_FLOW_BASE = 0x1000


class Rig:
    """A guest, a RingDevice over its rings, a generator into the device, a sink behind it."""

    def __init__(self, features=MODERN, *, pairs=1, size=64, memory_mib=8, seed=1,
                 dev_features=None, attach=True, **guest_kw):
        self.world = World(seed)
        self.mem = HostMemory(memory_mib << 20, "guest-ram")
        self.fds = []
        guest_kw.setdefault("tx_flows", 1)
        self.guest = GuestNet(self.world, self.mem, features=features, queue_pairs=pairs,
                              queue_size=size, **guest_kw)
        self.gen_port, self.dev_rx_port = link(self.world)
        self.dev_tx_port, self.sink_port = link(self.world)
        self.dev = RingDevice(self.world, self.mem,
                              [self.guest.queue_addresses(q) for q in range(2 * pairs)], size,
                              features if dev_features is None else dev_features,
                              tx_port=self.dev_tx_port)
        self.dev_rx_port.on_receive(self.dev.rx_handler(pairs))
        self.sink = Sink(self.world, self.sink_port, flows=pairs * guest_kw["tx_flows"],
                         flow_base=TX_FLOW_BASE)
        if attach:
            self.wire_fds()

    def wire_fds(self, dev=None):
        dev = dev or self.dev
        for q in range(self.guest.num_queues):
            kick = os.eventfd(0, os.EFD_NONBLOCK)
            call = os.eventfd(0, os.EFD_NONBLOCK)
            self.fds += [kick, call]
            self.guest.attach(q, kick, call)
            dev.attach(q, kick, call)

    def generator(self, size=1518, rate=10.0, frames=1000, flows=1, **kw):
        return Generator(self.world, self.gen_port, size, rate_gbps=rate, flows=flows,
                         max_frames=frames, **kw)

    def run_us(self, us):
        self.world.run_until(self.world.now + self.world.cycles(us * 1000))

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.mem.close()


@pytest.fixture
def rigs():
    made = []

    def make(*args, **kw):
        rig = Rig(*args, **kw)
        made.append(rig)
        return rig
    yield make
    for rig in made:
        rig.close()


def u16(mem, gpa):
    return struct.unpack_from("<H", mem.view, gpa)[0]


def stream_frames(stream, n):
    batch = stream.batch(n)
    return [bytes(batch.data[o:o + ln]) for o, ln, _ in batch.frames()]


# --- layout ---------------------------------------------------------------------------
@pytest.mark.parametrize("chain,size", [(c, n) for c in ("single", "split", "indirect")
                                         for n in (1, 2, 64, 256, 1024) if c != "split" or n > 1])
def test_layout_is_aligned_and_disjoint(chain, size):
    layouts, end = plan_layout(2, size, rx_buffer_size=1536, tx_buffer_size=2048, tx_chain=chain,
                               tx_flows=3)
    spans = []
    for lay in layouts:
        assert lay.desc % 4096 == 0 and lay.used % 4096 == 0 and lay.bufs % 4096 == 0
        assert lay.avail == lay.desc + 16 * size and lay.priv % 64 == 0
        assert lay.nslots == (size // 2 if lay.is_tx and chain == "split" else size)
        spans += [(lay.desc, lay.avail + 6 + 2 * size), (lay.used, lay.used + 6 + 8 * size),
                  (lay.bufs, lay.bufs + lay.nslots * lay.buf_size)]
        if lay.is_tx:
            spans.append((lay.seq, lay.seq + 24))
            if chain != "single":
                spans.append((lay.hdrs, lay.hdrs + 16 * lay.nslots))
            if chain == "indirect":
                spans.append((lay.tables, lay.tables + 32 * lay.nslots))
    spans.sort()
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a1 <= b0, f"{a0:#x}-{a1:#x} overlaps {b0:#x}-{b1:#x}"
    assert spans[-1][1] <= end and end % 4096 == 0


def test_fresh_rings_hold_every_rx_buffer_and_no_tx_chain(rigs):
    rig = rigs(size=32, attach=False)
    g, mem = rig.guest, rig.mem
    rx, tx = g.layout[0], g.layout[1]
    assert g.ring_indexes(0) == (32, 0) and g.ring_indexes(1) == (0, 0)
    for i in range(32):
        addr, length, flags, _ = struct.unpack_from("<QIHH", mem.view, rx.desc + 16 * i)
        assert (addr, length, flags) == (rx.bufs + i * rx.buf_size, rx.buf_size, 2)
    assert sorted(u16(mem, rx.avail + 4 + 2 * i) for i in range(32)) == list(range(32))
    # Linux: zeroed ring memory, callbacks on (no shadow NO_INTERRUPT), used_event 0
    assert u16(mem, tx.avail) == 0 and u16(mem, tx.avail + 4 + 2 * 32) == 0


def test_adopting_rings_in_memory_checks_the_private_block(rigs):
    rig = rigs(size=32, tx_rate_gbps=10, tx_sizes=512, tx_frames=20)
    rig.guest.start()
    rig.run_us(100)
    rig.guest.pause()
    adopted = GuestNet(rig.world, rig.mem, features=MODERN, queue_size=32, fresh=False,
                       name="adopted")
    assert [adopted.ring_indexes(q) for q in range(2)] == \
        [rig.guest.ring_indexes(q) for q in range(2)]
    assert adopted.queues[1].c.made_available == 0           # nothing re-initialised
    priv = rig.guest.layout[1].priv
    rig.mem.view[priv + 10:priv + 12] = (7).to_bytes(2, "little")   # nslots no longer matches
    with pytest.raises(ValueError, match="not consistent"):
        GuestNet(rig.world, rig.mem, features=MODERN, queue_size=32, fresh=False)


def test_guest_refuses_impossible_configurations():
    world = World(0)
    with HostMemory(1 << 20, "small") as mem:
        with pytest.raises(ValueError, match="guest RAM"):
            GuestNet(world, mem, features=MODERN, queue_size=1024)
    with HostMemory(8 << 20, "m") as mem:
        with pytest.raises(ValueError, match="INDIRECT"):
            GuestNet(world, mem, features=vr.feature_mask(V1), tx_chain="indirect")
        with pytest.raises(ValueError, match="MRG_RXBUF"):
            GuestNet(world, mem, features=vr.feature_mask(V1), rx_buffer_size=512)
        with pytest.raises(ValueError, match="do not fit"):
            GuestNet(world, mem, features=MODERN, tx_sizes=1518, tx_buffer_size=1500)


def test_negotiation_and_header_length():
    offered = MODERN | vr.feature_mask(vr.F_NET_MAC, vr.F_RING_PACKED, vr.F_NET_CSUM)
    got = negotiate(offered)
    assert got == MODERN | vr.feature_mask(vr.F_NET_MAC)
    assert net_header_len(0) == 10
    assert net_header_len(vr.feature_mask(V1)) == 12
    assert net_header_len(vr.feature_mask(MRG)) == 12


# --- traffic both ways ------------------------------------------------------------------
@pytest.mark.parametrize("features,hdr", [(MODERN, 12), (vr.feature_mask(V1), 12),
                                          (vr.feature_mask(MRG), 12), (LEGACY_LIKE, 10)])
def test_frames_flow_both_ways_with_10_and_12_byte_headers(rigs, features, hdr):
    rig = rigs(features, tx_rate_gbps=10, tx_sizes="64-1518", tx_frames=500, rx_flows=3)
    assert rig.guest.hdr_len == rig.dev.hdr_len == hdr
    gen = rig.generator(size="64-1518", rate=10, frames=500, flows=3)
    rig.guest.start()
    gen.start()
    rig.run_us(2000)
    rx = rig.guest.rx_counts()
    assert rx.frames == rx.good == 500 and rx.clean
    assert rig.guest.rx_totals() == (rx.frames, rx.bytes) and rx.bytes > 500 * 60
    sink = rig.sink.counts()
    assert sink.good == 500 and sink.clean
    assert rig.guest.tx_frames() == 500
    assert rig.dev.errors == [] and rig.guest.errors == []


def test_rx_frames_are_checked_per_flow(rigs):
    rig = rigs(rx_flows=4)
    gen = rig.generator(size="64-1518", rate=20, frames=800, flows=4)
    rig.guest.start()
    gen.start()
    rig.run_us(2000)
    rx = rig.guest.rx_counts()
    assert rx.good == 800 and rx.clean and rig.dev.rx_dropped == 0


def test_header_length_disagreement_is_caught(rigs):
    # The device writes 12-byte headers to a guest that expects 10: every frame is off by 2.
    rig = rigs(LEGACY_LIKE, dev_features=vr.feature_mask(V1))
    s = Stream(SizeDist.fixed(128))
    rig.dev.deliver(0, stream_frames(s, 5))
    rig.guest.start()
    rig.run_us(100)
    assert rig.guest.rx_counts().corrupted == 5
    # 10-byte headers to a guest that expects 12: it reads the MAC as num_buffers.
    rig = rigs(vr.feature_mask(V1), dev_features=LEGACY_LIKE)
    rig.dev.deliver(0, stream_frames(s, 5))
    rig.guest.start()
    rig.run_us(100)
    assert "num_buffers" in rig.guest.queues[0].broken


def test_mergeable_rx_buffers_carry_big_frames(rigs):
    rig = rigs(MODERN, size=128, rx_buffer_size=256)
    s = Stream(SizeDist.sequence([1518, 64, 300]))
    frames = stream_frames(s, 30)
    rig.guest.start()
    rig.run_us(10)
    assert rig.dev.deliver(0, frames) == 30
    rig.run_us(200)
    rx = rig.guest.rx_counts()
    assert rx.good == 30 and rx.clean
    # 1514 + 12 bytes over 256-byte buffers = 6 buffers; 60 + 12 -> 1; 296 + 12 -> 2
    assert rig.guest.queues[0].c.completed == 10 * (6 + 1 + 2)


def test_bad_num_buffers_breaks_the_queue(rigs):
    rig = rigs(MODERN, size=16)
    rig.guest.start()
    rig.run_us(10)
    lay = rig.guest.layout[0]
    rig.mem.view[lay.bufs + 10:lay.bufs + 12] = (5).to_bytes(2, "little")   # claims 5 buffers
    rig.dev.write_used(0, [(0, 100)])
    rig.run_us(50)
    assert "num_buffers" in rig.guest.queues[0].broken
    assert rig.world.trace.find("ring_error")


@pytest.mark.parametrize("entries,error", [([(999, 100)], "outside the ring"),
                                           ([(3, 100), (3, 100)], "does not hold"),
                                           ([(2, 99999)], "length")])
def test_used_entries_a_driver_must_refuse(rigs, entries, error):
    rig = rigs(vr.feature_mask(V1), size=16)
    rig.guest.start()
    rig.run_us(10)
    for i, (id_, _) in enumerate(entries):
        if id_ < 16:
            s = Stream(SizeDist.fixed(64))
            frame = stream_frames(s, 1)[0]
            lay = rig.guest.layout[0]
            at = lay.bufs + id_ * lay.buf_size
            rig.mem.view[at:at + 12] = b"\0" * 10 + b"\x01\x00"
            rig.mem.view[at + 12:at + 12 + len(frame)] = frame
    rig.dev.write_used(0, [(i, 72 if ln == 100 else ln) for i, ln in entries])
    rig.run_us(50)
    assert error in rig.guest.queues[0].broken, rig.guest.queues[0].broken
    assert rig.guest.errors


def test_corrupted_rx_frames_are_counted_and_traced(rigs):
    rig = rigs()
    rig.dev.corrupt_next = 3
    gen = rig.generator(frames=50)
    rig.guest.start()
    gen.start()
    rig.run_us(500)
    rx = rig.guest.rx_counts()
    # a corrupted frame does not count as received: its sequence number is a gap
    assert rx.bad_payload == 3 and rx.good == 47 and rx.lost == 3
    assert rig.world.trace.find("rx_bad")


# --- TX chain shapes -----------------------------------------------------------------------
@pytest.mark.parametrize("chain", ["single", "split", "indirect"])
def test_tx_chain_shapes(rigs, chain):
    rig = rigs(MODERN, size=32, tx_chain=chain, tx_rate_gbps=50, tx_sizes="64-1518",
               tx_frames=300, tx_batch=8)
    rig.guest.start()
    rig.run_us(100)
    lay = rig.guest.layout[1]
    head = u16(rig.mem, lay.avail + 4)      # first chain posted
    addr, length, flags, nxt = struct.unpack_from("<QIHH", rig.mem.view, lay.desc + 16 * head)
    if chain == "single":
        assert flags == 0 and lay.bufs <= addr < lay.bufs + lay.nslots * lay.buf_size
    elif chain == "split":
        assert head % 2 == 0 and flags == 1 and nxt == head + 1 and length == 12
        assert lay.hdrs <= addr < lay.hdrs + 16 * lay.nslots
    else:
        assert flags == 4 and length == 32 and lay.tables <= addr < lay.tables + 32 * lay.nslots
        t_addr, t_len, t_flags, t_next = struct.unpack_from("<QIHH", rig.mem.view, addr)
        assert (t_len, t_flags, t_next) == (12, 1, 1)
    rig.run_us(3000)
    sink = rig.sink.counts()
    assert rig.guest.tx_frames() == 300 and sink.good == 300 and sink.clean
    assert rig.dev.errors == []


# --- u16 index wrap-around ----------------------------------------------------------------
@pytest.mark.parametrize("features", [MODERN, vr.feature_mask(V1)])
def test_indexes_wrap_around_u16(rigs, features):
    rig = rigs(features, size=16, ring_base=0xFFF0, tx_rate_gbps=2, tx_sizes=256,
               tx_frames=400, tx_batch=8)
    assert rig.guest.ring_indexes(0) == ((0xFFF0 + 16) & 0xFFFF, 0xFFF0)
    # (2 Gb/s: a 16-entry ring keeps only 8 buffers posted between refills, as Linux
    # refills only once more than min(budget, ring)/2 are free)
    gen = rig.generator(size=512, rate=2, frames=400, burst=4)
    rig.guest.start()
    gen.start()
    rig.run_us(3000)
    assert rig.guest.rx_counts().good == 400 and rig.guest.rx_counts().clean
    assert rig.sink.counts().good == 400 and rig.sink.counts().clean
    avail, used = rig.guest.ring_indexes(1)
    assert used == (0xFFF0 + 400) & 0xFFFF
    assert rig.guest.errors == [] and rig.dev.errors == []


# --- notification suppression ----------------------------------------------------------------
def test_no_notify_suppresses_kicks(rigs):
    rig = rigs(vr.feature_mask(V1), size=64, tx_rate_gbps=2, tx_sizes=512, tx_frames=200,
               tx_batch=8)
    rig.dev.set_no_notify(1, True)
    rig.guest.start()
    rig.run_us(100)
    txq = rig.guest.queues[1]
    assert txq.kicks == 0 and txq.kicks_suppressed > 0 and rig.dev.queues[1].kicks == 0
    assert rig.dev.process_tx(1) > 0                # the device polls instead
    rig.dev.set_no_notify(1, False)
    rig.run_us(200)
    assert txq.kicks > 0 and rig.dev.queues[1].kicks == txq.kicks
    rig.run_us(500)
    assert rig.sink.counts().good == 200 and rig.sink.counts().clean


def test_event_idx_kicks_only_when_avail_event_is_crossed(rigs):
    rig = rigs(MODERN, size=64, tx_rate_gbps=100, tx_sizes=512, tx_frames=64, tx_batch=8)
    rig.dev.set_kick_every(1, 16)
    rig.guest.start()
    rig.run_us(500)
    # batches of 8: the index crosses avail_event (last_avail + 15) every second batch
    assert rig.guest.queues[1].kicks == 4
    assert rig.sink.counts().good == 64 and rig.dev.queues[1].kicks == 4


@pytest.mark.parametrize("features", [MODERN, vr.feature_mask(V1)])
def test_interrupts_stay_off_while_polling_and_a_late_entry_is_rechecked(rigs, features):
    costs = GuestCosts(irq_ns=1000, poll_ns=1000, rx_frame_ns=100)
    rig = rigs(features, size=64, costs=costs)
    g, dev, world = rig.guest, rig.dev, rig.world
    s = Stream(SizeDist.fixed(128))
    g.start()
    rig.run_us(10)                        # the start-up poll finds nothing, interrupts on
    rxq = dev.queues[0]
    dev.deliver(0, stream_frames(s, 4))    # interrupt -> poll starts 500 ns later (MSI-X)
    assert rxq.interrupts == 1
    # Before the poll runs (the interrupt's entry costs irq_ns), 4 more arrive:
    # nothing to signal (used_event is still 0 / the device already interrupted).
    rig.run_us(1.0)
    dev.deliver(0, stream_frames(s, 4))
    assert rxq.interrupts == 1 and rxq.interrupts_suppressed == 1
    # The poll takes all 8 at +1.5 us and runs until +3.3 us; 4 more at +2 us:
    rig.run_us(1.0)
    assert g.rx_counts().good == 8
    dev.deliver(0, stream_frames(s, 4))
    if features >> EVT & 1:
        # Linux with EVENT_IDX: a poll entered from an interrupt skipped the
        # disable (event_triggered), so used_event follows consumption and the
        # device interrupts again; napi_schedule_prep fails (NAPIF_STATE_MISSED),
        # napi_complete_done returns false and NAPI polls once more.
        assert u16(rig.mem, g.layout[0].avail + 4 + 2 * 64) == 8
        assert rxq.interrupts == 2
        rig.run_us(0.6)                   # the MSI-X write lands while the poll runs
        assert g.pairs[0].rx_missed and g.queues[0].interrupts == 2
        irqs = 2
    else:
        # avail->flags = NO_INTERRUPT while polling: suppressed.
        assert rxq.interrupts == 1 and rxq.interrupts_suppressed == 2
        irqs = 1
    rig.run_us(20)
    # Polled out: the late entries were found by polling again (MISSED) or by the
    # virtqueue_poll re-check after enable_cb_prepare, not by a poll of their own.
    assert g.rx_counts().good == 12
    assert g.queues[0].interrupts == irqs
    dev.deliver(0, stream_frames(s, 1))   # drained and re-enabled: this one interrupts
    assert rxq.interrupts == irqs + 1
    rig.run_us(20)
    assert g.rx_counts().good == 13 and g.rx_counts().clean


def test_tx_interrupt_only_when_the_ring_is_full(rigs):
    rig = rigs(MODERN, size=16, tx_rate_gbps=100, tx_sizes=256, tx_frames=200, tx_batch=16)
    rig.dev.set_no_notify(1, True)          # without EVENT_IDX this is ignored; set kick_every
    rig.dev.set_kick_every(1, 1 << 15)      # never kick: the device polls
    rig.guest.start()
    rig.run_us(50)
    txq = rig.guest.queues[1]
    assert rig.guest.pairs[0].tx_blocked and rig.guest.tx_frames() == 16
    lay = rig.guest.layout[1]
    # enable_cb_delayed: used_event = last_used + 3/4 of the 16 in flight
    assert u16(rig.mem, lay.avail + 4 + 2 * 16) == 12
    rig.dev.process_tx(1, limit=10)          # 10 completions: not past used_event yet
    rig.run_us(10)
    assert txq.interrupts == 0 and rig.guest.pairs[0].tx_blocked
    rig.dev.process_tx(1, limit=6)
    rig.run_us(10)
    assert txq.interrupts == 1 and rig.guest.tx_frames() > 16


# --- pause / resume / migration ---------------------------------------------------------------
def test_pause_freezes_the_rings_and_resume_catches_up(rigs):
    rig = rigs(size=64, tx_rate_gbps=20, tx_sizes=1518, tx_frames=3000)
    gen = rig.generator(size=1518, rate=20, frames=3000)
    g = rig.guest
    g.start()
    gen.start()
    rig.run_us(200)
    g.pause()
    frozen = [g.ring_indexes(q)[0] for q in range(2)]
    kicks = [q.kicks for q in g.queues]
    rx_before = g.rx_counts().good
    rig.run_us(300)
    assert [g.ring_indexes(q)[0] for q in range(2)] == frozen
    assert [q.kicks for q in g.queues] == kicks
    assert g.rx_counts().good == rx_before
    assert rig.dev.rx_dropped > 0               # the device ran out of RX buffers meanwhile
    g.resume()
    rig.run_us(3000)
    rx = g.rx_counts()
    assert rx.good == 3000 - rig.dev.rx_dropped and rx.lost == rig.dev.rx_dropped
    assert rx.duplicates == rx.corrupted == 0
    assert rig.sink.counts().good == 3000 and rig.sink.counts().clean
    assert [e.split()[2] for e in rig.world.trace.find("pause")] == ["pause"]


def migrate(rig, memory_copy, *, stale_copy=None):
    """Pause, stop the device, move guest RAM to a new memory, continue on a new device."""
    g = rig.guest
    g.pause()
    rig.dev.running = False
    new_mem = HostMemory(rig.mem.size, "dest-ram")
    new_mem.view[:] = stale_copy if stale_copy is not None else rig.mem.view
    g.detach()
    g.remap(new_mem)
    dev = RingDevice(rig.world, new_mem, [g.queue_addresses(q) for q in range(2)], g.queue_size,
                     g.features, tx_port=rig.dev_tx_port)
    rig.dev_rx_port.on_receive(dev.rx_handler(1))
    rig.wire_fds(dev)
    rig.old_mem, rig.mem, rig.dev = rig.mem, new_mem, dev
    g.resume()
    g.kick_all()
    return dev


def test_migration_continues_from_the_indexes_in_guest_memory(rigs):
    rig = rigs(size=64, tx_rate_gbps=20, tx_sizes="64-1518", tx_frames=2000)
    s = Stream(SizeDist.fixed(600))
    g = rig.guest
    g.start()
    for _ in range(5):
        rig.dev.deliver(0, stream_frames(s, 20))
        rig.run_us(60)
    migrate(rig, None)
    for _ in range(5):
        rig.dev.deliver(0, stream_frames(s, 20))
        rig.run_us(60)
    rig.run_us(3000)
    try:
        rx = g.rx_counts()
        assert rx.good == 200 and rx.clean
        sink = rig.sink.counts()
        assert sink.good == 2000 and sink.clean
        assert g.errors == [] and rig.dev.errors == []
        assert rig.world.trace.find("remap")
    finally:
        rig.old_mem.close()


def test_a_stale_copy_of_guest_memory_shows_up_as_duplicates(rigs):
    rig = rigs(size=64, tx_rate_gbps=20, tx_sizes=512, tx_frames=2000)
    g = rig.guest
    g.start()
    rig.run_us(100)
    stale = bytes(rig.mem.view)          # the destination gets RAM as it was back then
    rig.run_us(200)
    migrate(rig, None, stale_copy=stale)
    rig.run_us(2000)
    try:
        sink = rig.sink.counts()
        assert sink.duplicates > 0 or sink.stale > 0
    finally:
        rig.old_mem.close()


# --- CPU cost model ----------------------------------------------------------------------------
def test_guest_cpu_can_be_the_limit(rigs):
    slow = GuestCosts(rx_frame_ns=2000)        # 0.5 Mpps per core at most
    rig = rigs(size=256, costs=slow)
    gen = rig.generator(size=64, rate=1, frames=20000, burst=16)   # 1.49 Mpps offered
    rig.guest.start()
    gen.start()
    rig.run_us(1000)
    assert rig.guest.utilisation()[0] > 0.95
    assert rig.dev.rx_dropped > 0
    assert rig.guest.rx_counts().lost > 0


# --- determinism ---------------------------------------------------------------------------------
SCENARIO = textwrap.dedent("""
    import os
    from hal.memory import HostMemory
    from sim import virtio_regs as vr
    from sim.guest import GuestNet
    from sim.testing.guest_testdev import RingDevice, link
    from sim.traffic import Generator, Sink
    from sim.world import World

    world = World(42)
    mem = HostMemory(8 << 20, "g")
    feats = vr.feature_mask(vr.F_VERSION_1, vr.F_NET_MRG_RXBUF, vr.F_EVENT_IDX)
    g = GuestNet(world, mem, features=feats, queue_pairs=2, queue_size=64, tx_rate_gbps=30,
                 tx_sizes="imix", tx_frames=700, rx_flows=4, trace_polls=True)
    a, b = link(world); c, d = link(world)
    dev = RingDevice(world, mem, [g.queue_addresses(q) for q in range(4)], 64, feats, tx_port=c)
    b.on_receive(dev.rx_handler(2))
    sink = Sink(world, d, flows=2, flow_base=0x1000)
    for q in range(4):
        k, c_ = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        g.attach(q, k, c_); dev.attach(q, k, c_)
    gen = Generator(world, a, "64-1518", rate_gbps=10, flows=4, max_frames=900, burst=16)
    g.start(); gen.start()
    world.run_until(world.cycles(1_500_000))
    print(world.digest(), world.trace.count, g.rx_counts().good, sink.counts().good)
""")


def run_scenario(hash_seed):
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", SCENARIO], env=env, capture_output=True,
                         text=True, check=True, cwd=root)
    return out.stdout.strip()


def test_same_seed_same_digest_across_processes_and_hash_seeds():
    first, second = run_scenario(1), run_scenario(77)
    assert first == second
    digest, records, rx, tx = first.split()
    assert int(records) > 100 and int(rx) == 900 and int(tx) == 1400


def test_same_seed_same_counts_in_process(rigs):
    def run(seed):
        rig = rigs(seed=seed, tx_rate_gbps=30, tx_sizes="imix", tx_frames=500, trace_polls=True)
        gen = rig.generator(size="64-1518", rate=20, frames=500)
        rig.guest.start()
        gen.start()
        rig.run_us(1000)
        return rig.world.digest(), rig.guest.counts(), rig.sink.counts()
    a, b, c = run(3), run(3), run(4)
    assert a == b
    assert a[0] != c[0]


def test_a_corrupt_private_block_breaks_the_queue_instead_of_writing_out_of_bounds(rigs):
    rig = rigs(size=16, tx_rate_gbps=10, tx_sizes=512, tx_frames=8)
    priv = rig.guest.layout[1].priv
    rig.mem.view[priv + 16:priv + 18] = (4000).to_bytes(2, "little")   # free[0]: no such buffer
    rig.guest.start()
    rig.run_us(50)
    assert "corrupt" in rig.guest.queues[1].broken
    assert rig.guest.tx_frames() == 0


# --- Linux 6.1 where interrupts and buffers are decided (issue 10) ------------------------------
def used_event(rig, q):
    lay = rig.guest.layout[q]
    return u16(rig.mem, lay.avail + 4 + 2 * lay.size)


def test_a_poll_entered_other_than_from_an_interrupt_leaves_used_event_at_0(rigs):
    """virtnet_open -> virtnet_napi_enable -> virtqueue_napi_schedule: the disable
    really runs (EVENT_IDX: used_event = 0, "a hack"), and stays 0 until the poll ends
    with enable_cb_prepare (used_event = last_used)."""
    costs = GuestCosts(irq_ns=1000, poll_ns=5000, rx_frame_ns=100)
    rig = rigs(MODERN, size=64, costs=costs, ring_base=100)
    g = rig.guest
    g.start()
    assert used_event(rig, 0) == 0 and g.pairs[0].rx_sched      # polling, not from an irq
    rig.run_us(10)
    assert used_event(rig, 0) == 100 and not g.pairs[0].rx_sched


def test_without_event_idx_disable_sets_no_interrupt_and_the_poll_clears_it(rigs):
    costs = GuestCosts(irq_ns=1000, poll_ns=5000)
    rig = rigs(vr.feature_mask(V1), size=64, costs=costs)
    rig.guest.start()
    assert u16(rig.mem, rig.guest.layout[0].avail) == 1          # VRING_AVAIL_F_NO_INTERRUPT
    rig.run_us(10)
    assert u16(rig.mem, rig.guest.layout[0].avail) == 0


def test_refill_only_above_half_the_budget_then_to_full(rigs):
    """virtnet_receive refills only when num_free > min(budget, ring)/2, then fills to full."""
    rig = rigs(MODERN, size=64)
    g = rig.guest
    s = Stream(SizeDist.fixed(128))
    g.start()
    rig.run_us(10)
    for n, posted in ((32, 64 - 32), (1, 64)):       # 32 free: not > 32, no refill; 33: refill
        rig.dev.deliver(0, stream_frames(s, n))
        rig.run_us(20)
        assert lib.ifc_gvq_in_flight(g.queues[0].c) == posted
    assert g.ring_indexes(0)[0] == 64 + 33


def test_a_failed_refill_is_retried_by_refill_work(rigs):
    rig = rigs(MODERN, size=64, rx_alloc_fail=1.0)
    g = rig.guest
    s = Stream(SizeDist.fixed(128))
    g.start()
    rig.run_us(10)
    rig.dev.deliver(0, stream_frames(s, 40))
    rig.run_us(50)
    pair = g.pairs[0]
    assert pair.alloc_failures >= 1 and pair.refill_works >= 1
    assert lib.ifc_gvq_in_flight(g.queues[0].c) == 64          # refill_work filled it
    assert rig.world.trace.find("refill_work")
    assert g.rx_counts().good == 40


def test_intx_scans_every_queue_on_one_line(rigs):
    """vp_interrupt: read-and-clear the ISR, vring_interrupt on every queue.  An RX
    entry the device published without interrupting is found by the scan of a TX
    completion's interrupt; a queue without new entries is IRQ_NONE."""
    rig = rigs(MODERN, size=64, interrupts="intx", tx_pps=1000, tx_sizes=128, tx_frames=1)
    g = rig.guest
    g.start()
    rig.run_us(10)
    frame = stream_frames(Stream(SizeDist.fixed(128)), 1)[0]
    rx = g.layout[0]
    rig.mem.view[rx.bufs:rx.bufs + 12] = bytes(10) + (1).to_bytes(2, "little")
    rig.mem.view[rx.bufs + 12:rx.bufs + 12 + len(frame)] = frame
    rig.dev.write_used(0, [(0, 12 + len(frame))], interrupt=False)
    rig.dev.queues[0].last_avail = 1
    rig.run_us(900)                           # no interrupt: nobody looks
    assert g.rx_counts().frames == 0 and g.intx_interrupts == 0
    rig.run_us(200)                           # the guest's first frame leaves at 1 ms
    assert g.tx_frames() == 1 and rig.dev.queues[1].interrupts == 1
    assert g.rx_counts().good == 1 and g.intx_interrupts == 1
    assert g.queues[0].handled == 1 and g.queues[1].handled == 1
    assert g.isr == 0
    rig.run_us(100)
    assert g.errors == [] and rig.dev.errors == []


def test_tx_reaps_on_the_last_packet_with_enable_cb_delayed(rigs):
    """start_xmit: the last packet of a batch re-arms TX interrupts 3/4 of the chains
    outstanding ahead (enable_cb_delayed)."""
    rig = rigs(MODERN, size=256, tx_rate_gbps=100, tx_sizes=256, tx_frames=9, tx_batch=9)
    rig.dev.set_kick_every(1, 1 << 15)
    rig.guest.start()
    rig.run_us(5)
    assert rig.guest.tx_frames() == 9
    # before the 9th packet: 8 outstanding -> used_event = 0 + 8 * 3/4
    assert used_event(rig, 1) == 6
