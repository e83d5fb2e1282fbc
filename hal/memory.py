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
                 offset: int = 0, writable: bool = True):
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
        self.size = size
        self.offset = offset
        self.name = name
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            self.mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=offset)
        except Exception:
            if own:
                os.close(fd)
            raise
        self.view = memoryview(self.mmap)
        # Stable for the mmap's life.  The temporary cdata's buffer export is
        # released at once, so close() can still unmap.
        self.address = int(_ffi.cast("uintptr_t", _ffi.from_buffer(self.mmap)))
        self.closed = False

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


def align_up(value: int, align: int = PAGE_SIZE) -> int:
    return (value + align - 1) // align * align
