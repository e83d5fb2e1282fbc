"""QEMU's RAM migration stream between two guest RAMs (csrc/sim/qemu_ram.c).

A page of zeros goes on the stream as a 9-byte zero-page record, any other
page as its 8-byte header and 4096 bytes (QEMU 7.2, migration/ram.c), so a
guest's never-written memory costs the pre-copy almost nothing, as it does in
QEMU.  Both RAMs are memfds; pages nobody wrote are holes that this code never
touches, so the simulator's resident memory follows what the guest used.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass

from sim._native import ffi, lib

PAGE = lib.IFC_RAM_PAGE


@dataclass
class Sent:
    """What one call put on the stream."""

    pages: int = 0
    bytes: int = 0
    zero_pages: int = 0


def _ram(memory):
    ram = ffi.new("struct ifc_ram *")
    ram.mem = ffi.cast("uint8_t *", memory.address)
    ram.pages = memory.size // PAGE
    ram.fd = memory.fd
    ram.offset = memory.offset
    return ram


class RamStream:
    """Migrates pages of ``src`` into ``dst`` (HostMemory objects that outlive it)."""

    def __init__(self, src, dst):
        self._src = _ram(src)
        self._dst = _ram(dst)
        self._sent = ffi.new("struct ifc_ram_sent *")
        self.pages = min(self._src.pages, self._dst.pages)

    def pages_to_send(self, pages) -> array:
        """The page numbers ``send`` takes, checked against both RAMs once."""
        todo = array("I", pages)
        if todo and max(todo) >= self.pages:
            raise ValueError(f"page {max(todo)} is outside the {self.pages}-page RAM")
        return todo

    def send(self, pages: array, start: int, budget_bytes: int) -> Sent:
        """Send from pages[start:] (from ``pages_to_send``) until about
        ``budget_bytes`` are on the stream; returns what was sent."""
        n = len(pages) - start
        if n <= 0:
            return Sent()
        base = ffi.from_buffer("uint32_t[]", pages)
        try:
            got = lib.ifc_ram_send(self._src, self._dst, base + start, n, budget_bytes, self._sent)
        finally:
            ffi.release(base)
        if got < 0:
            raise RuntimeError(f"ifc_ram_send refused pages {pages[start]}..: error {got}")
        s = self._sent
        return Sent(pages=s.consumed, bytes=s.bytes, zero_pages=s.zero_pages)

    def differing_pages(self) -> list[int]:
        """Page numbers whose contents differ, ascending."""
        limit = 1024
        while True:
            out = ffi.new("uint32_t[]", limit)
            found = lib.ifc_ram_compare(self._src, self._dst, out, limit)
            if found < 0:
                raise RuntimeError(f"ifc_ram_compare failed: error {found}")
            if found <= limit:
                return list(out[0:found])
            limit = found


def fill_used(memory, first_page: int, pages: int, seed: int) -> None:
    """Write deterministic data into ``pages`` pages from ``first_page``: the RAM a
    running guest has used before the simulation starts (kernel, page cache)."""
    if first_page < 0 or pages < 0 or (first_page + pages) * PAGE > memory.size:
        raise ValueError(f"pages {first_page}+{pages} are outside the {memory.size}-byte RAM")
    lib.ifc_ram_fill(ffi.cast("uint8_t *", memory.address), first_page, pages, seed)
