"""The *driver's* view of one split virtqueue (virtio 1.x 2.7), for tests and benchmarks.

``SplitRing`` lays a split ring out in a byte buffer that stands for guest
memory: tests and the engine benchmark use it to build rings, hostile ones
included, and to read what the device wrote.  It is plain Python, a
descriptor at a time: not for the simulated guest's fast path (``sim.guest``
does that in C).  The device side of the datapath is ``sim.engines``.
"""
from __future__ import annotations

import struct

from sim.ring_layout import need_event, ring_layout

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1




class SplitRing:
    """One split ring in ``mem`` (a writable buffer whose offset 0 is GPA ``mem_base``)."""

    def __init__(self, mem, base: int, size: int, *, mem_base: int = 0):
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring size {size} is not a power of two")
        self.mem = memoryview(mem).cast("B")
        self.mem_base = mem_base
        self.size = size
        self.desc, self.avail, self.used, self.end = ring_layout(base, size)
        self.shadow_avail = 0        # next avail entry to write (published or not)
        self.last_used = 0           # next used entry to read

    def _off(self, gpa: int) -> int:
        return gpa - self.mem_base

    # --- descriptors and the avail ring --------------------------------------------
    def set_desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0,
                 table: int | None = None) -> None:
        """Descriptor ``index`` of the ring's table, or of an indirect table at GPA ``table``."""
        base = self.desc if table is None else table
        struct.pack_into("<QIHH", self.mem, self._off(base + 16 * index), addr, length, flags, next_)

    def desc_at(self, index: int, table: int | None = None) -> tuple[int, int, int, int]:
        base = self.desc if table is None else table
        return struct.unpack_from("<QIHH", self.mem, self._off(base + 16 * index))

    def post(self, head: int) -> None:
        """Put ``head`` in the next avail slot (not yet published)."""
        slot = self.shadow_avail % self.size
        struct.pack_into("<H", self.mem, self._off(self.avail + 4 + 2 * slot), head & 0xFFFF)
        self.shadow_avail = (self.shadow_avail + 1) & 0xFFFF

    def publish(self, idx: int | None = None) -> None:
        """Write avail->idx (the shadow index, or ``idx`` for hostile rings)."""
        value = self.shadow_avail if idx is None else idx
        struct.pack_into("<H", self.mem, self._off(self.avail + 2), value & 0xFFFF)

    def start_at(self, index: int) -> None:
        """Indexes of a ring resumed at ``index`` (avail and used idx in memory too)."""
        self.shadow_avail = self.last_used = index & 0xFFFF
        self.publish()
        struct.pack_into("<H", self.mem, self._off(self.used + 2), index & 0xFFFF)

    @property
    def avail_flags(self) -> int:
        return struct.unpack_from("<H", self.mem, self._off(self.avail))[0]

    @avail_flags.setter
    def avail_flags(self, value: int) -> None:
        struct.pack_into("<H", self.mem, self._off(self.avail), value)

    @property
    def used_event(self) -> int:
        return struct.unpack_from("<H", self.mem, self._off(self.avail + 4 + 2 * self.size))[0]

    @used_event.setter
    def used_event(self, value: int) -> None:
        struct.pack_into("<H", self.mem, self._off(self.avail + 4 + 2 * self.size), value & 0xFFFF)

    # --- what the device wrote ---------------------------------------------------------
    @property
    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.mem, self._off(self.used + 2))[0]

    @property
    def used_flags(self) -> int:
        return struct.unpack_from("<H", self.mem, self._off(self.used))[0]

    @property
    def avail_event(self) -> int:
        return struct.unpack_from("<H", self.mem, self._off(self.used + 4 + 8 * self.size))[0]

    def used_elem(self, index: int) -> tuple[int, int]:
        slot = index % self.size
        return struct.unpack_from("<II", self.mem, self._off(self.used + 4 + 8 * slot))

    def take_used(self) -> list[tuple[int, int]]:
        """Every used element published since the last call, in order."""
        out = []
        idx = self.used_idx
        while self.last_used != idx:
            out.append(self.used_elem(self.last_used))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.mem[self._off(gpa):self._off(gpa) + length])


__all__ = ["SplitRing", "ring_layout", "need_event", "DESC_F_NEXT", "DESC_F_WRITE",
           "DESC_F_INDIRECT", "AVAIL_F_NO_INTERRUPT", "USED_F_NO_NOTIFY"]
