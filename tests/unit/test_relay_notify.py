"""The notify relay (csrc/driver/notify.c via ifcvf.relay.NotifyRelay): thread and step modes.

Waiting is done on eventfds with timeouts (select), never by sleeping.  stop() is
also a barrier: the loop handles every fd that was readable when it saw the stop
request before returning, so after stop() the effects of earlier writes are visible.
"""
from __future__ import annotations

import fcntl
import os
import select
import threading

import pytest

from hal.memory import HostMemory
from ifcvf.relay import NotifyQueue, NotifyRelay, RelayError
from test_relay import Guest

WAIT = 10.0   # seconds: generous bound for a loaded CI machine, never reached when healthy


def eventfd(nonblock: bool = True) -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblock else 0))


def readable(fd: int, timeout: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def take(fd: int) -> int:
    return os.eventfd_read(fd)


class Rig:
    """Queue 0: RX, relayed (kick, doorbell, device interrupt, guest call).
    Queue 1: TX, kicks only.  The doorbells live in a page standing for the BAR."""

    def __init__(self, *, doorbell=None, capacity=None, size=8):
        self.guest = Guest(size)
        for i in range(size):
            self.guest.set_desc(i, Guest.POOL + i * 4096, 2048)
        self.bar = HostMemory(4096, "bar")
        self.bar.view[:] = b"\xAA" * 4096
        self.kick = [eventfd(), eventfd()]
        self.intr = eventfd()
        self.call = eventfd()
        self.queue = self.guest.queue(capacity=capacity)
        self.doorbells = doorbell or [self.bar.address + 0, self.bar.address + 4]
        self.relay = NotifyRelay("test", [
            NotifyQueue(0, kick_fd=self.kick[0], doorbell=self.doorbells[0], relay=self.queue,
                        intr_fd=self.intr, call_fd=self.call),
            NotifyQueue(1, kick_fd=self.kick[1], doorbell=self.doorbells[1]),
        ])

    def doorbell(self, qid: int) -> bytes:
        return bytes(self.bar.view[4 * qid:4 * qid + 4])

    def close(self) -> None:
        self.relay.close()
        for fd in self.kick + [self.intr, self.call]:
            os.close(fd)
        self.bar.close()
        self.guest.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def test_thread_kicks_write_the_queue_index_with_one_16_bit_store(rig):
    rig.relay.start()
    os.eventfd_write(rig.kick[1], 1)
    os.eventfd_write(rig.kick[1], 1)   # may coalesce into one doorbell write
    rig.relay.stop(WAIT)
    assert rig.doorbell(1) == b"\x01\x00\xAA\xAA"   # exactly two bytes written
    assert rig.doorbell(0) == b"\xAA" * 4
    assert 1 <= rig.relay.stats(1).kicks <= 2
    assert not readable(rig.kick[1]), "the kick eventfd was drained"
    assert not rig.relay.running


def test_thread_relays_a_device_interrupt_and_signals_the_guest(rig):
    rig.relay.start()
    rig.guest.device_used((3, 100), (5, 200))
    os.eventfd_write(rig.intr, 1)
    assert readable(rig.call, WAIT), "the guest call eventfd was not signalled"
    assert take(rig.call) == 1
    _, idx, elems, _ = rig.guest.guest_used()
    assert idx == 2 and elems[:2] == [(3, 100), (5, 200)]
    assert rig.guest.pages() == [(Guest.POOL >> 12) + 3, (Guest.POOL >> 12) + 5]
    rig.relay.stop(WAIT)
    stats = rig.relay.stats(0)
    assert (stats.interrupts, stats.relayed, stats.signals, stats.broken) == (1, 2, 1, None)


def test_stop_works_before_the_loop_has_started_and_again_after(rig):
    rig.relay.start()
    rig.relay.stop(WAIT)          # may reach the stop fd before run() does
    rig.relay.stop(WAIT)          # idempotent
    rig.relay.start()             # and it can run again
    os.eventfd_write(rig.kick[0], 1)
    rig.relay.stop(WAIT)
    assert rig.doorbell(0) == b"\x00\x00\xAA\xAA"


def test_step_forwards_kicks_to_a_callable_doorbell_and_reports_signals():
    rung = []
    r = Rig(doorbell=[rung.append, rung.append])
    try:
        assert r.relay.step() == []
        os.eventfd_write(r.kick[1], 1)
        os.eventfd_write(r.kick[0], 1)
        r.guest.device_used((1, 64))
        os.eventfd_write(r.intr, 1)
        assert r.relay.step() == [r.call]
        assert sorted(rung) == [0, 1]
        assert take(r.call) == 1
        assert r.guest.guest_used()[1] == 1
        assert r.relay.step() == [] and sorted(rung) == [0, 1]   # nothing pending any more
        with pytest.raises(ValueError, match="callable doorbells"):
            r.relay.run()
    finally:
        r.close()


def test_no_signal_when_the_guest_suppresses_interrupts(rig):
    rig.guest.set_avail(flags=1)
    rig.guest.device_used((0, 1))
    os.eventfd_write(rig.intr, 1)
    assert rig.relay.step() == []
    assert rig.relay.stats(0).relayed == 1 and not readable(rig.call)


def test_a_long_backlog_rearms_the_interrupt_fd():
    """One interrupt relays at most 16 calls' worth, then re-signals its own fd so the
    loop comes back (the device will not interrupt again for entries already written)."""
    r = Rig(capacity=32, size=32)
    try:
        for i in range(32):   # one chain of 32 writable descriptors: one entry per call
            r.guest.set_desc(i, Guest.POOL + i * 4096, 64, flags=3 if i < 31 else 2, nxt=i + 1)
        r.guest.device_used(*[(0, 1)] * 20)
        os.eventfd_write(r.intr, 1)
        assert r.relay.step() == [r.call, r.intr]
        assert r.relay.stats(0).relayed == 16 and readable(r.intr)
        assert r.relay.step() == [r.call]
        assert r.relay.stats(0).relayed == 20 and not readable(r.intr)
        assert r.guest.guest_used()[1] == 20
    finally:
        r.close()


def test_a_broken_queue_is_reported_and_not_relayed_again(rig):
    rig.guest.device_used((0, 1), (99, 1))           # id 99 >= size 8
    before = rig.guest.state()
    os.eventfd_write(rig.intr, 1)
    assert rig.relay.step() == []
    error = rig.relay.broken(0)
    assert isinstance(error, RelayError) and error.reason_name == "DESC_ID" and error.used_idx == 1
    assert rig.guest.state() == before
    rig.guest.mediated.put_used(1, 1, 1)              # even once the entry is fixed
    os.eventfd_write(rig.intr, 1)
    assert rig.relay.step() == []
    stats = rig.relay.stats(0)
    assert (stats.interrupts, stats.relayed, stats.signals) == (2, 0, 0)
    assert not readable(rig.intr), "interrupts of a broken queue are still drained"
    with pytest.raises(RelayError, match="DESC_ID"):
        rig.relay.catch_up(0)


def test_catch_up_relays_now_and_says_what_it_signalled(rig):
    rig.guest.device_used((2, 7))
    result = rig.relay.catch_up(0)
    assert result.entries == 1 and result.signalled == [rig.call]
    assert rig.relay.catch_up(0).entries == 0
    with pytest.raises(ValueError, match="not relayed"):
        rig.relay.catch_up(1)


def test_catch_up_while_the_loop_runs_relays_each_entry_once(rig):
    """The queue's lock serialises the loop and a catch-up from another thread."""
    rig.relay.start()
    total = 0
    for round_ in range(40):
        rig.guest.device_used(*[(i % 8, round_) for i in range(3)])
        os.eventfd_write(rig.intr, 1)
        total += rig.relay.catch_up(0).entries
    rig.relay.stop(WAIT)
    rig.relay.catch_up(0)
    assert rig.queue.relayed == 120 and rig.guest.guest_used()[1] == 120
    assert rig.relay.stats(0).relayed == 120 and total <= 120


def test_spec_refusals(rig):
    with pytest.raises(ValueError, match="needs a doorbell"):
        NotifyRelay("x", [NotifyQueue(0, kick_fd=rig.kick[0])])
    with pytest.raises(ValueError, match="needs a RelayQueue"):
        NotifyRelay("x", [NotifyQueue(0, intr_fd=rig.intr)])
    with pytest.raises(ValueError, match="share a queue index"):
        NotifyRelay("x", [NotifyQueue(0), NotifyQueue(0)])
    with pytest.raises(OSError):   # the same fd twice in one epoll set
        NotifyRelay("x", [NotifyQueue(0, kick_fd=rig.kick[0], doorbell=rig.doorbells[0]),
                          NotifyQueue(1, kick_fd=rig.kick[0], doorbell=rig.doorbells[1])])


def test_blocking_eventfds_are_made_non_blocking(rig):
    fd = eventfd(nonblock=False)
    try:
        relay = NotifyRelay("x", [NotifyQueue(0, kick_fd=fd, doorbell=rig.doorbells[0])])
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert relay.step() == []   # a spurious wake-up cannot block the loop
        relay.close()
    finally:
        os.close(fd)


def test_the_loop_runs_without_the_gil(rig):
    """While the C loop blocks in epoll, another Python thread keeps running."""
    rig.relay.start()
    done = threading.Event()
    worker = threading.Thread(target=lambda: (sum(range(100_000)), done.set()))
    worker.start()
    assert done.wait(WAIT)
    worker.join()
    rig.relay.stop(WAIT)


def test_poller_protocol_fds(rig):
    assert sorted(rig.relay.fds()) == sorted(rig.kick + [rig.intr])
    assert rig.relay.name == "test"
