"""The HAL contract: a PCI function as the driver sees it, nothing more.

Two backends implement it: ``hal.vfio`` (a real function through VFIO, BARs
mmap'd, DMA through the function's own IOMMU container) and ``hal.sim`` (the
simulated IFCVF in ``sim``).  The driver (``ifcvf``) sees only this module, so
anything it needs from hardware must be expressible here.

Rules every backend keeps:
- MMIO accesses have exactly the width asked for (8/16/32 bits); 64-bit values
  are written low dword first.  Offsets are checked against the region.
- Every wait goes through ``clock``: nothing in the driver sleeps or spins on
  its own, so every wait has a timeout and the simulator can advance time.
- DMA mappings go into the function's own IOMMU domain: IOVA -> host memory.

This module imports nothing of ours on purpose.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence


class HalError(Exception):
    """A request the function or its backend cannot honour; the message says why."""


class HalTimeout(HalError):
    """A wait did not complete in time."""


class HostBuffer(Protocol):
    """Host memory with a stable address (``hal.memory.HostMemory`` is one)."""

    fd: int
    size: int
    address: int
    view: memoryview


@dataclass(frozen=True)
class PciIds:
    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    revision: int
    class_code: int  # 24 bits: base class, subclass, programming interface

    def __str__(self) -> str:
        return (f"{self.vendor:04x}:{self.device:04x} "
                f"(subsystem {self.subsystem_vendor:04x}:{self.subsystem_device:04x}, "
                f"rev {self.revision:02x}, class {self.class_code:06x})")


@dataclass(frozen=True)
class NotifyArea:
    """Where a queue's doorbell can be mmap'd by someone else (QEMU host notifiers)."""

    fd: int
    offset: int
    size: int


class Poller(Protocol):
    """Relay work driven by eventfds (kicks, device interrupts)."""

    name: str

    def fds(self) -> Sequence[int]:
        """The eventfds whose readiness means there is work."""

    def step(self) -> Sequence[int]:
        """Do whatever is pending without blocking; return the eventfds it signalled."""

    def run(self) -> None:
        """Block handling events until ``stop()`` is called (from another thread)."""

    def stop(self) -> None: ...

    def next_poll_ns(self) -> int:
        """Work that no fd announces: call ``poll()`` this long from now (0: none).

        ``run()`` keeps its own timer for it; a HAL that drives ``step()``
        (the simulator) asks after every step and poll."""

    def poll(self) -> Sequence[int]:
        """The work ``next_poll_ns`` asked for; return the eventfds it signalled."""


class Clock(abc.ABC):
    """Time as the driver sees it.  Nanoseconds, monotonic."""

    @abc.abstractmethod
    def now_ns(self) -> int: ...

    @abc.abstractmethod
    def sleep(self, ns: int) -> None: ...

    def poll_until(self, predicate: Callable[[], bool], timeout_ns: int, *,
                   interval_ns: int = 1_000, what: str = "condition") -> None:
        """Return once ``predicate()`` is true; HalTimeout after ``timeout_ns``.

        The predicate is evaluated at least once, and once more at the deadline,
        so a condition that becomes true exactly then is not reported as late.
        """
        deadline = self.now_ns() + timeout_ns
        while not predicate():
            now = self.now_ns()
            if now >= deadline:
                raise HalTimeout(f"timed out after {timeout_ns / 1e6:g} ms waiting for {what}")
            self.sleep(min(interval_ns, deadline - now))


class MmioRegion(abc.ABC):
    """One BAR (or a window of one), accessed with exact-width loads and stores."""

    def __init__(self, bar: int, size: int):
        self.bar = bar
        self.size = size

    def check(self, offset: int, width: int) -> None:
        if offset < 0 or offset + width > self.size:
            raise HalError(f"BAR {self.bar}: {width * 8}-bit access at {offset:#x} is outside "
                           f"the region (size {self.size:#x})")
        if offset % width:
            raise HalError(f"BAR {self.bar}: {width * 8}-bit access at {offset:#x} is misaligned")

    def read(self, offset: int, width: int) -> int:
        self.check(offset, width)
        return self._read(offset, width)

    def write(self, offset: int, width: int, value: int) -> None:
        self.check(offset, width)
        if not 0 <= value < 1 << (8 * width):
            raise HalError(f"BAR {self.bar}: value {value:#x} does not fit {width * 8} bits")
        self._write(offset, width, value)

    def read8(self, offset: int) -> int:
        return self.read(offset, 1)

    def read16(self, offset: int) -> int:
        return self.read(offset, 2)

    def read32(self, offset: int) -> int:
        return self.read(offset, 4)

    def write8(self, offset: int, value: int) -> None:
        self.write(offset, 1, value)

    def write16(self, offset: int, value: int) -> None:
        self.write(offset, 2, value)

    def write32(self, offset: int, value: int) -> None:
        self.write(offset, 4, value)

    def write64(self, offset: int, value: int) -> None:
        """Low dword then high dword, as virtio's 64-bit queue address fields expect."""
        self.write32(offset, value & 0xFFFF_FFFF)
        self.write32(offset + 4, value >> 32)

    def read64(self, offset: int) -> int:
        return self.read32(offset) | self.read32(offset + 4) << 32

    @abc.abstractmethod
    def _read(self, offset: int, width: int) -> int: ...

    @abc.abstractmethod
    def _write(self, offset: int, width: int, value: int) -> None: ...

    def address_of(self, offset: int) -> int | None:
        """Host virtual address of ``offset`` when the BAR is mmap'd (for C), else None."""
        return None


class PciFunction(abc.ABC):
    """One PCI function handed to the driver.  Closing it releases everything."""

    address: str  # "0000:3b:00.2" or "sim:0"
    clock: Clock

    # --- config space -------------------------------------------------------
    @abc.abstractmethod
    def config_read(self, offset: int, size: int) -> int: ...

    @abc.abstractmethod
    def config_write(self, offset: int, size: int, value: int) -> None: ...

    @property
    def ids(self) -> PciIds:
        return PciIds(
            vendor=self.config_read(0x00, 2),
            device=self.config_read(0x02, 2),
            subsystem_vendor=self.config_read(0x2C, 2),
            subsystem_device=self.config_read(0x2E, 2),
            revision=self.config_read(0x08, 1),
            class_code=self.config_read(0x09, 1) | self.config_read(0x0A, 2) << 8,
        )

    # --- BARs ---------------------------------------------------------------
    @abc.abstractmethod
    def region(self, bar: int) -> MmioRegion | None:
        """The memory BAR ``bar`` (0-5), or None when the function has none there."""

    # --- DMA into the function's own IOMMU domain -----------------------------
    @abc.abstractmethod
    def dma_map(self, iova: int, memory: HostBuffer, offset: int, size: int) -> None:
        """Make [iova, iova+size) reach memory[offset:offset+size]; HalError on overlap."""

    @abc.abstractmethod
    def dma_unmap(self, iova: int, size: int) -> None:
        """Remove exactly a mapping made by dma_map; HalError if there is none."""

    def iova_ranges(self) -> list[tuple[int, int]]:
        """The IOVA ranges (first, last, inclusive) the function's IOMMU can map."""
        return [(0, (1 << 64) - 1)]

    # --- interrupts ---------------------------------------------------------
    @abc.abstractmethod
    def msix_vectors(self) -> int:
        """How many MSI-X vectors the function has."""

    @abc.abstractmethod
    def set_msix(self, eventfds: Sequence[int]) -> None:
        """Vector i signals eventfds[i] (-1 leaves it unrouted); an empty list disables MSI-X."""

    # --- doorbells ----------------------------------------------------------
    def notify_area(self, bar: int, offset: int) -> NotifyArea | None:
        """An fd+offset that maps the page holding this doorbell, if the backend has one."""
        return None

    # --- relay work -----------------------------------------------------------
    @abc.abstractmethod
    def start_poller(self, poller: "Poller") -> None:
        """Run ``poller`` whenever one of its eventfds fires, until stop_poller.

        VFIO runs ``poller.run()`` on its own thread (the loop lives in C and
        blocks in epoll); the simulator calls ``poller.step()`` from a simpy
        process at the modelled time after a watched fd is signalled.
        """

    @abc.abstractmethod
    def stop_poller(self, poller: "Poller") -> None:
        """Stop it within a bounded time; no step runs after this returns."""

    def eventfds_written(self, fds: Sequence[int]) -> None:
        """The driver wrote these eventfds itself, outside any poller step.

        Real eventfds wake their readers on their own; the simulator's readers
        live in the same world and must be told.
        """

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
