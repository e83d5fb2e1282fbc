"""QEMU's fetch-and-clear of the vhost dirty log (sim.migration.DirtyLogReader,
csrc/sim/qemu_log.c), over logs the driver marks (ifcvf.dirtylog)."""
from types import SimpleNamespace

from hypothesis import given, strategies as st

from ifcvf.dirtylog import PAGE_SIZE, DirtyLog
from sim.migration import DirtyLogReader


def reader_of(view) -> DirtyLogReader:
    return DirtyLogReader(SimpleNamespace(view=view), len(view))


def test_fetch_and_clear_returns_and_zeroes():
    buf = bytearray(24)
    log = DirtyLog(buf)
    reader = reader_of(memoryview(buf))
    log.mark(0, PAGE_SIZE)
    log.mark(100 * PAGE_SIZE, 1)
    assert reader.fetch_and_clear() == {0, 100}
    assert buf == bytes(24)
    assert reader.fetch_and_clear() == set()


@given(st.integers(0, 7), st.integers(1, 40),
       st.lists(st.tuples(st.integers(0, 70 * PAGE_SIZE), st.integers(1, 9 * PAGE_SIZE)), max_size=20))
def test_fetch_and_clear_takes_exactly_the_marked_pages(offset, size, ranges):
    # An unaligned start and odd sizes exercise the byte/word/tail split of the C loop.
    backing = bytearray(offset + size + 8)
    view = memoryview(backing)[offset:offset + size]
    log = DirtyLog(view)
    reader = reader_of(view)
    expected = set()
    for gpa, length in ranges:
        last = (gpa + length - 1) // PAGE_SIZE
        if last < log.pages:
            log.mark(gpa, length)
            expected |= set(range(gpa // PAGE_SIZE, last + 1))
    assert reader.fetch_and_clear() == expected
    assert backing == bytes(len(backing))
    assert reader.fetch_and_clear() == set()
