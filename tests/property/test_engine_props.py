"""Properties of the device datapath (hypothesis).

- the PCIe pipe's gap filling equals a tick-by-tick oracle;
- with dirty logging on, the bits set are exactly the pages the device wrote;
- random (mostly hostile) descriptor tables never touch memory outside the
  mapping, never raise, and either work or end in DEVICE_NEEDS_RESET;
- a TX queue stopped at any moment and resumed on another VF loses and
  duplicates nothing.
"""
from __future__ import annotations

import os
import pathlib
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "sim"))

from sim._native import ffi, lib  # noqa: E402
from test_dirty_logging import Logged, written_pages  # noqa: E402
from test_engine_rig import ALL, MRG, SLOT, Rig, frame  # noqa: E402
from sim.testing.splitring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE  # noqa: E402
from sim.wire import Port, connect  # noqa: E402

SETTINGS = settings(max_examples=int(os.environ.get("ENGINE_PROP_EXAMPLES", "40")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --- the PCIe pipe -----------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 40)), max_size=30))
def test_pipe_reservations_fill_gaps_like_a_tick_oracle(requests):
    pipe = ffi.new("struct ifc_pipe *")
    busy: set[int] = set()
    for t, d in requests:
        end = lib.ifc_pipe_reserve(pipe, t, d, 0)
        cur, left = t, d
        while left:
            if cur not in busy:
                busy.add(cur)
                left -= 1
            cur += 1
        assert end == (cur if d else t)
    ticks = set()
    for i in range(pipe.n):
        ticks.update(range(pipe.start[i], pipe.end[i]))
    assert ticks == busy


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 9)), min_size=40, max_size=120))
def test_a_full_pipe_only_ever_delays(requests):
    """With more intervals than slots, closing gaps makes reservations later, never earlier."""
    pipe = ffi.new("struct ifc_pipe *")
    busy: set[int] = set()
    for t, d in requests:
        end = lib.ifc_pipe_reserve(pipe, t, d, 0)
        cur, left = t, d
        while left:
            if cur not in busy:
                busy.add(cur)
                left -= 1
            cur += 1
        assert end >= cur
        assert pipe.n <= lib.IFC_PIPE_SLOTS


# --- dirty logging -------------------------------------------------------------------

@SETTINGS
@given(sizes=st.lists(st.integers(60, 1514), min_size=1, max_size=24),
       buf_len=st.sampled_from([128, 700, 1600, 2048, 4000]),
       pieces=st.sampled_from([1, 2, 4]),
       offset=st.integers(0, 4095),
       mrg=st.booleans())
def test_logged_pages_are_exactly_the_pages_written(sizes, buf_len, pieces, offset, mrg):
    rig = Rig(mem_mib=16)
    log = Logged(rig)
    try:
        rig.start(ALL if mrg else ALL & ~MRG)
        log.enable()
        ring = rig.rings[0]
        for slot in range(64):                       # buffers at an arbitrary page offset
            addr = rig.slot_addr(0, slot * 2) + offset % (SLOT - 16 * pieces - 16)
            length = min(buf_len, 2 * SLOT - (addr - rig.slot_addr(0, slot * 2)) - 16 * pieces)
            if pieces == 1:
                ring.set_desc(slot, addr, length, DESC_F_WRITE)
            else:
                table = rig.slot_addr(0, slot * 2 + 1) + SLOT - 16 * pieces
                part = max(1, length // pieces)
                for i in range(pieces):
                    flags = DESC_F_WRITE | (DESC_F_NEXT if i + 1 < pieces else 0)
                    ring.set_desc(i, addr + i * part, part, flags, i + 1, table=table)
                ring.set_desc(slot, table, 16 * pieces, DESC_F_INDIRECT)
            ring.post(slot)
        ring.publish()
        rig.kick(0)
        rig.capture.send([frame(n, i) for i, n in enumerate(sizes)])
        rig.run_ns(60_000)
        used = ring.take_used()
        assert set(log.pages()) == written_pages(rig, 0, used)
        assert log.canary_intact()
    finally:
        log.close()
        rig.close()


# --- hostile descriptor tables -------------------------------------------------------

MAPPED = 8 << 20
address = st.one_of(st.integers(0, MAPPED + 8192), st.sampled_from([MAPPED - 64, (1 << 64) - 16]),
                    st.integers(0, (1 << 64) - 1))
desc = st.tuples(address, st.one_of(st.integers(0, 5000), st.integers(0, (1 << 32) - 1)),
                 st.integers(0, 7), st.integers(0, 300))


@SETTINGS
@given(table=st.lists(desc, min_size=1, max_size=32),
       heads=st.lists(st.integers(0, 300), min_size=1, max_size=12),
       indirect=st.lists(desc, max_size=8),
       queue=st.sampled_from([0, 1]))
def test_random_rings_never_escape_the_mapping(table, heads, indirect, queue):
    rig = Rig(mem_mib=16, mapped_mib=8, size=32)
    try:
        rig.start(ALL)
        ring = rig.rings[queue]
        itable = rig.slot_addr(queue, 0)
        for i, (addr, length, flags, nxt) in enumerate(indirect):
            ring.set_desc(i, addr, length, flags, nxt, table=itable)
        for i, (addr, length, flags, nxt) in enumerate(table):
            if addr == 0 and flags & DESC_F_INDIRECT:
                addr = itable
            ring.set_desc(i, addr, length, flags, nxt)
        for h in heads:
            ring.post(h)
        ring.publish()
        rig.kick(queue)
        if queue == 0:
            rig.capture.send([frame(200, 1), frame(1514, 2)])
        rig.run_ns(30_000)
        assert rig.canary_intact()
        if rig.model.needs_reset:
            assert rig.model.errors and rig.world.trace.find("needs_reset")
            assert rig.model.queue(queue).engine.broken
    finally:
        rig.close()


# --- stop and resume -----------------------------------------------------------------

@SETTINGS
@given(count=st.integers(1, 200), stop_ns=st.integers(0, 30_000), size=st.integers(60, 1514),
       layout=st.sampled_from(["single", "split", "indirect"]))
def test_stop_anywhere_and_resume_elsewhere_loses_and_duplicates_nothing(count, stop_ns, size,
                                                                         layout):
    if layout == "split":
        count = min(count, 128)
    src = Rig(name="vf0", mem_mib=16)
    dst = Rig(name="vf1", index=1, mem_mib=16, world=src.world, capture=False)
    try:
        dst_sink = []
        peer = Port(src.world, "dst-peer")
        peer.on_receive(dst_sink.append)
        connect(dst.model.port, peer)
        src.start(ALL)
        frames = [frame(size, i) for i in range(count)]
        src.post_tx(1, frames, layout)
        src.run_ns(stop_ns)
        state = src.stop([1])[1]
        assert state.last_avail == state.last_used
        dst.mem.view[:] = src.mem.view
        dst.start(ALL, bases={1: state.last_used}, queues=[1], init_rings=False)
        src.run_ns(100_000)
        sent = src.capture.frames()
        for b in dst_sink:
            for off, length, _t in b.frames():
                sent.append(bytes(b.data[off:off + length]))
        assert sent == frames
    finally:
        src.close()
        dst.close()
