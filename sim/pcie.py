"""PCI configuration space of one type-0 function: header, BARs, capabilities.

Config space is a byte array with a write mask per byte (read-only bits ignore
writes, as in hardware) plus a few *fields* whose bytes are computed (BAR
registers, which implement the sizing protocol, and the virtio PCI-cfg data
window, which turns a config access into a BAR access).  Accesses are 1, 2 or 4
bytes at any offset inside the 4 KiB space; anything else is a caller bug and
raises ValueError.

The space is 4 KiB as VFIO exposes it for a PCIe function.  The extended
space (0x100 up) holds no capability: its first header reads 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from sim import virtio_regs as vr
from sim.layout import BarSpec

CONFIG_SPACE_SIZE = 0x1000

# --- type-0 header offsets (PCI Local Bus 3.0, 6.1) ---------------------------------
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09          # 3 bytes: prog-if, subclass, base class
CACHE_LINE_SIZE = 0x0C
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
EXPANSION_ROM = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
FIRST_CAPABILITY = 0x40
END_OF_LEGACY_SPACE = 0x100

COMMAND_MEMORY = 0x0002
COMMAND_BUS_MASTER = 0x0004
# Memory space, bus master, parity error response, SERR#, INTx disable.  No I/O
# BARs, so the I/O space bit stays 0.
COMMAND_WRITABLE = 0x0546
STATUS_CAPABILITIES_LIST = 0x0010

BAR_MEM_64 = 0x4
BAR_PREFETCHABLE = 0x8

PCI_CAP_ID_MSIX = 0x11
MSIX_CONTROL_ENABLE = 0x8000
MSIX_CONTROL_FUNCTION_MASK = 0x4000
MSIX_CAP_LEN = 12
_ENABLE_HI = MSIX_CONTROL_ENABLE >> 8          # the bits in the control word's high byte
_MASK_HI = MSIX_CONTROL_FUNCTION_MASK >> 8


def check_access(offset: int, width: int, limit: int, what: str) -> None:
    """Raise ValueError for an access a caller should never issue."""
    if width not in (1, 2, 4):
        raise ValueError(f"{what}: access width {width} is not 1, 2 or 4 bytes")
    if not isinstance(offset, int) or offset < 0 or offset + width > limit:
        raise ValueError(f"{what}: {width}-byte access at {offset!r} is outside 0..{limit:#x}")


def check_value(value: int, width: int, what: str) -> None:
    if not isinstance(value, int) or not 0 <= value < 1 << (8 * width):
        raise ValueError(f"{what}: value {value!r} does not fit {width * 8} bits")


@dataclass(frozen=True)
class PciIdentity:
    vendor_id: int
    device_id: int
    subsystem_vendor_id: int
    subsystem_device_id: int
    revision: int
    class_code: int
    interrupt_pin: int = 0  # SR-IOV VFs have no INTx


class BarAccess(Protocol):
    """What the PCI-cfg capability needs from the function behind it."""

    def bar_size(self, bar: int) -> int | None: ...
    def bar_read(self, bar: int, offset: int, width: int) -> int: ...
    def bar_write(self, bar: int, offset: int, width: int, value: int) -> None: ...


Recorder = Callable[..., None]  # record(event, **fields)


class _Field:
    """Config bytes computed on access.  ``write`` gets the new bytes merged in."""

    def __init__(self, offset: int, width: int, read: Callable[[], int],
                 write: Callable[[int, int], None]):
        self.offset = offset
        self.width = width
        self.read = read
        self.write = write  # write(value, byte_mask): byte_mask bit i = byte i written


class ConfigSpace:
    """Bytes, per-byte write masks, computed fields and write hooks."""

    def __init__(self, size: int = CONFIG_SPACE_SIZE):
        self.size = size
        self._data = bytearray(size)
        self._wmask = bytearray(size)
        self._field_at: list[_Field | None] = [None] * size
        self._hooks: list[tuple[int, int, Callable[[], None]]] = []

    # --- building -------------------------------------------------------------
    def set(self, offset: int, width: int, value: int, wmask: int = 0) -> None:
        self._data[offset:offset + width] = value.to_bytes(width, "little")
        self._wmask[offset:offset + width] = wmask.to_bytes(width, "little")

    def add_field(self, offset: int, width: int, read: Callable[[], int],
                  write: Callable[[int, int], None]) -> None:
        field = _Field(offset, width, read, write)
        for pos in range(offset, offset + width):
            self._field_at[pos] = field

    def on_write(self, offset: int, width: int, hook: Callable[[], None]) -> None:
        """Call ``hook()`` after any write touching [offset, offset+width)."""
        self._hooks.append((offset, width, hook))

    def raw(self, offset: int, width: int) -> int:
        """Stored bytes, without evaluating computed fields."""
        return int.from_bytes(self._data[offset:offset + width], "little")

    # --- access ---------------------------------------------------------------
    def read(self, offset: int, width: int) -> int:
        check_access(offset, width, self.size, "config space")
        out = bytearray(width)
        values: dict[int, bytes] = {}  # one evaluation per field per access
        for i in range(width):
            pos = offset + i
            field = self._field_at[pos]
            if field is None:
                out[i] = self._data[pos]
                continue
            if field.offset not in values:
                values[field.offset] = field.read().to_bytes(field.width, "little")
            out[i] = values[field.offset][pos - field.offset]
        return int.from_bytes(out, "little")

    def write(self, offset: int, width: int, value: int) -> None:
        check_access(offset, width, self.size, "config space")
        check_value(value, width, "config space")
        new = value.to_bytes(width, "little")
        touched: dict[int, list] = {}  # field offset -> [field, value, byte mask]
        order: list[int] = []
        for i in range(width):
            pos = offset + i
            field = self._field_at[pos]
            if field is None:
                mask = self._wmask[pos]
                self._data[pos] = (self._data[pos] & ~mask & 0xFF) | (new[i] & mask)
                continue
            entry = touched.get(field.offset)
            if entry is None:
                entry = touched[field.offset] = [field, 0, 0]
                order.append(field.offset)
            shift = pos - field.offset
            entry[1] |= new[i] << (8 * shift)
            entry[2] |= 1 << shift
        for key in order:
            field, field_value, byte_mask = touched[key]
            field.write(field_value, byte_mask)
        for hook_offset, hook_width, hook in self._hooks:
            if offset < hook_offset + hook_width and hook_offset < offset + width:
                hook()


def merge_bytes(old: int, new: int, byte_mask: int, width: int) -> int:
    """``old`` with the bytes selected by ``byte_mask`` replaced from ``new``."""
    out = old
    for i in range(width):
        if byte_mask >> i & 1:
            out = (out & ~(0xFF << (8 * i))) | (new & (0xFF << (8 * i)))
    return out


class _BarRegister:
    """A memory BAR: its address bits below the size read 0 (sizing protocol)."""

    def __init__(self, spec: BarSpec):
        self.spec = spec
        self.flags = (BAR_MEM_64 if spec.is_64bit else 0) | (BAR_PREFETCHABLE if spec.prefetchable else 0)
        self.address = 0
        limit = 1 << (64 if spec.is_64bit else 32)
        self._mask = (limit - 1) & ~(spec.size - 1)

    def read_low(self) -> int:
        return (self.address & 0xFFFF_FFF0) | self.flags

    def write_low(self, value: int, byte_mask: int) -> None:
        low = merge_bytes(self.read_low(), value, byte_mask, 4) & 0xFFFF_FFF0
        self.address = ((self.address & ~0xFFFF_FFFF) | low) & self._mask

    def read_high(self) -> int:
        return self.address >> 32

    def write_high(self, value: int, byte_mask: int) -> None:
        high = merge_bytes(self.read_high(), value, byte_mask, 4)
        self.address = ((high << 32) | (self.address & 0xFFFF_FFFF)) & self._mask


class MsixCapability:
    """The MSI-X capability's message control word: enable and function mask."""

    def __init__(self, space: ConfigSpace, offset: int, table_size: int):
        self.space = space
        self.offset = offset
        self.table_size = table_size
        self._listeners: list[Callable[[], None]] = []
        space.on_write(offset + 2, 2, self._changed)

    @property
    def control(self) -> int:
        return self.space.raw(self.offset + 2, 2)

    # Both bits live in the control word's high byte: read that byte of config
    # space directly (no cached copy to keep in step), as every MSI-X message
    # the datapath sends asks for both.
    @property
    def enabled(self) -> bool:
        return bool(self.space._data[self.offset + 3] & _ENABLE_HI)

    @property
    def function_masked(self) -> bool:
        return bool(self.space._data[self.offset + 3] & _MASK_HI)

    def listen(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every write to the control word."""
        self._listeners.append(callback)

    def set_enabled(self, on: bool) -> None:
        """Set or clear the enable bit as a config write would (listeners run)."""
        control = self.control
        control = control | MSIX_CONTROL_ENABLE if on else control & ~MSIX_CONTROL_ENABLE
        self.space.write(self.offset + 2, 2, control)

    def _changed(self) -> None:
        for callback in list(self._listeners):
            callback()


class PciCfgWindow:
    """virtio's VIRTIO_PCI_CAP_PCI_CFG: a BAR access through config space (4.1.4.9).

    The driver programs {bar, offset, length}; a read of pci_cfg_data performs a
    BAR read of ``length`` bytes and returns them, a write performs a BAR write
    of the first ``length`` bytes.  A window naming an absent BAR, a length
    other than 1/2/4, a misaligned or out-of-range offset is ignored and traced.
    """

    def __init__(self, space: ConfigSpace, offset: int, target: BarAccess, record: Recorder):
        self.space = space
        self.offset = offset
        self.target = target
        self.record = record
        self._data = 0
        space.add_field(offset + 16, 4, self._read_data, self._write_data)

    @property
    def bar(self) -> int:
        return self.space.raw(self.offset + 4, 1)

    @property
    def window_offset(self) -> int:
        return self.space.raw(self.offset + 8, 4)

    @property
    def length(self) -> int:
        return self.space.raw(self.offset + 12, 4)

    def _window(self) -> tuple[int, int, int] | None:
        bar, off, length = self.bar, self.window_offset, self.length
        size = self.target.bar_size(bar) if bar <= 5 else None
        if size is None or length not in (1, 2, 4) or off % length or off + length > size:
            self.record("pci_cfg_window_invalid", bar=bar, offset=off, length=length)
            return None
        return bar, off, length

    def _read_data(self) -> int:
        window = self._window()
        if window is not None:
            bar, off, length = window
            value = self.target.bar_read(bar, off, length)
            keep = ~((1 << (8 * length)) - 1) & 0xFFFF_FFFF
            self._data = (self._data & keep) | value
        return self._data

    def _write_data(self, value: int, byte_mask: int) -> None:
        self._data = merge_bytes(self._data, value, byte_mask, 4)
        window = self._window()
        if window is not None:
            bar, off, length = window
            self.target.bar_write(bar, off, length, self._data & ((1 << (8 * length)) - 1))


class PciConfigSpace(ConfigSpace):
    """A type-0 header with memory BARs and a linked capability list."""

    def __init__(self, identity: PciIdentity, bars: Sequence[BarSpec], record: Recorder):
        super().__init__(CONFIG_SPACE_SIZE)
        self.record = record
        self.set(VENDOR_ID, 2, identity.vendor_id)
        self.set(DEVICE_ID, 2, identity.device_id)
        # Memory decoding on, as vfio-pci leaves a function it has enabled; bus
        # mastering is the driver's to turn on (DPDK does, at map time).
        self.set(COMMAND, 2, COMMAND_MEMORY, wmask=COMMAND_WRITABLE)
        self.set(STATUS, 2, STATUS_CAPABILITIES_LIST)
        self.set(REVISION_ID, 1, identity.revision)
        self.set(CLASS_CODE, 3, identity.class_code)
        self.set(CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
        self.set(HEADER_TYPE, 1, 0x00)
        self.set(SUBSYSTEM_VENDOR_ID, 2, identity.subsystem_vendor_id)
        self.set(SUBSYSTEM_ID, 2, identity.subsystem_device_id)
        self.set(INTERRUPT_LINE, 1, 0, wmask=0xFF)
        self.set(INTERRUPT_PIN, 1, identity.interrupt_pin)
        self.bars: dict[int, _BarRegister] = {}
        for spec in bars:
            self._add_bar(spec)
        self._next_free = FIRST_CAPABILITY
        self._last_cap: int | None = None
        self.capabilities: list[tuple[int, int]] = []  # (cap id, offset) in list order

    def _add_bar(self, spec: BarSpec) -> None:
        if spec.size < 16 or spec.size & (spec.size - 1):
            raise ValueError(f"BAR{spec.index} size {spec.size:#x} is not a power of two >= 16")
        if spec.is_64bit and spec.index % 2:
            raise ValueError(f"a 64-bit BAR cannot start at odd BAR{spec.index}")
        reg = _BarRegister(spec)
        self.bars[spec.index] = reg
        self.add_field(BAR0 + 4 * spec.index, 4, reg.read_low, reg.write_low)
        if spec.is_64bit:
            self.add_field(BAR0 + 4 * spec.index + 4, 4, reg.read_high, reg.write_high)

    # --- command register -----------------------------------------------------
    @property
    def command(self) -> int:
        return self.raw(COMMAND, 2)

    # (both bits are in the command register's low byte: every MMIO access asks)
    @property
    def memory_enabled(self) -> bool:
        return bool(self._data[COMMAND] & COMMAND_MEMORY)

    @property
    def bus_master(self) -> bool:
        return bool(self._data[COMMAND] & COMMAND_BUS_MASTER)

    def bar_address(self, index: int) -> int | None:
        reg = self.bars.get(index)
        return None if reg is None else reg.address

    # --- capabilities ---------------------------------------------------------
    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a capability; ``body`` starts after the {id, next} header.  Returns its offset."""
        length = 2 + len(body)
        offset = self._next_free
        if offset + length > END_OF_LEGACY_SPACE:
            raise ValueError("capability list does not fit the legacy config space")
        self.set(offset, 1, cap_id)
        self.set(offset + 1, 1, 0)
        self._data[offset + 2:offset + length] = body
        if wmask is not None:
            if len(wmask) != len(body):
                raise ValueError("capability write mask must match its body")
            self._wmask[offset + 2:offset + length] = wmask
        if self._last_cap is None:
            self.set(CAPABILITY_LIST, 1, offset)
        else:
            self.set(self._last_cap + 1, 1, offset)
        self._last_cap = offset
        self._next_free = (offset + length + 3) & ~3
        self.capabilities.append((cap_id, offset))
        return offset

    def add_msix_capability(self, table_size: int, table_bar: int, table_offset: int,
                            pba_bar: int, pba_offset: int) -> MsixCapability:
        if not 1 <= table_size <= 2048:
            raise ValueError(f"MSI-X table size {table_size} is not in 1..2048")
        if table_offset % 8 or pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        body = ((table_size - 1).to_bytes(2, "little")
                + (table_offset | table_bar).to_bytes(4, "little")
                + (pba_offset | pba_bar).to_bytes(4, "little"))
        control_mask = (MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK).to_bytes(2, "little")
        offset = self.add_capability(PCI_CAP_ID_MSIX, body, control_mask + bytes(8))
        return MsixCapability(self, offset, table_size)

    def add_virtio_cap(self, cfg_type: int, bar: int, offset: int, length: int,
                       extra: bytes = b"") -> int:
        """A virtio vendor capability: {vndr, next, len, cfg_type, bar, pad[3], offset, length} + extra."""
        cap_len = vr.VIRTIO_PCI_CAP_LEN + len(extra)
        body = (bytes([cap_len, cfg_type, bar, 0, 0, 0])
                + offset.to_bytes(4, "little") + length.to_bytes(4, "little") + extra)
        return self.add_capability(vr.PCI_CAP_ID_VNDR, body)

    def add_virtio_pci_cfg_cap(self, target: BarAccess) -> PciCfgWindow:
        body = bytes([vr.VIRTIO_PCI_CFG_CAP_LEN, vr.VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, 0]) + bytes(12)
        # bar, offset and length are the driver's to program; the data bytes are a field.
        wmask = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 8 + bytes(4)
        offset = self.add_capability(vr.PCI_CAP_ID_VNDR, body, wmask)
        return PciCfgWindow(self, offset, target, self.record)
