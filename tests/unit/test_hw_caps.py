"""Capability walk and LM-block detection against hand-built config spaces.

These are the malformed functions a model of a *correct* device never
produces: capabilities pointing past their BAR, at absent BARs, loops.
"""
import struct

import pytest

from hal.api import Clock, MmioRegion, PciFunction
from ifcvf import ids
from ifcvf.hw import CapabilityError, IfcvfHw, walk_capabilities


class FakeClock(Clock):
    def __init__(self):
        self.t = 0

    def now_ns(self):
        return self.t

    def sleep(self, ns):
        self.t += ns


class RamRegion(MmioRegion):
    def __init__(self, bar, size):
        super().__init__(bar, size)
        self.mem = bytearray(size)

    def _read(self, off, width):
        return int.from_bytes(self.mem[off:off + width], "little")

    def _write(self, off, width, value):
        self.mem[off:off + width] = value.to_bytes(width, "little")


class FakeFunction(PciFunction):
    """Config space and RAM-backed BARs; capabilities added by the test."""

    address = "fake:0"

    def __init__(self, bars):
        self.clock = FakeClock()
        self.cfg = bytearray(256)
        struct.pack_into("<HH", self.cfg, 0, 0x1AF4, 0x1041)
        struct.pack_into("<HH", self.cfg, 0x2C, 0x8086, 0x001A)
        struct.pack_into("<H", self.cfg, 0x06, 0x10)
        self.regions = {bar: RamRegion(bar, size) for bar, size in bars.items()}
        self.next_cap = 0x40
        self.last_cap = None

    def add_cap(self, body: bytes):
        pos = self.next_cap
        self.cfg[pos:pos + len(body)] = body
        self.cfg[pos + 1] = 0
        if self.last_cap is None:
            self.cfg[0x34] = pos
        else:
            self.cfg[self.last_cap + 1] = pos
        self.last_cap = pos
        self.next_cap = (pos + len(body) + 3) & ~3
        return pos

    def add_virtio(self, cfg_type, bar, offset, length, extra=b""):
        body = struct.pack("<BBBBB3xII", ids.PCI_CAP_ID_VNDR, 0, 16 + len(extra), cfg_type, bar,
                           offset, length) + extra
        return self.add_cap(body)

    def config_read(self, offset, size):
        return int.from_bytes(self.cfg[offset:offset + size], "little")

    def config_write(self, offset, size, value):
        self.cfg[offset:offset + size] = value.to_bytes(size, "little")

    def region(self, bar):
        return self.regions.get(bar)

    def dma_map(self, *a):
        pass

    def dma_unmap(self, *a):
        pass

    def msix_vectors(self):
        return 0

    def set_msix(self, fds):
        pass

    def start_poller(self, p):
        pass

    def stop_poller(self, p):
        pass

    def close(self):
        pass


def good_function(bar=0, lm_bar=True):
    bars = {0: 0x4000, 4: 0x1000} if lm_bar else {0: 0x4000}
    bars[bar] = 0x4000
    fn = FakeFunction(bars)
    fn.add_virtio(ids.CAP_COMMON, bar, 0x0, 0x38)
    fn.add_virtio(ids.CAP_NOTIFY, bar, 0x3000, 0x1000, struct.pack("<I", 4))
    fn.add_virtio(ids.CAP_ISR, bar, 0x1000, 1)
    fn.add_virtio(ids.CAP_DEVICE, bar, 0x2000, 12)
    return fn


def test_walk_finds_every_structure():
    caps = walk_capabilities(good_function())
    assert (caps.common.bar, caps.common.offset) == (0, 0)
    assert caps.notify_off_multiplier == 4
    assert caps.device.length == 12


def test_capability_past_its_bar_is_an_error():
    fn = FakeFunction({0: 0x4000})
    fn.add_virtio(ids.CAP_COMMON, 0, 0x3FF0, 0x38)
    with pytest.raises(CapabilityError, match="outside BAR 0"):
        walk_capabilities(fn)


def test_capability_in_missing_bar_is_an_error():
    fn = FakeFunction({0: 0x4000})
    fn.add_virtio(ids.CAP_COMMON, 2, 0, 0x38)
    with pytest.raises(CapabilityError, match="BAR 2, which the function does not have"):
        walk_capabilities(fn)


def test_impossible_bar_number_is_an_error():
    fn = FakeFunction({0: 0x4000})
    fn.add_virtio(ids.CAP_COMMON, 7, 0, 0x38)
    with pytest.raises(CapabilityError, match="cannot exist"):
        walk_capabilities(fn)


def test_missing_structures_are_named():
    fn = FakeFunction({0: 0x4000})
    fn.add_virtio(ids.CAP_COMMON, 0, 0, 0x38)
    with pytest.raises(CapabilityError, match="no notify, ISR, device"):
        walk_capabilities(fn)


def test_capability_loop_is_detected():
    fn = good_function()
    fn.cfg[fn.last_cap + 1] = 0x40  # last points back to first
    with pytest.raises(CapabilityError, match="loops"):
        walk_capabilities(fn)


def test_no_capability_list():
    fn = good_function()
    struct.pack_into("<H", fn.cfg, 0x06, 0)
    with pytest.raises(CapabilityError, match="no PCI capability list"):
        walk_capabilities(fn)


def test_short_notify_capability_is_an_error():
    fn = FakeFunction({0: 0x4000})
    fn.add_virtio(ids.CAP_NOTIFY, 0, 0x3000, 0x100)
    with pytest.raises(CapabilityError, match="too short"):
        walk_capabilities(fn)


def test_bar4_holding_virtio_structures_is_not_an_lm_block():
    hw = IfcvfHw(good_function(bar=4))
    assert not hw.has_lm_block
    assert "virtio configuration structures" in hw.lm_absent_reason
    assert not hw.has_stop_command


def test_bar4_lm_block_detected_and_absent_bar4_reported():
    assert IfcvfHw(good_function()).has_lm_block
    hw = IfcvfHw(good_function(lm_bar=False))
    assert not hw.has_lm_block and hw.lm_absent_reason == "the function has no BAR 4"
