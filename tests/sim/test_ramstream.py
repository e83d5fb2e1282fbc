"""QEMU's RAM stream in the simulator: zero pages cost 9 bytes, and holes are never touched.

Resident memory must follow the pages the guest used, not its RAM size, so
every test also checks, with lseek(SEEK_DATA), that pages nobody wrote are
still holes in the memfd afterwards (touching a hole through a shared mapping
allocates it, even a read).
"""
from __future__ import annotations

import os

import pytest

from hal.memory import HostMemory
from sim.ramstream import PAGE, RamStream, fill_used

ZERO_RECORD = 8 + 1          # QEMU's page header and the zero byte
NORMAL_RECORD = 8 + PAGE


def data_pages(memory) -> set[int]:
    """Pages of the memfd that hold data (allocated), found without touching any."""
    pages, off = set(), 0
    while off < memory.size:
        try:
            start = os.lseek(memory.fd, off, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(memory.fd, start, os.SEEK_HOLE)
        pages.update(range(start // PAGE, min(end, memory.size) // PAGE))
        off = end
    return pages


@pytest.fixture
def rams():
    src, dst = HostMemory(256 * PAGE, "src"), HostMemory(256 * PAGE, "dst")
    yield src, dst
    src.close()
    dst.close()


def send_all(stream, pages, budget=1 << 40):
    todo = stream.pages_to_send(pages)
    sent = stream.send(todo, 0, budget)
    assert sent.pages == len(todo)
    return sent


def test_never_written_pages_are_zero_records_and_stay_holes(rams):
    src, dst = rams
    stream = RamStream(src, dst)
    sent = send_all(stream, range(256))
    assert (sent.bytes, sent.zero_pages) == (256 * ZERO_RECORD, 256)
    assert data_pages(src) == set() and data_pages(dst) == set()


def test_data_pages_are_copied_whole_and_only_they_become_resident(rams):
    src, dst = rams
    fill_used(src, 10, 5, seed=7)
    src.view[200 * PAGE + 17] = 0x5A
    stream = RamStream(src, dst)
    sent = send_all(stream, range(256))
    assert sent.zero_pages == 256 - 6
    assert sent.bytes == 6 * NORMAL_RECORD + 250 * ZERO_RECORD
    assert bytes(dst.view[10 * PAGE:15 * PAGE]) == bytes(src.view[10 * PAGE:15 * PAGE])
    assert dst.view[200 * PAGE + 17] == 0x5A
    assert data_pages(dst) == {10, 11, 12, 13, 14, 200}
    assert stream.differing_pages() == []


def test_a_written_page_of_zeros_is_a_zero_record_and_clears_the_destination(rams):
    src, dst = rams
    src.view[3 * PAGE] = 1
    src.view[3 * PAGE] = 0            # allocated, but all zeros again
    dst.view[3 * PAGE + 100] = 9      # the destination held something there
    sent = send_all(RamStream(src, dst), [3])
    assert (sent.bytes, sent.zero_pages) == (ZERO_RECORD, 1)
    assert dst.view[3 * PAGE + 100] == 0


def test_the_budget_ends_a_chunk_and_the_next_call_goes_on(rams):
    src, dst = rams
    fill_used(src, 0, 8, seed=1)
    stream = RamStream(src, dst)
    todo = stream.pages_to_send(range(8))
    first = stream.send(todo, 0, 3 * PAGE)
    assert first.pages == 3 and first.bytes == 3 * NORMAL_RECORD
    rest = stream.send(todo, first.pages, 1 << 40)
    assert rest.pages == 5
    assert stream.differing_pages() == []


def test_differing_pages_sees_data_against_holes_both_ways_without_touching_holes(rams):
    src, dst = rams
    src.view[5 * PAGE] = 1            # data only at the source
    dst.view[9 * PAGE + 4095] = 2     # data only at the destination
    src.view[20 * PAGE] = dst.view[20 * PAGE] = 3   # equal data on both
    src.view[30 * PAGE] = 4
    dst.view[30 * PAGE] = 5           # different data on both
    dst.view[40 * PAGE] = 6
    dst.view[40 * PAGE] = 0           # allocated zeros against a hole: equal
    stream = RamStream(src, dst)
    assert stream.differing_pages() == [5, 9, 30]
    assert data_pages(src) == {5, 20, 30} and data_pages(dst) == {9, 20, 30, 40}


def test_more_differences_than_the_first_guess_are_all_reported():
    with HostMemory(4096 * PAGE, "a") as a, HostMemory(4096 * PAGE, "b") as b:
        fill_used(a, 0, 3000, seed=3)
        assert RamStream(a, b).differing_pages() == list(range(3000))


def test_pages_outside_the_ram_are_refused_before_anything_is_sent(rams):
    src, dst = rams
    fill_used(src, 0, 1, seed=1)
    stream = RamStream(src, dst)
    with pytest.raises(ValueError, match="outside"):
        stream.pages_to_send([0, 256])
    assert data_pages(dst) == set()


def test_fill_is_deterministic_and_bounded(rams):
    src, dst = rams
    fill_used(src, 0, 4, seed=11)
    fill_used(dst, 0, 4, seed=11)
    assert bytes(src.view[:4 * PAGE]) == bytes(dst.view[:4 * PAGE])
    assert bytes(src.view[:PAGE]) != bytes(PAGE)
    with pytest.raises(ValueError, match="outside"):
        fill_used(src, 250, 7, seed=1)


def test_pages_written_between_calls_are_sent_whole(rams):
    """What one call learnt about the files' extents (kept across calls, so a big
    extent is not scanned again on every call) must not hide later writes: a hole
    that got data since is sent whole, and a hole next to a known extent stays a
    zero record and a hole."""
    src, dst = rams
    fill_used(src, 0, 8, seed=3)
    stream = RamStream(src, dst)
    assert send_all(stream, range(16)).zero_pages == 8
    fill_used(src, 8, 1, seed=4)          # page 8 was a hole during the first call
    fill_used(src, 3, 1, seed=5)          # page 3 changed: the destination holds the old copy
    sent = send_all(stream, range(16))
    assert sent.zero_pages == 7
    assert bytes(dst.view[3 * PAGE:4 * PAGE]) == bytes(src.view[3 * PAGE:4 * PAGE])
    assert bytes(dst.view[8 * PAGE:9 * PAGE]) == bytes(src.view[8 * PAGE:9 * PAGE])
    assert data_pages(src) == set(range(9)) and data_pages(dst) == set(range(9))
    assert stream.differing_pages() == []
