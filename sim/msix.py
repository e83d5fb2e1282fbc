"""MSI-X: the vector table and pending-bit array in a BAR, delivery to eventfds.

The table has one 16-byte entry per vector {addr lo, addr hi, data, vector
control}; bit 0 of vector control masks the entry and every entry starts
masked (PCI 3.0 6.8.2.9).  Enable and function mask live in the config-space
capability (``sim.pcie.MsixCapability``).

A message is sent when MSI-X is enabled, the function is not masked and the
entry is unmasked; otherwise the vector's pending bit is set, and the message
goes out as soon as the blocking condition clears (an unmask, clearing the
function mask, enabling MSI-X).  "Sent" means: write to the eventfd the vector
is bound to, which is how VFIO routes an MSI-X vector to user space.  The
table address/data are kept for the driver to read back but do not route
anything: the host kernel owns them on real hardware.
"""
from __future__ import annotations

from typing import Callable, Protocol

from sim.world import World

ENTRY_SIZE = 16
VECTOR_CONTROL = 12
VECTOR_MASKED = 0x1


# What vfio-pci programs into an entry on x86: the local-APIC MSI window.
HOST_MSI_ADDRESS = 0xFEE0_0000


class MsixControl(Protocol):
    """The capability's message control word, as the table needs it."""

    @property
    def enabled(self) -> bool: ...

    @property
    def function_masked(self) -> bool: ...

    def listen(self, callback: Callable[[], None]) -> None: ...

    def set_enabled(self, on: bool) -> None: ...


class MsixTable:
    """One function's MSI-X table, PBA and vector -> eventfd routing."""

    def __init__(self, world: World, control: MsixControl, vectors: int, delay_cycles: int,
                 name: str = "msix"):
        self.world = world
        self.control = control
        self.vectors = vectors
        self.delay_cycles = delay_cycles
        self.name = name
        self._entries = [[0, 0, 0, VECTOR_MASKED] for _ in range(vectors)]
        self._pending = [False] * vectors
        self._fds = [-1] * vectors
        self.delivered = [0] * vectors
        self.unrouted = [0] * vectors
        control.listen(self._unblocked)

    # --- routing (what VFIO_DEVICE_SET_IRQS does) --------------------------------------
    def bind(self, vector: int, fd: int) -> None:
        """Route ``vector`` to eventfd ``fd``; -1 unbinds."""
        self._check_vector(vector)
        self._fds[vector] = fd if fd >= 0 else -1

    def bound(self, vector: int) -> bool:
        self._check_vector(vector)
        return self._fds[vector] >= 0

    def host_enable(self, fds) -> None:
        """What vfio-pci does for SET_IRQS(MSIX, eventfds): route, program, unmask, enable.

        Vector i goes to ``fds[i]``; vectors past the list (or -1) stay unrouted.
        A convenience for the HAL: the same state is reachable by config-space
        and table writes.
        """
        if len(fds) > self.vectors:
            raise ValueError(f"{len(fds)} eventfds for {self.vectors} MSI-X vectors")
        for vector in range(self.vectors):
            self.bind(vector, fds[vector] if vector < len(fds) else -1)
            self._entries[vector][0:3] = [HOST_MSI_ADDRESS, 0, vector]
            if vector < len(fds) and fds[vector] >= 0:
                self._entries[vector][3] &= ~VECTOR_MASKED
        self.world.record(self.name, "msix_host_enable", vectors=len(fds))
        self.control.set_enabled(True)
        self._unblocked()

    def host_disable(self) -> None:
        """What vfio-pci does for SET_IRQS(MSIX, count 0): disable, mask, unroute."""
        self.control.set_enabled(False)
        for vector in range(self.vectors):
            self._fds[vector] = -1
            self._entries[vector][3] |= VECTOR_MASKED
        self.world.record(self.name, "msix_host_disable")

    # --- raising -----------------------------------------------------------------------
    def fire(self, vector: int) -> None:
        """Raise ``vector``; the message lands after the MSI-X delay."""
        if not 0 <= vector < self.vectors:
            self.world.record(self.name, "msix_bad_vector", vector=vector)
            return
        if self.delay_cycles == 0:
            self._arrive(vector)
            return
        # (= world.timeout(delay).callbacks.append(...), without the Timeout)
        self.world.call_with(self.world.env._now + self.delay_cycles, self._arrive, vector)

    def _deliverable(self, vector: int) -> bool:
        return (self.control.enabled and not self.control.function_masked
                and not self._entries[vector][3] & VECTOR_MASKED)

    def _arrive(self, vector: int) -> None:
        control = self.control
        # (= self._deliverable(vector), inline: once per message)
        if (control.enabled and not control.function_masked
                and not self._entries[vector][3] & VECTOR_MASKED):
            self._send(vector)
        else:
            if not self._pending[vector]:
                self.world.record(self.name, "msix_pending", vector=vector)
            self._pending[vector] = True

    def _send(self, vector: int) -> None:
        self._pending[vector] = False
        self.delivered[vector] += 1
        fd = self._fds[vector]
        world = self.world
        # = world.record(name, "msix_deliver", vector=vector, routed=fd >= 0)
        world.trace.add(f"{world.env._now} {self.name} msix_deliver routed={int(fd >= 0)} "
                        f"vector={vector}\n", "msix_deliver")
        if fd < 0:
            self.unrouted[vector] += 1
            return
        world.signal_fd(fd)

    def _unblocked(self) -> None:
        for vector in range(self.vectors):
            if self._pending[vector] and self._deliverable(vector):
                self._send(vector)

    # --- inspection ----------------------------------------------------------------------
    def pending(self, vector: int) -> bool:
        self._check_vector(vector)
        return self._pending[vector]

    def masked(self, vector: int) -> bool:
        self._check_vector(vector)
        return bool(self._entries[vector][3] & VECTOR_MASKED)

    def entry(self, vector: int) -> tuple[int, int, int]:
        """(message address, message data, vector control) of one entry."""
        self._check_vector(vector)
        lo, hi, data, ctrl = self._entries[vector]
        return lo | hi << 32, data, ctrl

    # --- BAR accesses ----------------------------------------------------------------------
    def table_read(self, offset: int, width: int) -> int:
        vector, word, shift = self._locate(offset, width)
        if vector is None:
            return 0
        return self._entries[vector][word] >> shift & ((1 << (8 * width)) - 1)

    def table_write(self, offset: int, width: int, value: int) -> None:
        vector, word, shift = self._locate(offset, width)
        if vector is None:
            self.world.record(self.name, "msix_table_unassigned", offset=offset, width=width)
            return
        mask = ((1 << (8 * width)) - 1) << shift
        entry = self._entries[vector]
        if word == 3:
            # Only the mask bit of vector control is writable; the rest is reserved.
            mask &= VECTOR_MASKED
        entry[word] = (entry[word] & ~mask) | (value << shift & mask)
        if word == 3:
            self.world.record(self.name, "msix_mask", vector=vector,
                              masked=bool(entry[3] & VECTOR_MASKED))
            if self._pending[vector] and self._deliverable(vector):
                self._send(vector)

    def pba_read(self, offset: int, width: int) -> int:
        value = 0
        for i in range(8 * width):
            vector = 8 * offset + i
            if vector < self.vectors and self._pending[vector]:
                value |= 1 << i
        return value

    def pba_write(self, offset: int, width: int, value: int) -> None:
        self.world.record(self.name, "msix_pba_write_ignored", offset=offset, width=width)

    def _locate(self, offset: int, width: int) -> tuple[int | None, int, int]:
        vector, within = divmod(offset, ENTRY_SIZE)
        word, shift = divmod(within, 4)
        if vector >= self.vectors or shift + width > 4:
            return None, 0, 0
        return vector, word, 8 * shift

    def _check_vector(self, vector: int) -> None:
        if not 0 <= vector < self.vectors:
            raise ValueError(f"MSI-X vector {vector} is outside the table (0..{self.vectors - 1})")
