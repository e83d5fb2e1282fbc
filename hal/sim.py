"""The HAL contract bound to a simulated IFCVF function (``sim.ifcvf``).

Time: an MMIO read is non-posted, so it advances the world by the device's
read latency before sampling the register; writes are posted and cost the
CPU nothing here (the device applies their delayed effects itself).  Sleeping
and polling advance the world.  None of this may happen inside a simpy
process: the world raises if the control plane blocks from there.

MSI-X is programmed the way the host kernel does it for VFIO: through the
MSI-X capability and table, then each vector is routed to its eventfd.
"""
from __future__ import annotations

from typing import Sequence

from hal.api import Clock, HalError, HostBuffer, MmioRegion, PciFunction, Poller
from sim.device import IommuError, SimDevice

PCI_CAP_ID_MSIX = 0x11
MSIX_ENABLE = 0x8000
MSIX_FUNCTION_MASK = 0x4000
MSI_ADDRESS = 0xFEE0_0000  # x86 local APIC window: any value works for the model


class SimClock(Clock):
    """Nanoseconds of simulated time; sleeping advances the whole world."""

    def __init__(self, world):
        self.world = world

    def now_ns(self) -> int:
        return self.world.now_ns()

    def sleep(self, ns: int) -> None:
        self.world.advance_ns(max(ns, 1))


class SimRegion(MmioRegion):
    def __init__(self, function: "SimFunction", bar: int, size: int):
        super().__init__(bar, size)
        self._fn = function

    def _read(self, offset: int, width: int) -> int:
        model = self._fn.model
        self._fn.world.advance(self._fn.read_cycles)
        return model.mmio_read(self.bar, offset, width)

    def _write(self, offset: int, width: int, value: int) -> None:
        self._fn.model.mmio_write(self.bar, offset, width, value)

    def write16(self, offset: int, value: int) -> None:
        # The doorbell write of every kick: the contract's checks inline (the
        # generic path raises the same errors), one call to the model.
        if offset < 0 or offset + 2 > self.size or offset & 1 or not 0 <= value <= 0xFFFF:
            super().write16(offset, value)
            return
        self._fn.model.mmio_write(self.bar, offset, 2, value)


class SimFunction(PciFunction):
    """A simulated function (``sim.device.SimDevice``) seen through the HAL."""

    # A relay thread woken by an eventfd on a quiet bare-metal core: a few us
    # (perf.md measured ~23 us in this VM; busy polling would be ~0).
    DEFAULT_WAKEUP_NS = 2_000

    def __init__(self, model: SimDevice, index: int = 0, *, wakeup_ns: int = DEFAULT_WAKEUP_NS):
        self.model = model
        self.world = model.world
        self.address = f"sim:{index}"
        self.clock = SimClock(self.world)
        self.read_cycles = self.world.cycles(model.mmio_read_ns)
        self._regions: dict[int, SimRegion] = {}
        for bar in range(6):
            size = model.bar_size(bar)
            if size:
                self._regions[bar] = SimRegion(self, bar, size)
        self._mappings: dict[int, int] = {}
        # Memory decoding and bus mastering on, as VFIO users (DPDK) set them
        # when they take the function.
        self.model.config_write(0x04, 2, self.model.config_read(0x04, 2) | 0x6)
        self._msix = self._find_msix()
        self.wakeup_cycles = self.world.cycles(wakeup_ns)
        self._pollers: dict[int, _PollerRun] = {}
        self.closed = False

    # --- config space -------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        self._check_config(offset, size)
        return self.model.config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self._check_config(offset, size)
        self.model.config_write(offset, size, value)

    @staticmethod
    def _check_config(offset: int, size: int) -> None:
        if size not in (1, 2, 4) or offset < 0 or offset + size > 256 or offset % size:
            raise HalError(f"config space access of {size} bytes at {offset:#x} is not valid")

    # --- BARs -----------------------------------------------------------------
    def region(self, bar: int) -> MmioRegion | None:
        return self._regions.get(bar)

    # --- DMA ------------------------------------------------------------------
    def dma_map(self, iova: int, memory: HostBuffer, offset: int, size: int) -> None:
        if offset < 0 or size <= 0 or offset + size > memory.size:
            raise HalError(f"dma_map: {offset:#x}+{size:#x} is outside the {memory.size:#x}-byte memory")
        try:
            self.model.dma.map(iova, memory.view[offset:offset + size], size)
        except IommuError as err:
            refused = str(err)
        else:
            self._mappings[iova] = size
            return
        # Raised out here: raised in the handler, the error would carry the
        # IommuError as its context (``from None`` only hides it), and with it the
        # model's frame holding a view of ``memory``: whoever keeps the error (a
        # log handler) would keep the guest memory mapped and its fd open.
        raise HalError(f"dma_map {iova:#x}+{size:#x}: {refused}")

    def dma_unmap(self, iova: int, size: int) -> None:
        try:
            self.model.dma.unmap(iova, size)
        except IommuError as err:
            raise HalError(f"dma_unmap {iova:#x}+{size:#x}: {err}") from None
        self._mappings.pop(iova, None)

    # --- MSI-X ----------------------------------------------------------------
    def _find_msix(self):
        pos = self.model.config_read(0x34, 1) & 0xFC
        seen = set()
        while pos and pos not in seen:
            seen.add(pos)
            if self.model.config_read(pos, 1) == PCI_CAP_ID_MSIX:
                control = self.model.config_read(pos + 2, 2)
                table = self.model.config_read(pos + 4, 4)
                return pos, (control & 0x7FF) + 1, table & 7, table & ~7
            pos = self.model.config_read(pos + 1, 1) & 0xFC
        return None

    def msix_vectors(self) -> int:
        return self._msix[1] if self._msix else 0

    def set_msix(self, eventfds: Sequence[int]) -> None:
        if not self._msix:
            raise HalError(f"{self.address}: the function has no MSI-X capability")
        pos, count, bir, table = self._msix
        if len(eventfds) > count:
            raise HalError(f"{self.address}: {len(eventfds)} eventfds for {count} MSI-X vectors")
        control = self.model.config_read(pos + 2, 2)
        for vector in range(count):
            self.model.bind_msix(vector, -1)
        if not eventfds:
            self.model.config_write(pos + 2, 2, control & ~(MSIX_ENABLE | MSIX_FUNCTION_MASK))
            return
        # Mask the function while the table is rewritten, as the kernel does.
        self.model.config_write(pos + 2, 2, control | MSIX_ENABLE | MSIX_FUNCTION_MASK)
        for vector, fd in enumerate(eventfds):
            entry = table + 16 * vector
            self.model.mmio_write(bir, entry, 4, MSI_ADDRESS)
            self.model.mmio_write(bir, entry + 4, 4, 0)
            self.model.mmio_write(bir, entry + 8, 4, vector)
            self.model.mmio_write(bir, entry + 12, 4, 0 if fd >= 0 else 1)
            self.model.bind_msix(vector, fd)
        self.model.config_write(pos + 2, 2, (control | MSIX_ENABLE) & ~MSIX_FUNCTION_MASK)

    # --- pollers --------------------------------------------------------------
    def start_poller(self, poller: Poller) -> None:
        if id(poller) in self._pollers:
            raise HalError(f"poller {poller.name} is already running")
        run = _PollerRun(self, poller)
        self._pollers[id(poller)] = run
        run.start()

    def stop_poller(self, poller: Poller) -> None:
        run = self._pollers.pop(id(poller), None)
        if run:
            run.stop()

    def eventfds_written(self, fds) -> None:
        if fds:
            self.world.wake_readable()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for run in list(self._pollers.values()):
            run.stop()
        self._pollers.clear()
        if self._msix:
            self.set_msix([])
        for iova, size in list(self._mappings.items()):
            self.dma_unmap(iova, size)


class _PollerRun:
    """Steps a poller one wake-up latency after any of its fds is signalled.

    Signals that arrive while a step is already scheduled are coalesced into
    it, as they would be for a thread that has not woken up yet.
    """

    def __init__(self, fn: SimFunction, poller: Poller):
        self.fn = fn
        self.poller = poller
        self.fds = list(poller.fds())
        self.scheduled = False
        self.poll_at: int | None = None
        self.stopped = False

    def start(self) -> None:
        for fd in self.fds:
            self.fn.world.watch_fd(fd, self.on_signal)
        self.on_signal(-1)  # whatever was signalled before we watched

    def stop(self) -> None:
        self.stopped = True
        for fd in self.fds:
            self.fn.world.unwatch_fd(fd, self.on_signal)

    def on_signal(self, fd: int) -> None:
        if self.stopped or self.scheduled:
            return
        self.scheduled = True
        # What ``world.process(g)`` of a generator that waits wakeup_cycles and
        # then runs ``_wake`` would do, event for event (an urgent first step
        # now, a timeout), without a process and its generator per signal;
        # nobody waits for the process's end.
        self.fn.world.call_first(self._arm)

    def _arm(self, _ev) -> None:
        world = self.fn.world
        world.call_at(world.env._now + self.fn.wakeup_cycles, self._wake)

    def _wake(self, _ev=None) -> None:
        self.scheduled = False
        if self.stopped:
            return
        if self.poller.step():
            # The poller's C code wrote eventfds (guest call fds) behind the
            # world's back; their readers hold other fd numbers for them.
            self.fn.world.wake_readable()
        self._maybe_poll()

    def _maybe_poll(self) -> None:
        """Polls a poller asks for without an fd (the relay's adaptive polls),
        at modelled times: a poll wanted sooner than the one pending replaces it."""
        delay = self.poller.next_poll_ns()
        if not delay:
            return
        world = self.fn.world
        at = world.now + world.cycles(delay)
        if self.poll_at is not None and self.poll_at <= at:
            return
        self.poll_at = at
        world.call_at(at, lambda _ev, at=at: self._poll(at))

    def _poll(self, at: int) -> None:
        if self.stopped or self.poll_at != at:
            return          # stopped, or replaced by a sooner poll
        self.poll_at = None
        if self.poller.poll():
            self.fn.world.wake_readable()
        self._maybe_poll()
