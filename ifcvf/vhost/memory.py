"""Guest memory as the front-end describes it: regions of fds we mmap.

Three address spaces meet here: guest-physical (GPA; also the VF's IOVA), the
front-end's own virtual addresses (UVA; what SET_VRING_ADDR carries), and our
host addresses (where the mmap landed; what C code and VFIO use).  Every
translation checks that the whole range lies inside one region.

Each region is mapped from file offset 0 for ``mmap_offset + size`` bytes and
then sliced, as DPDK does (hugepage-backed offsets need not be aligned for
mmap), after checking the fd really holds that many bytes: mapping past the
end of a file turns a hostile table into SIGBUS later.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from hal.memory import HostMemory


class GuestMemoryError(ValueError):
    """A memory table or address the front-end gave us cannot be used."""


@dataclass
class Region:
    gpa: int
    size: int
    uva: int
    mmap_offset: int
    mapping: HostMemory

    @property
    def host_address(self) -> int:
        return self.mapping.address + self.mmap_offset

    @property
    def view(self) -> memoryview:
        return self.mapping.view[self.mmap_offset:self.mmap_offset + self.size]

    @property
    def gpa_end(self) -> int:
        return self.gpa + self.size

    def key(self) -> tuple:
        """What identifies the layout (the fd number does not: it changes every time)."""
        st = os.fstat(self.mapping.fd)
        return (self.gpa, self.size, self.uva, self.mmap_offset, st.st_dev, st.st_ino)


class GuestMemory:
    """The mapped memory table of one vhost-user connection."""

    def __init__(self, regions: list[Region]):
        self.regions = sorted(regions, key=lambda r: r.gpa)

    @classmethod
    def map(cls, table: list[tuple[int, int, int, int]], fds: list[int]) -> "GuestMemory":
        """Map (gpa, size, uva, mmap_offset) regions from their fds.

        On success the returned object owns the fds; on failure nothing is
        mapped and the caller still owns (and must close) every fd.
        """
        if len(table) != len(fds):
            raise GuestMemoryError(f"{len(table)} regions but {len(fds)} fds")
        for i, (gpa, size, uva, offset) in enumerate(table):
            if size == 0:
                raise GuestMemoryError(f"region {i} has size 0")
            try:
                st = os.fstat(fds[i])
            except OSError as err:
                raise GuestMemoryError(f"region {i}: fd is not usable: {err}") from None
            if not (stat.S_ISREG(st.st_mode) or st.st_size):
                raise GuestMemoryError(f"region {i}: fd is not a memory file (mode {st.st_mode:o})")
            if st.st_size < offset + size:
                raise GuestMemoryError(
                    f"region {i}: the fd holds {st.st_size:#x} bytes, but the table maps "
                    f"{size:#x} bytes at offset {offset:#x}")
        regions: list[Region] = []
        try:
            for (gpa, size, uva, offset), fd in zip(table, fds):
                mapping = HostMemory.duplicate(fd, offset + size, "guest")
                regions.append(Region(gpa, size, uva, offset, mapping))
        except (OSError, ValueError) as err:
            for r in regions:
                r.mapping.close()
            raise GuestMemoryError(f"cannot map guest memory: {err}") from None
        # The dup'ed fds are ours now; the originals go back to the caller's care.
        for fd in fds:
            os.close(fd)
        return cls(regions)

    def close(self) -> None:
        for r in self.regions:
            r.mapping.close()
        self.regions = []

    # --- translation ------------------------------------------------------------
    def region_of_gpa(self, gpa: int, length: int = 1) -> Region:
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa_end:
                return r
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not inside one memory region")

    def uva_to_gpa(self, uva: int, length: int) -> int:
        for r in self.regions:
            if r.uva <= uva and uva + length <= r.uva + r.size:
                return r.gpa + (uva - r.uva)
        raise GuestMemoryError(f"front-end address {uva:#x}+{length:#x} is not inside one memory region")

    def gpa_to_host(self, gpa: int, length: int) -> int:
        r = self.region_of_gpa(gpa, length)
        return r.host_address + (gpa - r.gpa)

    def view(self, gpa: int, length: int) -> memoryview:
        r = self.region_of_gpa(gpa, length)
        return r.view[gpa - r.gpa:gpa - r.gpa + length]

    @property
    def end(self) -> int:
        """One past the highest guest-physical address."""
        return max((r.gpa_end for r in self.regions), default=0)

    def layout(self) -> list[tuple]:
        return [r.key() for r in self.regions]

    def c_table(self) -> list[tuple[int, int, int]]:
        """(gpa, size, host address) per region, for the C relay."""
        return [(r.gpa, r.size, r.host_address) for r in self.regions]
