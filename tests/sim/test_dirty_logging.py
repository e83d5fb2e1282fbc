"""Hardware dirty logging: the pages of every packet buffer the device writes, nothing else.

The driver maps the vhost log at IOVA 0x1000_0000_0000 and programs BAR 4
(base, end = base + size, LOGGING_CTRL = 1), as DPDK's IFCVF driver does.
Bit n of the log = guest page n (GPA = IOVA here).
"""
from __future__ import annotations

import pytest

from test_engine_rig import ALL, SLOT, Rig, frame
from hal.memory import HostMemory
from sim.config import IfcvfConfig

LOG_IOVA = 0x1000_0000_0000
PAGE = 4096


class Logged:
    """A rig with a dirty log mapped (``log_bytes`` of it programmed, a canary after)."""

    def __init__(self, rig: Rig, log_bytes: int | None = None, mapped: int = 8192):
        self.rig = rig
        pages = rig.mem.size // PAGE
        self.size = log_bytes if log_bytes is not None else (pages + 7) // 8
        self.mem = HostMemory(mapped, "log")
        self.canary = b"\x5a" * (mapped - self.size)
        self.mem.view[self.size:] = self.canary
        rig.fn.dma_map(LOG_IOVA, self.mem, 0, mapped)

    def enable(self) -> None:
        self.rig.hw.enable_logging(LOG_IOVA, self.size)

    def disable(self) -> None:
        self.rig.hw.disable_logging()

    def pages(self) -> list[int]:
        data = bytes(self.mem.view[:self.size])
        return [8 * i + b for i, byte in enumerate(data) for b in range(8) if byte >> b & 1]

    def canary_intact(self) -> bool:
        return bytes(self.mem.view[self.size:]) == self.canary

    def close(self) -> None:
        self.mem.close()


def written_pages(rig: Rig, q: int, used: list[tuple[int, int]]) -> set[int]:
    """Pages the device wrote for these used entries: the first len bytes of each chain."""
    pages: set[int] = set()
    for head, length in used:
        ring, table, i, left = rig.rings[q], None, head, length
        while left > 0:
            addr, blen, flags, nxt = ring.desc_at(i, table)
            if flags & 4:
                table, i = addr, 0
                continue
            take = min(blen, left)
            if take:
                pages.update(range(addr // PAGE, (addr + take - 1) // PAGE + 1))
            left -= take
            if not flags & 1:
                break
            i = nxt
    return pages


@pytest.fixture
def logged():
    rig = Rig()
    log = Logged(rig)
    rig.start(ALL)
    yield rig, log
    log.close()
    rig.close()


def test_every_page_the_device_wrote_is_marked_and_nothing_else(logged):
    rig, log = logged
    log.enable()
    rig.post_rx(0, 40, buf_len=SLOT)
    rig.capture.send([frame(60 + 48 * i, i) for i in range(30)])
    rig.run_ns(30_000)
    used = rig.rings[0].take_used()
    assert len(used) == 30
    assert log.pages() == sorted(written_pages(rig, 0, used))
    assert log.canary_intact()


def test_frames_across_page_boundaries_mark_both_pages(logged):
    rig, log = logged
    log.enable()
    ring = rig.rings[0]
    base = rig.slot_addr(0, 0)
    ring.set_desc(0, base + PAGE - 100, 2048, 2)      # straddles a page boundary
    ring.post(0)
    ring.publish()
    rig.kick(0)
    rig.capture.send([frame(500, 1)])
    rig.run_ns(20_000)
    first = (base + PAGE - 100) // PAGE
    assert log.pages() == [first, first + 1]


def test_merged_frames_mark_every_buffer(logged):
    rig, log = logged
    log.enable()
    rig.post_rx(0, 16, buf_len=256)
    rig.capture.send([frame(1514, 1)])
    rig.run_ns(20_000)
    used = rig.rings[0].take_used()
    assert len(used) == 6
    assert log.pages() == sorted(written_pages(rig, 0, used))


def test_tx_and_used_rings_are_never_logged(logged):
    rig, log = logged
    log.enable()
    rig.post_tx(1, [frame(1000, i) for i in range(20)])
    rig.run_ns(30_000)
    assert len(rig.capture.frames()) == 20
    assert log.pages() == []                          # TX writes no packet buffer
    rig.post_rx(0, 4)
    rig.capture.send([frame(100, 0)])
    rig.run_ns(20_000)
    used_page = rig.rings[0].used // PAGE
    assert used_page not in log.pages()              # the driver marks used rings at stop


def test_nothing_is_logged_while_logging_is_off(logged):
    rig, log = logged
    rig.post_rx(0, 8)
    rig.capture.send([frame(100, i) for i in range(4)])
    rig.run_ns(20_000)
    assert rig.rings[0].used_idx == 4 and log.pages() == []
    log.enable()
    rig.capture.send([frame(100, 9)])
    rig.run_ns(20_000)
    log.disable()
    rig.capture.send([frame(100, 10)])
    rig.run_ns(20_000)
    used = rig.rings[0].take_used()
    assert log.pages() == sorted(written_pages(rig, 0, [used[4]]))


def test_marks_or_into_bits_already_set(logged):
    rig, log = logged
    log.mem.view[0] = 0xFF                            # pages 0..7, set by someone else
    log.enable()
    rig.post_rx(0, 2)
    rig.capture.send([frame(100, 1)])
    rig.run_ns(20_000)
    used = rig.rings[0].take_used()
    assert log.pages() == list(range(8)) + sorted(written_pages(rig, 0, used))


def test_pages_beyond_the_log_end_are_recorded_faults_not_writes():
    rig = Rig()
    # a log covering only the first 2 MiB of guest memory (512 pages = 64 bytes)
    log = Logged(rig, log_bytes=64)
    try:
        rig.start(ALL)
        log.enable()
        rig.post_rx(0, 4)                             # buffers at 4 MiB and up
        rig.capture.send([frame(100, 1)])
        rig.run_ns(20_000)
        assert rig.rings[0].used_idx == 1             # the frame itself is delivered
        assert log.pages() == [] and log.canary_intact()
        faults = rig.world.trace.find("dirty_log_fault")
        assert faults and "page_beyond_the_log_end" in faults[0]
        assert rig.model.datapath.log_counts()["range_faults"] == 1
        assert not rig.model.needs_reset
    finally:
        log.close()
        rig.close()


def test_a_log_that_is_not_mapped_is_an_iommu_fault():
    rig = Rig()
    try:
        rig.start(ALL)
        rig.hw.enable_logging(LOG_IOVA, 4096)         # nothing mapped there
        rig.post_rx(0, 4)
        rig.capture.send([frame(100, 1)])
        rig.run_ns(20_000)
        assert rig.rings[0].used_idx == 1
        fault = rig.model.iommu.faults[-1]
        assert fault.iova >= LOG_IOVA and fault.reason == "dirty log page not mapped"
    finally:
        rig.close()


def skipped_run(seed: int, fraction: float):
    rig = Rig(config=IfcvfConfig(queue_pairs=1, dirty_log_skip_fraction=fraction), seed=seed)
    log = Logged(rig)
    try:
        rig.start(ALL)
        log.enable()
        rig.post_rx(0, 200, buf_len=SLOT)
        rig.capture.send([frame(1514, i) for i in range(150)])
        rig.run_ns(100_000)
        used = rig.rings[0].take_used()
        return written_pages(rig, 0, used), set(log.pages()), list(rig.model.datapath.skipped_pages)
    finally:
        log.close()
        rig.close()


def test_the_skip_knob_drops_marks_and_names_every_page_it_skipped():
    written, marked, skipped = skipped_run(7, 0.3)
    assert skipped and marked
    # every page is marked or named as skipped; only written pages appear in either
    assert written == marked | set(skipped)
    assert marked <= written and set(skipped) <= written
    missing = written - marked
    assert missing <= set(skipped) and missing         # the negative control shows
    # same seed, same skips; another seed, other skips
    assert skipped_run(7, 0.3)[2] == skipped
    assert skipped_run(8, 0.3)[2] != skipped


def test_skip_fraction_one_marks_nothing_and_zero_skips_nothing():
    written, marked, skipped = skipped_run(1, 1.0)
    assert marked == set() and set(skipped) == written
    written, marked, skipped = skipped_run(1, 0.0)
    assert marked == written and skipped == []
