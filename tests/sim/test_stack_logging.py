"""Dirty logging through the whole stack, in both migration modes, under traffic.

Every page of an RX buffer that changed while logging was on must be in the
vhost log (the VF's own logging, or the software relay's), every frame must
reach the guest exactly once, and cancelling (LOG_ALL cleared) must leave
nothing behind.
"""
import pytest

from hal.memory import HostMemory
from ifcvf import ids
from ifcvf.tools.runs.stack import SimHost, Vm, cable
from sim.config import IfcvfConfig
from ifcvf.vhost.protocol import log_size
from sim.migration import DirtyLogReader
from sim.traffic import Generator, Sink, steer_by_flow

US = 1_000
PAGE = 4096


def rx_buffer_pages(vm) -> set[int]:
    pages = set()
    for lay in vm.guest.layout:
        if not lay.is_tx:
            pages |= set(range(lay.bufs // PAGE, -(-(lay.bufs + lay.nslots * lay.buf_size) // PAGE)))
    return pages


def rx_dropped_by_vf(vf) -> int:
    return sum(q["dropped"] for q in vf.model.datapath.stats()["queues"].values() if q["kind"] == "rx")


def assert_delivered(vf, vm, gen, sink):
    """Every frame exactly once and in order, except frames the VF itself dropped
    (they arrived while an RX queue was paused for a switch); those are counted
    and must be exactly the ones missing."""
    rx, tx = vm.guest.rx_counts(), sink.counts()
    dropped = rx_dropped_by_vf(vf)
    assert rx.frames + dropped == gen.frames, (rx.as_dict(), dropped, gen.frames)
    assert rx.lost == dropped and not (rx.duplicates or rx.out_of_order or rx.corrupted), rx.as_dict()
    if not vf.driver.devargs.sw_live_migration:
        assert dropped == 0
    # Only frames that arrived while an RX queue was paused for the switch.
    stats = [q for q in vf.model.datapath.stats()["queues"].values() if q["kind"] == "rx"]
    assert sum(q["not_running_drops"] for q in stats) == dropped
    assert tx.frames == vm.guest.tx_frames() and tx.clean, tx.as_dict()


def changed_pages(before: bytes, ram) -> set[int]:
    now = ram.view
    return {p for p in range(len(before) // PAGE)
            if before[p * PAGE:(p + 1) * PAGE] != now[p * PAGE:(p + 1) * PAGE]}


@pytest.fixture(params=["vdpa=1", "vdpa=1,sw-live-migration=1"], ids=["hw", "sw"])
def stack(request):
    host = SimHost(seed=21)
    vf = host.add_vf(IfcvfConfig(queue_pairs=2), devargs=request.param)
    vm = Vm(host, pairs=2, queue_size=256, tx_rate_gbps=10, tx_sizes=1518, tx_flows=2, rx_flows=8)
    fe = vm.plug(vf)
    tester = cable(host.world, vf)
    vf.model.datapath.steer = steer_by_flow([0, 1])
    sink = Sink(host.world, tester, flows=4, flow_base=vm.guest.tx_flow_base)
    gen = Generator(host.world, tester, 1518, rate_gbps=30, burst=32, flows=8, flow_run=32)
    log = HostMemory(4 * PAGE, "vhost-log")
    yield host, vf, vm, fe, sink, gen, log
    host.close()
    log.close()


def start_logging(stack, warmup_us: float) -> DirtyLogReader:
    """Traffic on, then QEMU's SET_LOG_BASE and LOG_ALL; the reader takes the log as QEMU does."""
    host, vf, vm, fe, sink, gen, log = stack
    vm.guest.start()
    gen.start()
    host.world.advance_ns(warmup_us * US)
    fe.set_log_base(log.fd, log_size(vm.ram.size))
    reader = DirtyLogReader(log, log_size(vm.ram.size))
    fe.set_log_all(True, vm.rings)
    return reader


def test_every_page_the_vf_wrote_is_logged(stack):
    host, vf, vm, fe, sink, gen, log = stack
    reader = start_logging(stack, 200)
    mode = vf.driver.mode
    assert mode == ("sw-relay" if vf.driver.devargs.sw_live_migration else "hw-logging")
    reader.fetch_and_clear()
    before = bytes(vm.ram.view)
    host.world.advance_ns(500 * US)
    logged = reader.fetch_and_clear()
    written = changed_pages(before, vm.ram) & rx_buffer_pages(vm)
    assert written, "traffic must have written RX buffers"
    assert written <= logged, sorted(written - logged)[:10]
    gen.stop()
    vm.guest.stop_tx()
    host.world.advance_ns(300 * US)
    assert_delivered(vf, vm, gen, sink)


def test_cancelled_migration_leaves_nothing_behind(stack):
    host, vf, vm, fe, sink, gen, log = stack
    guest_maps = list(vf.model.iommu.mappings())
    vm.guest.start()
    gen.start()
    host.world.advance_ns(100 * US)
    fe.set_log_base(log.fd, log_size(vm.ram.size))
    fe.set_log_all(True, vm.rings)
    assert len(vf.model.iommu.mappings()) > len(guest_maps)  # the log or the mediated rings
    host.world.advance_ns(200 * US)
    fe.set_log_all(False, vm.rings)
    assert vf.driver.mode == "direct"
    assert vf.model.iommu.mappings() == guest_maps
    assert not vf.model.lm.logging_enabled
    host.world.advance_ns(200 * US)
    gen.stop()
    vm.guest.stop_tx()
    host.world.advance_ns(300 * US)
    assert_delivered(vf, vm, gen, sink)


def test_stop_while_logging_marks_used_rings_and_reports_bases(stack):
    host, vf, vm, fe, sink, gen, log = stack
    reader = start_logging(stack, 100)
    host.world.advance_ns(200 * US)
    vm.guest.pause()
    gen.stop()
    reader.fetch_and_clear()
    bases = fe.stop(vm.rings)
    logged = reader.fetch_and_clear()
    for q, ring in enumerate(vm.rings):
        assert ring.used // PAGE in logged, f"used ring of vring {q} not marked at stop"
        assert bases[q] == vm.guest.ring_indexes(q)[1]
    assert vf.model.iommu.mappings() == []


def test_hostile_entry_breaks_only_its_relayed_queue():
    """A used entry naming a descriptor outside the ring: the relay refuses it, touches
    nothing, reports the queue broken; the VF and the other queues keep going."""
    host = SimHost(seed=23)
    vf = host.add_vf(IfcvfConfig(queue_pairs=2), devargs="vdpa=1,sw-live-migration=1")
    vm = Vm(host, pairs=2, queue_size=256, tx_rate_gbps=5, tx_sizes=1518, tx_flows=2, rx_flows=8)
    fe = vm.plug(vf)
    tester = cable(host.world, vf)
    sink = Sink(host.world, tester, flows=4, flow_base=vm.guest.tx_flow_base)
    log = HostMemory(4 * PAGE, "vhost-log")
    try:
        fe.set_log_base(log.fd, log_size(vm.ram.size))
        fe.set_log_all(True, vm.rings)
        vm.guest.start()
        host.world.advance_ns(50 * US)
        sw = vf.driver.running.sw
        ring = sw.rings[0]
        guest_used = vm.guest.ring_indexes(0)[1]
        ring.put_used(ring.used_idx, 4096, 64)          # id far outside a 256-entry ring
        ring.used_idx = ring.used_idx + 1
        host.world.signal_fd(sw.intr_fds[0])              # as the VF's MSI-X would
        host.world.advance_ns(50 * US)
        broken = vf.driver.broken_vrings()
        assert list(broken) == [0] and "descriptor" in broken[0].lower(), broken
        assert vm.guest.ring_indexes(0)[1] == guest_used  # nothing published for it
        before = sink.counts().frames
        host.world.advance_ns(300 * US)
        assert sink.counts().frames > before               # TX keeps flowing
        assert vf.driver.mode == "sw-relay" and not vf.model.needs_reset
    finally:
        host.close()
        log.close()
