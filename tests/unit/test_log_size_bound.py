"""SET_LOG_BASE: the log size is bounded by what the memory table needs, from both sides.

QEMU 7.2 sizes a log exactly (vhost_get_log_size: last GPA / 256 KiB + 1
words of 8 bytes), except that vhost_commit grows it to that plus 170 words
(VHOST_LOG_BUFFER) when logging is on and the memory table grows, and it
does so *before* it sends the larger table.  So the back-end accepts, for
the table it has, sizes from the exact one up to LOG_SLACK more; a larger
log is refused, unless logging is on: then it may be that growth, and it
waits (unmapped) for the table it was sized for, which maps it or drops it.
A log is DMA-mapped (pinned) for the VF: an unbounded size would let a
front-end pin as much memory as its file claims.
"""
import logging
import os

import pytest

from hal.memory import HostMemory
from ifcvf.tools.runs.stack import SimHost, Vm
from ifcvf.vhost import protocol as p
from ifcvf.vhost.codes import LOG_CHUNK
from sim.config import IfcvfConfig
from sim.frontend import Region

MiB, GiB = 1 << 20, 1 << 30
QEMU_7_2_GROWTH = 170 * 8           # VHOST_LOG_BUFFER words as QEMU 7.2 computes them


def memfd(size: int) -> int:
    fd = os.memfd_create("log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def same_file(fd: int, other: int) -> bool:
    try:
        return os.fstat(fd).st_ino == os.fstat(other).st_ino
    except OSError:
        return False


@pytest.fixture
def host():
    h = SimHost(seed=13)
    yield h
    h.close()


def plugged(host, devargs="vdpa=1"):
    vf = host.add_vf(IfcvfConfig(queue_pairs=1), devargs=devargs)
    vm = Vm(host, pairs=1, queue_size=256, tx_rate_gbps=1, tx_sizes=1518, rx_flows=1)
    return vf, vm, vm.plug(vf)


def test_the_documented_slack_covers_qemus_growth():
    assert p.LOG_SLACK >= QEMU_7_2_GROWTH and p.LOG_SLACK % p.LOG_WORD == 0
    assert p.log_size(1) == 8 and p.log_size(LOG_CHUNK) == 8 and p.log_size(LOG_CHUNK + 1) == 16


@pytest.mark.parametrize("extra", [0, 8, QEMU_7_2_GROWTH, p.LOG_SLACK])
def test_sizes_from_the_exact_one_up_to_the_slack_are_mapped(host, extra):
    vf, vm, fe = plugged(host)
    size = p.log_size(vm.ram.size) + extra
    fd = memfd(size)
    try:
        fe.set_log_base(fd, size)
        assert vf.backend.log_mapping is not None and vf.backend.log_mapping.size == size
    finally:
        os.close(fd)


@pytest.mark.parametrize("extra", [p.LOG_SLACK + 8, 1 << 20])
def test_a_larger_log_is_refused_while_logging_is_off(host, caplog, extra):
    vf, vm, fe = plugged(host)
    need = p.log_size(vm.ram.size)
    fd = memfd(need + extra)
    try:
        refused = vf.backend.stats["refused"]
        with caplog.at_level(logging.WARNING, logger="ifcvf.vhost"):
            fe.set_log_base(fd, need + extra)
        assert vf.backend.stats["refused"] == refused + 1
        assert any(f"log of {need + extra} bytes is larger than the memory table needs ({need} bytes"
                   in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
        assert vf.backend.log_mapping is None and vf.backend._pending_log is None
        assert vf.driver.mode == "direct"            # the running VF is not touched
    finally:
        os.close(fd)


@pytest.mark.parametrize("extra, mapped", [(0, True), (p.LOG_SLACK, True), (p.LOG_SLACK + 8, False)])
def test_a_log_before_any_memory_table_waits_for_the_first(host, ram, extra, mapped):
    """QEMU sends the table first; a front-end that does not gets the same bound, one table later."""
    vf = host.add_vf(IfcvfConfig(queue_pairs=1))
    fe = host.connect(vf)
    fe.connect(2)
    size = p.log_size(ram.size) + extra
    fd = memfd(size)
    try:
        fe.set_log_base(fd, size)
        assert vf.backend.log_mapping is None and vf.backend._pending_log is not None
        fe.set_memory([Region(0, ram.size, ram.fd, ram.address)])
        assert vf.backend._pending_log is None
        assert (vf.backend.log_mapping is not None) == mapped
    finally:
        os.close(fd)


def grown_table(fe, hotplugged: HostMemory, gpa: int) -> list[Region]:
    """The front-end's table plus a hot-plugged DIMM at ``gpa``."""
    return [*fe.regions, Region(gpa, hotplugged.size, hotplugged.fd, 0x7F00_0000_0000)]


@pytest.mark.parametrize("devargs", ["vdpa=1", "vdpa=1,sw-live-migration=1"], ids=["hw", "sw"])
def test_qemus_growth_before_a_larger_table_waits_for_it(host, devargs):
    """vhost_commit with logging on: SET_LOG_BASE(new need + 170 words), then SET_MEM_TABLE."""
    vf, vm, fe = plugged(host, devargs)
    need = p.log_size(vm.ram.size)
    first, dimm = memfd(need), HostMemory(64 * MiB, "dimm")
    grown = p.log_size(4 * GiB + dimm.size) + QEMU_7_2_GROWTH
    second = memfd(grown)
    try:
        fe.set_log_base(first, need)
        fe.set_log_all(True, vm.rings)
        assert vf.driver.mode in ("hw-logging", "sw-relay")
        fe.set_log_base(second, grown)                 # too big for the table the back-end has...
        assert vf.backend.log_mapping is None and vf.backend._pending_log is not None
        assert vf.driver.mode in ("paused", "stopped")  # ...and no mark goes to the old log
        fe.set_memory(grown_table(fe, dimm, 4 * GiB))  # ...but it is the one for this table
        assert vf.backend._pending_log is None
        assert vf.backend.log_mapping is not None and vf.backend.log_mapping.size == grown
    finally:
        for fd in (first, second):
            os.close(fd)
        dimm.close()


def test_a_log_waiting_for_a_table_it_does_not_fit_is_dropped(host, caplog):
    vf, vm, fe = plugged(host)
    need = p.log_size(vm.ram.size)
    first, dimm = memfd(need), HostMemory(64 * MiB, "dimm")
    huge = p.log_size(64 * GiB)
    second = memfd(huge)
    try:
        fe.set_log_base(first, need)
        fe.set_log_all(True, vm.rings)
        fe.set_log_base(second, huge)
        held = vf.backend._pending_log[0]
        assert os.fstat(held).st_ino == os.fstat(second).st_ino
        with caplog.at_level(logging.ERROR, logger="ifcvf.vhost"):
            fe.set_memory(grown_table(fe, dimm, 4 * GiB))   # needs far less than ``huge``
        assert vf.backend.log_mapping is None and vf.backend._pending_log is None
        assert not same_file(held, second)                       # its fd is closed
        assert any("the log sent ahead of the memory table is dropped: log of" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        assert vf.driver.mode != "hw-logging"                    # nothing logs into no log
    finally:
        for fd in (first, second):
            os.close(fd)
        dimm.close()


def test_a_waiting_log_is_released_with_the_connection(host):
    vf, vm, fe = plugged(host)
    need = p.log_size(vm.ram.size)
    first, second = memfd(need), memfd(need * 4 + p.LOG_SLACK)
    try:
        fe.set_log_base(first, need)
        fe.set_log_all(True, vm.rings)
        fe.set_log_base(second, need * 4 + p.LOG_SLACK)
        held = vf.backend._pending_log[0]
        assert same_file(held, second)
        vf.backend.close()
        assert vf.backend._pending_log is None and not same_file(held, second)
    finally:
        for fd in (first, second):
            os.close(fd)
