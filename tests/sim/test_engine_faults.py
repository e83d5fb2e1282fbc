"""Hostile rings end in DEVICE_NEEDS_RESET with a precise reason, and touch nothing.

Every case: the guest memory mapped into the VF's IOMMU is the first 16 MiB
of a 32 MiB block whose second half holds a canary; after the hostile ring
the canary is intact, the offending chain got no used entry and none of its
(valid) buffers were written, the device status has DEVICE_NEEDS_RESET, the
config interrupt fired, and the trace names the reason.  No exception
escapes the model.
"""
from __future__ import annotations

import pytest

from test_engine_rig import ALL, Rig, frame
from sim.testing.splitring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

MAPPED = 16 << 20
PATTERN = b"\xa5" * 256


@pytest.fixture
def rig():
    r = Rig(mapped_mib=16)
    r.start(ALL)
    yield r
    r.close()


def assert_fault(rig, text: str, q: int, used_before: int = 0) -> None:
    model = rig.model
    assert model.needs_reset, "the device did not ask for a reset"
    assert any(text in e for e in model.errors), model.errors
    records = rig.world.trace.find("needs_reset")
    assert records and text.replace(" ", "_") in records[-1]
    assert rig.world.trace.find("engine_fault")
    assert rig.rings[q].used_idx == used_before
    assert rig.canary_intact()
    assert rig.model.msix.delivered[0] >= 1          # the config interrupt (vector 0)
    assert rig.model.queue(q).engine.broken


def post_raw(rig, q: int, head: int, kick: bool = True) -> None:
    ring = rig.rings[q]
    ring.post(head)
    ring.publish()
    if kick:
        rig.kick(q)
    rig.run_ns(20_000)


def buf(rig, q: int, slot: int) -> int:
    return rig.slot_addr(q, slot)


# --- TX -----------------------------------------------------------------------------

def test_head_id_out_of_range(rig):
    post_raw(rig, 1, 256)
    assert_fault(rig, "descriptor id out of range", 1)
    assert "head 256" in rig.model.errors[0]


def test_descriptor_loop(rig):
    ring = rig.rings[1]
    ring.set_desc(0, buf(rig, 1, 0), 100, DESC_F_NEXT, 1)
    ring.set_desc(1, buf(rig, 1, 1), 100, DESC_F_NEXT, 0)
    post_raw(rig, 1, 0)
    assert_fault(rig, "loop", 1)
    assert rig.capture.frames() == []


def test_next_out_of_range(rig):
    rig.rings[1].set_desc(0, buf(rig, 1, 0), 100, DESC_F_NEXT, 999)
    post_raw(rig, 1, 0)
    assert_fault(rig, "next index out of range", 1)
    assert "value 0x3e7" in rig.model.errors[0]


def test_indirect_inside_indirect(rig):
    ring = rig.rings[1]
    t1, t2 = buf(rig, 1, 1), buf(rig, 1, 2)
    ring.set_desc(0, t2, 16, DESC_F_INDIRECT, table=t1)
    ring.set_desc(0, buf(rig, 1, 3), 100, table=t2)
    ring.set_desc(0, t1, 16, DESC_F_INDIRECT)
    post_raw(rig, 1, 0)
    assert_fault(rig, "INDIRECT descriptor inside an indirect table", 1)
    assert "of its indirect table" in rig.model.errors[0]


def test_indirect_with_next(rig):
    ring = rig.rings[1]
    ring.set_desc(0, buf(rig, 1, 3), 100, table=buf(rig, 1, 1))
    ring.set_desc(0, buf(rig, 1, 1), 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)
    post_raw(rig, 1, 0)
    assert_fault(rig, "INDIRECT descriptor with NEXT", 1)


def test_indirect_not_at_the_head(rig):
    ring = rig.rings[1]
    ring.set_desc(0, buf(rig, 1, 0), 12, DESC_F_NEXT, 1)
    ring.set_desc(1, buf(rig, 1, 1), 16, DESC_F_INDIRECT)
    post_raw(rig, 1, 0)
    assert_fault(rig, "INDIRECT descriptor not at the chain head", 1)


@pytest.mark.parametrize("length", [0, 24, 16 * 257])
def test_indirect_table_lengths(rig, length):
    rig.rings[1].set_desc(0, buf(rig, 1, 1), length, DESC_F_INDIRECT)
    post_raw(rig, 1, 0)
    assert_fault(rig, "indirect table length", 1)


def test_indirect_table_outside_memory(rig):
    rig.rings[1].set_desc(0, MAPPED - 16, 32, DESC_F_INDIRECT)
    post_raw(rig, 1, 0)
    assert_fault(rig, "indirect table is not mapped", 1)
    assert rig.model.iommu.faults and rig.model.iommu.faults[-1].iova == MAPPED


def test_buffer_length_past_the_end_of_memory(rig):
    rig.rings[1].set_desc(0, MAPPED - 100, 1000)
    post_raw(rig, 1, 0)
    assert_fault(rig, "buffer is not mapped", 1)
    fault = rig.model.iommu.faults[-1]
    assert (fault.iova, fault.length, fault.direction) == (MAPPED, 1000, "read")
    assert f"unmapped at {MAPPED:#x}" in rig.model.errors[0]


def test_buffer_wrapping_the_address_space(rig):
    rig.rings[1].set_desc(0, (1 << 64) - 8, 100)
    post_raw(rig, 1, 0)
    assert_fault(rig, "buffer is not mapped", 1)


def test_device_writable_buffer_in_a_tx_chain(rig):
    rig.rings[1].set_desc(0, buf(rig, 1, 0), 100, DESC_F_WRITE)
    post_raw(rig, 1, 0)
    assert_fault(rig, "device-writable buffer in a TX chain", 1)


def test_avail_index_running_ahead(rig):
    rig.rings[1].publish(1000)
    rig.kick(1)
    rig.run_ns(20_000)
    assert_fault(rig, "avail idx more than the queue size ahead", 1)


def test_valid_chains_before_the_bad_one_complete_nothing_after(rig):
    good = [frame(100, i) for i in range(3)]
    rig.post_tx(1, good, publish=False, kick=False)
    rig.rings[1].post(300)                     # bad id
    rig.post_tx(1, [frame(100, 9)], publish=True, kick=True)
    rig.run_ns(20_000)
    assert_fault(rig, "descriptor id out of range", 1, used_before=3)
    assert rig.capture.frames() == good
    # the device fetches nothing more, on any queue
    rig.post_rx(0, 4)
    rig.capture.send([frame(64, 1)])
    rig.run_ns(20_000)
    assert rig.rings[0].used_idx == 0


# --- RX -----------------------------------------------------------------------------

def test_device_readable_buffer_in_an_rx_chain(rig):
    rig.rings[0].set_desc(0, buf(rig, 0, 0), 2048, 0)
    rig.write(buf(rig, 0, 0), PATTERN)
    post_raw(rig, 0, 0)
    rig.capture.send([frame(100, 1)])
    rig.run_ns(20_000)
    assert_fault(rig, "device-readable buffer in an RX chain", 0)
    assert rig.read(buf(rig, 0, 0), 256) == PATTERN


def test_nothing_is_written_for_an_rx_chain_whose_second_buffer_is_bad(rig):
    ring = rig.rings[0]
    first = buf(rig, 0, 0)
    rig.write(first, PATTERN)
    ring.set_desc(0, first, 64, DESC_F_WRITE | DESC_F_NEXT, 1)
    ring.set_desc(1, MAPPED - 32, 2048, DESC_F_WRITE)          # runs past memory
    post_raw(rig, 0, 0)
    rig.capture.send([frame(1000, 1)])
    rig.run_ns(20_000)
    assert_fault(rig, "buffer is not mapped", 0)
    assert rig.read(first, 256) == PATTERN
    assert rig.model.iommu.faults[-1].direction == "write"


def test_rx_loop_in_a_mergeable_frame_writes_nothing_of_that_frame(rig):
    ring = rig.rings[0]
    rig.post_rx(0, 1, buf_len=512, kick=False)                 # first buffer of the frame: fine
    rig.write(buf(rig, 0, 0), PATTERN)
    ring.set_desc(1, buf(rig, 0, 1), 512, DESC_F_WRITE | DESC_F_NEXT, 1)   # loops on itself
    ring.post(1)
    ring.publish()
    rig.kick(0)
    rig.capture.send([frame(1000, 1)])                         # needs both buffers
    rig.run_ns(20_000)
    assert_fault(rig, "loop", 0)
    assert rig.read(buf(rig, 0, 0), 256) == PATTERN


# --- rings, bus mastering, mappings ----------------------------------------------------

def test_rings_outside_memory_fail_at_start():
    rig = Rig(mapped_mib=16)
    try:
        rig.rings[1].desc = MAPPED - 1024                      # 16 * 256 bytes: runs past
        # the queue engine starts with DRIVER_OK: the driver sees the fault at once
        with pytest.raises(Exception, match="DRIVER_OK"):
            rig.start(ALL)
        assert rig.model.needs_reset
        assert "vq 1 (tx): descriptor table is not mapped" in rig.model.errors[0]
        assert rig.model.iommu.faults[-1].iova == MAPPED
        assert rig.canary_intact()
    finally:
        rig.close()


def test_no_dma_without_bus_mastering(rig):
    rig.fn.config_write(0x04, 2, 0x2)                          # memory decode only
    rig.post_tx(1, [frame(100, 1)])
    rig.run_ns(20_000)
    assert rig.rings[1].used_idx == 0 and rig.capture.frames() == []
    assert rig.world.trace.find("dma_blocked")
    assert not rig.model.needs_reset
    rig.fn.config_write(0x04, 2, 0x6)
    rig.kick(1)
    rig.run_ns(20_000)
    assert rig.capture.frames() == [frame(100, 1)]


def test_memory_unmapped_under_a_running_queue(rig):
    rig.post_tx(1, [frame(100, 1)])
    rig.run_ns(20_000)
    rig.fn.dma_unmap(0, MAPPED)
    rig.post_tx(1, [frame(100, 2)])
    rig.run_ns(20_000)
    assert rig.model.needs_reset
    assert "not mapped" in rig.model.errors[0]
    assert rig.capture.frames() == [frame(100, 1)]
    assert rig.canary_intact()
