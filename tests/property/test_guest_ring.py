"""Properties of the guest's C ring work and frame checker against small Python oracles."""
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from hal.memory import HostMemory
from sim._native import ffi, lib
from sim import virtio_regs as vr
from sim.guest import GuestNet
from sim.traffic import Checker, SizeDist
from sim.frames import FrameBatch
from sim.world import World

MODERN = vr.feature_mask(vr.F_VERSION_1, vr.F_NET_MRG_RXBUF, vr.F_EVENT_IDX, vr.F_INDIRECT_DESC)

_MEM = HostMemory(4 << 20, "prop-guest")


# --- the checker against an oracle ----------------------------------------------------------
def oracle(seqs):
    """Per-flow counts with the checker's rules: highest+1, a 64-entry window below it."""
    nxt, seen = 0, set()
    c = dict(in_order=0, out_of_order=0, duplicates=0, stale=0, lost=0)
    for s in seqs:
        if s >= nxt:
            c["lost"] += s - nxt
            c["in_order"] += 1
            nxt = s + 1
            seen.add(s)
        elif nxt - 1 - s >= 64:
            c["stale"] += 1
        elif s in seen:
            c["duplicates"] += 1
        else:
            seen.add(s)
            c["out_of_order"] += 1
            c["lost"] -= 1
    return c


@given(st.lists(st.integers(0, 200), max_size=120))
def test_checker_matches_the_oracle(seqs):
    batch = FrameBatch()
    for s in seqs:
        f = bytearray(64)
        lib.ifc_frame_fill(ffi.from_buffer(f), 64, ffi.NULL, 0, s)
        batch.append(bytes(f))
    ck = Checker(1)
    ck.check(batch)
    got = ck.counts()
    want = oracle(seqs)
    assert {k: getattr(got, k) for k in want} == want
    assert got.good == len(seqs)


@given(st.integers(60, 600), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
       st.data())
def test_any_single_bit_flip_is_caught(length, flow, seq, data):
    f = bytearray(length)
    lib.ifc_frame_fill(ffi.from_buffer(f), length, ffi.NULL, flow, seq)
    pos = data.draw(st.integers(12, length - 1))     # everything but the MACs is covered
    bit = data.draw(st.integers(0, 7))
    f[pos] ^= 1 << bit
    assert lib.ifc_frame_check(ffi.from_buffer(f), length, ffi.NULL, ffi.NULL) != lib.IFC_TF_OK


# --- TX ring: post / complete in any order / reclaim, across the u16 wrap ---------------------
def read_chain(view, lay, head, hdr_len):
    addr, length, flags, nxt = struct.unpack_from("<QIHH", view, lay.desc + 16 * head)
    table, i = lay.desc, head
    if flags & 4:
        table, i = addr, 0
        addr, length, flags, nxt = struct.unpack_from("<QIHH", view, table)
    data = bytearray()
    while True:
        data += view[addr:addr + length]
        if not flags & 1:
            break
        addr, length, flags, nxt = struct.unpack_from("<QIHH", view, table + 16 * nxt)
    return bytes(data[hdr_len:])


@settings(max_examples=60)
@given(chain=st.sampled_from(["single", "split", "indirect"]), base=st.integers(0, 0xFFFF),
       ops=st.lists(st.tuples(st.sampled_from(["post", "complete", "reclaim"]),
                              st.integers(1, 12), st.randoms(use_true_random=False)),
                    max_size=40))
def test_tx_ring_posts_each_frame_once_and_reclaims_any_order(chain, base, ops):
    world = World(0)
    _MEM.view[:] = bytes(_MEM.size)
    g = GuestNet(world, _MEM, features=MODERN, queue_size=8, tx_chain=chain, ring_base=base,
                 tx_sizes=SizeDist.sequence([64, 200, 1518]))
    q, lay, stream = g.queues[1], g.layout[1], g.queues[1].stream
    view = _MEM.view
    last_avail = base
    used_idx = base
    held = []             # heads the device fetched and has not completed
    seen = []             # (flow, seq) of every frame the device read
    for op, n, rnd in ops:
        if op == "post":
            before = lib.ifc_gvq_in_flight(q.c)
            got = lib.ifc_gvq_tx_post(q.c, n, stream.c)
            assert got == min(n, lay.nslots - before)
            lib.ifc_gvq_publish(q.c)
            avail = struct.unpack_from("<H", view, lay.avail + 2)[0]
            while last_avail != avail:
                head = struct.unpack_from("<H", view, lay.avail + 4 + 2 * (last_avail % 8))[0]
                frame = read_chain(view, lay, head, 12)
                flow, seq, length = struct.unpack_from("<IQI", frame, 18)
                assert length == len(frame)
                assert lib.ifc_frame_check(ffi.from_buffer(frame), len(frame), ffi.NULL, ffi.NULL) == 0
                seen.append((flow, seq))
                held.append(head)
                last_avail = (last_avail + 1) & 0xFFFF
        elif op == "complete" and held:
            rnd.shuffle(held)
            done, held = held[:n], held[n:]
            for head in done:
                struct.pack_into("<II", view, lay.used + 4 + 8 * (used_idx % 8), head, 0)
                used_idx = (used_idx + 1) & 0xFFFF
            struct.pack_into("<H", view, lay.used + 2, used_idx)
        elif op == "reclaim":
            assert lib.ifc_gvq_tx_reclaim(q.c) >= 0
            assert lib.ifc_gvq_in_flight(q.c) == len(held) + lib.ifc_gvq_pending(q.c)
    assert q.c.error == 0
    assert seen == [(0x1000, i) for i in range(len(seen))]
    assert stream.c.frames == len(seen)


# --- RX ring: mergeable buffers, any split of frames over buffers -------------------------------
@settings(max_examples=60)
@given(base=st.integers(0, 0xFFFF), sizes=st.lists(st.integers(60, 1514), min_size=1, max_size=30),
       budgets=st.lists(st.integers(1, 8), min_size=1, max_size=10))
def test_rx_merged_frames_are_reassembled_across_the_wrap(base, sizes, budgets):
    world = World(0)
    _MEM.view[:] = bytes(_MEM.size)
    g = GuestNet(world, _MEM, features=MODERN, queue_size=64, rx_buffer_size=256, ring_base=base)
    q, lay = g.queues[0], g.layout[0]
    view = _MEM.view
    last_avail = used_idx = base
    delivered = 0
    budget_iter = iter(budgets * 100)
    for seq, length in enumerate(sizes):
        frame = bytearray(length)
        lib.ifc_frame_fill(ffi.from_buffer(frame), length, ffi.NULL, 0, seq)
        data = bytes(12) + frame
        nb = -(-len(data) // 256)
        avail = struct.unpack_from("<H", view, lay.avail + 2)[0]
        if (avail - last_avail) & 0xFFFF < nb:
            break
        heads = []
        for k in range(nb):
            head = struct.unpack_from("<H", view, lay.avail + 4 + 2 * (last_avail % 64))[0]
            last_avail = (last_avail + 1) & 0xFFFF
            addr = struct.unpack_from("<Q", view, lay.desc + 16 * head)[0]
            chunk = data[256 * k:256 * (k + 1)]
            view[addr:addr + len(chunk)] = chunk
            if k == 0:
                struct.pack_into("<H", view, addr + 10, nb)
            heads.append((head, len(chunk)))
        for head, ln in heads:
            struct.pack_into("<II", view, lay.used + 4 + 8 * (used_idx % 64), head, ln)
            used_idx = (used_idx + 1) & 0xFFFF
        struct.pack_into("<H", view, lay.used + 2, used_idx)
        delivered += 1
        # the guest polls with some budget, refills and publishes
        got = lib.ifc_gvq_rx(q.c, next(budget_iter), g.checker.c, q.stats)
        assert got >= 0
        lib.ifc_gvq_refill(q.c, 64)
        lib.ifc_gvq_publish(q.c)
    while lib.ifc_gvq_pending(q.c):
        assert lib.ifc_gvq_rx(q.c, 64, g.checker.c, q.stats) > 0
    counts = g.rx_counts()
    assert counts.good == delivered and counts.clean and q.c.error == 0


# --- TX: the fused start_xmit batch against the steps it replaces ---------------------------
_TWIN = HostMemory(4 << 20, "prop-guest-twin")


def _xmit_steps(c, want, stop_free, stream):
    """GuestNet._tx_work's ring part as separate calls (what ifc_gvq_tx_xmit fuses):
    (frames, bytes, num_free, sent, broken)."""
    lib.ifc_gvq_disable_cb(c)
    if lib.ifc_gvq_tx_reclaim(c) < 0:
        return 0, 0, 0, 0, 1
    want = min(want, lib.ifc_gvq_num_free(c) - stop_free + 1)
    if want <= 0:
        return 0, 0, 0, 0, 0
    before, n = stream.bytes, 0
    if want > 1:
        got = lib.ifc_gvq_tx_post(c, want - 1, stream)
        if got < 0:
            return 0, 0, 0, 1, 1
        n = got
    while True:
        lib.ifc_gvq_disable_cb(c)
        if lib.ifc_gvq_tx_reclaim(c) < 0:
            return n, 0, 0, 1, 1
        if lib.ifc_gvq_enable_cb_delayed(c):
            break
    got = lib.ifc_gvq_tx_post(c, 1, stream)
    if got < 0:
        return n, 0, 0, 1, 1
    return n + got, stream.bytes - before, lib.ifc_gvq_num_free(c), 1, 0


@settings(max_examples=80)
@given(chain=st.sampled_from(["single", "split", "indirect"]), base=st.integers(0, 0xFFFF),
       event_idx=st.booleans(), stop_free=st.integers(1, 5),
       ops=st.lists(st.tuples(st.sampled_from(["xmit", "xmit", "complete", "clean", "bad_id"]),
                              st.integers(1, 12), st.randoms(use_true_random=False)),
                    max_size=40))
def test_fused_tx_xmit_and_clean_do_what_their_steps_do(chain, base, event_idx, stop_free, ops):
    features = MODERN if event_idx else MODERN & ~(1 << vr.F_EVENT_IDX)
    twins = []
    for mem in (_MEM, _TWIN):
        mem.view[:] = bytes(mem.size)
        g = GuestNet(World(0), mem, features=features, queue_size=16, tx_chain=chain,
                     ring_base=base, tx_sizes=SizeDist.sequence([64, 200, 1518]))
        twins.append((g.queues[1], g.layout[1], g.queues[1].stream, mem.view, g.end))
    (q, lay, stream, view, end), (q2, _, stream2, view2, _) = twins
    out = ffi.new("struct ifc_gvq_xmit *")
    last_avail = used_idx = base
    for op, n, rnd in ops:
        if op == "xmit":
            want = rnd.randrange(-2, 14)
            if want > 0:
                ref = _xmit_steps(q.c, want, stop_free, stream.c)
                lib.ifc_gvq_tx_xmit(q2.c, want, stop_free, stream2.c, out)
                got = (out.frames, out.bytes, out.num_free, out.sent, out.broken)
                assert got[0] == ref[0] and got[3:] == ref[3:]
                if not ref[4]:
                    assert got == ref
            lib.ifc_gvq_publish(q.c)
            lib.ifc_gvq_publish(q2.c)
        elif op == "clean":
            ref_free = None
            while True:
                lib.ifc_gvq_disable_cb(q.c)
                r = lib.ifc_gvq_tx_reclaim(q.c)
                if r < 0:
                    ref_free = r
                    break
                if lib.ifc_gvq_enable_cb_delayed(q.c):
                    ref_free = lib.ifc_gvq_num_free(q.c)
                    break
            assert lib.ifc_gvq_tx_clean(q2.c) == ref_free
        else:
            # the device: complete some of what it fetched (a bad id: break the ring)
            avail = struct.unpack_from("<H", view, lay.avail + 2)[0]
            heads = []
            while last_avail != avail and len(heads) < n:
                heads.append(struct.unpack_from("<H", view, lay.avail + 4 + 2 * (last_avail % 16))[0])
                last_avail = (last_avail + 1) & 0xFFFF
            rnd.shuffle(heads)
            if op == "bad_id":
                heads.append(999)
            for v in (view, view2):
                idx = used_idx
                for head in heads:
                    struct.pack_into("<II", v, lay.used + 4 + 8 * (idx % 16), head, 0)
                    idx = (idx + 1) & 0xFFFF
                struct.pack_into("<H", v, lay.used + 2, idx)
            used_idx = (used_idx + len(heads)) & 0xFFFF
        assert bytes(view[:end]) == bytes(view2[:end])
        for field in ("error", "error_value", "kick_old", "completed", "made_available"):
            assert getattr(q.c, field) == getattr(q2.c, field), field
        assert (stream.c.frames, stream.c.bytes) == (stream2.c.frames, stream2.c.bytes)
