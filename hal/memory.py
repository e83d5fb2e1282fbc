"""Host memory with a stable address: memfd + shared mmap.

Guest RAM, the dirty log and mediated rings are always real memory in both
backends, so the C code and VFIO DMA mappings work on them unchanged, and the
memfd can be passed to another process (vhost-user SET_MEM_TABLE).
"""
from __future__ import annotations

import mmap
import os

import cffi

_ffi = cffi.FFI()

PAGE_SIZE = mmap.PAGESIZE


class HostMemory:
    """A page-aligned block of shared memory, optionally backed by an existing fd.

    ``fd`` stays open for the lifetime of the object (it is what gets passed
    over vhost-user); ``close()`` unmaps and closes it.
    """

    def __init__(self, size: int, name: str = "ifcvf", *, fd: int | None = None,
                 offset: int = 0, writable: bool = True, whole_pages: bool = False):
        """Map ``size`` bytes of ``fd`` (a new memfd if None) from ``offset``.

        With ``whole_pages`` the object spans the pages that hold those bytes:
        ``self.size`` is ``size`` rounded up to a page, which is what an IOMMU
        maps.  The file may end inside the last page (a vhost dirty log is
        sized in 8-byte words, never in pages): the kernel maps that page whole
        and its bytes past the end of the file are ordinary memory, but Python's
        mmap refuses a length past the end of a file, so only ``size`` bytes
        are asked of it and the rest of the page is reached through a pointer.
        """
        if size <= 0:
            raise ValueError(f"memory size must be positive, not {size}")
        if offset < 0 or offset % mmap.ALLOCATIONGRANULARITY:
            raise ValueError(f"mmap offset {offset:#x} is not page aligned")
        own = fd is None
        if own:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                raise
        self.fd = fd
        self.size = align_up(size) if whole_pages else size
        self.offset = offset
        self.name = name
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            self.mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=offset)
        except Exception:
            if own:
                os.close(fd)
            raise
        self.view = _span(self.mmap, self.size, writable)
        # Stable for the mmap's life.  The temporary cdata's buffer export is
        # released at once, so close() can still unmap.
        self.address = int(_ffi.cast("uintptr_t", _ffi.from_buffer(self.mmap)))
        self.closed = False

    @classmethod
    def duplicate(cls, fd: int, size: int, name: str, **kwargs) -> "HostMemory":
        """Map ``size`` bytes of a duplicate of ``fd`` (the object owns the
        duplicate, the caller keeps ``fd``).  When mapping fails the duplicate
        is closed: a peer's fd that cannot be mapped costs no fd here."""
        dup = os.dup(fd)
        try:
            return cls(size, name, fd=dup, **kwargs)
        except BaseException:
            os.close(dup)
            raise

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.view.release()
        try:
            self.mmap.close()
        except BufferError:
            # Someone still holds an export (a cffi buffer, a memoryview); the
            # mapping stays until it is dropped rather than crashing the caller.
            pass
        os.close(self.fd)

    def __enter__(self) -> "HostMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HostMemory({self.name!r}, size={self.size:#x}, fd={self.fd})"


def _span(mapping: mmap.mmap, length: int, writable: bool) -> memoryview:
    """A view of ``length`` bytes from the start of ``mapping``, which may be
    shorter when its file ends inside the last page (see ``HostMemory``).

    The pointer behind a longer view holds a buffer export of the mmap, as a
    plain memoryview does, so the mmap cannot be closed (and unmapped) while
    any view of the span is alive.
    """
    if length == len(mapping):
        return memoryview(mapping)
    if length > align_up(len(mapping)):
        raise ValueError(f"a span of {length} bytes reaches past the last page of a "
                         f"{len(mapping)}-byte mapping")
    pointer = _ffi.from_buffer("uint8_t *", mapping)
    view = memoryview(_ffi.buffer(pointer, length))
    return view if writable else view.toreadonly()


def align_up(value: int, align: int = PAGE_SIZE) -> int:
    return (value + align - 1) // align * align
