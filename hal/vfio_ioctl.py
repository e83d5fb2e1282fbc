"""The VFIO user ABI (linux/vfio.h) as ctypes structures, constants and one ioctl call.

Only what ``hal.vfio`` uses.  Every request number is ``_IO(';', 100 + n)``:
VFIO passes its argument size inside the structures (``argsz``) instead of
encoding it in the request, so the request carries no size or direction bits.

ioctls go through libc's ``ioctl`` via ctypes rather than ``fcntl.ioctl``:
GROUP_GET_DEVICE_FD returns the new fd as the syscall's return value, and
``fcntl.ioctl`` with a buffer argument returns the buffer, dropping it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct

# --- request numbers --------------------------------------------------------
VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _io(nr: int) -> int:
    return VFIO_TYPE << 8 | (VFIO_BASE + nr)


VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_UNSET_CONTAINER = _io(5)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_GET_INFO = _io(7)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_DEVICE_GET_IRQ_INFO = _io(9)
VFIO_DEVICE_SET_IRQS = _io(10)
VFIO_DEVICE_RESET = _io(11)
VFIO_IOMMU_GET_INFO = _io(12)
VFIO_IOMMU_MAP_DMA = _io(13)
VFIO_IOMMU_UNMAP_DMA = _io(14)

# --- constants ----------------------------------------------------------------
VFIO_API_VERSION = 0

VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

VFIO_IRQ_INFO_EVENTFD = 1 << 0

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1

# vfio-pci region and IRQ indexes.
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8

VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4


# --- structures -----------------------------------------------------------------
class _Vfio(ctypes.Structure):
    """Base: sets ``argsz`` to the structure's own size, as every VFIO call expects."""

    def __init__(self, **fields):
        super().__init__(argsz=ctypes.sizeof(self), **fields)


class GroupStatus(_Vfio):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class DeviceInfo(_Vfio):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("num_regions", ctypes.c_uint32),
        ("num_irqs", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
    ]


class RegionInfo(_Vfio):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("size", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
    ]


class IrqInfo(_Vfio):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    ]


class IrqSetHeader(ctypes.Structure):
    """vfio_irq_set without its trailing ``data[]``; see ``irq_set``."""

    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("start", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    ]


def irq_set(index: int, flags: int, start: int, eventfds: list[int] | None = None) -> ctypes.Structure:
    """A vfio_irq_set with ``data`` = the eventfds as s32 (none for DATA_NONE).

    ``count`` is the number of eventfds; DATA_NONE with count 0 disables the index.
    """
    fds = list(eventfds or [])

    class IrqSet(ctypes.Structure):
        _fields_ = IrqSetHeader._fields_ + [("data", ctypes.c_int32 * len(fds))]

    req = IrqSet(argsz=ctypes.sizeof(IrqSet), flags=flags, index=index, start=start, count=len(fds))
    for i, fd in enumerate(fds):
        req.data[i] = fd
    return req


class DmaMap(_Vfio):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("vaddr", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]


class DmaUnmap(_Vfio):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]


class IommuInfo(_Vfio):
    """vfio_iommu_type1_info; with VFIO_IOMMU_INFO_CAPS a capability chain follows."""

    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova_pgsizes", ctypes.c_uint64),
        ("cap_offset", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1


def parse_iova_ranges(buf: bytes) -> list[tuple[int, int]] | None:
    """The IOVA ranges (first, last, inclusive) in a VFIO_IOMMU_GET_INFO answer,
    or None when the kernel reported none (then any 64-bit IOVA may be used)."""
    argsz, flags, _pgsizes, cap_offset = struct.unpack_from("<IIQI", buf, 0)
    if not flags & VFIO_IOMMU_INFO_CAPS:
        return None
    offset, seen = cap_offset, set()
    while offset and offset not in seen and offset + 8 <= min(argsz, len(buf)):
        seen.add(offset)
        cap_id, _version, nxt = struct.unpack_from("<HHI", buf, offset)
        if cap_id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            (count,) = struct.unpack_from("<I", buf, offset + 8)
            ranges = []
            for i in range(count):
                at = offset + 16 + 16 * i
                if at + 16 > len(buf):
                    break
                ranges.append(struct.unpack_from("<QQ", buf, at))
            return ranges
        offset = nxt
    return None


# --- calls ----------------------------------------------------------------------
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int

MAP_FAILED = ctypes.c_void_p(-1).value


def ioctl(fd: int, request: int, arg=None) -> int:
    """Issue one ioctl; return its (non-negative) result or raise OSError with errno.

    ``arg`` is a ctypes structure (passed by reference), an int (passed by
    value, e.g. an extension number), bytes (a C string) or None.
    """
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = arg
    elif isinstance(arg, bytes):
        ptr = ctypes.cast(ctypes.c_char_p(arg), ctypes.c_void_p)
    else:
        ptr = ctypes.addressof(arg)
    ret = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def mmap_shared(fd: int, size: int, offset: int) -> int:
    """mmap(PROT_READ|PROT_WRITE, MAP_SHARED) of an fd range; returns the address.

    A raw mapping (not Python's ``mmap``) so that loads and stores are plain
    ctypes accesses of the exact width, with no buffer exports to track.
    """
    import mmap as _mmap
    addr = _libc.mmap(None, size, _mmap.PROT_READ | _mmap.PROT_WRITE, _mmap.MAP_SHARED, fd, offset)
    if addr is None or addr == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return addr


def munmap(addr: int, size: int) -> None:
    if _libc.munmap(addr, size) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err))
