"""Typed vhost-user payloads: frozen dataclasses with ``unpack(bytes)`` / ``pack()``.

``unpack`` is the trust boundary: it takes bytes a front-end (or back-end)
controls, checks the length and every field whose bad value could hurt a
consumer (sizes, overflowing ranges, overlapping regions, reserved bits), and
raises ``ProtocolError`` and nothing else. Constructing a dataclass directly
does not validate, so tests and fault injection can build bad payloads on
purpose. ``pack`` raises ``ValueError`` for a field that does not fit its wire
type (a programming error, not hostile input).

All integers are native byte order with standard sizes, no implicit padding:
the wire layout is spelled out field by field.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from ifcvf.vhost.codes import (
    MAX_CONFIG_SIZE, MAX_PAYLOAD_SIZE, MAX_REGIONS, VRING_F_LOG, VRING_INDEX_MASK, VRING_NOFD)
from ifcvf.vhost.errors import ProtocolError

U64_LIMIT = 1 << 64


def _fits_u64_range(start: int, length: int) -> bool:
    """``start + length`` is representable, so ``[start, start + length)`` has a u64 end."""
    return start + length < U64_LIMIT


def _check_size(cls: type, data: bytes | memoryview, size: int) -> None:
    if len(data) != size:
        raise ProtocolError(f"{cls.__name__} payload is {len(data)} bytes, expected {size}")


def _pack(fmt: struct.Struct, cls: type, *values: int) -> bytes:
    try:
        return fmt.pack(*values)
    except struct.error as exc:
        raise ValueError(f"{cls.__name__} field out of range: {exc}") from None


class Payload:
    """Base of every payload type.

    ``SIZE`` is the fixed wire size, or None for the variable-size ones, which
    declare ``MIN_SIZE``/``MAX_SIZE`` and check their own consistency.
    """

    __slots__ = ()
    SIZE: ClassVar[int | None] = None
    MIN_SIZE: ClassVar[int] = 0
    MAX_SIZE: ClassVar[int] = 0

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        raise NotImplementedError

    def pack(self) -> bytes:
        raise NotImplementedError


_U64 = struct.Struct("=Q")
_U32X2 = struct.Struct("=II")


@dataclass(frozen=True, slots=True)
class U64(Payload):
    """A single u64: features, status, ack value, MTU, queue count..."""

    value: int
    SIZE: ClassVar[int] = 8

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size(cls, data, cls.SIZE)
        return cls(*_U64.unpack(data))

    def pack(self) -> bytes:
        return _pack(_U64, type(self), self.value)


@dataclass(frozen=True, slots=True)
class VringFd(Payload):
    """The u64 of SET_VRING_KICK/CALL/ERR: bits 0-7 vring index, bit 8 "no fd".

    The other bits are reserved; a peer setting them is rejected rather than
    silently masked, so a confused front-end cannot address the wrong ring.
    """

    index: int
    nofd: bool = False
    SIZE: ClassVar[int] = 8

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size(cls, data, cls.SIZE)
        (value,) = _U64.unpack(data)
        return cls.from_u64(value)

    @classmethod
    def from_u64(cls, value: int) -> Self:
        reserved = value & ~(VRING_INDEX_MASK | VRING_NOFD)
        if reserved:
            raise ProtocolError(f"vring u64 {value:#x} sets reserved bits {reserved:#x}: "
                                f"only bits 0-7 (index) and bit 8 (no fd) are defined")
        return cls(value & VRING_INDEX_MASK, bool(value & VRING_NOFD))

    def to_u64(self) -> int:
        if not 0 <= self.index <= VRING_INDEX_MASK:
            raise ValueError(f"vring index {self.index} does not fit bits 0-7")
        return self.index | (VRING_NOFD if self.nofd else 0)

    def pack(self) -> bytes:
        return _U64.pack(self.to_u64())


@dataclass(frozen=True, slots=True)
class VringState(Payload):
    """``{index:u32, num:u32}``: ring size, base index, enable flag, endianness."""

    index: int
    num: int
    SIZE: ClassVar[int] = 8

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size(cls, data, cls.SIZE)
        return cls(*_U32X2.unpack(data))

    def pack(self) -> bytes:
        return _pack(_U32X2, type(self), self.index, self.num)


_VRING_ADDR = struct.Struct("=IIQQQQ")


@dataclass(frozen=True, slots=True)
class VringAddr(Payload):
    """``{index, flags:u32, desc, used, avail, log:u64}`` (wire order desc, used, avail, log).

    Ring addresses are front-end virtual addresses (IOVAs with IOMMU_PLATFORM);
    ``log`` is the guest-physical address of the used ring, for dirty logging.
    """

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    SIZE: ClassVar[int] = 40

    @property
    def log_enabled(self) -> bool:
        return bool(self.flags & VRING_F_LOG)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size(cls, data, cls.SIZE)
        addr = cls(*_VRING_ADDR.unpack(data))
        if addr.flags & ~VRING_F_LOG:
            raise ProtocolError(f"vring flags {addr.flags:#x} set undefined bits: "
                                f"only VHOST_VRING_F_LOG ({VRING_F_LOG:#x}) is defined")
        return addr

    def pack(self) -> bytes:
        return _pack(_VRING_ADDR, type(self), self.index, self.flags, self.desc, self.used,
                     self.avail, self.log)


_REGION = struct.Struct("=QQQQ")


@dataclass(frozen=True, slots=True)
class MemoryRegion(Payload):
    """One guest RAM region: ``{guest_phys_addr, memory_size, userspace_addr, mmap_offset}``."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    SIZE: ClassVar[int] = 32

    @property
    def gpa_end(self) -> int:
        """Exclusive end in guest-physical space."""
        return self.guest_phys_addr + self.memory_size

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size(cls, data, cls.SIZE)
        region = cls(*_REGION.unpack(data))
        region.validate()
        return region

    def validate(self) -> None:
        """A region a back-end can map: non-empty, every range ending inside u64."""
        if self.memory_size == 0:
            raise ProtocolError("memory_size is 0: a region must be non-empty")
        for name, start in (("guest_phys_addr", self.guest_phys_addr),
                            ("userspace_addr", self.userspace_addr),
                            ("mmap_offset", self.mmap_offset)):
            if not _fits_u64_range(start, self.memory_size):
                raise ProtocolError(f"{name} {start:#x} + memory_size {self.memory_size:#x} "
                                    f"overflows 64 bits")

    def pack(self) -> bytes:
        return _pack(_REGION, type(self), self.guest_phys_addr, self.memory_size,
                     self.userspace_addr, self.mmap_offset)


_TABLE_HEAD = struct.Struct("=II")


@dataclass(frozen=True, slots=True)
class MemoryTable(Payload):
    """SET_MEM_TABLE: ``nregions:u32, padding:u32`` then ``nregions`` regions.

    QEMU 7.2 (vhost_user_fill_set_mem_table_msg) sends size = 8 + nregions * 32,
    not the 8 slots of its C struct, and so does rust-vmm's front-end; that is the
    only form accepted. The padding word carries nothing and is ignored.
    """

    regions: tuple[MemoryRegion, ...]
    MIN_SIZE: ClassVar[int] = _TABLE_HEAD.size + MemoryRegion.SIZE
    MAX_SIZE: ClassVar[int] = _TABLE_HEAD.size + MAX_REGIONS * MemoryRegion.SIZE

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) < _TABLE_HEAD.size:
            raise ProtocolError(f"memory table is {len(data)} bytes, shorter than its "
                                f"{_TABLE_HEAD.size}-byte nregions/padding head")
        nregions, _padding = _TABLE_HEAD.unpack_from(data)
        if nregions == 0:
            raise ProtocolError("nregions is 0: a memory table needs at least one region")
        if nregions > MAX_REGIONS:
            raise ProtocolError(f"nregions is {nregions}, at most {MAX_REGIONS} allowed")
        expected = _TABLE_HEAD.size + nregions * MemoryRegion.SIZE
        if len(data) != expected:
            raise ProtocolError(f"memory table is {len(data)} bytes, expected "
                                f"8 + {nregions} * 32 = {expected} for nregions {nregions}")
        regions = []
        for i in range(nregions):
            start = _TABLE_HEAD.size + i * MemoryRegion.SIZE
            try:
                regions.append(MemoryRegion.unpack(data[start:start + MemoryRegion.SIZE]))
            except ProtocolError as exc:
                raise ProtocolError(f"region {i}: {exc.reason}") from None
        table = cls(tuple(regions))
        table.check_no_overlap()
        return table

    def check_no_overlap(self) -> None:
        """Two regions claiming the same guest-physical page would make address
        translation ambiguous (and let one fd shadow another)."""
        order = sorted(range(len(self.regions)), key=lambda i: self.regions[i].guest_phys_addr)
        for a, b in zip(order, order[1:]):
            ra, rb = self.regions[a], self.regions[b]
            if rb.guest_phys_addr < ra.gpa_end:
                first, second = sorted((a, b))
                raise ProtocolError(
                    f"regions {first} and {second} overlap in guest-physical space: "
                    f"[{ra.guest_phys_addr:#x}, {ra.gpa_end:#x}) and "
                    f"[{rb.guest_phys_addr:#x}, {rb.gpa_end:#x})")

    def pack(self) -> bytes:
        return (_TABLE_HEAD.pack(len(self.regions), 0)
                + b"".join(region.pack() for region in self.regions))


@dataclass(frozen=True, slots=True)
class SingleRegion(Payload):
    """ADD_MEM_REG / REM_MEM_REG: ``padding:u64`` then one region (padding ignored)."""

    region: MemoryRegion
    SIZE: ClassVar[int] = 8 + MemoryRegion.SIZE

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size(cls, data, cls.SIZE)
        return cls(MemoryRegion.unpack(data[8:]))

    def pack(self) -> bytes:
        return bytes(8) + self.region.pack()


_LOG = struct.Struct("=QQ")


@dataclass(frozen=True, slots=True)
class Log(Payload):
    """SET_LOG_BASE: ``{mmap_size, mmap_offset}`` of the dirty log in the attached fd.

    QEMU sends mmap_size = log chunks * 8 (never 0) and mmap_offset 0.
    """

    mmap_size: int
    mmap_offset: int
    SIZE: ClassVar[int] = 16

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size(cls, data, cls.SIZE)
        log = cls(*_LOG.unpack(data))
        if log.mmap_size == 0:
            raise ProtocolError("log mmap_size is 0: nothing to map")
        if not _fits_u64_range(log.mmap_offset, log.mmap_size):
            raise ProtocolError(f"log mmap_offset {log.mmap_offset:#x} + mmap_size "
                                f"{log.mmap_size:#x} overflows 64 bits")
        return log

    def pack(self) -> bytes:
        return _pack(_LOG, type(self), self.mmap_size, self.mmap_offset)


class IotlbType(enum.IntEnum):
    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class IotlbPerm(enum.IntEnum):
    NONE = 0
    RO = 1
    WO = 2
    RW = 3


_IOTLB_PERMS = frozenset(p.value for p in IotlbPerm)
_IOTLB_TYPES = frozenset(t.value for t in IotlbType)

# struct vhost_iotlb_msg: iova, size, uaddr u64, perm u8, type u8, 6 bytes of
# tail padding (the struct is 8-aligned): 32 bytes on the wire.
_IOTLB = struct.Struct("=QQQBB6x")


@dataclass(frozen=True, slots=True)
class Iotlb(Payload):
    """IOTLB_MSG / BACKEND_IOTLB_MSG: ``{iova, size, uaddr, perm:u8, type:u8}``."""

    iova: int
    size: int
    uaddr: int
    perm: int
    msg_type: int
    SIZE: ClassVar[int] = _IOTLB.size

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size(cls, data, cls.SIZE)
        msg = cls(*_IOTLB.unpack(data))
        if msg.perm not in _IOTLB_PERMS:
            raise ProtocolError(f"IOTLB perm {msg.perm} undefined: expected 0-3")
        if msg.msg_type not in _IOTLB_TYPES:
            raise ProtocolError(f"IOTLB type {msg.msg_type} undefined: expected 1-4")
        if not _fits_u64_range(msg.iova, msg.size):
            raise ProtocolError(f"IOTLB iova {msg.iova:#x} + size {msg.size:#x} overflows 64 bits")
        return msg

    def pack(self) -> bytes:
        return _pack(_IOTLB, type(self), self.iova, self.size, self.uaddr, self.perm,
                     self.msg_type)


_CONFIG_HEAD = struct.Struct("=III")


class ConfigFlags(enum.IntEnum):
    """SET_CONFIG flags: a value, not a bit mask."""

    WRITABLE = 0        # a guest write to a writable field
    MIGRATION = 1       # restoring config on the migration destination


_CONFIG_FLAGS = frozenset(f.value for f in ConfigFlags)


@dataclass(frozen=True, slots=True)
class Config(Payload):
    """GET/SET_CONFIG: ``{offset, size, flags:u32}`` then ``size`` bytes.

    ``size`` is not stored twice: it is ``len(payload)``. The whole access must
    lie inside QEMU's 256-byte config cap.
    """

    offset: int
    flags: int
    payload: bytes
    HEAD_SIZE: ClassVar[int] = _CONFIG_HEAD.size
    MIN_SIZE: ClassVar[int] = _CONFIG_HEAD.size
    MAX_SIZE: ClassVar[int] = _CONFIG_HEAD.size + MAX_CONFIG_SIZE

    @property
    def size(self) -> int:
        return len(self.payload)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) < _CONFIG_HEAD.size:
            raise ProtocolError(f"config payload is {len(data)} bytes, shorter than its "
                                f"{_CONFIG_HEAD.size}-byte offset/size/flags head")
        offset, size, flags = _CONFIG_HEAD.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise ProtocolError(f"config size {size} exceeds the {MAX_CONFIG_SIZE}-byte maximum")
        if offset + size > MAX_CONFIG_SIZE:
            raise ProtocolError(f"config offset {offset} + size {size} runs past the "
                                f"{MAX_CONFIG_SIZE}-byte config space")
        if len(data) != _CONFIG_HEAD.size + size:
            raise ProtocolError(f"config payload is {len(data)} bytes, expected 12 + size "
                                f"{size} = {_CONFIG_HEAD.size + size}")
        if flags not in _CONFIG_FLAGS:
            raise ProtocolError(f"config flags {flags} undefined: expected 0 (writable) "
                                f"or 1 (migration)")
        return cls(offset, flags, bytes(data[_CONFIG_HEAD.size:]))

    def pack(self) -> bytes:
        head = _pack(_CONFIG_HEAD, type(self), self.offset, self.size, self.flags)
        return head + bytes(self.payload)


_AREA = struct.Struct("=QQQ")


@dataclass(frozen=True, slots=True)
class VringArea(Payload):
    """BACKEND_VRING_HOST_NOTIFIER_MSG: ``{u64 index|nofd, size, offset}``.

    ``size``/``offset`` locate the queue's notify area inside the attached fd
    (for IFCVF: the VFIO device fd, one host page per queue).
    """

    index: int
    size: int
    offset: int
    nofd: bool = False
    SIZE: ClassVar[int] = _AREA.size

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size(cls, data, cls.SIZE)
        value, size, offset = _AREA.unpack(data)
        vring = VringFd.from_u64(value)
        if not _fits_u64_range(offset, size):
            raise ProtocolError(f"vring area offset {offset:#x} + size {size:#x} overflows 64 bits")
        return cls(vring.index, size, offset, vring.nofd)

    def pack(self) -> bytes:
        value = VringFd(self.index, self.nofd).to_u64()
        return _pack(_AREA, type(self), value, self.size, self.offset)


# VhostUserInflight: mmap_size, mmap_offset u64, num_queues, queue_size u16, and
# 4 bytes of tail padding: QEMU sends sizeof() = 24.
_INFLIGHT = struct.Struct("=QQHH4x")


@dataclass(frozen=True, slots=True)
class Inflight(Payload):
    """GET/SET_INFLIGHT_FD: ``{mmap_size, mmap_offset, num_queues:u16, queue_size:u16}``."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    SIZE: ClassVar[int] = _INFLIGHT.size

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size(cls, data, cls.SIZE)
        inflight = cls(*_INFLIGHT.unpack(data))
        if not _fits_u64_range(inflight.mmap_offset, inflight.mmap_size):
            raise ProtocolError(f"inflight mmap_offset {inflight.mmap_offset:#x} + mmap_size "
                                f"{inflight.mmap_size:#x} overflows 64 bits")
        return inflight

    def pack(self) -> bytes:
        return _pack(_INFLIGHT, type(self), self.mmap_size, self.mmap_offset, self.num_queues,
                     self.queue_size)


@dataclass(frozen=True, slots=True)
class SharedObject(Payload):
    """GET_SHARED_OBJECT and BACKEND_SHARED_OBJECT_*: a 16-byte UUID."""

    uuid: bytes
    SIZE: ClassVar[int] = 16

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size(cls, data, cls.SIZE)
        return cls(bytes(data))

    def pack(self) -> bytes:
        if len(self.uuid) != self.SIZE:
            raise ValueError(f"uuid is {len(self.uuid)} bytes, expected 16")
        return bytes(self.uuid)


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer(Payload):
    """SET_DEVICE_STATE_FD: ``{direction:u32 (0 save, 1 load), phase:u32 (0 stopped)}``."""

    direction: int
    phase: int
    SIZE: ClassVar[int] = 8

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size(cls, data, cls.SIZE)
        transfer = cls(*_U32X2.unpack(data))
        if transfer.direction not in (0, 1):
            raise ProtocolError(f"transfer direction {transfer.direction} undefined: "
                                f"expected 0 (save) or 1 (load)")
        if transfer.phase != 0:
            raise ProtocolError(f"transfer phase {transfer.phase} undefined: expected 0 (stopped)")
        return transfer

    def pack(self) -> bytes:
        return _pack(_U32X2, type(self), self.direction, self.phase)


@dataclass(frozen=True, slots=True)
class Raw(Payload):
    """Bytes kept opaque: payloads a net back-end never interprets (crypto
    sessions, whose layout changed between QEMU versions)."""

    data: bytes
    MAX_SIZE: ClassVar[int] = MAX_PAYLOAD_SIZE

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(bytes(data))

    def pack(self) -> bytes:
        return bytes(self.data)


PAYLOAD_TYPES: tuple[type[Payload], ...] = (
    U64, VringFd, VringState, VringAddr, MemoryRegion, MemoryTable, SingleRegion, Log, Iotlb,
    Config, VringArea, Inflight, SharedObject, DeviceStateTransfer, Raw)
