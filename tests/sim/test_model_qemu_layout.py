"""Layout "qemu": QEMU 7.2 virtio-net-pci, disable-legacy=on, iommu_platform=on."""
import os

from sim.config import IfcvfConfig
from sim.ifcvf import IfcvfFunction
from sim.world import World

BAR = 4
STATUS, GFSELECT, GF, Q_SELECT, Q_SIZE, Q_ENABLE, Q_NOTIFY_OFF = (
    0x14, 0x08, 0x0C, 0x16, 0x18, 0x1C, 0x1E)
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET = 1, 2, 4, 8, 0x40


def make():
    world = World(9)
    return world, IfcvfFunction(world, IfcvfConfig.qemu_virtio_net())


def negotiate(fn, high):
    fn.mmio_write(BAR, STATUS, 1, ACK | DRIVER)
    fn.mmio_write(BAR, GFSELECT, 4, 1)
    fn.mmio_write(BAR, GF, 4, high)
    fn.mmio_write(BAR, STATUS, 1, ACK | DRIVER | FEATURES_OK)
    return fn.mmio_read(BAR, STATUS, 1)


def test_bars_and_no_lm_block():
    _, fn = make()
    assert fn.lm is None
    assert fn.bar_size(4) == 0x4000 and fn.bar_size(1) == 0x1000
    assert fn.bar_size(0) is None and fn.bar_size(2) is None
    assert fn.mmio_read(BAR, 0x12, 2) == 9  # num_queues in BAR 4
    assert fn.mmio_read(BAR, 0x2000 + 10, 2) == 1500  # mtu in the device page
    assert "live-migration" not in fn.layout.describe()


def test_access_platform_is_required():
    _, fn = make()
    assert not negotiate(fn, 0x1) & FEATURES_OK         # VERSION_1 only
    assert negotiate(fn, 0x3) & FEATURES_OK             # + ACCESS_PLATFORM


def test_doorbells_four_bytes_apart_in_bar4():
    world, fn = make()
    for q in range(9):
        fn.mmio_write(BAR, Q_SELECT, 2, q)
        assert fn.mmio_read(BAR, Q_NOTIFY_OFF, 2) == q
        fn.mmio_write(BAR, 0x3000 + 4 * q, 2, q)
    world.advance(world.cycles(200) + 1)
    assert [fn.queue(q).doorbells for q in range(9)] == [1] * 9


def test_msix_table_in_bar1():
    world, fn = make()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        fn.msix.host_enable([fd])
        assert fn.mmio_read(1, 0x0C, 4) & 1 == 0  # entry 0 unmasked
        fn.mmio_write(1, 0x0C, 4, 1)
        fn.msix.fire(0)
        world.advance(world.cycles(500) + 1)
        assert fn.mmio_read(1, 0x800, 4) == 1  # PBA at 0x800
    finally:
        os.close(fd)


def test_queue_enable_zero_is_a_driver_error():
    _, fn = make()
    negotiate(fn, 0x3)
    fn.mmio_write(BAR, Q_SELECT, 2, 0)
    fn.mmio_write(BAR, Q_ENABLE, 2, 1)
    fn.mmio_write(BAR, STATUS, 1, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    fn.mmio_write(BAR, Q_ENABLE, 2, 0)
    assert fn.mmio_read(BAR, STATUS, 1) & NEEDS_RESET
    assert fn.errors == ["wrong value for queue_enable 0"]
    assert fn.mmio_read(BAR, Q_ENABLE, 2) == 1, "no stop command in QEMU"
    assert not fn.queue(0).stopping


def test_reset_is_immediate():
    _, fn = make()
    negotiate(fn, 0x3)
    fn.mmio_write(BAR, STATUS, 1, 0)
    assert fn.mmio_read(BAR, STATUS, 1) == 0


def test_queue_size_max_is_256():
    _, fn = make()
    fn.mmio_write(BAR, Q_SELECT, 2, 0)
    assert fn.mmio_read(BAR, Q_SIZE, 2) == 256
    fn.mmio_write(BAR, Q_SIZE, 2, 512)
    assert fn.mmio_read(BAR, Q_SIZE, 2) == 256
