"""MSI-X table, PBA, masking and delivery to real eventfds."""
import os

import pytest

from sim.config import IfcvfConfig
from sim.ifcvf import IfcvfFunction
from sim.world import World

TABLE, PBA = 0x3000, 0x3800
MSIX_CONFIG, Q_SELECT, Q_VECTOR = 0x10, 0x16, 0x1A


@pytest.fixture
def eventfds():
    fds = []

    def make(n):
        for _ in range(n):
            fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        return fds[-n:]

    yield make
    for fd in fds:
        os.close(fd)


def drain(fd):
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class Dev:
    def __init__(self, **kw):
        self.world = World(5)
        self.fn = IfcvfFunction(self.world, IfcvfConfig(**kw))
        self.cap = [pos for pos, cap_id in self._caps() if cap_id == 0x11][0]

    def _caps(self):
        pos = self.fn.config_read(0x34, 1)
        while pos:
            yield pos, self.fn.config_read(pos, 1)
            pos = self.fn.config_read(pos + 1, 1)

    def control(self, enable=None, mask=None):
        value = self.fn.config_read(self.cap + 2, 2)
        if enable is not None:
            value = value | 0x8000 if enable else value & ~0x8000
        if mask is not None:
            value = value | 0x4000 if mask else value & ~0x4000
        self.fn.config_write(self.cap + 2, 2, value)

    def entry(self, vector, word):
        return self.fn.mmio_read(0, TABLE + 16 * vector + 4 * word, 4)

    def set_entry(self, vector, word, value):
        self.fn.mmio_write(0, TABLE + 16 * vector + 4 * word, 4, value)

    def pba(self):
        return self.fn.mmio_read(0, PBA, 4)

    def settle(self, ns=500):
        self.world.advance(self.world.cycles(ns) + 1)


def test_table_starts_masked_and_entries_read_back():
    d = Dev()
    for vector in range(10):
        assert d.entry(vector, 3) & 1 == 1
    d.set_entry(2, 0, 0xFEE0_1000)
    d.set_entry(2, 1, 0x1)
    d.set_entry(2, 2, 0x4041)
    d.set_entry(2, 3, 0xFFFF_FFFE)  # only the mask bit is writable
    assert [d.entry(2, w) for w in range(4)] == [0xFEE0_1000, 1, 0x4041, 0]
    assert d.fn.mmio_read(0, TABLE + 16 * 2 + 2, 2) == 0xFEE0
    assert d.fn.msix.entry(2) == (0x1_FEE0_1000, 0x4041, 0)
    assert d.fn.mmio_read(0, TABLE + 16 * 10, 4) == 0, "past the table"


def test_delivery_to_a_real_eventfd(eventfds):
    d = Dev()
    fd, = eventfds(1)
    d.fn.msix.bind(3, fd)
    d.set_entry(3, 3, 0)
    d.control(enable=True)
    d.fn.msix.fire(3)
    assert drain(fd) == 0, "the message takes msix_ns"
    d.settle()
    assert drain(fd) == 1
    assert d.fn.msix.delivered[3] == 1
    record = d.world.trace.find("msix_deliver")[0]
    assert "vector=3" in record and f"fd={fd}" not in record


def test_masked_entry_sets_pending_and_unmask_delivers(eventfds):
    d = Dev()
    fd, = eventfds(1)
    d.fn.msix.bind(1, fd)
    d.control(enable=True)
    d.fn.msix.fire(1)
    d.settle()
    assert drain(fd) == 0
    assert d.pba() == 1 << 1 and d.fn.msix.pending(1)
    d.set_entry(1, 3, 0)
    assert drain(fd) == 1
    assert d.pba() == 0 and d.fn.msix.delivered[1] == 1


def test_function_mask_and_disable_hold_messages_pending(eventfds):
    d = Dev()
    fd0, fd5 = eventfds(2)
    d.fn.msix.bind(0, fd0)
    d.fn.msix.bind(5, fd5)
    d.set_entry(0, 3, 0)
    d.set_entry(5, 3, 0)
    d.fn.msix.fire(0)  # MSI-X still disabled
    d.settle()
    assert d.pba() == 1
    d.control(enable=True, mask=True)
    d.fn.msix.fire(5)
    d.settle()
    assert d.pba() == 1 | 1 << 5
    assert drain(fd0) == 0 and drain(fd5) == 0
    d.control(mask=False)
    assert drain(fd0) == 1 and drain(fd5) == 1
    assert d.pba() == 0


def test_repeated_fires_while_pending_coalesce(eventfds):
    d = Dev()
    fd, = eventfds(1)
    d.fn.msix.bind(2, fd)
    d.control(enable=True)
    for _ in range(3):
        d.fn.msix.fire(2)
    d.settle()
    d.set_entry(2, 3, 0)
    assert drain(fd) == 1 and d.fn.msix.delivered[2] == 1


def test_unbound_vector_counts_but_signals_nothing():
    d = Dev()
    d.set_entry(4, 3, 0)
    d.control(enable=True)
    d.fn.msix.fire(4)
    d.settle()
    assert d.fn.msix.delivered[4] == 1 and d.fn.msix.unrouted[4] == 1


def test_bind_minus_one_unbinds(eventfds):
    d = Dev()
    fd, = eventfds(1)
    d.fn.msix.bind(0, fd)
    assert d.fn.msix.bound(0)
    d.fn.msix.bind(0, -1)
    assert not d.fn.msix.bound(0)
    with pytest.raises(ValueError):
        d.fn.msix.bind(10, fd)


def test_pba_is_read_only():
    d = Dev()
    d.fn.msix.fire(0)
    d.settle()
    d.fn.mmio_write(0, PBA, 4, 0)
    assert d.pba() == 1


def test_host_enable_routes_programs_and_enables(eventfds):
    d = Dev()
    fds = eventfds(3)
    d.fn.msix.host_enable(fds)
    assert d.fn.config_read(d.cap + 2, 2) & 0x8000
    assert [d.entry(v, 3) & 1 for v in range(4)] == [0, 0, 0, 1]
    d.fn.msix.fire(2)
    d.settle()
    assert drain(fds[2]) == 1
    d.fn.msix.host_disable()
    assert not d.fn.config_read(d.cap + 2, 2) & 0x8000
    d.fn.msix.fire(2)
    d.settle()
    assert drain(fds[2]) == 0 and d.fn.msix.pending(2)


def test_queue_and_config_interrupts_use_the_programmed_vectors(eventfds):
    d = Dev()
    fds = eventfds(10)
    d.fn.msix.host_enable(fds)
    d.fn.mmio_write(0, MSIX_CONFIG, 2, 0)
    d.fn.mmio_write(0, Q_SELECT, 2, 4)
    d.fn.mmio_write(0, Q_VECTOR, 2, 5)
    d.fn.raise_queue_interrupt(4)
    d.fn.set_link(False)
    d.settle()
    assert drain(fds[5]) == 1 and drain(fds[0]) == 1
    assert d.fn.isr_pending == 0x2, "with MSI-X on, only the config bit goes to the ISR"
    d.fn.mmio_write(0, Q_VECTOR, 2, 0xFFFF)
    d.fn.raise_queue_interrupt(4)
    d.settle()
    assert sum(d.fn.msix.delivered) == 2


def test_bad_vector_fire_is_traced_not_raised():
    d = Dev()
    d.fn.msix.fire(99)
    assert d.world.trace.find("msix_bad_vector")


def test_closed_eventfd_loses_the_signal_quietly():
    d = Dev()
    fd = os.eventfd(0)
    d.fn.msix.bind(0, fd)
    d.set_entry(0, 3, 0)
    d.control(enable=True)
    os.close(fd)
    d.fn.msix.fire(0)
    d.settle()
    assert d.fn.msix.delivered[0] == 1
    assert d.world.trace.find("signal_lost")
