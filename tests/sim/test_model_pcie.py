"""Config space of the simulated IFCVF: header, BAR sizing, capabilities, PCI-cfg window.

Offsets are written out from the PCI and virtio specifications here on
purpose, not taken from the model, so a wrong constant in the model fails.
"""
import pytest

from sim.config import IfcvfConfig
from sim.ifcvf import IfcvfFunction
from sim.world import World


def make(**kw):
    world = World(7)
    return world, IfcvfFunction(world, IfcvfConfig(**kw))


def walk_caps(fn):
    """[(offset, cap id)] following the list from 0x34, as a driver would."""
    assert fn.config_read(0x06, 2) & 0x10, "status must announce a capability list"
    found, pos, seen = [], fn.config_read(0x34, 1), set()
    while pos:
        assert pos not in seen and 0x40 <= pos < 0x100
        seen.add(pos)
        found.append((pos, fn.config_read(pos, 1)))
        pos = fn.config_read(pos + 1, 1)
    return found


def virtio_caps(fn):
    """cfg_type -> dict(bar, offset, length, cap_len, pos) from the vendor caps."""
    out = {}
    for pos, cap_id in walk_caps(fn):
        if cap_id != 0x09:
            continue
        cfg_type = fn.config_read(pos + 3, 1)
        out[cfg_type] = dict(pos=pos, cap_len=fn.config_read(pos + 2, 1),
                             bar=fn.config_read(pos + 4, 1),
                             offset=fn.config_read(pos + 8, 4),
                             length=fn.config_read(pos + 12, 4))
    return out


def test_identity_registers():
    _, fn = make()
    assert fn.config_read(0x00, 2) == 0x1AF4
    assert fn.config_read(0x02, 2) == 0x1041
    assert fn.config_read(0x00, 4) == 0x1041_1AF4
    assert fn.config_read(0x08, 1) == 1
    assert fn.config_read(0x09, 1) == 0x00 and fn.config_read(0x0A, 2) == 0x0200
    assert fn.config_read(0x2C, 2) == 0x8086
    assert fn.config_read(0x2E, 2) == 0x001A
    assert fn.config_read(0x0E, 1) == 0x00  # type-0 header
    assert fn.config_read(0x3D, 1) == 0     # a VF has no INTx pin


def test_read_only_fields_ignore_writes():
    _, fn = make()
    for offset, size in [(0x00, 4), (0x08, 4), (0x2C, 4), (0x34, 1), (0x3D, 1), (0x06, 2)]:
        before = fn.config_read(offset, size)
        fn.config_write(offset, size, (1 << (8 * size)) - 1)
        assert fn.config_read(offset, size) == before, hex(offset)


def test_command_register_bits():
    _, fn = make()
    assert fn.config_read(0x04, 2) & 0x2, "memory decoding starts enabled"
    assert not fn.bus_master
    fn.config_write(0x04, 2, 0x0006)
    assert fn.bus_master
    fn.config_write(0x04, 2, 0xFFFF)
    assert fn.config_read(0x04, 2) & 0x1 == 0, "no I/O BARs, so no I/O decode"


def test_accesses_at_any_offset_and_width():
    _, fn = make()
    whole = fn.config_read(0x00, 4)
    assert fn.config_read(0x01, 2) == (whole >> 8) & 0xFFFF
    assert fn.config_read(0x03, 1) == whole >> 24
    assert fn.config_read(0xFFC, 4) == 0  # extended space: no capabilities
    assert fn.config_read(0x100, 4) == 0


@pytest.mark.parametrize("offset,size", [(0x1000, 1), (0xFFE, 4), (-1, 1), (0, 3), (0, 8)])
def test_accesses_outside_config_space_are_caller_bugs(offset, size):
    _, fn = make()
    with pytest.raises(ValueError):
        fn.config_read(offset, size)
    with pytest.raises(ValueError):
        fn.config_write(offset, size, 0)


def test_bar_sizing_protocol_ifcvf_layout():
    _, fn = make()
    expected = {0: 0x4000, 2: 0x10000, 4: 0x1000}  # 9 queues x 4 KiB -> 64 KiB
    for bar in range(6):
        assert fn.bar_size(bar) == expected.get(bar)
    for bar, size in expected.items():
        low, high = 0x10 + 4 * bar, 0x14 + 4 * bar
        flags = fn.config_read(low, 4) & 0xF
        assert flags & 0x1 == 0, "memory BAR"
        assert flags & 0x6 == 0x4, "64-bit"
        fn.config_write(low, 4, 0xFFFF_FFFF)
        fn.config_write(high, 4, 0xFFFF_FFFF)
        mask = fn.config_read(low, 4) | fn.config_read(high, 4) << 32
        assert (~(mask & ~0xF) + 1) & (2**64 - 1) == size
        fn.config_write(low, 4, 0xFEB0_0000)
        fn.config_write(high, 4, 0x0000_0038)
        assert fn.config_read(low, 4) == 0xFEB0_0000 | flags
        assert fn.config_read(high, 4) == 0x38
        assert fn.pci.bar_address(bar) == 0x38_FEB0_0000
    # BARs 1, 3 and 5 are the upper halves of the 64-bit BARs; no expansion ROM.
    fn.config_write(0x30, 4, 0xFFFF_FFFF)
    assert fn.config_read(0x30, 4) == 0


def test_bar_address_bits_below_the_size_read_zero():
    _, fn = make()
    fn.config_write(0x20, 4, 0x1234_5678)  # BAR4, 4 KiB
    assert fn.config_read(0x20, 4) & ~0xF == 0x1234_5000


def test_virtio_capabilities_ifcvf_layout():
    _, fn = make()
    caps = virtio_caps(fn)
    assert sorted(caps) == [1, 2, 3, 4, 5]
    assert (caps[1]["bar"], caps[1]["offset"]) == (0, 0x0000)
    assert caps[1]["length"] >= 0x38
    assert (caps[3]["bar"], caps[3]["offset"]) == (0, 0x1000)
    assert (caps[4]["bar"], caps[4]["offset"]) == (0, 0x2000)
    assert caps[4]["length"] >= 12
    assert (caps[2]["bar"], caps[2]["offset"]) == (2, 0)
    assert caps[2]["cap_len"] == 20
    assert fn.config_read(caps[2]["pos"] + 16, 4) == 0x1000  # notify_off_multiplier
    assert caps[2]["length"] >= 8 * 0x1000 + 2  # last doorbell (queue 8) fits
    assert caps[5]["cap_len"] == 20
    for cfg_type in (1, 2, 3, 4):  # every structure lies inside its BAR
        cap = caps[cfg_type]
        assert cap["offset"] + cap["length"] <= fn.bar_size(cap["bar"])


def test_msix_capability():
    _, fn = make()
    msix = [pos for pos, cap_id in walk_caps(fn) if cap_id == 0x11]
    assert len(msix) == 1
    pos = msix[0]
    control = fn.config_read(pos + 2, 2)
    assert control & 0x7FF == 10 - 1, "table size - 1"
    assert control & 0xC000 == 0, "starts disabled, not function-masked"
    table, pba = fn.config_read(pos + 4, 4), fn.config_read(pos + 8, 4)
    assert (table & 7, table & ~7) == (0, 0x3000)
    assert (pba & 7, pba & ~7) == (0, 0x3800)
    fn.config_write(pos + 2, 2, 0xFFFF)
    assert fn.config_read(pos + 2, 2) == 0xC000 | 9, "only enable and mask are writable"
    assert fn.msix_cap.enabled and fn.msix_cap.function_masked
    fn.config_write(pos + 3, 1, 0x80)  # byte write of the high half: enable, unmask
    assert fn.msix_cap.enabled and not fn.msix_cap.function_masked


def pci_cfg_window(fn, bar, offset, length):
    pos = virtio_caps(fn)[5]["pos"]
    fn.config_write(pos + 4, 1, bar)
    fn.config_write(pos + 8, 4, offset)
    fn.config_write(pos + 12, 4, length)
    return pos + 16


def test_pci_cfg_window_reads_and_writes_bars():
    world, fn = make()
    data = pci_cfg_window(fn, 0, 0x12, 2)  # num_queues
    assert fn.config_read(data, 2) == 9
    data = pci_cfg_window(fn, 0, 0x14, 1)  # device_status
    fn.config_write(data, 1, 0x01)
    assert fn.status == 0x01
    assert fn.config_read(data, 1) == 0x01
    data = pci_cfg_window(fn, 4, 0x28, 4)  # LM MQ register through config space
    fn.config_write(data, 4, 3)
    assert fn.lm.mq == 3
    assert fn.mmio_read(4, 0x28, 4) == 3


def test_pci_cfg_window_read_has_the_bar_side_effect():
    _, fn = make()
    fn.set_link(False)  # raises the config interrupt: ISR bit 1
    data = pci_cfg_window(fn, 0, 0x1000, 1)
    assert fn.config_read(data, 1) == 0x2
    assert fn.isr_pending == 0, "ISR read through the window clears it"


@pytest.mark.parametrize("bar,offset,length", [(1, 0, 4), (0, 0x14, 3), (0, 0x13, 2),
                                               (4, 0x1000, 4), (9, 0, 4)])
def test_pci_cfg_window_invalid_is_ignored_and_traced(bar, offset, length):
    world, fn = make()
    data = pci_cfg_window(fn, bar, offset, length)
    fn.config_write(data, 4, 0x0101_0101)
    fn.config_read(data, 4)
    assert fn.status == 0
    assert len(world.trace.find("pci_cfg_window_invalid")) == 2


def test_qemu_layout_config_space():
    world = World(1)
    fn = IfcvfFunction(world, IfcvfConfig.qemu_virtio_net())
    assert fn.config_read(0x2C, 4) == 0x1100_1AF4
    assert [fn.bar_size(b) for b in range(6)] == [None, 0x1000, None, None, 0x4000, None]
    assert fn.config_read(0x14, 4) & 0x7 == 0, "BAR1 is 32-bit memory"
    fn.config_write(0x14, 4, 0xFFFF_FFFF)
    assert fn.config_read(0x14, 4) == 0xFFFF_F000
    caps = virtio_caps(fn)
    assert {t: (c["bar"], c["offset"]) for t, c in caps.items() if t != 5} == {
        1: (4, 0x0), 3: (4, 0x1000), 4: (4, 0x2000), 2: (4, 0x3000)}
    assert fn.config_read(caps[2]["pos"] + 16, 4) == 4
    pos = [p for p, cap_id in walk_caps(fn) if cap_id == 0x11][0]
    assert fn.config_read(pos + 4, 4) == 0x0000 | 1
    assert fn.config_read(pos + 8, 4) == 0x0800 | 1
