"""The vhost dirty log: one bit per 4 KiB guest-physical page.

The front-end owns the memory and clears it with atomic exchanges while the
back-end and the device set bits, so marking goes through a C atomic OR
(``csrc/driver/dirtylog.c``).  This module only adapts buffers and errors.
The front-end's fetch-and-clear is not the driver's: the simulator's QEMU role
has it (``sim.migration.DirtyLogReader``, ``csrc/sim/qemu_log.c``).
"""
from __future__ import annotations

import re

from ifcvf._native import ffi, lib

PAGE_SIZE = 1 << lib.IFC_LOG_PAGE_SHIFT


class LogRangeError(ValueError):
    """A range to mark lies (partly) past the end of the log; nothing was written."""


class DirtyLog:
    """A view of a vhost log bitmap held in writable memory (an mmap, bytearray...)."""

    def __init__(self, buffer, size: int | None = None):
        self._view = memoryview(buffer).cast("B")
        if size is not None:
            if size > len(self._view):
                raise ValueError(f"log size {size} exceeds its buffer ({len(self._view)} bytes)")
            self._view = self._view[:size]
        self.size = len(self._view)
        # A plain pointer, not the from_buffer object: the memoryview keeps the
        # memory alive, and CPython 3.11's cycle collector crashes clearing a
        # memoryview that a live from_buffer object still exports.
        self._ptr = ffi.cast("uint8_t *", ffi.from_buffer("uint8_t[]", self._view, require_writable=True))

    @property
    def pages(self) -> int:
        """How many guest pages the log can describe."""
        return self.size * 8

    def mark(self, gpa: int, length: int) -> None:
        """Mark the pages of [gpa, gpa+length); LogRangeError if outside, with nothing written."""
        if gpa < 0 or length < 0 or gpa >= 1 << 64 or length >= 1 << 64:
            raise LogRangeError(f"range {gpa:#x}+{length:#x} is not a 64-bit guest range")
        rc = lib.ifc_log_mark(self._ptr, self.size, gpa, length)
        if rc == lib.IFC_ERR_RANGE:
            raise LogRangeError(
                f"range {gpa:#x}+{length:#x} ends past the log, which covers "
                f"guest addresses below {self.pages * PAGE_SIZE:#x}")
        if rc != lib.IFC_OK:
            raise ValueError(f"ifc_log_mark failed ({rc})")

    def dirty_pages(self) -> list[int]:
        """Page numbers whose bit is set (a snapshot, not atomic)."""
        return bitmap_pages(self._view)

    def release(self) -> None:
        """Drop the references to the buffer so its mmap can be closed."""
        self._ptr = None
        self._view.release()


def bitmap_pages(bitmap) -> list[int]:
    """Page numbers set in a log bitmap (bytes-like), in ascending order."""
    data = bytes(bitmap)
    pages = []
    for m in _NONZERO.finditer(data):  # logs are mostly zero: let the regex engine skip
        byte = m.start()
        value = data[byte]
        pages.extend(byte * 8 + bit for bit in range(8) if value >> bit & 1)
    return pages


_NONZERO = re.compile(rb"[^\x00]")
