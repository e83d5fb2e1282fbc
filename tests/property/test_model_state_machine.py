"""Random register traffic against the simulated IFCVF, invariants after every step.

Drives config space, every BAR (random offsets, widths and values as well as
targeted writes to the interesting registers), resets, doorbells, interrupts
and time, with a stand-in datapath engine that moves the ring indexes, and
checks what the rules promise: no exception for in-range accesses, only legal
device_status bits, FEATURES_OK only for an acceptable feature set, sane queue
sizes and vectors, the MQ register and ring-state words as the LM rules say.
"""
import os

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from sim.config import IfcvfConfig
from sim.ifcvf import IfcvfFunction
from sim.world import World

QUEUE_PAIRS = 2
NUM_QUEUES = 2 * QUEUE_PAIRS + 1
VECTORS = 2 * QUEUE_PAIRS + 2
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 0x40, 0x80
LEGAL_STATUS = ACK | DRIVER | DRIVER_OK | FEATURES_OK | NEEDS_RESET | FAILED
COMMON = {  # name: (offset, width), virtio 1.x
    "dfselect": (0x00, 4), "gfselect": (0x08, 4), "gf": (0x0C, 4), "msix_config": (0x10, 2),
    "status": (0x14, 1), "q_select": (0x16, 2), "q_size": (0x18, 2), "q_vector": (0x1A, 2),
    "q_enable": (0x1C, 2), "q_desc": (0x20, 4), "q_desc_hi": (0x24, 4), "q_used": (0x30, 4),
}
MQ = 0x28


def ring_state(qid):
    return 0x20 + (qid // 2) * 0x40 + (qid % 2) * 4


class RandomProgress:
    """Moves last_avail/last_used on kicks; finishes a stop now or a little later."""

    def __init__(self, fn, queue):
        self.fn = fn
        self.queue = queue
        self.rng = fn.world.rng(f"prop.engine{queue.index}")
        self.running = False

    def start(self):
        # Buffers the guest posted before the start are fetched at once, so the
        # live indexes soon differ from the restored ones.
        self.running = True
        self._progress()

    def kick(self):
        assert self.running, "kicked while not running"
        self._progress()

    def _progress(self):
        q = self.queue
        fetched = self.rng.randrange(4)
        q.last_avail = (q.last_avail + fetched) & 0xFFFF
        in_flight = (q.last_avail - q.last_used) & 0xFFFF
        q.last_used = (q.last_used + self.rng.randrange(in_flight + 1)) & 0xFFFF

    def stop(self, done):
        self.running = False
        delay = self.rng.choice([0, 0, 100, 2_000])
        if delay == 0:
            done()
        else:
            self.fn.world.timeout(delay).callbacks.append(lambda _e: done())


class IfcvfModelMachine(RuleBasedStateMachine):
    @initialize(layout=st.sampled_from(["ifcvf", "ifcvf", "qemu"]),
                fault=st.sampled_from(["none", "none", "none", "reset", "stop"]),
                require_ap=st.booleans())
    def build(self, layout, fault, require_ap):
        self.world = World(1234)
        kw = dict(queue_pairs=QUEUE_PAIRS, reset_never_completes=fault == "reset",
                  stop_never_acks=fault == "stop", require_access_platform=require_ap)
        config = (IfcvfConfig.qemu_virtio_net(**kw) if layout == "qemu"
                  else IfcvfConfig(**kw))
        self.config = config
        self.fn = IfcvfFunction(self.world, config, engine_factory=RandomProgress)
        lay = self.fn.layout
        self.common_bar, self.common_base = lay.common.bar, lay.common.offset
        self.notify = lay.notify
        self.bars = [b for b in range(6) if self.fn.bar_size(b) is not None]
        self.cfg_cap = [pos for cap_id, pos in self.fn.pci.capabilities
                        if cap_id == 0x09 and self.fn.config_read(pos + 3, 1) == 5][0]
        self.shadow_mq = 0
        # Ring-state word of each queue: snapshot while running, and whether it
        # has been written since the queue's last stop acknowledgement.
        self.clean_since_ack = [False] * NUM_QUEUES
        self.snapshot = [None] * NUM_QUEUES
        self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(VECTORS)]

    def teardown(self):
        for fd in getattr(self, "eventfds", ()):
            os.close(fd)

    # --- helpers -------------------------------------------------------------------
    def bar_write(self, bar, offset, width, value, through_decode=True):
        """Every BAR write goes through here so the MQ / ring-state shadows stay right."""
        if through_decode:
            lands = self.fn.pci.memory_enabled
            self.fn.mmio_write(bar, offset, width, value)
        else:
            lands = True
        if not lands or self.fn.lm is None or bar != 4:
            return
        word = offset & ~3
        if word == MQ:
            shift = 8 * (offset - word)
            mask = ((1 << (8 * width)) - 1) << shift
            merged = (self.shadow_mq & ~mask) | (value << shift & mask)
            if merged <= QUEUE_PAIRS:
                self.shadow_mq = merged
        for qid in range(NUM_QUEUES):
            if ring_state(qid) == word:
                self.clean_since_ack[qid] = False
                self.snapshot[qid] = None

    def common_write(self, name, value):
        offset, width = COMMON[name]
        self.bar_write(self.common_bar, self.common_base + offset, width, value)

    def before_time_passes(self):
        return [(q.stopped, q.running or q.stopping) for q in self.fn.queues]

    def after_time_passed(self, before):
        for qid, q in enumerate(self.fn.queues):
            was_stopped, _ = before[qid]
            if q.stopped and not was_stopped:
                self.clean_since_ack[qid] = True

    # --- rules: config space -------------------------------------------------------
    @rule(data=st.data(), width=st.sampled_from([1, 2, 4]))
    def config_read(self, data, width):
        offset = data.draw(st.integers(0, 0x1000 - width))
        assert 0 <= self.fn.config_read(offset, width) < 1 << (8 * width)

    @rule(data=st.data(), width=st.sampled_from([1, 2, 4]), value=st.integers(0, 2**32 - 1))
    def config_write(self, data, width, value):
        offset = data.draw(st.one_of(st.integers(0, 0x1000 - width),
                                     st.integers(0, 0x100 - width)))
        data_lo = self.cfg_cap + 16
        if offset < data_lo + 4 and data_lo < offset + width:
            return  # PCI-cfg data: a BAR access, done by its own rule
        self.fn.config_write(offset, width, value & ((1 << (8 * width)) - 1))

    @rule()
    def memory_decode_on(self):
        self.fn.config_write(0x04, 2, self.fn.config_read(0x04, 2) | 0x2)

    @rule(bar=st.integers(0, 5), offset=st.sampled_from([0x0, 0x14, 0x18, 0x28, 0x12, 0x1000]),
          width=st.sampled_from([1, 2, 4]), value=st.integers(0, 2**32 - 1),
          write=st.booleans())
    def pci_cfg_window(self, bar, offset, width, value, write):
        pos = self.cfg_cap
        self.fn.config_write(pos + 4, 1, bar)
        self.fn.config_write(pos + 8, 4, offset)
        self.fn.config_write(pos + 12, 4, width)
        size = self.fn.bar_size(bar)
        valid = size is not None and offset % width == 0 and offset + width <= size
        if write:
            value &= (1 << (8 * width)) - 1
            self.fn.config_write(pos + 16, 4, value)
            if valid:
                self.bar_write(bar, offset, width, value, through_decode=False)
        else:
            self.fn.config_read(pos + 16, 4)

    # --- rules: raw BAR traffic ---------------------------------------------------------
    @rule(data=st.data(), width=st.sampled_from([1, 2, 4]))
    def mmio_read(self, data, width):
        bar = data.draw(st.sampled_from(self.bars))
        offset = data.draw(st.integers(0, self.fn.bar_size(bar) // width - 1)) * width
        assert 0 <= self.fn.mmio_read(bar, offset, width) < 1 << (8 * width)

    @rule(data=st.data(), width=st.sampled_from([1, 2, 4]), value=st.integers(0, 2**32 - 1))
    def mmio_write(self, data, width, value):
        bar = data.draw(st.sampled_from(self.bars))
        near_registers = st.integers(0, min(0x60, self.fn.bar_size(bar)) // width - 1)
        anywhere = st.integers(0, self.fn.bar_size(bar) // width - 1)
        offset = data.draw(st.one_of(near_registers, anywhere)) * width
        self.bar_write(bar, offset, width, value & ((1 << (8 * width)) - 1))

    # --- rules: targeted register writes ---------------------------------------------------
    @rule(bits=st.sampled_from([ACK, ACK | DRIVER, ACK | DRIVER | FEATURES_OK,
                                ACK | DRIVER | FEATURES_OK | DRIVER_OK, DRIVER_OK, FAILED,
                                NEEDS_RESET, 0x30, 0xFF]),
          keep=st.booleans())
    def write_status(self, bits, keep):
        current = self.fn.status if keep else 0
        if current | bits:
            self.common_write("status", (current | bits) & 0xFF)

    @rule()
    def reset(self):
        self.common_write("status", 0)

    @rule(high=st.sampled_from([0, 1, 3, 0x11, 0x04]), low=st.sampled_from([0, 0x20, 0x438028]))
    def write_features(self, high, low):
        self.common_write("gfselect", 0)
        self.common_write("gf", low)
        self.common_write("gfselect", 1)
        self.common_write("gf", high)

    @rule(select=st.integers(0, 3))
    def feature_selects(self, select):
        self.common_write("dfselect", select)
        self.common_write("gfselect", select)

    @rule(vector=st.sampled_from([0, 1, VECTORS - 1, VECTORS, 0x7FF, 0xFFFF]))
    def write_msix_config(self, vector):
        self.common_write("msix_config", vector)

    @rule(qid=st.integers(0, NUM_QUEUES + 1),
          size=st.sampled_from([0, 1, 3, 64, 100, 256, 1024, 2048, 0xFFFF]),
          vector=st.sampled_from([0, 2, VECTORS, 0xFFFF]),
          desc=st.integers(0, 2**32 - 1))
    def program_queue(self, qid, size, vector, desc):
        self.common_write("q_select", qid)
        self.common_write("q_size", size)
        self.common_write("q_vector", vector)
        self.common_write("q_desc", desc)

    @rule(qid=st.integers(0, NUM_QUEUES + 1), value=st.sampled_from([0, 1, 1, 2]))
    def queue_enable(self, qid, value):
        self.common_write("q_select", qid)
        self.common_write("q_enable", value)

    @rule(qid=st.integers(0, NUM_QUEUES - 1), value=st.integers(0, 2**32 - 1),
          width=st.sampled_from([2, 4, 4]))
    def write_ring_state(self, qid, value, width):
        if self.fn.lm is None:
            return
        self.bar_write(4, ring_state(qid), width, value & ((1 << (8 * width)) - 1))

    @rule(pairs=st.integers(0, QUEUE_PAIRS + 2))
    def write_mq(self, pairs):
        if self.fn.lm is not None:
            self.bar_write(4, MQ, 4, pairs)

    @rule(queues=st.lists(st.integers(0, NUM_QUEUES - 1), min_size=1, max_size=NUM_QUEUES,
                          unique=True),
          state=st.integers(0, 2**32 - 1))
    def bring_up(self, queues, state):
        """The driver's start sequence (reference 3.8), so runs reach DRIVER_OK."""
        self.common_write("status", 0)
        self.advance(12_501)
        self.common_write("status", ACK)
        self.common_write("status", ACK | DRIVER)
        self.write_features(0x3, 0x438028)
        self.common_write("status", ACK | DRIVER | FEATURES_OK)
        self.write_mq(len(queues) // 2)
        for qid in queues:
            self.common_write("q_select", qid)
            self.common_write("q_size", 256)
            self.write_ring_state(qid, state, 4)
            self.common_write("q_vector", qid + 1)
            self.common_write("q_enable", 1)
        self.common_write("status", ACK | DRIVER | FEATURES_OK | DRIVER_OK)

    @rule(qid=st.integers(0, NUM_QUEUES - 1), wait=st.booleans())
    def stop_queue(self, qid, wait):
        """The IFCVF stop command (reference 3.9) on one queue, maybe waiting for the ack."""
        self.common_write("q_select", qid)
        self.common_write("q_enable", 0)
        self.common_write("q_vector", 0xFFFF)
        if wait:
            self.advance(3_000)

    @rule(qid=st.integers(0, NUM_QUEUES - 1), times=st.integers(1, 3))
    def doorbells(self, qid, times):
        for _ in range(times):
            self.doorbell(qid)

    @rule(qid=st.integers(0, NUM_QUEUES - 1))
    def doorbell(self, qid):
        mult = self.config.notify_off_multiplier
        self.bar_write(self.notify.bar, self.notify.offset + qid * mult, 2, qid)

    # --- rules: device events and time --------------------------------------------------------
    @rule(up=st.booleans())
    def link(self, up):
        self.fn.set_link(up)

    @rule()
    def needs_reset(self):
        self.fn.mark_needs_reset("property test")

    @rule(qid=st.integers(0, NUM_QUEUES - 1))
    def queue_interrupt(self, qid):
        self.fn.raise_queue_interrupt(qid)

    @rule(on=st.booleans())
    def host_msix(self, on):
        if on:
            self.fn.msix.host_enable(self.eventfds)
        else:
            self.fn.msix.host_disable()

    @rule(cycles=st.sampled_from([0, 1, 50, 51, 125, 1_251, 3_000, 12_500, 12_501, 100_000]))
    def advance(self, cycles):
        before = self.before_time_passes()
        self.world.advance(cycles)
        self.after_time_passed(before)

    # --- invariants ------------------------------------------------------------------------
    @invariant()
    def status_bits_follow_the_rules(self):
        status = self.fn.status
        assert status & ~LEGAL_STATUS == 0
        if status & FEATURES_OK:
            assert self.fn.driver_features & ~self.config.device_features == 0
            if self.config.require_access_platform:
                assert self.fn.driver_features >> 33 & 1
        if status & DRIVER_OK:
            assert status & FEATURES_OK
        if self.fn.resetting:
            assert status != 0

    @invariant()
    def queues_are_sane(self):
        for q in self.fn.queues:
            assert 1 <= q.size <= q.max_size and q.size & (q.size - 1) == 0
            assert q.msix_vector < VECTORS or q.msix_vector == 0xFFFF
            assert not q.stopping or q.enabled
            assert not q.stopped or not q.enabled
            if q.running:
                assert q.enabled and not q.stopping and self.fn.status & DRIVER_OK
                assert q.engine.running
        assert self.fn.msix_config < VECTORS or self.fn.msix_config == 0xFFFF

    @invariant()
    def selected_queue_reads_match(self):
        if not self.fn.pci.memory_enabled:
            return
        base, bar = self.common_base, self.common_bar
        select = self.fn.mmio_read(bar, base + 0x16, 2)
        size = self.fn.mmio_read(bar, base + 0x18, 2)
        vector = self.fn.mmio_read(bar, base + 0x1A, 2)
        if select >= NUM_QUEUES:
            assert size == 0 and vector == 0xFFFF
        else:
            q = self.fn.queue(select)
            assert (size, vector) == (q.size, q.msix_vector)
            assert self.fn.mmio_read(bar, base + 0x1C, 2) == int(q.enabled)

    @invariant()
    def lm_block_reads_as_the_rules_say(self):
        lm = self.fn.lm
        if lm is None:
            return
        assert lm.mq == self.shadow_mq <= QUEUE_PAIRS
        assert self.fn.bar_read(4, MQ, 4) == self.shadow_mq
        for qid, q in enumerate(self.fn.queues):
            word = self.fn.bar_read(4, ring_state(qid), 4)
            assert word == q.ring_state
            if q.stopped and self.clean_since_ack[qid]:
                assert word == q.live_ring_state, "after the handshake the word is live"
            if q.running or q.stopping:
                # Stale while running: it only changes by a driver write.
                if self.snapshot[qid] is not None:
                    assert word == self.snapshot[qid]
                self.snapshot[qid] = word
            else:
                self.snapshot[qid] = None

    @invariant()
    def interrupts_are_sane(self):
        assert self.fn.isr_pending & ~0x3 == 0
        for v in range(VECTORS):
            # A vector is never both pending and deliverable.
            if self.fn.msix.pending(v):
                assert (not self.fn.msix_cap.enabled or self.fn.msix_cap.function_masked
                        or self.fn.msix.masked(v))
        pba_bits = 0
        for v in range(VECTORS):
            pba_bits |= self.fn.msix.pending(v) << v
        table = self.fn.layout.msix_pba
        assert self.fn.bar_read(table.bar, table.offset, 4) == pba_bits

    @invariant()
    def bar_flags_are_stable(self):
        for bar in self.bars:
            spec = self.fn.layout.bar(bar)
            flags = self.fn.config_read(0x10 + 4 * bar, 4) & 0xF
            assert flags == (0x4 if spec.is_64bit else 0) | (0x8 if spec.prefetchable else 0)


IfcvfModelMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestIfcvfModelStateMachine = IfcvfModelMachine.TestCase
