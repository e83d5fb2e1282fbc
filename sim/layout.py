"""Where each register structure lives in the BARs, as data.

``layout_for(config)`` answers for both layouts; ``BarLayout.describe()``
prints the map (the same one ``sim/ifcvf.py``'s docstring documents).
"""
from __future__ import annotations

from dataclasses import dataclass

from sim import virtio_regs as vr
from sim.config import QEMU_NOTIFY_REGION, IfcvfConfig

PAGE = 0x1000
LM_BLOCK_SIZE = 0x1000


@dataclass(frozen=True)
class Region:
    """One register structure: ``length`` bytes at ``offset`` in BAR ``bar``.

    ``length`` is what the capability advertises; ``window`` (>= length) is the
    span the structure decodes: offsets in the window past its registers read 0.
    """

    name: str
    bar: int
    offset: int
    length: int
    window: int

    def decodes(self, bar: int, offset: int) -> bool:
        return bar == self.bar and self.offset <= offset < self.offset + self.window


@dataclass(frozen=True)
class BarSpec:
    """One memory BAR as config space advertises it."""

    index: int
    size: int
    is_64bit: bool
    prefetchable: bool


@dataclass(frozen=True)
class BarLayout:
    name: str
    bars: tuple[BarSpec, ...]
    common: Region
    isr: Region
    device: Region
    notify: Region
    msix_table: Region
    msix_pba: Region
    lm: Region | None

    def bar(self, index: int) -> BarSpec | None:
        for spec in self.bars:
            if spec.index == index:
                return spec
        return None

    def regions(self) -> list[Region]:
        found = [self.common, self.isr, self.device, self.notify, self.msix_table, self.msix_pba]
        if self.lm is not None:
            found.append(self.lm)
        return sorted(found, key=lambda r: (r.bar, r.offset))

    def describe(self) -> str:
        lines = [f"layout {self.name}"]
        for spec in self.bars:
            kind = "64-bit" if spec.is_64bit else "32-bit"
            pref = " prefetchable" if spec.prefetchable else ""
            lines.append(f"BAR{spec.index}: {kind}{pref} memory, {spec.size:#x} bytes")
            for region in self.regions():
                if region.bar == spec.index:
                    lines.append(f"  {region.offset:#07x} len {region.length:#07x} "
                                 f"window {region.window:#07x}  {region.name}")
        return "\n".join(lines)


def _pow2_at_least(value: int, floor: int) -> int:
    size = floor
    while size < value:
        size *= 2
    return size


def layout_for(config: IfcvfConfig) -> BarLayout:
    table_len = 16 * config.msix_vectors
    pba_len = 8 * ((config.msix_vectors + 63) // 64)
    if config.layout == "ifcvf":
        # Queue q's doorbell is at q * multiplier; a zero multiplier shares one.
        notify_len = max(2, config.num_queues * config.notify_off_multiplier)
        bar2 = _pow2_at_least(notify_len, PAGE)
        return BarLayout(
            name="ifcvf",
            bars=(BarSpec(0, 0x4000, True, True),
                  BarSpec(2, bar2, True, True),
                  BarSpec(4, LM_BLOCK_SIZE, True, True)),
            common=Region("common cfg", 0, 0x0000, vr.COMMON_CFG_SIZE, PAGE),
            isr=Region("ISR", 0, 0x1000, 1, PAGE),
            device=Region("device cfg (virtio-net)", 0, 0x2000, vr.NET_CFG_SIZE, PAGE),
            notify=Region("notify (doorbells)", 2, 0x0000, notify_len, bar2),
            msix_table=Region("MSI-X table", 0, 0x3000, table_len, 0x800),
            msix_pba=Region("MSI-X PBA", 0, 0x3800, pba_len, 0x800),
            lm=Region("live-migration block", 4, 0x0000, LM_BLOCK_SIZE, LM_BLOCK_SIZE),
        )
    # QEMU 7.2 virtio-net-pci, disable-legacy=on: MSI-X in BAR 1, every virtio
    # structure a 4 KiB region of the 16 KiB modern BAR 4 with its cap length
    # covering the whole region.
    return BarLayout(
        name="qemu",
        bars=(BarSpec(1, 0x1000, False, False),
              BarSpec(4, 0x4000, True, True)),
        common=Region("common cfg", 4, 0x0000, PAGE, PAGE),
        isr=Region("ISR", 4, 0x1000, PAGE, PAGE),
        device=Region("device cfg (virtio-net)", 4, 0x2000, PAGE, PAGE),
        notify=Region("notify (doorbells)", 4, 0x3000, QEMU_NOTIFY_REGION, QEMU_NOTIFY_REGION),
        msix_table=Region("MSI-X table", 1, 0x0000, table_len, 0x800),
        msix_pba=Region("MSI-X PBA", 1, 0x0800, pba_len, 0x800),
        lm=None,
    )
