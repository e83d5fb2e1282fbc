"""The IFCVF live-migration (LM) register block at the start of BAR 4.

Layout as DPDK's IFCVF driver uses it (reference ifcvf-hw.md 1.4):

    0x00  LOGGING_CTRL   u32, bit 0 = log dirty packet-buffer pages
    0x10  log base IOVA  low / 0x14 high
    0x18  log end IOVA   low / 0x1C high   (end = base + log size)
    0x20 + (qid // 2) * 0x40 + (qid % 2) * 4
          ring-state word of queue qid: last_avail (low 16) | last_used (high 16)
    0x28  MQ             u32, number of enabled queue pairs (inside pair 0's
                         block, after its two ring-state words)

Every register is a 32-bit word; narrower aligned accesses read or replace
some of its bytes (the old kernel driver wrote 16-bit avail indexes).

A ring-state word reads the *latched* value: what the driver last wrote (the
restore state, loaded when the queue is next enabled) or what the device
captured when it acknowledged the last stop.  While a queue runs, the word is
stale by design: only the stop handshake makes it current.
"""
from __future__ import annotations

from typing import Sequence

from sim.queue_state import QueueState
from sim.world import World

LOGGING_CTRL = 0x00
LOG_BASE_LO = 0x10
LOG_BASE_HI = 0x14
LOG_END_LO = 0x18
LOG_END_HI = 0x1C
RING_STATE = 0x20
PAIR_STRIDE = 0x40
MQ = 0x28
LOGGING_ENABLE = 0x1


def ring_state_offset(qid: int) -> int:
    """BAR 4 offset of queue ``qid``'s ring-state word (net layout)."""
    return RING_STATE + (qid // 2) * PAIR_STRIDE + (qid % 2) * 4


class LmBlock:
    """Registers of the LM block; the queues' ring-state words live in QueueState."""

    def __init__(self, world: World, name: str, queues: Sequence[QueueState], queue_pairs: int):
        self.world = world
        self.name = name
        self.queue_pairs = queue_pairs
        self.ctrl = 0
        self.base = 0
        self.end = 0
        self.mq = 0
        self._ring_words = {ring_state_offset(q.index): q for q in queues}

    @property
    def logging_enabled(self) -> bool:
        return bool(self.ctrl & LOGGING_ENABLE)

    def log_range(self) -> tuple[int, int] | None:
        """[base, end) IOVA of the dirty bitmap while logging is on, else None."""
        if not self.logging_enabled or self.end <= self.base:
            return None
        return self.base, self.end

    def ring_state_queue(self, offset: int) -> QueueState | None:
        return self._ring_words.get(offset & ~3)

    # --- BAR accesses (offset/width already checked and aligned) ------------------------
    def read(self, offset: int, width: int) -> int:
        word = offset & ~3
        value = self._read_word(word)
        if value is None:
            return 0
        shift = 8 * (offset - word)
        return value >> shift & ((1 << (8 * width)) - 1)

    def write(self, offset: int, width: int, value: int) -> None:
        word = offset & ~3
        old = self._read_word(word)
        if old is None:
            self.world.record(self.name, "lm_unassigned_write", offset=offset, width=width)
            return
        shift = 8 * (offset - word)
        mask = ((1 << (8 * width)) - 1) << shift
        self._write_word(word, (old & ~mask) | (value << shift & mask))

    def _read_word(self, word: int) -> int | None:
        if word == LOGGING_CTRL:
            return self.ctrl
        if word == LOG_BASE_LO:
            return self.base & 0xFFFF_FFFF
        if word == LOG_BASE_HI:
            return self.base >> 32
        if word == LOG_END_LO:
            return self.end & 0xFFFF_FFFF
        if word == LOG_END_HI:
            return self.end >> 32
        if word == MQ:
            return self.mq
        queue = self._ring_words.get(word)
        return None if queue is None else queue.ring_state

    def _write_word(self, word: int, value: int) -> None:
        if word == LOGGING_CTRL:
            was = self.logging_enabled
            self.ctrl = value
            if was != self.logging_enabled:
                self.world.record(self.name, "lm_logging", on=self.logging_enabled,
                                  base=self.base, end=self.end)
        elif word == LOG_BASE_LO:
            self.base = (self.base & ~0xFFFF_FFFF) | value
        elif word == LOG_BASE_HI:
            self.base = (self.base & 0xFFFF_FFFF) | value << 32
        elif word == LOG_END_LO:
            self.end = (self.end & ~0xFFFF_FFFF) | value
        elif word == LOG_END_HI:
            self.end = (self.end & 0xFFFF_FFFF) | value << 32
        elif word == MQ:
            if value > self.queue_pairs:
                self.world.record(self.name, "lm_mq_refused", value=value, max=self.queue_pairs)
                return
            self.mq = value
            self.world.record(self.name, "lm_mq", pairs=value)
        else:
            queue = self._ring_words[word]
            queue.ring_state = value
            self.world.record(self.name, "lm_ring_state_write", qid=queue.index,
                              last_avail=value & 0xFFFF, last_used=value >> 16)
