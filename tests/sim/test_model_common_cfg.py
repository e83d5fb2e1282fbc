"""Virtio common configuration, device config and ISR of the simulated IFCVF.

Register offsets are the virtio 1.x ones (reference 1.3), written out here.
"""
import pytest

from sim.config import IfcvfConfig
from sim.ifcvf import IfcvfFunction
from sim.world import World

DFSELECT, DF, GFSELECT, GF = 0x00, 0x04, 0x08, 0x0C
MSIX_CONFIG, NUM_QUEUES, STATUS, GENERATION = 0x10, 0x12, 0x14, 0x15
Q_SELECT, Q_SIZE, Q_VECTOR, Q_ENABLE, Q_NOTIFY_OFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
Q_DESC, Q_AVAIL, Q_USED = 0x20, 0x28, 0x30
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 0x40, 0x80
VERSION_1, ACCESS_PLATFORM = 1 << 32, 1 << 33
ISR_BAR_OFFSET, DEVICE_BAR_OFFSET = 0x1000, 0x2000


class Dev:
    """Exact-width register access to the common config in BAR 0."""

    def __init__(self, **kw):
        self.world = World(3)
        self.fn = IfcvfFunction(self.world, IfcvfConfig(**kw))

    def r(self, off, w, bar=0):
        return self.fn.mmio_read(bar, off, w)

    def w(self, off, w, value, bar=0):
        self.fn.mmio_write(bar, off, w, value)

    def device_features(self):
        self.w(DFSELECT, 4, 0)
        low = self.r(DF, 4)
        self.w(DFSELECT, 4, 1)
        return low | self.r(DF, 4) << 32

    def write_features(self, features):
        self.w(GFSELECT, 4, 0)
        self.w(GF, 4, features & 0xFFFF_FFFF)
        self.w(GFSELECT, 4, 1)
        self.w(GF, 4, features >> 32)

    def add_status(self, bit):
        self.w(STATUS, 1, self.r(STATUS, 1) | bit)
        return self.r(STATUS, 1)

    def negotiate(self, features=None):
        features = self.device_features() if features is None else features
        self.add_status(ACK)
        self.add_status(DRIVER)
        self.write_features(features)
        return self.add_status(FEATURES_OK)

    def advance_ns(self, ns):
        # World.run_until(t) leaves events due exactly at t unprocessed, so
        # step one cycle past the deadline.
        self.world.advance(self.world.cycles(ns) + 1)

    def trace(self, event):
        return self.world.trace.find(event)


def test_feature_windows():
    d = Dev()
    assert d.device_features() == d.fn.config.device_features
    d.w(DFSELECT, 4, 2)
    assert d.r(DF, 4) == 0
    d.w(DF, 4, 0xFFFF_FFFF)  # read-only
    d.w(DFSELECT, 4, 0)
    assert d.r(DF, 4) == d.fn.config.device_features & 0xFFFF_FFFF


def test_guest_features_read_back_and_other_selects_are_ignored():
    d = Dev()
    d.write_features(VERSION_1 | 1 << 5)
    d.w(GFSELECT, 4, 0)
    assert d.r(GF, 4) == 1 << 5
    d.w(GFSELECT, 4, 1)
    assert d.r(GF, 4) == 1
    d.w(GFSELECT, 4, 2)
    d.w(GF, 4, 0xFFFF_FFFF)
    assert d.r(GF, 4) == 0
    assert d.fn.driver_features == VERSION_1 | 1 << 5
    assert d.trace("guest_feature_select_invalid")


def test_features_ok_accepted_for_a_subset():
    d = Dev()
    status = d.negotiate(VERSION_1 | 1 << 5)
    assert status == ACK | DRIVER | FEATURES_OK


def test_features_ok_refused_for_features_not_offered():
    d = Dev()
    status = d.negotiate(d.device_features() | 1 << 34)  # RING_PACKED is not offered
    assert status == ACK | DRIVER
    assert not status & FEATURES_OK
    assert "not_offered" in d.trace("features_ok_refused")[0]


def test_access_platform_not_required_by_default():
    d = Dev()
    assert d.negotiate(VERSION_1) & FEATURES_OK


def test_access_platform_required_when_configured():
    d = Dev(require_access_platform=True)
    assert not d.negotiate(VERSION_1) & FEATURES_OK
    d.write_features(VERSION_1 | ACCESS_PLATFORM)
    assert d.add_status(FEATURES_OK) & FEATURES_OK


def test_feature_writes_after_features_ok_are_ignored():
    d = Dev()
    d.negotiate(VERSION_1)
    d.write_features(0)
    assert d.fn.driver_features == VERSION_1
    assert d.trace("features_after_features_ok")


def test_driver_ok_needs_features_ok():
    d = Dev()
    d.add_status(ACK)
    d.add_status(DRIVER)
    assert not d.add_status(DRIVER_OK) & DRIVER_OK
    assert d.trace("driver_ok_refused")


def test_status_bits_can_only_be_added():
    d = Dev()
    d.negotiate(VERSION_1)
    d.w(STATUS, 1, ACK)  # would clear DRIVER and FEATURES_OK
    assert d.r(STATUS, 1) == ACK | DRIVER | FEATURES_OK
    assert d.trace("status_clear_refused")
    d.w(STATUS, 1, d.r(STATUS, 1) | NEEDS_RESET | 0x30)  # device-only and reserved bits
    assert d.r(STATUS, 1) == ACK | DRIVER | FEATURES_OK
    assert d.add_status(FAILED) & FAILED


def test_reset_takes_reset_ns_and_restores_defaults():
    d = Dev()
    d.negotiate(VERSION_1)
    d.w(MSIX_CONFIG, 2, 0)
    d.w(Q_SELECT, 2, 3)
    d.w(Q_SIZE, 2, 256)
    d.w(Q_VECTOR, 2, 4)
    d.w(Q_DESC, 4, 0x1000)
    d.w(STATUS, 1, 0)
    assert d.fn.resetting
    d.advance_ns(49_000)
    assert d.r(STATUS, 1) != 0, "reset still in progress"
    d.w(Q_SIZE, 2, 128)  # ignored while resetting
    assert d.trace("write_during_reset")
    d.advance_ns(1_000)
    assert d.r(STATUS, 1) == 0
    assert d.fn.driver_features == 0 and d.r(MSIX_CONFIG, 2) == 0xFFFF
    assert d.r(Q_SELECT, 2) == 0
    q = d.fn.queue(3)
    assert (q.size, q.msix_vector, q.desc, q.enabled) == (1024, 0xFFFF, 0, False)


def test_reset_never_completes():
    d = Dev(reset_never_completes=True)
    d.add_status(ACK)
    d.w(STATUS, 1, 0)
    d.advance_ns(10_000_000)
    assert d.r(STATUS, 1) == ACK
    assert d.fn.resetting


def test_reset_of_an_untouched_device_is_immediate():
    d = Dev(reset_never_completes=True)
    d.w(STATUS, 1, 0)
    assert d.r(STATUS, 1) == 0 and not d.fn.resetting


def test_msix_config_vector():
    d = Dev()
    assert d.r(MSIX_CONFIG, 2) == 0xFFFF
    d.w(MSIX_CONFIG, 2, 9)
    assert d.r(MSIX_CONFIG, 2) == 9
    d.w(MSIX_CONFIG, 2, 10)  # table has 10 entries: 0..9
    assert d.r(MSIX_CONFIG, 2) == 0xFFFF
    assert d.trace("vector_refused")


def test_num_queues_and_notify_off_are_read_only():
    d = Dev(queue_pairs=2)
    assert d.r(NUM_QUEUES, 2) == 5
    d.w(NUM_QUEUES, 2, 7)
    assert d.r(NUM_QUEUES, 2) == 5
    for q in range(5):
        d.w(Q_SELECT, 2, q)
        assert d.r(Q_NOTIFY_OFF, 2) == q
        d.w(Q_NOTIFY_OFF, 2, 0)
        assert d.r(Q_NOTIFY_OFF, 2) == q


@pytest.mark.parametrize("bad", [0, 3, 1000, 2048, 0xFFFF])
def test_invalid_queue_sizes_are_refused(bad):
    d = Dev()
    d.w(Q_SELECT, 2, 1)
    assert d.r(Q_SIZE, 2) == 1024
    d.w(Q_SIZE, 2, 256)
    d.w(Q_SIZE, 2, bad)
    assert d.r(Q_SIZE, 2) == 256
    assert d.trace("queue_size_refused")


def test_valid_queue_sizes():
    d = Dev()
    d.w(Q_SELECT, 2, 0)
    for size in (1, 2, 64, 1024):
        d.w(Q_SIZE, 2, size)
        assert d.r(Q_SIZE, 2) == size


def test_queue_vectors():
    d = Dev()
    d.w(Q_SELECT, 2, 2)
    assert d.r(Q_VECTOR, 2) == 0xFFFF
    d.w(Q_VECTOR, 2, 3)
    assert d.r(Q_VECTOR, 2) == 3
    d.w(Q_VECTOR, 2, 10)
    assert d.r(Q_VECTOR, 2) == 0xFFFF
    assert d.fn.queue(2).msix_vector == 0xFFFF


def test_queue_addresses_lo_hi():
    d = Dev()
    d.w(Q_SELECT, 2, 4)
    for off, value in ((Q_DESC, 0x1_2345_6000), (Q_AVAIL, 0x2_0000_1000), (Q_USED, 0xABC0_0000)):
        d.w(off, 4, value & 0xFFFF_FFFF)
        d.w(off + 4, 4, value >> 32)
        assert d.r(off, 4) | d.r(off + 4, 4) << 32 == value
    q = d.fn.queue(4)
    assert (q.desc, q.avail, q.used) == (0x1_2345_6000, 0x2_0000_1000, 0xABC0_0000)


def test_absent_queue_select():
    d = Dev()
    d.w(Q_SELECT, 2, 9)  # queues are 0..8
    assert d.r(Q_SIZE, 2) == 0
    assert d.r(Q_ENABLE, 2) == 0
    d.w(Q_SIZE, 2, 64)
    d.w(Q_ENABLE, 2, 1)
    d.w(Q_DESC, 4, 0x1000)
    d.w(Q_VECTOR, 2, 1)
    assert d.r(Q_SIZE, 2) == 0 and d.r(Q_DESC, 4) == 0
    assert len(d.trace("absent_queue_write")) == 4
    assert all(not d.fn.queue(q).enabled for q in range(9))


def test_queue_configuration_is_frozen_while_enabled():
    d = Dev()
    d.w(Q_SELECT, 2, 0)
    d.w(Q_SIZE, 2, 256)
    d.w(Q_DESC, 4, 0x4000)
    d.w(Q_ENABLE, 2, 1)
    assert d.r(Q_ENABLE, 2) == 1
    d.w(Q_SIZE, 2, 128)
    d.w(Q_DESC, 4, 0x8000)
    assert d.r(Q_SIZE, 2) == 256 and d.r(Q_DESC, 4) == 0x4000
    d.w(Q_VECTOR, 2, 1)  # vectors may change at any time (DPDK's stop clears them)
    assert d.r(Q_VECTOR, 2) == 1


def test_narrow_reads_compose_and_wide_writes_across_registers_are_ignored():
    d = Dev()
    d.add_status(ACK)
    d.w(Q_SELECT, 2, 5)
    assert d.r(STATUS, 4) == ACK | 0 << 8 | 5 << 16  # status, generation, queue_select
    assert d.r(NUM_QUEUES + 1, 1) == 0 and d.r(NUM_QUEUES, 1) == 9
    d.w(STATUS, 4, 0x0007_0000)
    assert d.r(Q_SELECT, 2) == 5
    assert d.trace("common_write_unassigned")
    d.w(Q_DESC, 2, 0x5000)  # a 16-bit half of a 32-bit register
    d.w(Q_DESC + 2, 2, 0x0001)
    assert d.r(Q_DESC, 4) == 0x0001_5000


def test_unassigned_offsets_read_zero_and_ignore_writes():
    d = Dev()
    for off in (0x38, 0x3C, 0x800, 0xFFC, 0x1004, 0x200C, 0x2FFC):
        assert d.r(off, 4) == 0
        d.w(off, 4, 0xFFFF_FFFF)
        assert d.r(off, 4) == 0
    assert d.trace("common_write_unassigned")


def test_device_config_bytes():
    d = Dev(mac=bytes.fromhex("0a1b2c3d4e5f"), mtu=9000, queue_pairs=3)
    assert bytes(d.r(DEVICE_BAR_OFFSET + i, 1) for i in range(6)) == bytes.fromhex("0a1b2c3d4e5f")
    assert d.r(DEVICE_BAR_OFFSET + 6, 2) == 1  # LINK_UP
    assert d.r(DEVICE_BAR_OFFSET + 8, 2) == 3
    assert d.r(DEVICE_BAR_OFFSET + 10, 2) == 9000
    assert d.r(DEVICE_BAR_OFFSET + 4, 4) == 0x5f4e | 1 << 16  # mac[4], mac[5], status
    d.w(DEVICE_BAR_OFFSET + 0, 1, 0xFF)  # read-only
    assert d.r(DEVICE_BAR_OFFSET, 1) == 0x0A


def test_set_link_changes_status_generation_and_interrupts():
    d = Dev()
    d.w(MSIX_CONFIG, 2, 0)
    generation = d.r(GENERATION, 1)
    d.fn.set_link(False)
    assert d.r(DEVICE_BAR_OFFSET + 6, 2) & 1 == 0
    assert d.r(GENERATION, 1) == (generation + 1) & 0xFF
    assert d.r(ISR_BAR_OFFSET, 1) == 0x2
    assert d.r(ISR_BAR_OFFSET, 1) == 0, "ISR read clears it"
    d.advance_ns(500)
    assert d.fn.msix.pending(0), "MSI-X not enabled yet: the vector is pending"
    d.fn.set_link(False)  # no change, nothing happens
    assert d.r(GENERATION, 1) == (generation + 1) & 0xFF


def test_isr_queue_bit_and_wide_read():
    d = Dev()
    d.fn.raise_queue_interrupt(0)
    d.fn.raise_config_interrupt()
    assert d.r(ISR_BAR_OFFSET, 4) == 0x3
    assert d.fn.isr_pending == 0
    d.w(ISR_BAR_OFFSET, 1, 3)  # writes do nothing
    assert d.fn.isr_pending == 0


def test_mark_needs_reset():
    d = Dev()
    d.negotiate(VERSION_1)
    d.fn.mark_needs_reset("descriptor loop in queue 1")
    assert d.r(STATUS, 1) & NEEDS_RESET
    assert d.fn.errors == ["descriptor loop in queue 1"]
    assert d.fn.isr_pending & 0x2
    assert "descriptor_loop_in_queue_1" in d.trace("needs_reset")[0]
    d.add_status(DRIVER_OK)  # the driver's read-modify-write keeps the bit
    assert d.r(STATUS, 1) & (NEEDS_RESET | DRIVER_OK) == NEEDS_RESET | DRIVER_OK
    d.w(STATUS, 1, 0)
    d.advance_ns(50_000)
    assert d.r(STATUS, 1) == 0


def test_memory_decode_off_reads_all_ones():
    d = Dev()
    d.fn.config_write(0x04, 2, 0)
    assert d.r(NUM_QUEUES, 2) == 0xFFFF
    d.w(STATUS, 1, ACK)
    assert d.fn.status == 0
    assert d.trace("mmio_decode_off")
    d.fn.config_write(0x04, 2, 0x2)
    assert d.r(NUM_QUEUES, 2) == 9


@pytest.mark.parametrize("bar,offset,width", [
    (1, 0, 4), (3, 0, 4), (5, 0, 4), (6, 0, 4), (0, 0x4000, 1), (0, 0x3FFE, 4),
    (0, 2, 4), (0, 1, 2), (0, 0, 8), (0, 0, 3), (4, -4, 4)])
def test_bad_mmio_accesses_are_caller_bugs(bar, offset, width):
    d = Dev()
    with pytest.raises(ValueError):
        d.fn.mmio_read(bar, offset, width)
    with pytest.raises(ValueError):
        d.fn.mmio_write(bar, offset, width, 0)


def test_values_that_do_not_fit_the_width_are_caller_bugs():
    d = Dev()
    with pytest.raises(ValueError):
        d.w(STATUS, 1, 0x100)
    with pytest.raises(ValueError):
        d.w(Q_SELECT, 2, -1)


def test_repeated_writes_to_an_address_are_checked_and_gated_every_time():
    """mmio_write remembers where an address decodes; the value check, the
    memory-decode gate and the region's own handling still run on every write."""
    d = Dev()
    for _ in range(2):
        d.w(0, 4, 7, bar=2)                 # a 4-byte write to a doorbell: not a kick
    assert len(d.trace("notify_unassigned")) == 2
    with pytest.raises(ValueError):
        d.w(0, 4, 1 << 32, bar=2)
    d.fn.config_write(0x04, 2, 0)           # memory decode off
    d.w(0, 4, 7, bar=2)
    assert len(d.trace("notify_unassigned")) == 2 and d.trace("mmio_decode_off")
    for _ in range(2):
        with pytest.raises(ValueError):
            d.w(1, 2, 0, bar=2)             # misaligned: a caller bug every time
