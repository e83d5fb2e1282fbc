"""The HAL contract on a real PCI function bound to vfio-pci.

One function, one VFIO container: the function gets an IOMMU domain of its own
(TYPE1v2), so its DMA reaches exactly what ``dma_map`` put there and nothing
another function mapped.  Opening goes container -> group -> device; every
step that fails says what to do and releases what was already taken.

MMIO goes through a raw mmap of the BAR with ctypes loads and stores of the
asked width (c_uint8/16/32 at the mapped address).  Slicing or ``struct``
writes on a Python mmap are byte copies, not exact-width bus accesses, and
devices (QEMU's virtio-pci among them) reject those.  BARs VFIO will not let
us mmap fall back to pread/pwrite at the region's offset, which the kernel
turns into one access of the same width.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hal import vfio_ioctl as V
from hal.api import Clock, HalError, HalTimeout, HostBuffer, MmioRegion, NotifyArea, PciFunction, Poller
from hal.realtime import RealClock
from hal.sysfs import VFIO_PCI, Sysfs, SysfsError, normalize_bdf

log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_BAR0 = 0x10
POLLER_STOP_TIMEOUT_S = 5.0

_CTYPE = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32}


class VfioError(HalError):
    """Opening or driving the function through VFIO failed; the message says why."""


@dataclass(frozen=True)
class Region:
    """What VFIO_DEVICE_GET_REGION_INFO says about one region of the device fd."""

    index: int
    flags: int
    size: int
    offset: int  # where the region starts in the device fd (for pread/pwrite/mmap)

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & V.VFIO_REGION_INFO_FLAG_MMAP)

    @property
    def readable(self) -> bool:
        return bool(self.flags & V.VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & V.VFIO_REGION_INFO_FLAG_WRITE)


class VfioRegion(MmioRegion):
    """One memory BAR: mmap'd when VFIO allows it, else pread/pwrite on the device fd."""

    def __init__(self, device_fd: int, bar: int, info: Region):
        super().__init__(bar, info.size)
        self.info = info
        self._fd = device_fd
        self.base: int | None = None
        if info.mmappable:
            try:
                self.base = V.mmap_shared(device_fd, info.size, info.offset)
            except OSError as e:
                # Still usable, just slower: every access becomes a syscall.
                log.info("BAR %d: mmap of %#x bytes failed (%s); using pread/pwrite",
                            bar, info.size, e.strerror)

    def _read(self, offset: int, width: int) -> int:
        if self.base is not None:
            return _CTYPE[width].from_address(self.base + offset).value
        data = _pread_exact(self._fd, width, self.info.offset + offset, f"BAR {self.bar}")
        return int.from_bytes(data, "little")

    def _write(self, offset: int, width: int, value: int) -> None:
        if self.base is not None:
            _CTYPE[width].from_address(self.base + offset).value = value
            return
        _pwrite_exact(self._fd, value.to_bytes(width, "little"), self.info.offset + offset,
                      f"BAR {self.bar}")

    def address_of(self, offset: int) -> int | None:
        if self.base is None:
            return None
        if not 0 <= offset < self.size:
            raise HalError(f"BAR {self.bar}: offset {offset:#x} is outside the region (size {self.size:#x})")
        return self.base + offset

    def unmap(self) -> None:
        if self.base is not None:
            base, self.base = self.base, None
            V.munmap(base, self.size)


def _pread_exact(fd: int, size: int, offset: int, what: str) -> bytes:
    try:
        data = os.pread(fd, size, offset)
    except OSError as e:
        raise VfioError(f"{what}: {size}-byte read at region offset {offset:#x} failed: {e.strerror}") from None
    if len(data) != size:
        raise VfioError(f"{what}: {size}-byte read at {offset:#x} returned {len(data)} bytes")
    return data


def _pwrite_exact(fd: int, data: bytes, offset: int, what: str) -> None:
    try:
        done = os.pwrite(fd, data, offset)
    except OSError as e:
        raise VfioError(f"{what}: {len(data)}-byte write at region offset {offset:#x} failed: "
                        f"{e.strerror}") from None
    if done != len(data):
        raise VfioError(f"{what}: {len(data)}-byte write at {offset:#x} wrote {done} bytes")


class VfioFunction(PciFunction):
    """A function bound to vfio-pci, in a VFIO container of its own.

    ``sysfs_root`` and ``vfio_dir`` exist so tests can point at fakes; on a
    real host they are /sys and /dev/vfio.
    """

    def __init__(self, bdf: str, clock: Clock | None = None, *,
                 sysfs_root: str | os.PathLike = "/sys", vfio_dir: str | os.PathLike = "/dev/vfio"):
        self.address = normalize_bdf(bdf)
        self.clock = clock or RealClock()
        self.sysfs = Sysfs(sysfs_root)
        self.vfio_dir = Path(vfio_dir)
        self.container_fd = -1
        self.group_fd = -1
        self.device_fd = -1
        self.group: int | None = None
        self.device_flags = 0
        self.regions: dict[int, Region] = {}
        self.irq_counts: dict[int, int] = {}
        self._bars: dict[int, VfioRegion] = {}
        self._dma: dict[int, int] = {}           # iova -> size, what we mapped
        self._iova_ranges: list[tuple[int, int]] | None = None
        self._msix_count = 0                      # vectors currently enabled
        self._pollers: dict[int, tuple[Poller, threading.Thread]] = {}
        self.closed = False
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # --- opening ----------------------------------------------------------------
    def _open(self) -> None:
        try:
            info = self.sysfs.function(self.address)
        except SysfsError as e:
            raise VfioError(str(e)) from None
        if info.iommu_group is None:
            self.sysfs.require_iommu(info)  # raises with the advice
        if info.driver != VFIO_PCI:
            raise VfioError(f"{self.address} is bound to {info.driver or 'no driver'}, not vfio-pci: "
                            f"run `ifcvf bind {self.address}` first")
        self.group = info.iommu_group
        self._open_container()
        self._open_group()
        self._open_device()
        self._read_regions()
        self._map_bars()
        # Memory decoding and bus mastering on: the device must answer MMIO and
        # be allowed to DMA (vfio-pci leaves bus mastering as it found it).
        command = self.config_read(PCI_COMMAND, 2)
        self.config_write(PCI_COMMAND, 2, command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    def _open_container(self) -> None:
        path = self.vfio_dir / "vfio"
        self.container_fd = self._open_node(path, "the VFIO container")
        try:
            version = V.ioctl(self.container_fd, V.VFIO_GET_API_VERSION)
        except OSError as e:
            raise VfioError(f"{path}: VFIO_GET_API_VERSION failed: {e.strerror}") from None
        if version != V.VFIO_API_VERSION:
            raise VfioError(f"{path}: VFIO API version {version}, this driver speaks {V.VFIO_API_VERSION}")
        if not self._check_extension(V.VFIO_TYPE1v2_IOMMU):
            raise VfioError(f"{path}: the kernel offers no TYPE1v2 IOMMU for VFIO: load it with "
                            f"`modprobe vfio_iommu_type1` (and check the IOMMU is on)")

    def _check_extension(self, extension: int) -> bool:
        try:
            return V.ioctl(self.container_fd, V.VFIO_CHECK_EXTENSION, extension) > 0
        except OSError:
            return False

    def _open_group(self) -> None:
        path = self.vfio_dir / str(self.group)
        self.group_fd = self._open_node(path, f"IOMMU group {self.group}")
        status = V.GroupStatus()
        try:
            V.ioctl(self.group_fd, V.VFIO_GROUP_GET_STATUS, status)
        except OSError as e:
            raise VfioError(f"{path}: VFIO_GROUP_GET_STATUS failed: {e.strerror}") from None
        if not status.flags & V.VFIO_GROUP_FLAGS_VIABLE:
            raise VfioError(self._not_viable_message())
        try:
            V.ioctl(self.group_fd, V.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(self.container_fd))
        except OSError as e:
            raise VfioError(f"{path}: cannot put group {self.group} into a new container: "
                            f"{e.strerror}") from None
        try:
            V.ioctl(self.container_fd, V.VFIO_SET_IOMMU, V.VFIO_TYPE1v2_IOMMU)
        except OSError as e:
            raise VfioError(f"VFIO_SET_IOMMU(TYPE1v2) for group {self.group} failed: {e.strerror}") from None
        self._iova_ranges = self._query_iova_ranges()

    def _query_iova_ranges(self) -> list[tuple[int, int]] | None:
        """What the IOMMU can map (a vIOMMU with 39 address bits cannot reach 2**45)."""
        info = V.IommuInfo()
        try:
            V.ioctl(self.container_fd, V.VFIO_IOMMU_GET_INFO, info)
            buf = ctypes.create_string_buffer(max(info.argsz, ctypes.sizeof(info)))
            ctypes.c_uint32.from_buffer(buf).value = len(buf)
            V.ioctl(self.container_fd, V.VFIO_IOMMU_GET_INFO, buf)
        except (OSError, TypeError) as e:
            log.info("%s: VFIO_IOMMU_GET_INFO: %s; assuming any IOVA can be mapped", self.address, e)
            return None
        return V.parse_iova_ranges(buf.raw)

    def iova_ranges(self) -> list[tuple[int, int]]:
        return self._iova_ranges or [(0, (1 << 64) - 1)]

    def _not_viable_message(self) -> str:
        try:
            info = self.sysfs.function(self.address)
            blockers = self.sysfs.group_blockers(self.address)
        except SysfsError:
            info, blockers = None, []
        if info is not None and blockers:
            return self.sysfs.group_not_viable_message(info, blockers)
        members = ", ".join(m for m in self.sysfs.group_members(self.group) if m != self.address)
        return (f"IOMMU group {self.group} of {self.address} is not viable for VFIO "
                f"(other members: {members or 'none seen in sysfs'}): every function in the group "
                f"must be bound to vfio-pci or to no driver; bind them to vfio-pci or unbind them")

    def _open_device(self) -> None:
        try:
            self.device_fd = V.ioctl(self.group_fd, V.VFIO_GROUP_GET_DEVICE_FD,
                                     self.address.encode() + b"\0")
        except OSError as e:
            hint = (" (is it already open, e.g. by QEMU or DPDK?)" if e.errno == errno.EBUSY else "")
            raise VfioError(f"cannot get a device fd for {self.address} from group {self.group}: "
                            f"{e.strerror}{hint}") from None
        dev = V.DeviceInfo()
        try:
            V.ioctl(self.device_fd, V.VFIO_DEVICE_GET_INFO, dev)
        except OSError as e:
            raise VfioError(f"{self.address}: VFIO_DEVICE_GET_INFO failed: {e.strerror}") from None
        if not dev.flags & V.VFIO_DEVICE_FLAGS_PCI:
            raise VfioError(f"{self.address}: VFIO says this is not a PCI device (flags {dev.flags:#x})")
        self.device_flags = dev.flags
        self._num_regions = dev.num_regions
        self._num_irqs = dev.num_irqs

    def _read_regions(self) -> None:
        for index in range(min(self._num_regions, V.VFIO_PCI_CONFIG_REGION_INDEX + 1)):
            req = V.RegionInfo(index=index)
            try:
                V.ioctl(self.device_fd, V.VFIO_DEVICE_GET_REGION_INFO, req)
            except OSError:
                continue  # an index the device does not implement
            self.regions[index] = Region(index, req.flags, req.size, req.offset)
        config = self.regions.get(V.VFIO_PCI_CONFIG_REGION_INDEX)
        if config is None or config.size < 256:
            raise VfioError(f"{self.address}: VFIO gives no usable config space region")
        for index in (V.VFIO_PCI_INTX_IRQ_INDEX, V.VFIO_PCI_MSI_IRQ_INDEX, V.VFIO_PCI_MSIX_IRQ_INDEX):
            if index >= self._num_irqs:
                continue
            req = V.IrqInfo(index=index)
            try:
                V.ioctl(self.device_fd, V.VFIO_DEVICE_GET_IRQ_INFO, req)
            except OSError:
                continue
            self.irq_counts[index] = req.count

    def _map_bars(self) -> None:
        for bar in range(6):
            region = self.regions.get(bar)
            if region is None or region.size == 0:
                continue
            # I/O port BARs (bit 0 of the BAR register) are not MMIO windows.
            if self.config_read(PCI_BAR0 + 4 * bar, 4) & 1:
                continue
            self._bars[bar] = VfioRegion(self.device_fd, bar, region)

    def _open_node(self, path: Path, what: str) -> int:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if path.name == "vfio":
                raise VfioError(f"{path} does not exist: the vfio modules are not loaded "
                                f"(`modprobe vfio-pci`)") from None
            raise VfioError(f"{path} ({what}) does not exist: bind the function with "
                            f"`ifcvf bind {self.address}`") from None
        except PermissionError:
            raise VfioError(f"{path} ({what}): permission denied: run as root or give this user "
                            f"the device node") from None
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise VfioError(f"{path} ({what}) is busy: another process (QEMU, DPDK, another "
                                f"ifcvf) holds it") from None
            raise VfioError(f"cannot open {path} ({what}): {e.strerror}") from None

    # --- config space -------------------------------------------------------------
    def _config_check(self, offset: int, size: int) -> Region:
        config = self.regions[V.VFIO_PCI_CONFIG_REGION_INDEX]
        if size not in (1, 2, 4) or offset < 0 or offset + size > config.size or offset % size:
            raise HalError(f"{self.address}: config space access of {size} bytes at {offset:#x} is not valid")
        return config

    def config_read(self, offset: int, size: int) -> int:
        config = self._config_check(offset, size)
        return int.from_bytes(_pread_exact(self.device_fd, size, config.offset + offset, "config space"),
                              "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        config = self._config_check(offset, size)
        if not 0 <= value < 1 << (8 * size):
            raise HalError(f"{self.address}: value {value:#x} does not fit a {size}-byte config write")
        _pwrite_exact(self.device_fd, value.to_bytes(size, "little"), config.offset + offset, "config space")

    # --- BARs ---------------------------------------------------------------------
    def region(self, bar: int) -> MmioRegion | None:
        return self._bars.get(bar)

    def notify_area(self, bar: int, offset: int) -> NotifyArea | None:
        region = self._bars.get(bar)
        if region is None or region.base is None or not 0 <= offset < region.size:
            return None
        page = offset - offset % PAGE_SIZE
        return NotifyArea(fd=self.device_fd, offset=region.info.offset + page, size=PAGE_SIZE)

    # --- DMA ------------------------------------------------------------------------
    def dma_map(self, iova: int, memory: HostBuffer, offset: int, size: int) -> None:
        where = f"dma_map iova {iova:#x}+{size:#x}"
        if size <= 0 or offset < 0 or offset + size > memory.size:
            raise HalError(f"{where}: {offset:#x}+{size:#x} is outside the {memory.size:#x}-byte memory")
        vaddr = memory.address + offset
        for name, value in (("iova", iova), ("size", size), ("host address", vaddr)):
            if value % PAGE_SIZE:
                raise HalError(f"{where}: {name} {value:#x} is not {PAGE_SIZE}-byte page aligned")
        for other, other_size in self._dma.items():
            if iova < other + other_size and other < iova + size:
                raise HalError(f"{where}: overlaps the existing mapping iova {other:#x}+{other_size:#x}")
        req = V.DmaMap(flags=V.VFIO_DMA_MAP_FLAG_READ | V.VFIO_DMA_MAP_FLAG_WRITE,
                       vaddr=vaddr, iova=iova, size=size)
        try:
            V.ioctl(self.container_fd, V.VFIO_IOMMU_MAP_DMA, req)
        except OSError as e:
            raise HalError(f"{where} (host {vaddr:#x}): {self._map_error(e)}") from None
        self._dma[iova] = size

    def _map_error(self, e: OSError) -> str:
        why = {
            errno.EEXIST: "the IOMMU already has a mapping in this range (made outside this object?)",
            errno.ENOMEM: "pinning the pages failed: raise the locked-memory limit (ulimit -l, "
                          "LimitMEMLOCK=) or free memory",
            errno.EFAULT: "the host address range is not mapped in this process",
            errno.ENOSPC: "too many DMA mappings (vfio_iommu_type1 dma_entry_limit)",
            errno.EINVAL: "the IOMMU refused the range: outside its IOVA aperture, a reserved "
                          f"region (see /sys/kernel/iommu_groups/{self.group}/reserved_regions), "
                          "or not aligned to its page size",
            errno.EPERM: "not allowed: the locked-memory limit is too low for this user",
        }.get(e.errno, e.strerror)
        return f"{V.errno_name(e.errno)}: {why}"

    def dma_unmap(self, iova: int, size: int) -> None:
        mapped = self._dma.get(iova)
        if mapped != size:
            known = ", ".join(f"{a:#x}+{s:#x}" for a, s in sorted(self._dma.items())) or "none"
            raise HalError(f"dma_unmap iova {iova:#x}+{size:#x}: no such mapping (mapped: {known})")
        req = V.DmaUnmap(iova=iova, size=size)
        try:
            V.ioctl(self.container_fd, V.VFIO_IOMMU_UNMAP_DMA, req)
        except OSError as e:
            raise HalError(f"dma_unmap iova {iova:#x}+{size:#x}: {V.errno_name(e.errno)}: {e.strerror}") from None
        del self._dma[iova]
        if req.size != size:
            raise HalError(f"dma_unmap iova {iova:#x}+{size:#x}: the IOMMU unmapped {req.size:#x} bytes")

    def dma_mappings(self) -> dict[int, int]:
        return dict(self._dma)

    # --- interrupts -------------------------------------------------------------------
    def msix_vectors(self) -> int:
        return self.irq_counts.get(V.VFIO_PCI_MSIX_IRQ_INDEX, 0)

    def set_msix(self, eventfds: Sequence[int]) -> None:
        fds = [int(fd) for fd in eventfds]
        vectors = self.msix_vectors()
        if fds and not vectors:
            raise HalError(f"{self.address}: the function has no MSI-X vectors")
        if len(fds) > vectors:
            raise HalError(f"{self.address}: {len(fds)} eventfds for {vectors} MSI-X vectors")
        # The kernel only rebinds within the block it enabled, so a different
        # count means disable first, then enable with the new count.
        if self._msix_count and (not fds or len(fds) != self._msix_count):
            self._set_irqs(V.irq_set(V.VFIO_PCI_MSIX_IRQ_INDEX,
                                     V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_TRIGGER, 0),
                           "disabling MSI-X")
            self._msix_count = 0
        if fds:
            self._set_irqs(V.irq_set(V.VFIO_PCI_MSIX_IRQ_INDEX,
                                     V.VFIO_IRQ_SET_DATA_EVENTFD | V.VFIO_IRQ_SET_ACTION_TRIGGER, 0, fds),
                           f"routing {len(fds)} MSI-X vectors to eventfds")
            self._msix_count = len(fds)

    def _set_irqs(self, req, what: str) -> None:
        try:
            V.ioctl(self.device_fd, V.VFIO_DEVICE_SET_IRQS, req)
        except OSError as e:
            raise HalError(f"{self.address}: {what} failed: {V.errno_name(e.errno)}: {e.strerror}") from None

    # --- pollers ----------------------------------------------------------------------
    def start_poller(self, poller: Poller) -> None:
        if id(poller) in self._pollers:
            raise HalError(f"poller {poller.name} is already running")

        def run() -> None:
            try:
                poller.run()
            except Exception:
                log.exception("%s: poller %s died", self.address, poller.name)

        thread = threading.Thread(target=run, name=f"{poller.name}", daemon=True)
        self._pollers[id(poller)] = (poller, thread)
        thread.start()

    def stop_poller(self, poller: Poller) -> None:
        entry = self._pollers.pop(id(poller), None)
        if entry is None:
            return
        poller.stop()
        entry[1].join(POLLER_STOP_TIMEOUT_S)
        if entry[1].is_alive():
            raise HalTimeout(f"poller {poller.name} did not stop within {POLLER_STOP_TIMEOUT_S:g} s")

    # --- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        """Release everything, in reverse order; keeps going past failures and logs them."""
        if self.closed:
            return
        self.closed = True
        steps = []
        for poller, _ in list(self._pollers.values()):
            steps.append((f"stopping poller {poller.name}", lambda p=poller: self.stop_poller(p)))
        if self._msix_count:
            steps.append(("disabling MSI-X", lambda: self.set_msix([])))
        for iova, size in sorted(self._dma.items()):
            steps.append((f"unmapping iova {iova:#x}", lambda i=iova, s=size: self.dma_unmap(i, s)))
        for bar, region in self._bars.items():
            steps.append((f"unmapping BAR {bar}", region.unmap))
        for step, fn in steps:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - teardown must reach the fds
                log.warning("%s: %s failed during close: %s", self.address, step, e)
        self._bars.clear()
        # Device before group before container: each holds a reference on the next.
        for attr in ("device_fd", "group_fd", "container_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                try:
                    os.close(fd)
                except OSError as e:
                    log.warning("%s: closing %s failed: %s", self.address, attr, e.strerror)

    def __repr__(self) -> str:
        return f"VfioFunction({self.address!r}, group={self.group}, closed={self.closed})"
