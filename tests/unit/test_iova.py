from ifcvf.iova import ALIGN, place

FULL = [(0, (1 << 64) - 1)]
GUEST = [(0, 1 << 30)]


def test_dpdk_addresses_where_the_iommu_allows_them():
    assert place(FULL, 0x1000_0000_0000, 0x4000, GUEST) == 0x1000_0000_0000


def test_a_39_bit_iommu_gets_a_window_above_guest_memory():
    narrow = [(0, (1 << 39) - 1)]
    assert place(narrow, 0x2000_0000_0000, 0x8000, GUEST) == ALIGN
    taken = GUEST + [(ALIGN, 0x8000)]
    assert place(narrow, 0x1000_0000_0000, 0x4000, taken) == 2 * ALIGN


def test_holes_and_no_room():
    ranges = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 33) - 1)]
    assert place(ranges, 1 << 45, 4096, [(0, 0xFE000000)]) == 1 << 32
    assert place([(0, (1 << 31) - 1)], 1 << 45, 4096, [(0, 1 << 31)]) is None
