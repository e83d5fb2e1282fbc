"""The C dirty-log marking behind ifcvf.dirtylog.

(The front-end's fetch-and-clear is the simulator's: tests/sim/test_qemu_log.py.)"""
import pytest
from hypothesis import given, strategies as st

from ifcvf.dirtylog import PAGE_SIZE, DirtyLog, LogRangeError, bitmap_pages
from ifcvf.vhost.protocol import log_size


def pages_of(gpa, length):
    return set(range(gpa // PAGE_SIZE, (gpa + length - 1) // PAGE_SIZE + 1)) if length else set()


def test_mark_sets_exactly_the_touched_pages():
    buf = bytearray(4)
    log = DirtyLog(buf)
    log.mark(0x1FFF, 2)  # straddles pages 1 and 2
    assert log.dirty_pages() == [1, 2]
    assert buf == bytes([0b110, 0, 0, 0])


def test_out_of_range_writes_nothing():
    buf = bytearray(2)  # covers pages 0..15
    log = DirtyLog(buf)
    with pytest.raises(LogRangeError, match="past the log"):
        log.mark(15 * PAGE_SIZE, PAGE_SIZE + 1)  # pages 15 and 16
    assert buf == bytes(2)
    with pytest.raises(LogRangeError):
        log.mark(2**64 - 1, 2)  # wraps
    assert buf == bytes(2)


def test_log_size_matches_qemu():
    # QEMU's vhost-user-test: a 256 MiB guest needs an 8192-byte log; -m 200M
    # gives 6400 bytes (whole 64-bit words, never a page).
    assert log_size(256 << 20) == 8192
    assert log_size(200 << 20) == 6400
    assert log_size((200 << 20) + 4096) == 6408


@given(st.integers(0, 4096), st.lists(st.tuples(st.integers(0, 70 * PAGE_SIZE), st.integers(0, 9 * PAGE_SIZE)),
                                      max_size=20))
def test_marks_match_a_set_model(offset, ranges):
    # An unaligned start exercises the byte/word split of the C loop.
    backing = bytearray(offset % 8 + 11)
    view = memoryview(backing)[offset % 8:]
    log = DirtyLog(view)
    expected = set()
    for gpa, length in ranges:
        want = pages_of(gpa, length)
        if want and max(want) >= log.pages:
            with pytest.raises(LogRangeError):
                log.mark(gpa, length)
        else:
            log.mark(gpa, length)
            expected |= want
    assert log.dirty_pages() == sorted(expected)
    assert set(bitmap_pages(bytes(view))) == expected
