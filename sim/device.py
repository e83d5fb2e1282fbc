"""What a HAL needs of a simulated PCI function: the ``SimDevice`` protocol.

``hal/sim.py`` binds the driver's HAL contract to any object that has this
shape, and to nothing else of the model: config space and BAR access as the
bus sees them, BAR sizes, the function's DMA domain (its IOMMU, where VFIO
would map), MSI-X vectors routed to eventfds (what VFIO's SET_IRQS does), the
world it lives in, and the latency of a non-posted read.  ``sim.ifcvf
.IfcvfFunction`` is one such device.
"""
from __future__ import annotations

from typing import Protocol

from sim.iommu import IommuError
from sim.world import World

__all__ = ["DmaPort", "IommuError", "SimDevice"]


class DmaPort(Protocol):
    """The function's IOMMU domain.  Refusals raise ``IommuError`` and change nothing."""

    def map(self, iova: int, buffer, size: int) -> None: ...

    def unmap(self, iova: int, size: int) -> None: ...

    def mappings(self) -> list[tuple[int, int]]: ...


class SimDevice(Protocol):
    world: World
    name: str

    @property
    def dma(self) -> DmaPort: ...

    @property
    def mmio_read_ns(self) -> float:
        """How long a non-posted MMIO read takes to complete."""

    def config_read(self, offset: int, size: int) -> int: ...

    def config_write(self, offset: int, size: int, value: int) -> None: ...

    def bar_size(self, bar: int) -> int | None:
        """The BAR's size in bytes, None when it is not implemented."""

    def mmio_read(self, bar: int, offset: int, width: int) -> int: ...

    def mmio_write(self, bar: int, offset: int, width: int, value: int) -> None: ...

    def bind_msix(self, vector: int, eventfd: int) -> None:
        """Route MSI-X ``vector`` to ``eventfd`` (-1: nowhere)."""
