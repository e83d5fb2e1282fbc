"""Traffic through the whole stack: QEMU role -> vhost-user -> back-end -> driver -> HAL -> VF.

Every frame is checked end to end (flow, sequence, every payload byte) in
both directions: generator -> wire -> VF RX -> guest, and guest -> VF TX ->
wire -> sink.
"""
import pytest

from ifcvf.tools.runs.stack import SimHost, Vm, cable
from sim.config import IfcvfConfig
from sim.frontend import DPDK_VIRTIO_USER, QEMU_7_2
from sim.traffic import Generator, Sink, steer_by_flow

US = 1_000


def setup(pairs, *, style=QEMU_7_2, status=True, rate=20.0, size=1518, seed=7, enabled_pairs=None):
    host = SimHost(seed=seed)
    vf = host.add_vf(IfcvfConfig(queue_pairs=pairs))
    vm = Vm(host, pairs=pairs, queue_size=256, tx_rate_gbps=rate, tx_sizes=size, tx_flows=2,
            rx_flows=4 * pairs)
    fe = vm.plug(vf, style=style, status=status, enabled_pairs=enabled_pairs)
    tester = cable(host.world, vf)
    active = list(range(pairs if enabled_pairs is None else enabled_pairs))
    vf.model.datapath.steer = steer_by_flow(active)
    sink = Sink(host.world, tester, flows=2 * pairs, flow_base=vm.guest.tx_flow_base)
    gen = Generator(host.world, tester, size, rate_gbps=rate, burst=32, flows=4 * pairs, flow_run=32)
    return host, vf, vm, fe, sink, gen, active


def drain(host, gen, vm, us=300):
    gen.stop()
    vm.guest.stop_tx()
    host.world.advance_ns(us * US)


def assert_clean(vm, gen, sink):
    rx, tx = vm.guest.rx_counts(), sink.counts()
    assert rx.frames == gen.frames > 0, (rx.as_dict(), gen.frames)
    assert tx.frames == vm.guest.tx_frames() > 0, (tx.as_dict(), vm.guest.tx_frames())
    assert rx.clean and tx.clean, (rx.as_dict(), tx.as_dict())
    assert not vm.guest.errors


@pytest.mark.parametrize("pairs, style, status", [(1, QEMU_7_2, True), (4, QEMU_7_2, False),
                                                  (4, DPDK_VIRTIO_USER, True)])
def test_traffic_both_ways(pairs, style, status):
    host, vf, vm, fe, sink, gen, _ = setup(pairs, style=style, status=status)
    try:
        assert vf.backend.configured
        vm.guest.start()
        gen.start()
        host.world.advance_ns(1_000 * US)
        drain(host, gen, vm)
        assert_clean(vm, gen, sink)
        assert not vf.model.errors
    finally:
        host.close()


def test_queue_pairs_change_while_traffic_flows():
    """The guest's ethtool -L: pairs stop and start, nothing is lost or repeated."""
    host, vf, vm, fe, sink, gen, active = setup(4, enabled_pairs=2)
    try:
        vm.guest.start()
        gen.start()
        host.world.advance_ns(300 * US)
        active[:] = [0, 1, 2, 3]
        fe.set_queue_pairs(vm.rings, 4)
        host.world.advance_ns(300 * US)
        active[:] = [0]
        fe.set_queue_pairs(vm.rings, 1)
        host.world.advance_ns(300 * US)
        active[:] = [0, 1, 2, 3]
        fe.set_queue_pairs(vm.rings, 4)   # TX frames queued on stopped pairs go out now
        host.world.advance_ns(300 * US)
        drain(host, gen, vm)
        assert_clean(vm, gen, sink)
        assert vf.model.lm.mq == 4
    finally:
        host.close()


def test_vring_base_after_traffic_matches_the_rings():
    host, vf, vm, fe, sink, gen, _ = setup(1)
    try:
        vm.guest.start()
        gen.start()
        host.world.advance_ns(500 * US)
        drain(host, gen, vm)
        bases = fe.stop(vm.rings)
        for q in range(2):
            avail, used = vm.guest.ring_indexes(q)
            assert bases[q] == used, (q, bases, avail, used)
    finally:
        host.close()
