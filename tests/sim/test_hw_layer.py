"""The driver's register layer (ifcvf.hw) against the independently written model.

Every wait has a timeout: a reset or a queue stop that never completes is an
error naming what was awaited, and simulated time shows the bound was kept.
"""
import os

import pytest

from hal.memory import HostMemory
from hal.sim import SimFunction
from ifcvf import ids
from ifcvf.hw import HwError, IfcvfHw, QueueConfig, Timeouts
from ifcvf.tools.runs.bringup import GUEST_FEATURES
from ifcvf.vring import split_ring_layout
from sim.config import IfcvfConfig
from sim.ifcvf import IfcvfFunction
from sim.world import World


def make(config=None, timeouts=Timeouts()):
    world = World(5)
    model = IfcvfFunction(world, config or IfcvfConfig(queue_pairs=2))
    fn = SimFunction(model)
    return world, model, fn, IfcvfHw(fn, timeouts)


@pytest.fixture
def ram():
    mem = HostMemory(4 << 20, "guest")
    yield mem
    mem.close()


def queues(n, size=256, base_index=0):
    out, base = [], 0x1_0000
    for q in range(n):
        desc, avail, used, base = split_ring_layout(base, size)
        index = base_index + q if base_index else 0
        out.append(QueueConfig(q, size, desc, avail, used, last_avail=index, last_used=index,
                               vector=1 + q))
    return out


def test_identity_capabilities_and_config():
    world, model, fn, hw = make()
    assert fn.ids.vendor == 0x1AF4 and fn.ids.device == 0x1041
    assert (fn.ids.subsystem_vendor, fn.ids.subsystem_device) == (0x8086, 0x001A)
    assert fn.ids.class_code == 0x020000
    assert hw.has_lm_block and hw.queue_pairs == 2 and hw.num_queues == 5
    cfg = hw.net_config()
    assert cfg.max_virtqueue_pairs == 2 and cfg.mtu == 1500 and len(cfg.mac) == 6


def test_start_programs_every_queue_and_stop_reads_ring_state(ram):
    world, model, fn, hw = make()
    fn.dma_map(0, ram, 0, ram.size)
    qs = queues(4, base_index=40)
    features = hw.start(GUEST_FEATURES, qs, mq_pairs=2)
    assert features == (GUEST_FEATURES & model.config.device_features) | ids.bit(ids.Feature.ACCESS_PLATFORM)
    assert model.driver_features == features
    assert model.status == ids.Status.ACKNOWLEDGE | ids.Status.DRIVER | ids.Status.FEATURES_OK | ids.Status.DRIVER_OK
    for q in qs:
        state = model.queue(q.index)
        assert (state.desc, state.avail, state.used, state.size, state.msix_vector) == \
            (q.desc, q.avail, q.used, q.size, q.vector)
    assert model.lm.mq == 2
    states = hw.stop([q.index for q in qs])
    assert {i: (s.last_avail, s.last_used) for i, s in states.items()} == {q.index: (40 + q.index,) * 2 for q in qs}
    assert model.status == 0


def test_driver_reports_refused_features_ok():
    world, model, fn, hw = make(IfcvfConfig(queue_pairs=1, require_access_platform=True,
                                            device_features=IfcvfConfig().device_features
                                            & ~ids.bit(ids.Feature.ACCESS_PLATFORM)))
    with pytest.raises(HwError, match="refused FEATURES_OK"):
        hw.start(GUEST_FEATURES, [])
    assert model.status & ids.Status.FAILED


def test_reset_that_never_completes_times_out():
    timeouts = Timeouts(reset_ns=2_000_000)
    world, model, fn, hw = make(IfcvfConfig(queue_pairs=1, reset_never_completes=True), timeouts)
    hw.start(GUEST_FEATURES, [])  # status 0 at power-on: the first reset is immediate
    start = world.now_ns()
    with pytest.raises(HwError, match="reset did not complete"):
        hw.reset()
    waited = world.now_ns() - start
    assert 2_000_000 <= waited < 2_100_000  # bounded by the timeout, in simulated time


def test_queue_stop_that_never_acknowledges_times_out(ram):
    timeouts = Timeouts(queue_stop_ns=1_000_000)
    world, model, fn, hw = make(IfcvfConfig(queue_pairs=1, stop_never_acks=True), timeouts)
    fn.dma_map(0, ram, 0, ram.size)
    hw.start(GUEST_FEATURES, queues(2))
    with pytest.raises(HwError, match="never reported disabled"):
        hw.stop([0, 1])


def test_ring_state_is_read_only_after_the_handshake(ram):
    """Skipping the wait would read the stale latched word: the model keeps it stale."""
    world, model, fn, hw = make()
    fn.dma_map(0, ram, 0, ram.size)
    hw.start(GUEST_FEATURES, queues(2, base_index=3))
    model.queue(0).last_avail = model.queue(0).last_used = 9  # progress an engine would make
    state = hw.stop_queue(0)
    assert (state.last_avail, state.last_used) == (9, 9)


def test_refused_queue_size_and_vector_are_errors(ram):
    world, model, fn, hw = make(IfcvfConfig(queue_pairs=1, max_queue_size=256))
    fn.dma_map(0, ram, 0, ram.size)
    with pytest.raises(HwError, match="refused size 512"):
        hw.start(GUEST_FEATURES, queues(1, size=512))
    bad_vector = [QueueConfig(0, 256, 0x1_0000, 0x2_0000, 0x3_0000, vector=40)]
    with pytest.raises(HwError, match="refused MSI-X vector 40"):
        hw.start(GUEST_FEATURES, bad_vector)


def test_logging_registers(ram):
    world, model, fn, hw = make()
    hw.enable_logging(ids.IOVA_LOG_BASE, 4096)
    assert model.lm.logging_enabled and model.lm.log_range() == (ids.IOVA_LOG_BASE, ids.IOVA_LOG_BASE + 4096)
    assert hw.logging_enabled()
    hw.disable_logging()
    assert not model.lm.logging_enabled


def test_kick_reaches_the_queue_doorbell(ram):
    world, model, fn, hw = make()
    fn.dma_map(0, ram, 0, ram.size)
    hw.start(GUEST_FEATURES, queues(4))
    offset = hw.notify_offset(3)
    hw.kick(3, offset)
    world.advance_ns(1_000)
    assert model.queue(3).doorbells == 1 and model.doorbell_mismatches == 0


def test_config_generation_change_is_retried():
    world, model, fn, hw = make()
    reads = {"n": 0}
    original = model.mmio_read

    def flaky(bar, offset, width):
        # Change the link state once, in the middle of the first read-through.
        if bar == hw.caps.device.bar and offset == hw.caps.device.offset + 6 and reads["n"] == 0:
            reads["n"] += 1
            model.set_link(False)
        return original(bar, offset, width)

    model.mmio_read = flaky
    cfg = hw.net_config()
    assert reads["n"] == 1
    assert not cfg.status & 1  # the retried read saw the new link state


def test_qemu_layout_has_no_lm_block_and_no_stop_command(ram):
    world, model, fn, hw = make(IfcvfConfig.qemu_virtio_net(queue_pairs=1))
    assert not hw.has_lm_block and "virtio configuration structures" in hw.lm_absent_reason
    fn.dma_map(0, ram, 0, ram.size)
    features = hw.start(GUEST_FEATURES, queues(2, base_index=0))
    assert features >> ids.Feature.ACCESS_PLATFORM & 1  # accepted towards the device
    states = hw.stop([0, 1])
    assert states == {0: None, 1: None}
    assert not model.needs_reset  # queue_enable = 0 was never written
    with pytest.raises(HwError, match="always starts its rings at index 0"):
        hw.start(GUEST_FEATURES, queues(2, base_index=5))


def test_msix_vectors_routed_through_the_hal(ram):
    world, model, fn, hw = make()
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
    try:
        fn.set_msix(fds)
        model.raise_queue_interrupt(1)  # no vector programmed for the queue yet
        fn.dma_map(0, ram, 0, ram.size)
        hw.start(GUEST_FEATURES, queues(2))
        model.raise_queue_interrupt(1)
        world.advance_ns(10_000)
        assert os.eventfd_read(fds[2]) == 1
        fn.set_msix([])
        model.raise_queue_interrupt(1)
        world.advance_ns(10_000)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fds[2])
    finally:
        for fd in fds:
            os.close(fd)
