"""Split-ring sizes and layout (virtio 1.x, 2.7), the driver's one copy.

A split ring of ``size`` entries is three areas: the descriptor table
(16 bytes an entry), the avail ring (flags, idx, ring[size], used_event) and
the used ring (flags, idx, ring[size] of (id, len), avail_event).  The
simulated device keeps its own copy of these facts (sim/ring_layout.py): the
model is written independently of the driver, so a wrong number here is
caught rather than shared.
"""
from __future__ import annotations

DESC_BYTES = 16          # addr, len, flags, next
RING_HEADER = 4          # flags and idx, before the ring entries
USED_ELEM_BYTES = 8      # id, len


def desc_table_bytes(size: int) -> int:
    return DESC_BYTES * size


def avail_ring_bytes(size: int) -> int:
    """flags, idx, ring[size], used_event."""
    return RING_HEADER + 2 * size + 2


def used_ring_bytes(size: int) -> int:
    """flags, idx, ring[size], avail_event."""
    return RING_HEADER + USED_ELEM_BYTES * size + 2


def used_elem_offset(slot: int) -> int:
    """Where used->ring[slot] starts in the used ring."""
    return RING_HEADER + USED_ELEM_BYTES * slot


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def split_ring_layout(base: int, size: int, align: int = 4096) -> tuple[int, int, int, int]:
    """(desc, avail, used, end) of a ring laid out from ``base`` as vring_init
    does: the avail ring right after the table, the used ring at the next
    ``align`` boundary, ``end`` rounded up to ``align``."""
    avail = base + desc_table_bytes(size)
    used = align_up(avail + avail_ring_bytes(size), align)
    return base, avail, used, align_up(used + used_ring_bytes(size), align)
