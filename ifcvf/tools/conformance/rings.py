"""A minimal split virtqueue in host memory, for exercising a queue by hand.

The conformance suite posts a buffer, kicks, and watches the used ring; it
does not need a driver's bookkeeping.  Addresses are IOVAs: the memory is
DMA-mapped at ``iova_base``.
"""
from __future__ import annotations

import struct

from hal.memory import HostMemory
from ifcvf.vring import split_ring_layout, used_elem_offset

DESC_F_NEXT = 1
DESC_F_WRITE = 2


class TestRing:
    __test__ = False  # not a pytest class

    def __init__(self, memory: HostMemory, offset: int, size: int, iova_base: int = 0):
        self.mem = memory.view
        self.size = size
        self.desc, self.avail, self.used, self.end = split_ring_layout(offset, size)
        self.iova_base = iova_base
        self.mem[offset:self.end] = bytes(self.end - offset)
        self.next_desc = 0
        self.avail_idx = 0

    def iova(self, offset: int) -> int:
        return self.iova_base + offset

    @property
    def addresses(self) -> tuple[int, int, int]:
        return self.iova(self.desc), self.iova(self.avail), self.iova(self.used)

    def post(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Chain (offset, length, device_writable) buffers; make the chain available."""
        head = self.next_desc
        for i, (off, length, writable) in enumerate(buffers):
            d = (head + i) % self.size
            flags = (DESC_F_WRITE if writable else 0) | (DESC_F_NEXT if i + 1 < len(buffers) else 0)
            struct.pack_into("<QIHH", self.mem, self.desc + 16 * d, self.iova(off), length, flags,
                             (d + 1) % self.size)
        self.next_desc = (head + len(buffers)) % self.size
        struct.pack_into("<H", self.mem, self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, self.avail + 2, self.avail_idx)
        return head

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.mem, self.used + 2)[0]

    def used_elem(self, n: int) -> tuple[int, int]:
        return struct.unpack_from("<II", self.mem, self.used + used_elem_offset(n % self.size))
