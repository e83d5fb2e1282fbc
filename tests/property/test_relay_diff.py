"""The C used-ring relay against the Python oracle, on random and hostile ring states.

Each example builds guest memory (regions with holes, odd host alignment, one maybe at
the top of the address space), guest rings, indirect tables, a mediated ring and a
dirty log from a seed and a few hostility knobs, makes an identical copy, runs the C
relay (csrc/driver/relay.c, called directly) on one and tests/relay_oracle.py on the other,
and requires the same return values, error details, guest memory, mediated ring and
log bits after set-up and after every call.  The module only needs ``ifcvf._native``,
so the sanitizer test can run it against an ASan/UBSan build.
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

from hypothesis import event, given, settings, strategies as st

from ifcvf._native import ffi, lib
import relay_oracle as oracle

TOP = 1 << 64
PAGE = 4096


def test_oracle_constants_match_c():
    for name in ("USED_IDX", "DESC_ID", "NEXT", "LOOP", "INDIRECT_NEXT", "INDIRECT_NESTED",
                 "INDIRECT_POS", "INDIRECT_LEN", "INDIRECT_ADDR", "BUF_ADDR", "BUF_LOG", "SIZE",
                 "MEM_TABLE", "DESC_ADDR", "AVAIL_ADDR", "USED_ADDR", "ALIGN", "USED_LOG",
                 "CAPACITY", "MEDIATED", "NOT_READY"):
        assert getattr(oracle, "E_" + name) == getattr(lib, "IFC_RELAY_E_" + name), name
    for name in ("RANGE", "ARG", "RING", "MEM"):
        assert getattr(oracle, "ERR_" + name) == getattr(lib, "IFC_ERR_" + name), name
    assert (oracle.F_NEXT, oracle.F_WRITE, oracle.F_INDIRECT) == (
        lib.IFC_VRING_DESC_F_NEXT, lib.IFC_VRING_DESC_F_WRITE, lib.IFC_VRING_DESC_F_INDIRECT)


# --- building a world -----------------------------------------------------------------

@dataclass
class Region:
    gpa: int
    size: int
    shift: int                  # host misalignment of the region start (0..15)
    backing: bytearray = None   # size + 16 bytes; the region is backing[shift:shift+size]


@dataclass
class World:
    size: int
    regions: list
    mediated: bytearray
    m_avail: int                # offsets into mediated
    m_used: int
    m_shift: int
    log: bytearray | None
    params: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        regions = ", ".join(f"{r.gpa:#x}+{r.size:#x}@{r.shift}" for r in self.regions)
        return (f"World(size={self.size}, regions=[{regions}], m_shift={self.m_shift}, "
                f"log={None if self.log is None else len(self.log)}, {self.params})")

    def copy(self) -> "World":
        regions = [Region(r.gpa, r.size, r.shift, bytearray(r.backing)) for r in self.regions]
        return World(self.size, regions, bytearray(self.mediated), self.m_avail, self.m_used,
                     self.m_shift, None if self.log is None else bytearray(self.log),
                     dict(self.params))

    def region_view(self, r: Region):
        return memoryview(r.backing)[r.shift:r.shift + r.size]

    def write(self, gpa: int, data: bytes) -> None:
        """Write guest bytes wherever they fall inside regions (dropped elsewhere)."""
        for i, b in enumerate(data):
            for r in self.regions:
                if r.gpa <= gpa + i < r.gpa + r.size:
                    r.backing[r.shift + gpa + i - r.gpa] = b

    def snapshot(self):
        return ([bytes(r.backing) for r in self.regions], bytes(self.mediated),
                None if self.log is None else bytes(self.log))


class Gen:
    """Random content with a hostility rate: most values valid, some hostile."""

    def __repr__(self) -> str:
        return f"Gen(hostile={self.hostile}, tables={self.tables})"

    def __init__(self, rnd: random.Random, hostile: float, world: World):
        self.rnd, self.hostile, self.w = rnd, hostile, world
        self.tables: list[tuple[int, int]] = []   # indirect tables (gpa, entries)

    def bad(self) -> bool:
        return self.rnd.random() < self.hostile

    def end(self) -> int:
        return max((r.gpa + r.size for r in self.w.regions if r.gpa < TOP // 2), default=0x1000)

    def place(self, length: int, align: int) -> int:
        return self._place(length, align) & (TOP - 1)

    def _place(self, length: int, align: int) -> int:
        rnd = self.rnd
        if self.bad():
            r = rnd.choice(self.w.regions)
            return rnd.choice([rnd.randrange(0, self.end() + 0x1000), r.gpa + 1, r.gpa + 2,
                               r.gpa + r.size - length // 2, r.gpa + r.size, TOP - length // 2])
        fits = [r for r in self.w.regions if r.size >= length + align]
        if not fits:
            return rnd.randrange(0, self.end() + 1)
        r = rnd.choice(fits)
        start = -r.gpa % align
        return r.gpa + start + rnd.randrange(0, (r.size - length - start) // align + 1) * align

    def buffer(self) -> tuple[int, int]:
        rnd = self.rnd
        if self.bad():
            r = rnd.choice(self.w.regions)
            kind = rnd.randrange(6)
            if kind == 0:   # crosses the region end (into a hole or the next region)
                return r.gpa + r.size - 8, rnd.choice([9, 16, 4096])
            if kind == 1:   # in a hole or past everything
                return self.end() + rnd.randrange(0, 0x4000), rnd.randrange(1, 0x2000)
            if kind == 2:   # wraps the address space
                return TOP - rnd.randrange(1, 64), rnd.randrange(64, 0x1000)
            if kind == 3:
                return rnd.getrandbits(64), rnd.getrandbits(32)
            if kind == 4:
                return r.gpa, 0xFFFF_FFFF
            return r.gpa + rnd.randrange(r.size), 0
        r = rnd.choice(self.w.regions)
        length = min(rnd.choice([1, 12, 64, 1500, 2048, 4096, 9000]), r.size)
        return r.gpa + rnd.randrange(0, r.size - length + 1), length

    def desc(self, i: int, n_max: int, level: int) -> bytes:
        rnd = self.rnd
        # Valid chains point forward (no loops); bad() below adds the hostile ones.
        chain = i + 1 < n_max and rnd.random() < 0.4
        flags = (oracle.F_WRITE if rnd.random() < 0.7 else 0) | (oracle.F_NEXT if chain else 0)
        indirect = (level == 0 and self.tables and rnd.random() < 0.15) or (level == 1 and self.bad())
        if indirect:
            flags = oracle.F_INDIRECT | (flags if self.bad() else 0)
        if self.bad():
            flags = rnd.getrandbits(16) if rnd.random() < 0.3 else flags ^ (1 << rnd.randrange(3))
        if flags & oracle.F_INDIRECT and self.tables:
            gpa, entries = rnd.choice(self.tables)
            addr, length = gpa, 16 * entries
            if self.bad():
                length = rnd.choice([0, length - 1, length + 8, 16 * (self.w.size + 1), 0xFFFF_FFF0])
            if self.bad():
                addr = rnd.choice([addr + 8, self.end(), TOP - 16])
        else:
            addr, length = self.buffer()
        nxt = rnd.randrange(i + 1, n_max) if chain else rnd.randrange(n_max)
        if self.bad():
            nxt = rnd.randrange(n_max)            # maybe backwards: a loop
        if self.bad() and n_max < 0x10000:
            nxt = rnd.randrange(n_max, 0x10000)
        return struct.pack("<QIHH", addr & (TOP - 1), length & 0xFFFF_FFFF, flags & 0xFFFF, nxt)


@st.composite
def worlds(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    hostile = draw(st.sampled_from([0.0, 0.0, 0.0, 0.02, 0.1, 0.3]))
    size = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    event_idx = draw(st.booleans())
    log_used = draw(st.booleans())
    high = draw(st.sampled_from([False, False, False, True]))
    last = draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFE, 0xFFF0]) | st.integers(0, 0xFFFF))
    rnd = random.Random(seed)

    regions, gpa = [], rnd.choice([0, 0x1000, 0x3000])
    for _ in range(rnd.randrange(1, 5)):
        rsize = rnd.choice([0x100, 0x800, 0x1000, 0x2800, 0x5000])
        shift = rnd.randrange(1, 16) if rnd.random() < hostile / 4 else 0
        regions.append(Region(gpa, rsize, shift))
        gpa += rsize + rnd.choice([0, 0, 0x10, 0x1000, 0x3000])   # 0: adjacent regions
    if high:
        regions[-1].gpa = TOP - regions[-1].size - rnd.choice([0, 0x10])
    for r in regions:
        r.backing = bytearray(rnd.randbytes(r.size + 16))
    if hostile and rnd.random() < hostile:   # a table C must refuse
        victim = rnd.choice(regions)
        if rnd.random() < 0.5:
            victim.gpa = regions[0].gpa + 0x80              # overlaps region 0
        else:
            victim.gpa = TOP - victim.size // 2             # wraps

    avail_off = 16 * size
    used_off = (avail_off + 6 + 2 * size + 3) // 4 * 4
    m_shift = rnd.choice([1, 2]) if rnd.random() < hostile / 4 else 0
    mediated = bytearray(rnd.randbytes(m_shift + used_off + 6 + 8 * size + 16))
    log = None if rnd.random() < 0.15 else bytearray(rnd.randbytes(rnd.choice([0, 1, 2, 4, 8, 8, 16])))
    w = World(size, regions, mediated, m_shift + avail_off, m_shift + used_off, m_shift, log)
    g = Gen(rnd, hostile, w)

    for _ in range(rnd.randrange(0, 4)):   # indirect tables
        entries = rnd.randrange(1, size + 1)
        tgpa = g.place(16 * entries, 16)
        g.tables.append((tgpa, entries))
    desc_gpa = g.place(16 * size, 16)
    avail_gpa = g.place(6 + 2 * size, 2)
    used_gpa = g.place(6 + 8 * size, 4)
    for tgpa, entries in g.tables:
        w.write(tgpa, b"".join(g.desc(i, entries, 1) for i in range(entries)))
    w.write(desc_gpa, b"".join(g.desc(i, size, 0) for i in range(size)))
    used_event = (last + rnd.randrange(-2, size + 3)) & 0xFFFF
    w.write(avail_gpa, struct.pack("<HH", rnd.randrange(2), rnd.getrandbits(16)))
    w.write(avail_gpa + 4 + 2 * size, struct.pack("<H", used_event))

    pending = rnd.randrange(size + 1) if not g.bad() else rnd.randrange(size + 1, 0x10000)
    fill_mediated(w, g, last, pending)
    w.params = dict(
        desc_gpa=desc_gpa, avail_gpa=avail_gpa, used_gpa=used_gpa, last_idx=last,
        event_idx=event_idx,
        log_used_gpa=(log_address(rnd, g, w, used_gpa) if log_used else None),
        capacity=(rnd.choice([size, size + 1, 2 * size, 4 * size]) if not g.bad()
                  else rnd.choice([0, size - 1])))
    calls = [draw_call(rnd, size) for _ in range(draw(st.integers(1, 4)))]
    return w, g, calls


def log_address(rnd: random.Random, g: Gen, w: World, used_gpa: int) -> int:
    """Where the guest used ring is logged: mostly inside the log, sometimes not."""
    room = (len(w.log) if w.log else 0) * 8 * PAGE - (6 + 8 * w.size)
    if g.bad() or room <= 0:
        return rnd.choice([used_gpa, 0, rnd.randrange(0, 0x40000), TOP - 8])
    if room > PAGE and rnd.random() < 0.5:   # a page boundary inside the ring
        back = rnd.choice([rnd.randrange(1, 16), rnd.randrange(1, 7 + 8 * w.size), 5 + 8 * w.size])
        return max(0, rnd.randrange(1, room // PAGE + 1) * PAGE - back)
    return rnd.randrange(0, room + 1)


def fill_mediated(w: World, g: Gen, first: int, count: int) -> None:
    """The device's part: used elements first..first+count-1, then the index."""
    rnd, size = g.rnd, w.size
    for k in range(min(count, size)):
        slot = (first + k) % size
        desc_id = rnd.randrange(size) if not g.bad() else rnd.getrandbits(32)
        struct.pack_into("<II", w.mediated, w.m_used + 4 + 8 * slot, desc_id, rnd.getrandbits(32))
    struct.pack_into("<HH", w.mediated, w.m_used, rnd.randrange(2), (first + count) & 0xFFFF)


def draw_call(rnd: random.Random, size: int) -> dict:
    return dict(max_entries=rnd.choice([0, 0, 1, rnd.randrange(1, size + 1)]),
                produce=rnd.randrange(0, size + 1), set_log=rnd.random() < 0.1,
                log_bytes=rnd.choice([0, 2, 8]), seed=rnd.getrandbits(32))


# --- the two implementations ----------------------------------------------------------

class CQueue:
    """The C relay, driven through cffi directly (no wrapper in between)."""

    def __init__(self, w: World):
        self.keep = []
        p = w.params
        mem = ffi.new("struct ifc_mem_table *")
        mem.nregions = len(w.regions)
        self.hva = []
        for i, r in enumerate(w.regions):
            mem.regions[i].gpa = r.gpa
            mem.regions[i].size = r.size
            mem.regions[i].hva = self.addr(r.backing) + r.shift
            self.hva.append(mem.regions[i].hva)
        self.m_base = self.addr(w.mediated)
        self.scratch = ffi.new("struct ifc_relay_range[]", max(p["capacity"], 1))
        cfg = ffi.new("struct ifc_relay_config *")
        cfg.size = w.size
        cfg.flags = ((lib.IFC_RELAY_F_EVENT_IDX if p["event_idx"] else 0)
                     | (lib.IFC_RELAY_F_LOG_USED if p["log_used_gpa"] is not None else 0))
        cfg.desc_gpa, cfg.avail_gpa, cfg.used_gpa = p["desc_gpa"], p["avail_gpa"], p["used_gpa"]
        cfg.used_log_gpa = p["log_used_gpa"] or 0
        cfg.m_avail, cfg.m_used = self.m_base + w.m_avail, self.m_base + w.m_used
        cfg.log, cfg.log_size = self.log_ptr(w.log)
        cfg.scratch, cfg.capacity = self.scratch, p["capacity"]
        cfg.last_idx = p["last_idx"]
        self.q = ffi.new("struct ifc_relay_queue *")
        self.res = ffi.new("struct ifc_relay_result *")
        self.rc = lib.ifc_relay_queue_init(self.q, cfg, mem, self.res)

    def addr(self, buf) -> int:
        c = ffi.from_buffer(buf)
        self.keep.append(c)
        return int(ffi.cast("uintptr_t", c))

    def log_ptr(self, log):
        if log is None:
            return ffi.NULL, 0
        c = ffi.from_buffer("uint8_t[]", log, require_writable=True)
        self.keep.append(c)
        return c, len(log)

    def relay(self, max_entries: int) -> oracle.Result:
        rc = lib.ifc_relay_used(self.q, max_entries, self.res)
        assert rc == self.res.rc
        return result_of(self.res)

    def set_log(self, log, log_used_gpa):
        ptr, size = self.log_ptr(log)
        rc = lib.ifc_relay_queue_set_log(self.q, ptr, size, int(log_used_gpa is not None),
                                         log_used_gpa or 0, self.res)
        return rc, self.res.reason


def result_of(res) -> oracle.Result:
    return oracle.Result(res.rc, res.count, res.old_idx, res.new_idx, res.signal, res.more,
                         res.reason, res.err_idx, res.err_desc, res.err_indirect, res.err_value,
                         res.err_len)


def make_oracle(w: World, hva: list[int], m_base: int):
    p = w.params
    mem = oracle.Memory([(r.gpa, w.region_view(r), h) for r, h in zip(w.regions, hva)])
    try:
        return oracle.OracleQueue(
            mem, w.size, p["desc_gpa"], p["avail_gpa"], p["used_gpa"],
            (w.mediated, w.m_avail, w.m_used, m_base), last_idx=p["last_idx"],
            event_idx=p["event_idx"], log=w.log, log_used_gpa=p["log_used_gpa"],
            capacity=p["capacity"]), None
    except oracle.Refused as err:
        return None, err


# --- the properties -------------------------------------------------------------------

def check_same(cw: World, ow: World, what: str) -> None:
    c_regions, c_med, c_log = cw.snapshot()
    o_regions, o_med, o_log = ow.snapshot()
    for i, (a, b) in enumerate(zip(c_regions, o_regions)):
        assert a == b, f"{what}: guest region {i} differs"
    assert c_med == o_med, f"{what}: mediated ring differs"
    assert c_log == o_log, f"{what}: dirty log differs"


@settings(max_examples=2000)
@given(worlds())
def test_c_relay_matches_oracle(case):
    w, g, calls = case
    ow = w.copy()
    before = w.snapshot()
    cq = CQueue(w)
    oq, refused = make_oracle(ow, cq.hva, cq.m_base)
    if refused is not None:
        event(f"set-up refused: {refused.reason}")
        assert (cq.rc, cq.res.reason, cq.res.err_value, cq.res.err_len) == (
            refused.code, refused.reason, refused.value, refused.length)
        assert w.snapshot() == before, "a refused set-up wrote something"
        return
    assert cq.rc == lib.IFC_OK, f"C refused what the oracle accepted: {result_of(cq.res)}"
    check_same(w, ow, "after init")
    for n, call in enumerate(calls):
        snap = w.snapshot()
        c_res, o_res = cq.relay(call["max_entries"]), oq.relay(call["max_entries"])
        assert c_res == o_res, f"call {n}"
        event(f"call: reason {c_res.reason}" if c_res.rc < 0 else
              f"call: relayed {'0' if not c_res.count else '1' if c_res.count == 1 else 'many'}"
              f"{' more' if c_res.more else ''}")
        if c_res.rc < 0:
            assert w.snapshot() == snap, f"call {n}: an error wrote something"
        assert cq.q.last == oq.last
        check_same(w, ow, f"after call {n}")
        # The device produces more (the same in both worlds), maybe hostile.
        produce = call["produce"] if random.Random(call["seed"]).random() > g.hostile else 0x8000
        for world in (w, ow):
            fill_mediated(world, Gen(random.Random(call["seed"]), g.hostile, world),
                          struct.unpack_from("<H", world.mediated, world.m_used + 2)[0], produce)
        if call["set_log"]:
            new_log = bytearray(call["log_bytes"])
            log_used_gpa = w.params["log_used_gpa"]
            c_rc, c_reason = cq.set_log(new_log, log_used_gpa)
            o_log = bytearray(new_log)
            try:
                oq.set_log(o_log, log_used_gpa)
                o_rc, o_reason = 0, 0
            except oracle.Refused as err:
                o_rc, o_reason = err.code, err.reason
            assert (c_rc, c_reason) == (o_rc, o_reason)
            if c_rc == 0:
                w.log, ow.log = new_log, o_log


@settings(max_examples=300)
@given(worlds(), st.integers(0, 2**32 - 1))
def test_descriptor_rewrites_between_calls(case, seed):
    """A guest that rewrites its whole descriptor table with junk between two calls: the
    second call judges only what it reads then, exactly as the oracle does."""
    w, g, _ = case
    ow = w.copy()
    cq = CQueue(w)
    oq, refused = make_oracle(ow, cq.hva, cq.m_base)
    if refused is not None:
        return
    assert cq.relay(0) == oq.relay(0)
    produce = random.Random(seed).randrange(w.size + 1)
    for world in (w, ow):
        world.write(w.params["desc_gpa"], random.Random(seed).randbytes(16 * w.size))
        fill_mediated(world, Gen(random.Random(seed), 0.3, world),
                      struct.unpack_from("<H", world.mediated, world.m_used + 2)[0], produce)
    assert cq.relay(0) == oq.relay(0)
    check_same(w, ow, "after the rewrite")
