"""The function's own IOMMU domain: IOVA ranges mapped onto host memory.

Like a VFIO type-1 container, mappings are page-granular and never overlap,
and an unmap must remove whole mappings.  A device access to an IOVA nobody
mapped is an IOMMU fault: it is recorded (``faults`` and the trace) and the
access fails softly (None / False), the way a real DMA read would abort rather
than crash the host.  Translation bisects the sorted mapping starts because the
datapath calls it once per descriptor.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from sim.world import World

IOMMU_PAGE = 0x1000
IOVA_LIMIT = 1 << 48  # 48-bit input address width, as VT-d second-level tables


class IommuError(ValueError):
    """A map or unmap request the domain refuses; nothing was changed.

    A ValueError: the request carries a bad argument."""


@dataclass(frozen=True)
class IommuFault:
    cycle: int
    iova: int
    length: int
    direction: str  # "read" or "write"
    reason: str


@dataclass
class Mapping:
    iova: int
    size: int
    memory: memoryview  # exactly ``size`` bytes, format "B"

    @property
    def end(self) -> int:
        return self.iova + self.size


class IommuDomain:
    """IOVA -> host memory for one function."""

    def __init__(self, world: World, name: str = "iommu"):
        self.world = world
        self.name = name
        self._starts: list[int] = []
        self._maps: list[Mapping] = []
        self.faults: list[IommuFault] = []
        # Fault knob: every map at or above this IOVA fails, as a full IOMMU
        # (VFIO's -ENOSPC) or an exhausted DMA limit would make it (None: never).
        self.refuse_maps_from: int | None = None

    # --- control (the driver, through VFIO_IOMMU_MAP_DMA / UNMAP_DMA) ------------
    def map(self, iova: int, buffer, size: int) -> None:
        """Map [iova, iova+size) onto the first ``size`` bytes of ``buffer``."""
        _check_range("map", iova, size)
        if self.refuse_maps_from is not None and iova + size > self.refuse_maps_from:
            self.world.record(self.name, "iommu_map_refused", iova=iova, size=size)
            raise IommuError(f"map {iova:#x}+{size:#x}: refused (fault knob: no maps from "
                             f"{self.refuse_maps_from:#x})")
        try:
            view = memoryview(buffer)
        except TypeError as exc:
            raise IommuError(f"map {iova:#x}: buffer {type(buffer).__name__} is not a buffer") from exc
        if view.readonly:
            raise IommuError(f"map {iova:#x}: buffer is read-only; the device must be able to write")
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if view.nbytes < size:
            raise IommuError(f"map {iova:#x}+{size:#x}: buffer holds only {view.nbytes:#x} bytes")
        i = bisect.bisect_right(self._starts, iova)
        before = self._maps[i - 1] if i else None
        after = self._maps[i] if i < len(self._maps) else None
        for other in (before, after):
            if other is not None and iova < other.end and other.iova < iova + size:
                raise IommuError(f"map {iova:#x}+{size:#x} overlaps the mapping "
                                 f"{other.iova:#x}+{other.size:#x}")
        self._starts.insert(i, iova)
        self._maps.insert(i, Mapping(iova, size, view[:size]))
        self.world.record(self.name, "iommu_map", iova=iova, size=size)

    def unmap(self, iova: int, size: int) -> None:
        """Remove the mappings that exactly tile [iova, iova+size)."""
        _check_range("unmap", iova, size)
        i = bisect.bisect_left(self._starts, iova)
        if i == len(self._maps) or self._maps[i].iova != iova:
            raise IommuError(f"unmap {iova:#x}+{size:#x}: no mapping starts at {iova:#x}")
        j, cursor = i, iova
        while cursor < iova + size:
            if j == len(self._maps) or self._maps[j].iova != cursor:
                raise IommuError(f"unmap {iova:#x}+{size:#x}: nothing mapped at {cursor:#x}")
            cursor = self._maps[j].end
            j += 1
        if cursor != iova + size:
            last = self._maps[j - 1]
            raise IommuError(f"unmap {iova:#x}+{size:#x} would split the mapping "
                             f"{last.iova:#x}+{last.size:#x}")
        for mapping in self._maps[i:j]:
            mapping.memory.release()
        del self._maps[i:j]
        del self._starts[i:j]
        self.world.record(self.name, "iommu_unmap", iova=iova, size=size)

    def mappings(self) -> list[tuple[int, int]]:
        """(iova, size) of every mapping, in IOVA order."""
        return [(m.iova, m.size) for m in self._maps]

    def clear(self) -> None:
        for mapping in self._maps:
            mapping.memory.release()
        self._maps.clear()
        self._starts.clear()

    # --- device accesses ----------------------------------------------------------
    def translate(self, iova: int) -> tuple[Mapping, int] | None:
        """The mapping holding ``iova`` and the offset into it, or None."""
        i = bisect.bisect_right(self._starts, iova) - 1
        if i < 0:
            return None
        mapping = self._maps[i]
        if iova >= mapping.end:
            return None
        return mapping, iova - mapping.iova

    def segments(self, iova: int, length: int, direction: str = "read") -> list[memoryview] | None:
        """Zero-copy views covering [iova, iova+length), one per mapping crossed.

        None (and a recorded fault) when any byte is unmapped.
        """
        if length < 0 or iova < 0 or iova + length > IOVA_LIMIT:
            self._fault(iova, length, direction, "address out of range")
            return None
        out: list[memoryview] = []
        cursor, end = iova, iova + length
        while cursor < end:
            hit = self.translate(cursor)
            if hit is None:
                self._fault(iova, length, direction, f"unmapped at {cursor:#x}")
                return None
            mapping, off = hit
            take = min(end, mapping.end) - cursor
            out.append(mapping.memory[off:off + take])
            cursor += take
        return out

    def view(self, iova: int, length: int, direction: str = "read") -> memoryview | None:
        """A zero-copy view of [iova, iova+length) when it lies in one mapping.

        None when any byte is unmapped (a recorded fault) or when the range
        crosses into an adjacent mapping (not a fault: use read/write instead).
        """
        parts = self.segments(iova, length, direction)
        if parts is None:
            return None
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return memoryview(b"")
        return None

    def read(self, iova: int, length: int) -> bytes | None:
        parts = self.segments(iova, length, "read")
        if parts is None:
            return None
        return b"".join(bytes(p) for p in parts)

    def write(self, iova: int, data) -> bool:
        data = memoryview(data).cast("B")
        parts = self.segments(iova, data.nbytes, "write")
        if parts is None:
            return False
        pos = 0
        for part in parts:
            part[:] = data[pos:pos + part.nbytes]
            pos += part.nbytes
        return True

    def _fault(self, iova: int, length: int, direction: str, reason: str) -> None:
        fault = IommuFault(self.world.now, iova, length, direction, reason)
        self.faults.append(fault)
        self.world.record(self.name, "iommu_fault", iova=iova, length=length,
                          direction=direction, reason=reason)


def _check_range(op: str, iova: int, size: int) -> None:
    if not isinstance(iova, int) or not isinstance(size, int):
        raise IommuError(f"{op}: iova and size must be integers")
    if size <= 0:
        raise IommuError(f"{op} {iova:#x}: size {size:#x} must be positive")
    if iova < 0 or iova % IOMMU_PAGE or size % IOMMU_PAGE:
        raise IommuError(f"{op} {iova:#x}+{size:#x}: iova and size must be 4 KiB aligned")
    if iova + size > IOVA_LIMIT:
        raise IommuError(f"{op} {iova:#x}+{size:#x}: ends beyond the 48-bit IOVA space")
