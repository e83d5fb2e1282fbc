"""SET_LOG_BASE with the logs QEMU really sends: any multiple of 8 bytes, never page-rounded.

QEMU 7.2 sizes the log at (last GPA / 256 KiB + 1) words of 8 bytes and the
memfd is exactly that size (``-m 200M`` gives 6400 bytes).  Python's mmap
refuses a length past the end of a file, so mapping the log "in whole pages"
raised ValueError out of the handler and ended `ifcvf serve`.  Each test here
failed before the fix (issue 10).
"""
import logging
import os

import pytest

from hal.memory import PAGE_SIZE, HostMemory
from ifcvf.dirtylog import LogRangeError
from ifcvf.tools.runs.stack import SimHost, Vm, cable
from ifcvf.vhost import protocol as p
from sim.config import IfcvfConfig
from sim.frontend import Region
from ifcvf.vhost.codes import LOG_CHUNK
from ifcvf.vhost.protocol import log_size
from sim.migration import DirtyLogReader
from sim.traffic import Generator, steer_by_flow

MiB = 1 << 20
US = 1_000
LOG_200M = 6400   # QEMU's log for -m 200M: 200 MiB / 256 KiB = 800 words


def memfd(size: int, name: str = "log") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


# --- HostMemory over a file that ends inside a page -------------------------------

def test_whole_pages_span_the_page_holding_the_files_last_byte():
    fd = memfd(LOG_200M)
    mem = HostMemory(LOG_200M, "log", fd=fd, whole_pages=True)
    try:
        assert mem.size == 2 * PAGE_SIZE and len(mem.view) == mem.size
        mem.view[LOG_200M - 1] = 0xA5          # the file's last byte, through the span
        assert os.pread(fd, 1, LOG_200M - 1) == b"\xa5"
        mem.view[mem.size - 1] = 1             # the rest of the page is ordinary memory
        assert os.fstat(fd).st_size == LOG_200M   # and the file does not grow
    finally:
        mem.close()


def test_a_span_is_not_unmapped_while_a_view_of_it_lives():
    mem = HostMemory(LOG_200M, "log", fd=memfd(LOG_200M), whole_pages=True)
    kept = mem.view[4096:6400]
    mem.close()                                # must not unmap under ``kept``
    kept[0] = 7
    assert kept[0] == 7
    kept.release()


def test_without_whole_pages_the_size_is_exact():
    with HostMemory(LOG_200M, "log", fd=memfd(LOG_200M)) as mem:
        assert mem.size == len(mem.view) == LOG_200M


# --- through the back-end state machine -------------------------------------------

@pytest.fixture
def host():
    h = SimHost(seed=7)
    yield h
    h.close()


def connected(host, ram):
    vf = host.add_vf(IfcvfConfig(queue_pairs=1))
    fe = host.connect(vf)
    fe.connect(2)
    assert fe.protocol_features >> p.ProtocolFeature.LOG_SHMFD & 1
    fe.set_memory([Region(0, ram.size, ram.fd, ram.address)])
    return vf, fe


def guest_needing(size: int) -> HostMemory:
    """Guest RAM (sparse) whose exact log is ``size`` bytes, as QEMU sizes it."""
    return HostMemory(size // 8 * LOG_CHUNK, "guest")


@pytest.mark.parametrize("size, offset", [(LOG_200M, 0), (LOG_200M, 8), (LOG_200M, PAGE_SIZE + 24),
                                          (520, 0), (4104, 0), (8 * PAGE_SIZE + 8, 3 * PAGE_SIZE)])
def test_any_multiple_of_8_bytes_is_mapped(host, size, offset):
    ram = guest_needing(size)
    vf, fe = connected(host, ram)
    fd = memfd(offset + size)                  # exactly the log's bytes, as QEMU's memfd
    try:
        fe.set_log_base(fd, size, offset)      # answered (LOG_SHMFD): the back-end lives
        mapping = vf.backend.log_mapping
        assert mapping is not None and mapping.size == mapping.log.size == size
        # Whole pages of address space for the driver's DMA map of the log...
        start = mapping.offset - mapping.offset % PAGE_SIZE
        end = -(-(mapping.offset + size) // PAGE_SIZE) * PAGE_SIZE
        assert mapping.memory.size >= end and mapping.memory.size % PAGE_SIZE == 0
        assert len(mapping.memory.view[start:end]) == end - start
        # ...and the log itself is the front-end's bytes at ``offset``.
        last_page = size * 8 - 1
        mapping.log.mark(last_page * 4096, 1)
        assert os.pread(fd, 1, offset + size - 1) == b"\x80"
        # Nothing past the log is written through it: a mark beyond is refused.
        tail = bytes(mapping.memory.view[mapping.offset + size:])
        with pytest.raises(LogRangeError):
            mapping.log.mark((last_page + 1) * 4096, 1)
        assert bytes(mapping.memory.view[mapping.offset + size:]) == tail
        assert fe.get_u64(p.Request.GET_FEATURES) == fe.features
    finally:
        os.close(fd)
        ram.close()


@pytest.mark.parametrize("size, offset, file_size, reason", [
    (0, 0, PAGE_SIZE, "mmap_size is 0"),                 # the codec already refuses it
    (516, 0, PAGE_SIZE, "not a positive multiple of 8"),
    (LOG_200M - 4, 0, LOG_200M, "not a positive multiple of 8"),
    (LOG_200M + 8, 0, LOG_200M, "ends past its fd, which holds 6400 bytes"),
    (LOG_200M, 8, LOG_200M, "ends past its fd"),
    (504, 0, PAGE_SIZE, "covers less than the memory table (needs 512 bytes)"),
    (512 + p.LOG_SLACK + 8, 0, 2 * PAGE_SIZE,
     f"larger than the memory table needs (512 bytes, at most {p.LOG_SLACK} more accepted)"),
    (1 << 30, 0, 1 << 30, "larger than the memory table needs"),
])
def test_bad_log_sizes_are_refused(host, ram, caplog, size, offset, file_size, reason):
    """Refused with the reason, and nothing of the bad log is kept.  The log QEMU
    had before is dropped too: QEMU ignores the reply and reads only the log it
    just sent, so no mark may go to the old one (see the next test)."""
    vf, fe = connected(host, ram)
    good = memfd(PAGE_SIZE)
    bad = memfd(file_size)
    try:
        fe.set_log_base(good, 512)
        before = vf.backend.log_mapping
        refused = vf.backend.stats["refused"]
        with caplog.at_level(logging.WARNING, logger="ifcvf.vhost"):
            fe.set_log_base(bad, size, offset)          # still answered: QEMU reads no failure here
        assert vf.backend.stats["refused"] == refused + 1
        assert any("refused" in r.getMessage() and reason in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        assert vf.backend.log_mapping is None and before.memory.closed
        assert fe.get_u64(p.Request.GET_FEATURES) == fe.features
    finally:
        os.close(good)
        os.close(bad)


@pytest.mark.parametrize("devargs", ["vdpa=1", "vdpa=1,sw-live-migration=1"], ids=["hw", "sw"])
def test_a_refused_log_stops_a_logging_vf_until_a_usable_one_comes(devargs):
    host = SimHost(seed=43)
    first, bad, second = HostMemory(PAGE_SIZE, "log-1"), memfd(PAGE_SIZE), HostMemory(PAGE_SIZE, "log-2")
    try:
        vf = host.add_vf(IfcvfConfig(queue_pairs=1), devargs=devargs)
        vm = Vm(host, pairs=1, queue_size=256, tx_rate_gbps=1, tx_sizes=1518, rx_flows=1)
        fe = vm.plug(vf)
        size = log_size(vm.ram.size)
        fe.set_log_base(first.fd, size)
        fe.set_log_all(True, vm.rings)
        assert vf.driver.mode in ("hw-logging", "sw-relay")
        fe.set_log_base(bad, size + 4)                      # QEMU reads only this one now
        assert vf.driver.mode == "paused" and vf.backend.log_mapping is None
        fe.set_log_base(second.fd, size)
        assert vf.driver.mode in ("hw-logging", "sw-relay")
        assert vf.backend.log_mapping.size == size
    finally:
        host.close()
        first.close()
        os.close(bad)
        second.close()


def test_a_log_fd_that_is_not_a_file_is_refused(host, ram, caplog):
    vf, fe = connected(host, ram)
    r, w = os.pipe()
    try:
        with caplog.at_level(logging.WARNING, logger="ifcvf.vhost"):
            fe.set_log_base(r, 512)
        assert vf.backend.log_mapping is None
        assert any("not a memory file" in r.getMessage() for r in caplog.records)
    finally:
        os.close(r)
        os.close(w)


# --- a 200 MiB guest migrates with QEMU's exact 6400-byte log ---------------------

@pytest.mark.parametrize("devargs", ["vdpa=1", "vdpa=1,sw-live-migration=1"], ids=["hw", "sw"])
def test_a_200_mib_guest_migrates_with_a_6400_byte_log(devargs):
    host = SimHost(seed=41)
    log = HostMemory(LOG_200M, "vhost-log")    # exactly QEMU's size: not a whole page
    try:
        vf = host.add_vf(IfcvfConfig(queue_pairs=1), devargs=devargs)
        vm = Vm(host, pairs=1, queue_size=256, ram_mib=200, tx_rate_gbps=1, tx_sizes=1518, rx_flows=1)
        assert vm.ram.size == 200 * MiB and log_size(vm.ram.size) == LOG_200M
        fe = vm.plug(vf)
        tester = cable(host.world, vf)
        vf.model.datapath.steer = steer_by_flow([0])
        gen = Generator(host.world, tester, 1518, rate_gbps=5, burst=8, flows=1, flow_run=8)
        vm.guest.start()
        gen.start()
        host.world.advance_ns(100 * US)

        fe.set_log_base(log.fd, LOG_200M)
        assert vf.backend.log_mapping.size == LOG_200M
        reader = DirtyLogReader(log, LOG_200M)
        fe.set_log_all(True, vm.rings)
        assert vf.driver.mode == ("sw-relay" if "sw-live" in devargs else "hw-logging")
        reader.fetch_and_clear()
        got = vm.guest.rx_counts().frames
        host.world.advance_ns(300 * US)
        assert vm.guest.rx_counts().frames > got           # the guest keeps receiving
        logged = reader.fetch_and_clear()
        rx = [lay for lay in vm.guest.layout if not lay.is_tx][0]
        rx_pages = set(range(rx.bufs // PAGE_SIZE, -(-(rx.bufs + rx.nslots * rx.buf_size) // PAGE_SIZE)))
        assert logged & rx_pages, "the RX buffers the VF wrote must be logged"
        assert max(logged) < LOG_200M * 8                   # and only inside the log

        gen.stop()
        vm.guest.pause()
        bases = fe.stop(vm.rings)                           # switch-over: used rings marked
        assert set(bases) == {0, 1}
        logged = reader.fetch_and_clear()
        assert vm.rings[0].used // PAGE_SIZE in logged
        assert host.server.connections                      # the back-end still serves
    finally:
        host.close()
        log.close()
