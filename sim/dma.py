"""Device DMA through the function's IOMMU, as the C ring code sees it.

``DmaDomain`` is the function's ``IommuDomain`` plus a ``generation`` that
changes with every map and unmap, so the engines rebuild their C segment
table (``SegmentTable``: IOVA ranges with host addresses) exactly when the
mappings changed and never use a stale host address.  Faults the C code
detects (an unmapped buffer, ring or log page) are recorded on the domain
like any other IOMMU fault, so ``fn.iommu.faults`` and the trace show them.

Host addresses are taken from the mapped buffers without keeping a buffer
export alive (an export would make the domain's unmap fail); a table is
only used while the generation it was built for is current.
"""
from __future__ import annotations

from sim._native import ffi
from sim.iommu import IommuDomain


class DmaDomain(IommuDomain):
    """An IommuDomain that counts its changes."""

    def __init__(self, world, name: str = "iommu"):
        super().__init__(world, name)
        self.generation = 0

    def map(self, iova: int, buffer, size: int) -> None:
        super().map(iova, buffer, size)
        self.generation += 1

    def unmap(self, iova: int, size: int) -> None:
        super().unmap(iova, size)
        self.generation += 1

    def clear(self) -> None:
        super().clear()
        self.generation += 1

    def record_fault(self, iova: int, length: int, direction: str, reason: str) -> None:
        """A fault found by the device's own address checks (C ring code, logging)."""
        self._fault(iova, length, direction, reason)


def host_address(view: memoryview) -> int:
    """The address of a writable buffer's first byte, without holding an export."""
    pointer = ffi.from_buffer(view, require_writable=True)
    try:
        return int(ffi.cast("uintptr_t", pointer))
    finally:
        ffi.release(pointer)


class SegmentTable:
    """The C view (``struct ifc_dp_mem``) of a DmaDomain, rebuilt when it changes."""

    def __init__(self, domain: IommuDomain):
        self.domain = domain
        self.mem = ffi.new("struct ifc_dp_mem *")
        self._segs = ffi.new("struct ifc_dp_seg[]", 1)
        self.generation = -1
        self.refresh()

    def refresh(self) -> bool:
        """Rebuild if the domain changed; True when it did."""
        generation = getattr(self.domain, "generation", None)
        if generation is not None and generation == self.generation:
            return False
        maps = self.domain.mappings()
        segs = ffi.new("struct ifc_dp_seg[]", max(1, len(maps)))
        for i, (iova, size) in enumerate(maps):
            hit = self.domain.translate(iova)
            mapping = hit[0]
            segs[i].iova = iova
            segs[i].size = size
            segs[i].host = ffi.cast("uint8_t *", host_address(mapping.memory))
        self._segs = segs
        self.mem.segs = segs
        self.mem.nsegs = len(maps)
        self.generation = generation if generation is not None else self.generation + 1
        return True


__all__ = ["DmaDomain", "SegmentTable", "host_address"]
