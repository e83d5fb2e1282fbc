"""Where the driver puts its own DMA windows in the VF's IOVA space.

Guest memory sits at IOVA = GPA.  DPDK puts the dirty log at 0x1000_0000_0000
and the mediated rings at 0x2000_0000_0000 (2^44, 2^45), which an IOMMU with
fewer than 46 address bits cannot map (QEMU's intel-iommu defaults to 39).
We keep DPDK's addresses where the IOMMU allows them and otherwise take the
lowest 1 GiB-aligned place above everything mapped that an allowed range holds.
"""
from __future__ import annotations

ALIGN = 1 << 30


def _fits(ranges, start: int, size: int) -> bool:
    return any(lo <= start and start + size - 1 <= hi for lo, hi in ranges)


def _free(taken, start: int, size: int) -> bool:
    return all(start + size <= t_start or t_start + t_size <= start for t_start, t_size in taken)


def place(ranges: list[tuple[int, int]], preferred: int, size: int,
          taken: list[tuple[int, int]]) -> int | None:
    """An IOVA for ``size`` bytes: ``preferred`` if allowed and free, else the lowest
    aligned free place above ``taken``; None when no allowed range has room."""
    if _fits(ranges, preferred, size) and _free(taken, preferred, size):
        return preferred
    floor = max((s + n for s, n in taken), default=0)
    for lo, hi in sorted(ranges):
        start = max(lo, floor)
        start = -(-start // ALIGN) * ALIGN
        while start + size - 1 <= hi:
            if _free(taken, start, size):
                return start
            start += ALIGN
    return None
