"""BAR 4 live-migration block, the IFCVF stop handshake, doorbells and engine hooks.

Offsets from the reference (ifcvf-hw.md 1.4): LOGGING_CTRL 0x00, base 0x10/0x14,
end 0x18/0x1C, ring state 0x20 + (qid//2)*0x40 + (qid%2)*4, MQ 0x28.
"""
import pytest

from sim.config import IfcvfConfig
from sim.ifcvf import IfcvfFunction
from sim.world import World

STATUS, Q_SELECT, Q_SIZE, Q_VECTOR, Q_ENABLE, Q_DESC = 0x14, 0x16, 0x18, 0x1A, 0x1C, 0x20
GFSELECT, GF = 0x08, 0x0C
ACK, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8


def ring_state(qid):
    return 0x20 + (qid // 2) * 0x40 + (qid % 2) * 4


class Progress:
    """A stand-in datapath: each kick fetches 3 descriptors and completes 2;
    a stop waits for the test to say the in-flight work is done."""

    def __init__(self, fn, queue, hold_stop=False):
        self.queue = queue
        self.hold_stop = hold_stop
        self.running = False
        self.pending_done = None
        self.log = []

    def start(self):
        self.running = True
        self.log.append("start")

    def kick(self):
        self.log.append("kick")
        self.queue.last_avail = (self.queue.last_avail + 3) & 0xFFFF
        self.queue.last_used = (self.queue.last_used + 2) & 0xFFFF

    def stop(self, done):
        self.running = False
        self.log.append("stop")
        if self.hold_stop:
            self.pending_done = done
        else:
            done()


class Dev:
    def __init__(self, engine=None, **kw):
        self.world = World(11)
        self.fn = IfcvfFunction(self.world, IfcvfConfig(**kw), engine_factory=engine)

    def r(self, off, w, bar=0):
        return self.fn.mmio_read(bar, off, w)

    def w(self, off, w, value, bar=0):
        self.fn.mmio_write(bar, off, w, value)

    def advance_ns(self, ns):
        self.world.advance(self.world.cycles(ns) + 1)

    def trace(self, event):
        return self.world.trace.find(event)

    def start(self, queues, *, states=None, mq=None):
        """DPDK's ifcvf_start_hw order: reset, ACK, DRIVER, features, FEATURES_OK,
        MQ, per queue (addresses, size, ring state, vector, enable), DRIVER_OK."""
        self.w(STATUS, 1, 0)
        self.advance_ns(50_000)
        self.w(STATUS, 1, ACK)
        self.w(STATUS, 1, ACK | DRIVER)
        self.w(GFSELECT, 4, 1)
        self.w(GF, 4, 1)  # VERSION_1
        self.w(STATUS, 1, ACK | DRIVER | FEATURES_OK)
        assert self.r(STATUS, 1) & FEATURES_OK
        self.w(0x28, 4, len(queues) // 2 if mq is None else mq, bar=4)
        for qid in queues:
            self.w(Q_SELECT, 2, qid)
            self.w(Q_DESC, 4, 0x10_0000 * (qid + 1))
            self.w(Q_SIZE, 2, 256)
            if states is not None:
                self.w(ring_state(qid), 4, states[qid], bar=4)
            self.w(Q_VECTOR, 2, qid + 1)
            self.w(Q_ENABLE, 2, 1)
        self.w(STATUS, 1, ACK | DRIVER | FEATURES_OK | DRIVER_OK)

    def kick(self, qid, times=1):
        for _ in range(times):
            self.w(qid * 0x1000, 2, qid, bar=2)
        self.advance_ns(200)


def test_lm_registers_read_back():
    d = Dev()
    for off, value in ((0x10, 0x0000_0000), (0x14, 0x1000), (0x18, 0x0004_0000), (0x1C, 0x1000)):
        d.w(off, 4, value, bar=4)
        assert d.r(off, 4, bar=4) == value
    assert (d.fn.lm.base, d.fn.lm.end) == (0x1000_0000_0000, 0x1000_0004_0000)
    assert not d.fn.lm.logging_enabled and d.fn.lm.log_range() is None
    d.w(0x00, 4, 1, bar=4)
    assert d.fn.lm.logging_enabled
    assert d.fn.lm.log_range() == (0x1000_0000_0000, 0x1000_0004_0000)
    assert d.trace("lm_logging")
    d.w(0x00, 4, 0, bar=4)
    assert not d.fn.lm.logging_enabled
    assert d.r(0x08, 4, bar=4) == 0 and d.r(0xFFC, 4, bar=4) == 0  # no register there


def test_ring_state_words_are_where_dpdk_puts_them():
    d = Dev(queue_pairs=4)
    for qid in range(9):
        d.w(ring_state(qid), 4, 0x1000 * qid + qid, bar=4)
    for qid in range(9):
        assert d.fn.queue(qid).ring_state == 0x1000 * qid + qid
        assert d.r(ring_state(qid), 4, bar=4) == 0x1000 * qid + qid
    assert ring_state(8) == 0x120  # the control vq of 4 pairs
    assert d.r(0x124, 4, bar=4) == 0, "no queue 9"


def test_mq_register_sits_inside_pair_zero_block():
    d = Dev(queue_pairs=4)
    d.w(0x20, 4, 0x1111_2222, bar=4)
    d.w(0x24, 4, 0x3333_4444, bar=4)
    d.w(0x28, 4, 2, bar=4)
    assert d.r(0x28, 4, bar=4) == 2 and d.fn.lm.mq == 2
    assert d.r(0x20, 4, bar=4) == 0x1111_2222 and d.r(0x24, 4, bar=4) == 0x3333_4444
    d.w(0x28, 4, 5, bar=4)  # more pairs than the device has
    assert d.r(0x28, 4, bar=4) == 2
    assert d.trace("lm_mq_refused")
    d.w(0x28, 4, 0, bar=4)
    assert d.fn.lm.mq == 0


def test_sixteen_bit_ring_state_write_replaces_the_avail_half():
    d = Dev()
    d.w(ring_state(3), 4, 0x0007_0005, bar=4)
    d.w(ring_state(3), 2, 0x0009, bar=4)
    assert d.r(ring_state(3), 4, bar=4) == 0x0007_0009
    assert d.r(ring_state(3) + 2, 2, bar=4) == 0x0007


def test_restore_state_is_loaded_on_enable():
    d = Dev(engine=Progress)
    d.start([0, 1], states={0: 100 | 90 << 16, 1: 7 | 7 << 16})
    q0, q1 = d.fn.queue(0), d.fn.queue(1)
    assert (q0.last_avail, q0.last_used) == (100, 90)
    assert (q1.last_avail, q1.last_used) == (7, 7)
    assert q0.running and q0.engine.log == ["start"]
    assert d.fn.lm.mq == 1


def test_engines_start_only_after_driver_ok():
    d = Dev(engine=Progress)
    d.w(STATUS, 1, ACK | DRIVER)
    d.w(GFSELECT, 4, 1)
    d.w(GF, 4, 1)
    d.w(STATUS, 1, ACK | DRIVER | FEATURES_OK)
    d.w(Q_SELECT, 2, 0)
    d.w(Q_ENABLE, 2, 1)
    assert d.fn.queue(0).enabled and not d.fn.queue(0).running
    d.w(STATUS, 1, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert d.fn.queue(0).running


def test_stop_handshake_then_live_ring_state():
    d = Dev(engine=Progress)
    d.start([0, 1], states={0: 10 | 10 << 16, 1: 0})
    d.kick(0, times=2)
    q = d.fn.queue(0)
    assert (q.last_avail, q.last_used) == (16, 14)
    # Running: the word still holds the restore value.
    assert d.r(ring_state(0), 4, bar=4) == 10 | 10 << 16
    d.w(Q_SELECT, 2, 0)
    d.w(Q_ENABLE, 2, 0)  # IFCVF stop command
    d.w(Q_VECTOR, 2, 0xFFFF)  # DPDK clears the vector right after
    assert d.r(Q_ENABLE, 2) == 1, "not acknowledged yet"
    assert d.r(ring_state(0), 4, bar=4) == 10 | 10 << 16, "stale before the handshake"
    d.advance_ns(4_000)
    assert d.r(Q_ENABLE, 2) == 1
    d.advance_ns(1_000)
    assert d.r(Q_ENABLE, 2) == 0
    assert d.r(ring_state(0), 4, bar=4) == 16 | 14 << 16
    assert q.stopped and not q.running and q.engine.log[-1] == "stop"
    assert d.trace("queue_stopped")
    assert d.r(Q_VECTOR, 2) == 0xFFFF


def test_stop_waits_for_the_engine_to_finish_in_flight_work():
    d = Dev(engine=lambda fn, q: Progress(fn, q, hold_stop=True))
    d.start([0, 1])
    d.kick(1)
    d.w(Q_SELECT, 2, 1)
    d.w(Q_ENABLE, 2, 0)
    d.advance_ns(100_000)
    assert d.r(Q_ENABLE, 2) == 1, "engine still has work in flight"
    engine = d.fn.queue(1).engine
    engine.queue.last_used = 3  # it completes the last descriptor...
    engine.pending_done()       # ...and reports done
    assert d.r(Q_ENABLE, 2) == 0, "acknowledged as soon as both conditions hold"
    assert d.r(ring_state(1), 4, bar=4) == 3 | 3 << 16


def test_stop_never_acks():
    d = Dev(engine=Progress, stop_never_acks=True)
    d.start([0, 1])
    d.kick(0)
    d.w(Q_SELECT, 2, 0)
    d.w(Q_ENABLE, 2, 0)
    d.advance_ns(10_000_000)
    assert d.r(Q_ENABLE, 2) == 1
    assert d.r(ring_state(0), 4, bar=4) == 0, "the word never gets the live value"
    assert d.fn.queue(0).stopping and not d.fn.queue(0).running


def test_stop_of_a_disabled_queue_is_ignored():
    d = Dev()
    d.w(Q_SELECT, 2, 2)
    d.w(Q_ENABLE, 2, 0)
    assert d.trace("queue_stop_ignored")
    assert not d.fn.queue(2).stopping


def test_other_queue_enable_values_are_ignored():
    d = Dev()
    d.w(Q_SELECT, 2, 2)
    d.w(Q_ENABLE, 2, 2)
    assert d.r(Q_ENABLE, 2) == 0 and d.trace("queue_enable_value_ignored")


def test_restart_after_stop_resumes_from_the_latched_state():
    d = Dev(engine=Progress)
    d.start([0, 1])
    d.kick(0)
    d.w(Q_SELECT, 2, 0)
    d.w(Q_ENABLE, 2, 0)
    d.advance_ns(5_000)
    assert d.r(Q_ENABLE, 2) == 0
    d.w(Q_ENABLE, 2, 1)  # DPDK's per-queue re-enable without a reset
    q = d.fn.queue(0)
    assert q.enabled and q.running and (q.last_avail, q.last_used) == (3, 2)
    assert q.engine.log == ["start", "kick", "stop", "start"]


def test_reset_cancels_a_pending_stop_and_clears_ring_state_but_not_logging():
    d = Dev(engine=lambda fn, q: Progress(fn, q, hold_stop=True))
    d.start([0, 1], states={0: 5 | 5 << 16, 1: 0})
    d.w(0x00, 4, 1, bar=4)
    d.w(Q_SELECT, 2, 0)
    d.w(Q_ENABLE, 2, 0)
    done = d.fn.queue(0).engine.pending_done
    d.w(STATUS, 1, 0)
    d.advance_ns(50_000)
    assert d.r(STATUS, 1) == 0
    done()  # a late completion from before the reset changes nothing
    q = d.fn.queue(0)
    assert not q.enabled and not q.stopping and not q.stopped
    assert d.r(ring_state(0), 4, bar=4) == 0
    assert d.fn.lm.logging_enabled and d.fn.lm.mq == 1


def test_doorbells_are_counted_delayed_and_kick_running_queues():
    d = Dev(engine=Progress)
    d.start([0, 1, 2, 3])
    d.w(2 * 0x1000, 2, 2, bar=2)
    assert d.fn.queue(2).doorbells == 0, "a doorbell lands after doorbell_ns"
    d.advance_ns(200)
    assert d.fn.queue(2).doorbells == 1
    assert d.fn.queue(2).engine.log == ["start", "kick"]
    assert len(d.trace("doorbell")) == 1


def test_doorbell_to_an_idle_queue_is_counted_but_kicks_nothing():
    d = Dev(engine=Progress)
    d.w(5 * 0x1000, 2, 5, bar=2)
    d.advance_ns(200)
    assert d.fn.queue(5).doorbells == 1
    assert d.fn.queue(5).engine.log == []
    assert d.trace("doorbell_idle_queue")


def test_malformed_doorbells():
    d = Dev()
    d.w(0x1000, 4, 1, bar=2)       # wrong width
    d.w(0x1002, 2, 1, bar=2)       # not at the doorbell offset
    d.w(9 * 0x1000, 2, 9, bar=2)   # no queue 9 (BAR2 is 64 KiB)
    d.advance_ns(1_000)
    assert sum(d.fn.queue(q).doorbells for q in range(9)) == 0
    assert len(d.trace("notify_unassigned")) == 3
    d.w(0x3000, 2, 4, bar=2)       # queue 3's page, value 4: the address decides
    d.advance_ns(200)
    assert d.fn.queue(3).doorbells == 1 and d.fn.doorbell_mismatches == 1
    assert d.r(0x3000, 2, bar=2) == 0


def test_set_engine_refuses_a_running_queue():
    d = Dev(engine=Progress)
    d.start([0, 1])
    with pytest.raises(RuntimeError):
        d.fn.set_engine(0, Progress(d.fn, d.fn.queue(0)))
    d.fn.set_engine(4, Progress(d.fn, d.fn.queue(4)))


def test_dpdk_stop_sequence_reads_the_used_index():
    """The whole of ifcvf_hw_disable as the reference describes it."""
    d = Dev(engine=Progress)
    d.start([0, 1], states={0: 40 | 40 << 16, 1: 8 | 8 << 16})
    d.kick(0, times=3)
    d.kick(1)
    d.w(0x10, 2, 0xFFFF)  # msix_config
    for qid in (0, 1):
        d.w(Q_SELECT, 2, qid)
        d.w(Q_ENABLE, 2, 0)
        d.w(Q_VECTOR, 2, 0xFFFF)
    saved = {}
    for qid in (0, 1):
        d.w(Q_SELECT, 2, qid)
        for _ in range(10):  # poll up to 10 x 10 ms
            if d.r(Q_ENABLE, 2) == 0:
                break
            d.advance_ns(10_000_000)
        assert d.r(Q_ENABLE, 2) == 0
        word = d.r(ring_state(qid), 4, bar=4)
        saved[qid] = (word >> 16, word >> 16)  # net decode: both from the high half
    assert saved == {0: (46, 46), 1: (10, 10)}
