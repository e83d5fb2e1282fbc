"""Split-ring facts the simulator's Python needs (virtio 1.x, 2.7), its one copy.

Kept apart from the driver's (ifcvf/vring.py) on purpose: the model is
written independently, so a wrong number on either side shows up as a
disagreement instead of being shared.  The C ring code (csrc/sim/) has its
own, checked against this by the guest and engine tests.
"""
from __future__ import annotations


def used_ring_bytes(size: int) -> int:
    """flags, idx, ring[size] of (id, len), avail_event."""
    return 6 + 8 * size


def ring_layout(base: int, size: int, align: int = 4096) -> tuple[int, int, int, int]:
    """(desc, avail, used, end) GPAs of a ring laid out from ``base`` as vring_init
    does: desc 16 * size, avail 6 + 2 * size, the used ring (6 + 8 * size) at the
    next ``align`` boundary, ``end`` rounded up to ``align``."""
    desc = base
    avail = desc + 16 * size
    used = (avail + 6 + 2 * size + align - 1) // align * align
    end = (used + used_ring_bytes(size) + align - 1) // align * align
    return desc, avail, used, end


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event (virtio 2.7.10): did an index moving old -> new pass event?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
