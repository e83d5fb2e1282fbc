"""Conformance: what the driver needs of a function, on the simulated VF or a real one.

Run it with `ifcvf conformance --device sim|BDF`; in this repository's tests
it runs on the simulated VF always and on a VFIO function when one is named
(IFCVF_DEVICE=0000:3b:00.2 make test).  Every test opens the function afresh
and closes it, so one failure cannot leak state into the next.

Device-dependent behaviour is asserted, not skipped: a function without an
IFCVF live-migration block must say why and refuse hardware logging; one
without IFCVF's stop command must be reset instead, its ring state then taken
from the used ring.
"""
from __future__ import annotations

import os
import select
import struct

import pytest

from hal.api import HalError
from hal.memory import HostMemory
from ifcvf import ids
from ifcvf.hw import HwError, IfcvfHw, QueueConfig, walk_capabilities
from ifcvf.tools import functions
from ifcvf.tools.conformance.rings import TestRing

MEMORY = 2 << 20
WAIT_NS = 2_000_000_000          # generous for a TCG guest; simulated time on sim
NET_HDR = 12                     # VERSION_1 header
FRAME = (b"\xff" * 6 + bytes.fromhex("525400c0ffee") + b"\x88\xb5"
         + b"ifcvf conformance frame".ljust(46, b"."))


def open_function(device: str):
    """A fresh function for each test; a simulated one in a world of its own (seed 11)."""
    config = None
    if functions.is_sim(device):
        from sim.config import IfcvfConfig
        config = IfcvfConfig(queue_pairs=2)
    return functions.open_function(device, config=config, seed=11)


def devices() -> list[str]:
    """The functions to run on, read when pytest collects the tests, not at import:
    `ifcvf conformance` imports this module before it sets the variable."""
    return [d for d in os.environ.get("IFCVF_CONFORMANCE_DEVICES", "sim").split(",") if d]


def pytest_generate_tests(metafunc):
    if "fn" in metafunc.fixturenames:
        metafunc.parametrize("fn", devices(), indirect=True)


@pytest.fixture
def fn(request):
    f = open_function(request.param)
    yield f
    f.close()


@pytest.fixture
def hw(fn):
    return IfcvfHw(fn)


@pytest.fixture
def memory(fn):
    mem = HostMemory(MEMORY, "conformance")
    fn.dma_map(0, mem, 0, mem.size)
    yield mem
    fn.dma_unmap(0, mem.size)
    mem.close()


@pytest.fixture
def eventfds(fn):
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
    fn.set_msix(fds)
    yield fds
    fn.set_msix([])
    for fd in fds:
        os.close(fd)


def accepted(hw: IfcvfHw) -> int:
    """The features this suite drives a queue with: VERSION_1 and nothing fancy."""
    return ids.bit(ids.Feature.VERSION_1)


def pair(memory, size=64):
    rx = TestRing(memory, 0x1000, size)
    tx = TestRing(memory, rx.end, size)
    return rx, tx


def configs(rx, tx, base=0):
    return [QueueConfig(0, rx.size, *rx.addresses, base, base, 1),
            QueueConfig(1, tx.size, *tx.addresses, base, base, 2)]


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


# --- identity and structure ------------------------------------------------------------

def test_identity_is_a_virtio_net_function(fn):
    pci = fn.ids
    assert ids.is_virtio_net(pci.vendor, pci.device, pci.subsystem_device), str(pci)
    assert pci.class_code >> 16 == 0x02, f"class {pci.class_code:06x} is not a network controller"


def test_virtio_structures_lie_inside_their_bars(fn):
    caps = walk_capabilities(fn)
    for cap in (caps.common, caps.notify, caps.isr, caps.device):
        region = fn.region(cap.bar)
        assert region is not None and cap.offset + cap.length <= region.size
    assert caps.common.length >= ids.COMMON_CFG_SIZE
    assert caps.msix_table_size >= 3, "config + one vector per queue of a pair"
    assert fn.msix_vectors() == caps.msix_table_size


def test_reset_completes_and_clears_status(hw):
    hw.reset()
    hw.common.write8(ids.Common.DEVICE_STATUS, ids.Status.ACKNOWLEDGE)
    assert hw.status() == ids.Status.ACKNOWLEDGE
    hw.reset()
    assert hw.status() == 0


def test_feature_negotiation(hw):
    offered = hw.device_features()
    assert offered >> ids.Feature.VERSION_1 & 1, "a virtio 1.x device offers VERSION_1"
    features = hw.start(accepted(hw), [])
    assert hw.driver_features() == features
    assert features & ~offered == 0
    assert hw.status() & ids.Status.FEATURES_OK and hw.status() & ids.Status.DRIVER_OK
    hw.reset()


def test_queue_programming_reads_back(hw, memory):
    rx, tx = pair(memory)
    hw.start(accepted(hw), configs(rx, tx))
    for q, ring in ((0, rx), (1, tx)):
        hw.common.write16(ids.Common.QUEUE_SELECT, q)
        assert hw.common.read16(ids.Common.QUEUE_SIZE) == ring.size
        assert hw.common.read16(ids.Common.QUEUE_MSIX_VECTOR) == q + 1
        assert hw.common.read16(ids.Common.QUEUE_ENABLE) == 1
        lo, hi = hw.common.read32(ids.Common.QUEUE_DESC), hw.common.read32(ids.Common.QUEUE_DESC + 4)
        assert lo | hi << 32 == ring.addresses[0]
        assert hw.notify_offset(q) >= hw.caps.notify.offset
    hw.reset()
    hw.common.write16(ids.Common.QUEUE_SELECT, 0)
    assert hw.common.read16(ids.Common.QUEUE_ENABLE) == 0, "reset disables queues"


def test_unavailable_queue_reads_size_zero(hw):
    hw.common.write16(ids.Common.QUEUE_SELECT, hw.num_queues)
    assert hw.common.read16(ids.Common.QUEUE_SIZE) == 0


# --- the datapath through the driver's eyes -------------------------------------------------

def send_one_frame(hw, memory, eventfds, base=0):
    rx, tx = pair(memory)
    if base:
        for ring in (rx, tx):
            ring.avail_idx = base
            struct.pack_into("<H", ring.mem, ring.avail + 2, base)
            struct.pack_into("<H", ring.mem, ring.used + 2, base)
    hw.start(accepted(hw), configs(rx, tx, base))
    data = tx.end
    memory.view[data:data + NET_HDR] = bytes(NET_HDR)
    memory.view[data + NET_HDR:data + NET_HDR + len(FRAME)] = FRAME
    head = tx.post([(data, NET_HDR + len(FRAME), False)])
    hw.kick(1)
    hw.clock.poll_until(lambda: tx.used_idx() == (base + 1) & 0xFFFF, WAIT_NS,
                        interval_ns=100_000, what="the TX used index to advance")
    hw.clock.poll_until(lambda: readable(eventfds[2]), WAIT_NS, interval_ns=100_000,
                        what="the TX queue's MSI-X vector to fire")
    return rx, tx, head


def test_kick_makes_tx_progress_and_fires_its_vector(hw, memory, eventfds):
    rx, tx, head = send_one_frame(hw, memory, eventfds)
    used_id, _ = tx.used_elem(0)
    assert used_id == head
    assert os.eventfd_read(eventfds[2]) >= 1
    assert not readable(eventfds[1]), "RX's vector must not fire for a TX completion"
    hw.reset()


def test_stop_reports_ring_state(hw, memory, eventfds):
    rx, tx, _ = send_one_frame(hw, memory, eventfds)
    states = hw.stop([0, 1])
    if hw.has_stop_command:
        assert (states[1].last_avail, states[1].last_used) == (1, 1)
        assert (states[0].last_avail, states[0].last_used) == (0, 0)
    else:
        # Reset instead of a stop command: the used ring in memory is the truth.
        assert states == {0: None, 1: None}
        assert tx.used_idx() == 1
    assert hw.status() == 0


def test_restore_resumes_at_the_saved_index(hw, memory, eventfds):
    if not hw.has_lm_block:
        with pytest.raises(HwError, match="always starts its rings at index 0"):
            hw.start(accepted(hw), configs(*pair(memory), base=5))
        return
    rx, tx, head = send_one_frame(hw, memory, eventfds, base=300)
    assert tx.used_idx() == 301
    states = hw.stop([0, 1])
    assert (states[1].last_avail, states[1].last_used) == (301, 301)


def test_lm_block_or_the_reason_it_is_absent(hw):
    if hw.has_lm_block:
        hw.enable_logging(ids.IOVA_LOG_BASE, 4096)
        assert hw.logging_enabled()
        hw.disable_logging()
        assert not hw.logging_enabled()
    else:
        assert hw.lm_absent_reason
        with pytest.raises(HwError, match="no hardware dirty logging"):
            hw.enable_logging(ids.IOVA_LOG_BASE, 4096)


def test_dma_map_refuses_overlap(fn, memory):
    with pytest.raises(HalError):
        fn.dma_map(0x1000, memory, 0, 0x1000)
