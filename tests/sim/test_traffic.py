"""Traffic endpoints: frame format, the checker (it must catch what it claims to), generator and sink."""
import struct
from array import array

import pytest

from sim._native import ffi, lib
from sim.frames import FrameBatch
from sim.testing.guest_testdev import link
from sim.traffic import (HEADER_LEN, IMIX, Checker, Generator, Sink, SizeDist, Stream, mac_bytes)
from sim.world import World


def frames_of(stream: Stream, n: int) -> list[bytes]:
    batch = stream.batch(n)
    return [bytes(batch.data[o:o + ln]) for o, ln, _ in batch.frames()]


def batch_of(frames) -> FrameBatch:
    batch = FrameBatch()
    for f in frames:
        batch.append(f)
    return batch


# --- frame format -------------------------------------------------------------------
def test_frame_layout_is_ethernet_then_test_header():
    s = Stream(SizeDist.fixed(64), flows=3, flow_base=7, dst_mac="52:54:00:00:00:01",
               src_mac="02:00:00:00:00:02")
    frames = frames_of(s, 4)
    assert [len(f) for f in frames] == [60] * 4          # 64 B with FCS -> 60 in a buffer
    f = frames[0]
    assert f[:6] == bytes.fromhex("525400000001") and f[6:12] == bytes.fromhex("020000000002")
    assert f[12:14] == b"\x88\xb5"
    magic, flow, seq, length = struct.unpack_from("<IIQI", f, 14)
    assert (magic, flow, seq, length) == (0x46434649, 7, 0, 60)
    # round robin over flows, one sequence per flow
    assert [struct.unpack_from("<IQ", g, 18) for g in frames] == [(7, 0), (8, 0), (9, 0), (7, 1)]
    assert s.sent_per_flow() == [2, 1, 1]


def test_payload_depends_on_flow_and_seq():
    a = bytearray(200)
    b = bytearray(200)
    lib.ifc_frame_fill(ffi.from_buffer(a), 200, ffi.NULL, 1, 5)
    lib.ifc_frame_fill(ffi.from_buffer(b), 200, ffi.NULL, 1, 6)
    assert a[HEADER_LEN:] != b[HEADER_LEN:]
    assert lib.ifc_frame_check(ffi.from_buffer(a), 200, ffi.NULL, ffi.NULL) == lib.IFC_TF_OK
    # b's payload under a's header is caught
    a[HEADER_LEN:] = b[HEADER_LEN:]
    assert lib.ifc_frame_check(ffi.from_buffer(a), 200, ffi.NULL, ffi.NULL) == lib.IFC_TF_BAD_PAYLOAD


@pytest.mark.parametrize("length", [60, 61, 67, 68, 1514, 9000])
def test_every_payload_byte_is_checked(length):
    frame = bytearray(length)
    lib.ifc_frame_fill(ffi.from_buffer(frame), length, ffi.NULL, 3, 99)
    for pos in range(HEADER_LEN, length, max(1, (length - HEADER_LEN) // 50)):
        broken = bytearray(frame)
        broken[pos] ^= 0x01
        assert lib.ifc_frame_check(ffi.from_buffer(broken), length, ffi.NULL, ffi.NULL) \
            == lib.IFC_TF_BAD_PAYLOAD, pos
    broken = bytearray(frame)
    broken[-1] ^= 0x80                    # the odd tail bytes too
    assert lib.ifc_frame_check(ffi.from_buffer(broken), length, ffi.NULL, ffi.NULL) != 0


def test_header_damage_is_classified():
    frame = bytearray(100)
    lib.ifc_frame_fill(ffi.from_buffer(frame), 100, ffi.NULL, 0, 0)
    check = lambda f, n=None: lib.ifc_frame_check(ffi.from_buffer(f), len(f) if n is None else n,
                                                  ffi.NULL, ffi.NULL)
    assert check(frame) == lib.IFC_TF_OK
    assert check(frame[:80]) == lib.IFC_TF_BAD_LENGTH      # truncated
    assert check(frame[:20]) == lib.IFC_TF_RUNT
    other = bytearray(frame)
    other[13] = 0x00                                       # ethertype
    assert check(other) == lib.IFC_TF_NOT_TEST
    other = bytearray(frame)
    other[14] ^= 1                                         # magic
    assert check(other) == lib.IFC_TF_NOT_TEST
    other = bytearray(frame)
    other[22] ^= 1                                         # seq: payload no longer matches
    assert check(other) == lib.IFC_TF_BAD_PAYLOAD


# --- the checker -----------------------------------------------------------------------
def check_sequence(seqs, flows=1, corrupt=()):
    """Frames of flow 0 with these sequence numbers, some corrupted, through one checker."""
    frames = []
    for i, seq in enumerate(seqs):
        f = bytearray(64)
        lib.ifc_frame_fill(ffi.from_buffer(f), 64, ffi.NULL, 0, seq)
        if i in corrupt:
            f[50] ^= 0xFF
        frames.append(bytes(f))
    ck = Checker(flows)
    bad = ck.check(batch_of(frames))
    return ck, bad


def test_clean_sequence_counts_in_order():
    ck, bad = check_sequence(range(100))
    c = ck.counts()
    assert bad == 0 and c.good == c.in_order == 100 and c.clean


def test_checker_catches_loss():
    ck, _ = check_sequence([0, 1, 2, 5, 6, 9])
    c = ck.counts()
    assert c.lost == 4 and c.in_order == 6 and not c.clean


def test_checker_catches_duplicates():
    ck, _ = check_sequence([0, 1, 1, 2, 0, 3])
    c = ck.counts()
    assert c.duplicates == 2 and c.lost == 0 and c.good == 6


def test_checker_catches_reordering_and_a_late_frame_fills_its_gap():
    ck, _ = check_sequence([0, 2, 1, 3, 6, 4, 5])
    c = ck.counts()
    assert c.out_of_order == 3 and c.lost == 0 and c.duplicates == 0
    ck, _ = check_sequence([0, 100, 1])     # more than 64 behind: stale
    assert ck.counts().stale == 1 and ck.counts().lost == 99


def test_checker_catches_corruption_and_does_not_count_the_frame_as_received():
    ck, bad = check_sequence([0, 1, 2, 3], corrupt={1})
    c = ck.counts()
    assert bad == 1 and c.corrupted == c.bad_payload == 1 and c.good == 3 and c.lost == 1
    reason, flow, seq = Checker.last_bad(ck.stats)
    assert (reason, flow, seq) == ("bad_payload", 0, 1)


def test_checker_refuses_flows_outside_its_range():
    s = Stream(SizeDist.fixed(64), flows=2, flow_base=10)
    ck = Checker(1, flow_base=10)
    ck.check(s.batch(4))
    c = ck.counts()
    assert c.good == 2 and c.bad_flow == 2


def test_missing_counts_the_tail_that_never_arrived():
    ck, _ = check_sequence([0, 1, 2])
    assert ck.missing([10]) == 7


def test_check_refuses_lengths_past_the_data():
    ck = Checker(1)
    batch = FrameBatch(bytearray(60), array("I", [60, 60]), array("q", [0, 0]))
    with pytest.raises(ValueError):
        ck.check(batch)


# --- sizes -------------------------------------------------------------------------------
def test_size_distributions():
    world = World(3)
    assert list(SizeDist.fixed(1518).table) == [1514]
    assert list(SizeDist.parse("64,128").table) == [60, 124]
    u = SizeDist.parse("64-1518", world.rng("u"))
    assert 60 <= u.min_length and u.max_length <= 1514 and len(set(u.table)) > 100
    imix = SizeDist.imix(world.rng("i"))
    counts = {size: list(imix.table).count(size - 4) for size, _ in IMIX}
    assert counts == {64: 7 * 64, 594: 4 * 64, 1518: 64}
    assert list(SizeDist.imix(world.rng("i")).table) == list(imix.table)   # seeded
    with pytest.raises(ValueError):
        SizeDist.fixed(32)
    with pytest.raises(ValueError):
        SizeDist.parse("imix")          # random without an rng


def test_stream_cycles_sizes_and_runs_flows():
    s = Stream(SizeDist.sequence([64, 128, 256]), flows=2, flow_run=3)
    frames = frames_of(s, 7)
    assert [len(f) for f in frames] == [60, 124, 252, 60, 124, 252, 60]
    assert [struct.unpack_from("<I", f, 18)[0] for f in frames] == [0, 0, 0, 1, 1, 1, 0]
    assert mac_bytes("aa:bb:cc:dd:ee:ff") == bytes.fromhex("aabbccddeeff")


# --- generator -> wire -> sink ------------------------------------------------------------
def run_link(rate_gbps, size, frames, burst=32, flows=4, seed=1, **kw):
    world = World(seed)
    a, b = link(world)
    sink = Sink(world, b, flows=flows)
    gen = Generator(world, a, size, rate_gbps=rate_gbps, burst=burst, flows=flows,
                    max_frames=frames, **kw)
    gen.start()
    world.run_until(world.cycles(10_000_000))
    return world, gen, sink


def test_line_rate_64_byte_frames_arrive_checked_at_148_mpps():
    world, gen, sink = run_link(100, 64, 64 * 100)
    c = sink.counts()
    assert c.frames == gen.frames == 6400 and c.clean and c.good == 6400
    mpps, _ = sink.rate()
    assert 147.0 < mpps < 150.0


def test_offered_rate_below_line_rate_is_kept_on_average():
    world, gen, sink = run_link(25, 1518, 32 * 50)
    mpps, _ = sink.rate()
    # 25 Gb/s of 1518 B frames = 2.03 Mpps (bursts at line rate, gaps between them)
    assert 1.95 < mpps < 2.1
    assert sink.counts().clean


def test_pps_rate_and_imix():
    world, gen, sink = run_link(None, "imix", 3000, pps=1_000_000)
    mpps, _ = sink.rate()
    assert 0.95 < mpps < 1.05
    assert sink.counts().good == 3000


def test_generator_and_sink_are_deterministic():
    w1, g1, s1 = run_link(40, "64-1518", 2000, seed=5)
    w2, g2, s2 = run_link(40, "64-1518", 2000, seed=5)
    w3, g3, s3 = run_link(40, "64-1518", 2000, seed=6)
    assert s1.counts() == s2.counts() and w1.digest() == w2.digest()
    assert g1.bytes == g2.bytes != g3.bytes


def test_sink_reports_bad_frames_in_the_trace():
    world = World(1)
    a, b = link(world)
    sink = Sink(world, b, flows=1)
    frames = frames_of(Stream(SizeDist.fixed(128)), 3)
    broken = bytearray(frames[1])
    broken[-5] ^= 1
    a.transmit(batch_of([frames[0], bytes(broken), frames[2]]), 0)
    world.run_until(world.cycles(1000))
    assert sink.counts().bad_payload == 1 and sink.counts().lost == 1
    assert world.trace.find("frames_bad")


# --- the fast paths give what the general ones give -------------------------------
@pytest.mark.parametrize("size", [64, 65, 71, 72, 100, 1518])
@pytest.mark.parametrize("flows,run", [(1, 1), (3, 2), (16, 5), (4, 512)])
def test_one_size_streams_fill_exactly_as_the_general_path(size, flows, run):
    """A one-size stream fills from a header template, a flow's run at a time
    (csrc/sim/guest_frames.c); a table of two equal sizes takes the general path."""
    fast = Stream(SizeDist([size]), flows=flows, flow_run=run, flow_base=5)
    general = Stream(SizeDist([size, size]), flows=flows, flow_run=run, flow_base=5)
    for n in (1, 7, 64, 3):
        a, b = fast.batch(n), general.batch(n)
        assert bytes(a.data) == bytes(b.data) and list(a.lengths) == list(b.lengths)
    assert fast.sent_per_flow() == general.sent_per_flow()
    for field in ("flow_cursor", "run_pos", "frames", "bytes"):
        assert getattr(fast.c, field) == getattr(general.c, field)


def test_pooled_batches_keep_their_bytes_while_anyone_holds_them():
    from sim.wire import BufferPool
    pool = BufferPool(64 * 60)
    s, ref = Stream(SizeDist.fixed(64), flows=2), Stream(SizeDist.fixed(64), flows=2)
    kept = s.batch(64, pool)                     # held: its buffer must not be reused
    expected = bytes(ref.batch(64).data)
    assert isinstance(kept.data, memoryview) and bytes(kept.data) == expected
    for _ in range(3):
        s.batch(64, pool)                        # dropped at once: one buffer goes round
        ref.batch(64)
    assert bytes(kept.data) == expected and len(pool) == 2
    big = s.batch(65, pool)                      # more than a pool buffer: a plain bytearray
    assert isinstance(big.data, bytearray) and bytes(big.data) == bytes(ref.batch(65).data)


# --- low-rate sources (issue 10) ----------------------------------------------------------
def test_arrivals_constant_poisson_and_on_off():
    from sim.traffic import Arrivals

    world = World(3)
    a = Arrivals(world, 1000.0, start=0)                       # every 1 ms
    ms = world.cycles(1_000_000)
    assert [a.take(k * ms) for k in range(1, 4)] == [1, 1, 1]
    p = Arrivals(world, 1000.0, pattern="poisson", start=0, name="p")
    n = p.take(world.cycles(2_000_000_000))                       # 2 s
    assert 1800 < n < 2200
    gaps_seen = Arrivals(world, 1000.0, pattern="poisson", start=0, name="p")
    assert gaps_seen.next_at() == Arrivals(world, 1000.0, pattern="poisson", start=0,
                                           name="p").next_at()   # seeded by name
    o = Arrivals(world, 10_000.0, burst=2, on_us=1000, off_us=4000, start=0)
    # 5000 arrivals/s of 2 frames while on: 5 per on period (the first one starts a
    # gap after the start), none in the off period
    assert o.take(world.cycles(1_000_000)) == 8
    assert o.take(world.cycles(4_999_000)) == 0
    assert o.take(world.cycles(6_000_000)) == 10
    with pytest.raises(ValueError):
        Arrivals(world, 0.0)
    with pytest.raises(ValueError):
        Arrivals(world, 10.0, off_us=5.0)
    with pytest.raises(ValueError):
        Arrivals(world, 10.0, pattern="bursty")


def test_a_generator_on_arrivals_and_a_responder_answer_frame_for_frame():
    from sim.traffic import Arrivals, Responder
    from sim.testing.guest_testdev import link

    world = World(5)
    a, b = link(world)
    c, d = link(world)
    gen = Generator(world, a, 128, arrivals=Arrivals(world, 2000.0, start=0), max_frames=20)
    sink = Sink(world, b)
    resp = Responder(world, c, 98, delay_us=50.0)
    back = Sink(world, d)
    sink.on_frames.append(resp.answer)
    gen.start()
    world.run_until(world.cycles(11_000_000))                  # 20 frames in 10 ms
    assert gen.frames == 20 and sink.counts().good == 20
    assert resp.frames == back.counts().good == 20 and back.counts().clean
    assert back.first_arrival >= sink.first_arrival + world.cycles(50_000)


def test_steer_by_flow_follows_the_first_frames_flow_id():
    from sim.traffic import FLOW_OFFSET, steer_by_flow

    def one_flow(flow: int):
        b = Stream(SizeDist.fixed(64), flows=1, flow_base=flow).batch(2)
        assert struct.unpack_from("<I", b.data, FLOW_OFFSET)[0] == flow
        return b

    assert [steer_by_flow(4)(one_flow(f)) for f in range(6)] == [0, 1, 2, 3, 0, 1]
    active = [0, 2]
    steer = steer_by_flow(active)            # the list may change while traffic runs
    assert [steer(one_flow(f)) for f in range(3)] == [0, 2, 0]
    active.append(3)
    assert [steer(one_flow(f)) for f in range(3)] == [0, 2, 3]
    active.clear()
    assert steer(one_flow(5)) == 0
    assert steer(batch_of([bytes(10)])) == 0    # too short to carry a flow id


def test_sink_totals_are_the_frames_and_bytes_of_its_counts():
    """``Sink.totals()`` is what runs sample every few us instead of ``counts()``."""
    world, gen, sink = run_link(10, 300, 100)
    c = sink.counts()
    assert sink.totals() == (c.frames, c.bytes) == (100, 100 * 296)
    assert (c + c).as_dict() == {k: 2 * v for k, v in c.as_dict().items()}
