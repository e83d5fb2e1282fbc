"""The function's IOMMU domain: map/unmap rules, translation, recorded faults."""
import mmap

import pytest

from sim.config import IfcvfConfig
from sim.ifcvf import IfcvfFunction
from sim.iommu import IommuDomain, IommuError
from sim.world import World

PAGE = 0x1000


@pytest.fixture
def domain():
    return IommuDomain(World(2), "test.iommu")


@pytest.fixture
def memory():
    maps = []

    def make(size):
        m = mmap.mmap(-1, size)
        maps.append(m)
        return memoryview(m)

    yield make


def test_function_has_a_domain():
    fn = IfcvfFunction(World(0), IfcvfConfig())
    assert isinstance(fn.iommu, IommuDomain) and fn.iommu.mappings() == []


def test_map_read_write_view(domain, memory):
    mem = memory(2 * PAGE)
    domain.map(0x10_0000, mem, 2 * PAGE)
    assert domain.write(0x10_0FFE, b"abcd")
    assert bytes(mem[0xFFE:0x1002]) == b"abcd"
    assert domain.read(0x10_0FFE, 4) == b"abcd"
    view = domain.view(0x10_0FFE, 4)
    view[0:1] = b"X"
    assert mem[0xFFE] == ord("X"), "view is zero-copy"
    assert domain.faults == []


def test_map_of_part_of_a_buffer_limits_the_window(domain, memory):
    mem = memory(4 * PAGE)
    domain.map(0, mem, PAGE)
    assert domain.read(PAGE - 1, 1) is not None
    assert domain.read(PAGE, 1) is None


@pytest.mark.parametrize("iova,size,message", [
    (0x1001, PAGE, "aligned"), (0x1000, 0x800, "aligned"), (0x1000, 0, "positive"),
    (-PAGE, PAGE, "aligned"), (2**48 - PAGE, 2 * PAGE, "48-bit"), (0, 8 * PAGE, "holds only")])
def test_map_rejects_bad_requests(domain, memory, iova, size, message):
    mem = memory(4 * PAGE)
    with pytest.raises(IommuError, match=message):
        domain.map(iova, mem, size)
    assert domain.mappings() == []


def test_map_rejects_read_only_buffers(domain):
    with pytest.raises(IommuError, match="read-only"):
        domain.map(0, b"\0" * PAGE, PAGE)


def test_map_refuses_overlap_and_changes_nothing(domain, memory):
    mem = memory(16 * PAGE)
    domain.map(4 * PAGE, mem, 2 * PAGE)
    for iova, size in ((3 * PAGE, 2 * PAGE), (5 * PAGE, PAGE), (4 * PAGE, PAGE), (0, 16 * PAGE)):
        with pytest.raises(IommuError, match="overlaps"):
            domain.map(iova, mem, size)
    assert domain.mappings() == [(4 * PAGE, 2 * PAGE)]
    domain.map(6 * PAGE, mem, PAGE)  # adjacent is fine
    domain.map(3 * PAGE, mem, PAGE)
    assert domain.mappings() == [(3 * PAGE, PAGE), (4 * PAGE, 2 * PAGE), (6 * PAGE, PAGE)]


def test_unmap_must_cover_whole_mappings(domain, memory):
    mem = memory(8 * PAGE)
    domain.map(0, mem[:2 * PAGE], 2 * PAGE)
    domain.map(2 * PAGE, mem[2 * PAGE:], 2 * PAGE)
    domain.map(8 * PAGE, mem, PAGE)
    for iova, size, message in ((0, PAGE, "split"), (PAGE, PAGE, "no mapping starts"),
                                (0, 6 * PAGE, "nothing mapped"), (0, 3 * PAGE, "split"),
                                (5 * PAGE, PAGE, "no mapping starts"), (0, 0, "positive")):
        with pytest.raises(IommuError, match=message):
            domain.unmap(iova, size)
    assert len(domain.mappings()) == 3
    domain.unmap(0, 4 * PAGE)  # two adjacent mappings at once
    assert domain.mappings() == [(8 * PAGE, PAGE)]
    domain.unmap(8 * PAGE, PAGE)
    assert domain.mappings() == []


def test_access_spanning_adjacent_mappings(domain, memory):
    a, b = memory(PAGE), memory(PAGE)
    domain.map(0x4000, a, PAGE)
    domain.map(0x5000, b, PAGE)
    assert domain.write(0x4FFC, b"01234567")
    assert bytes(a[-4:]) == b"0123" and bytes(b[:4]) == b"4567"
    assert domain.read(0x4FFC, 8) == b"01234567"
    assert domain.view(0x4FFC, 8) is None, "no single zero-copy view across mappings"
    assert [bytes(s) for s in domain.segments(0x4FFC, 8)] == [b"0123", b"4567"]
    assert domain.faults == []


def test_unmapped_accesses_are_recorded_faults(domain, memory):
    mem = memory(PAGE)
    domain.map(0x4000, mem, PAGE)
    domain.world.advance(42)
    assert domain.read(0x3FFF, 2) is None
    assert domain.write(0x4FFF, b"ab") is False
    assert domain.view(0x9000, 1) is None
    assert domain.read(2**48 - 1, 2) is None
    assert bytes(mem[-1:]) == b"\0", "a faulting write writes nothing"
    kinds = [(f.cycle, f.iova, f.length, f.direction) for f in domain.faults]
    assert kinds == [(42, 0x3FFF, 2, "read"), (42, 0x4FFF, 2, "write"),
                     (42, 0x9000, 1, "read"), (42, 2**48 - 1, 2, "read")]
    assert "unmapped at 0x3fff" in domain.faults[0].reason
    assert "out of range" in domain.faults[3].reason
    assert len(domain.world.trace.find("iommu_fault")) == 4


def test_empty_access_is_not_a_fault(domain):
    assert domain.read(0x1234, 0) == b""
    assert domain.write(0x1234, b"") is True
    assert domain.faults == []


def test_translation_after_many_maps(domain, memory):
    mem = memory(PAGE)
    for i in reversed(range(200)):
        domain.map(i * 2 * PAGE, mem, PAGE)
    for i in range(200):
        hit = domain.translate(i * 2 * PAGE + 5)
        assert hit is not None and hit[0].iova == i * 2 * PAGE and hit[1] == 5
        assert domain.translate(i * 2 * PAGE + PAGE) is None


def test_unmap_releases_the_buffer(domain):
    m = mmap.mmap(-1, PAGE)
    view = memoryview(m)
    domain.map(0, view, PAGE)
    domain.unmap(0, PAGE)
    view.release()
    m.close()  # would raise BufferError if the domain still held an export
