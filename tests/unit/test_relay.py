"""The used-ring relay through its Python wrapper (ifcvf.relay), case by case.

Guest memory is real memfd memory, as in the driver; each test states a ring,
relays, and checks the guest used ring, the mediated ring and the dirty log
byte for byte.  Errors must leave all three exactly as they were.
"""
from __future__ import annotations

import pickle
import struct

import pytest

from hal.memory import HostMemory
from ifcvf.dirtylog import DirtyLog, bitmap_pages
from ifcvf.relay import (
    DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MediatedRing, MemoryTable, RelayError, RelayQueue,
    reason_text)

W, N, I = DESC_F_WRITE, DESC_F_NEXT, DESC_F_INDIRECT
PAGE = 4096


class Guest:
    """A guest with one or two memory regions, split rings at fixed GPAs, a mediated ring
    and a dirty log; the device side is simulated by writing the mediated ring."""

    DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000   # ring GPAs (region 0)
    POOL = 0x10000                                # buffers start here

    def __init__(self, size: int = 8, *, regions=((0, 0x40000),), log_bytes: int = 64):
        self.size = size
        self.mems = [HostMemory(length) for _, length in regions]
        self.regions = [(gpa, length, mem.address) for (gpa, length), mem in zip(regions, self.mems)]
        self.table = MemoryTable(self.regions)
        self.mediated = MediatedRing(size)
        # A bytearray, not a DirtyLog: DirtyLog keeps a cffi from_buffer over a
        # memoryview, which CPython 3.11's cycle collector can crash on when a
        # failing test's traceback puts it in a reference cycle.
        self.log_buf = bytearray(log_bytes)
        self.log = self.log_buf

    def close(self) -> None:
        for mem in self.mems:
            mem.close()
        self.mediated.close()

    # guest memory by GPA
    def _at(self, gpa: int):
        for (rgpa, length, _), mem in zip(self.regions, self.mems):
            if rgpa <= gpa < rgpa + length:
                return mem.view, gpa - rgpa
        raise AssertionError(f"gpa {gpa:#x} is not guest memory")

    def write(self, gpa: int, data: bytes) -> None:
        view, off = self._at(gpa)
        view[off:off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        view, off = self._at(gpa)
        return bytes(view[off:off + length])

    def set_desc(self, i: int, addr: int, length: int, flags: int = W, nxt: int = 0,
                 table: int | None = None) -> None:
        base = self.DESC if table is None else table
        self.write(base + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def set_avail(self, flags: int = 0, used_event: int = 0) -> None:
        self.write(self.AVAIL, struct.pack("<H", flags))
        self.write(self.AVAIL + 4 + 2 * self.size, struct.pack("<H", used_event))

    def post(self, count: int) -> None:
        """The guest makes ``count`` more buffers available (avail->idx only)."""
        idx = struct.unpack("<H", self.read(self.AVAIL + 2, 2))[0]
        self.write(self.AVAIL + 2, struct.pack("<H", (idx + count) & 0xFFFF))

    def set_used_event(self, value: int) -> None:
        self.write(self.AVAIL + 4 + 2 * self.size, struct.pack("<H", value & 0xFFFF))

    def device_header(self, *, flags: int, avail_event: int) -> None:
        """The device moves its used->flags and avail_event without completing anything."""
        m = self.mediated
        struct.pack_into("<H", m.memory.view, m.used_offset, flags)
        struct.pack_into("<H", m.memory.view, m.used_offset + 4 + 8 * self.size, avail_event)

    def guest_header(self) -> tuple[int, int]:
        flags, _, _, avail_event = self.guest_used()
        return flags, avail_event

    def device_used(self, *entries: tuple[int, int], flags: int = 0, avail_event: int = 0) -> None:
        m = self.mediated
        idx = m.used_idx
        for k, (desc_id, length) in enumerate(entries):
            m.put_used(idx + k, desc_id, length)
        struct.pack_into("<H", m.memory.view, m.used_offset, flags)
        struct.pack_into("<H", m.memory.view, m.used_offset + 4 + 8 * self.size, avail_event)
        m.used_idx = (idx + len(entries)) & 0xFFFF

    def guest_used(self) -> tuple[int, int, list[tuple[int, int]], int]:
        flags, idx = struct.unpack("<HH", self.read(self.USED, 4))
        elems = [struct.unpack("<II", self.read(self.USED + 4 + 8 * s, 8)) for s in range(self.size)]
        avail_event = struct.unpack("<H", self.read(self.USED + 4 + 8 * self.size, 2))[0]
        return flags, idx, elems, avail_event

    def queue(self, **kw) -> RelayQueue:
        kw.setdefault("log", self.log)
        return RelayQueue(self.table, self.size, self.DESC, self.AVAIL, self.USED, self.mediated, **kw)

    def state(self) -> tuple:
        return (tuple(bytes(m.view) for m in self.mems), bytes(self.mediated.memory.view),
                bytes(self.log_buf))

    def pages(self) -> list[int]:
        return bitmap_pages(self.log_buf)


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.close()


def pages_of(gpa: int, length: int) -> list[int]:
    return list(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))


# --- the relay ------------------------------------------------------------------------

def test_relays_single_descriptor_chains_and_logs_their_pages(guest):
    bufs = [Guest.POOL, Guest.POOL + 0x5000, Guest.POOL + 0x9800]
    for i, addr in enumerate(bufs):
        guest.set_desc(i, addr, 2048)
    guest.device_used((2, 60), (0, 1514), (1, 64))
    q = guest.queue()
    batch = q.relay()
    assert (batch.count, batch.old_idx, batch.new_idx, batch.more) == (3, 0, 3, False)
    assert batch.signal  # avail flags 0: the guest wants interrupts
    flags, idx, elems, _ = guest.guest_used()
    assert idx == 3 and elems[:3] == [(2, 60), (0, 1514), (1, 64)]
    assert guest.pages() == sorted({p for a in bufs for p in pages_of(a, 2048)})
    assert q.last_idx == 3 and q.relayed == 3
    assert q.relay().count == 0  # nothing new: nothing written


def test_only_device_writable_buffers_of_a_chain_are_logged(guest):
    guest.set_desc(0, 0x20000, 12, flags=N, nxt=5)           # read-only header
    guest.set_desc(5, 0x21000, 1500, flags=W | N, nxt=3)
    guest.set_desc(3, 0x23FFF, 2, flags=W)                   # straddles pages 0x23/0x24
    guest.device_used((0, 1512))
    guest.queue().relay()
    assert guest.pages() == [0x21, 0x23, 0x24]


def test_indirect_table_is_walked_and_its_writable_buffers_logged(guest):
    table = 0x30000
    guest.set_desc(0, 0x31000, 100, flags=N, nxt=1, table=table)
    guest.set_desc(1, 0x32000, 9000, flags=W, table=table)   # 3 pages
    guest.set_desc(4, table, 32, flags=I)
    guest.device_used((4, 9000))
    assert guest.queue().relay().count == 1
    assert guest.pages() == pages_of(0x32000, 9000)


def test_zero_length_and_read_only_buffers_are_not_checked(guest):
    guest.set_desc(0, 0xDEAD_0000_0000, 0, flags=W)   # nowhere, but zero length
    guest.set_desc(1, 0xDEAD_0000_0000, 64, flags=0)  # nowhere, but read-only
    guest.device_used((0, 0), (1, 0))
    assert guest.queue().relay().count == 2
    assert guest.pages() == []


def test_indexes_wrap_at_65536(guest):
    for i in range(4):
        guest.set_desc(i, Guest.POOL + i * PAGE, 64)
    guest.mediated.used_idx = 0xFFFE
    guest.device_used((0, 1), (1, 2), (2, 3), (3, 4))
    q = guest.queue(last_idx=0xFFFE)
    batch = q.relay()
    assert (batch.count, batch.old_idx, batch.new_idx) == (4, 0xFFFE, 2)
    _, idx, elems, _ = guest.guest_used()
    assert idx == 2
    assert [elems[s] for s in (6, 7, 0, 1)] == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_used_flags_are_copied(guest):
    guest.set_desc(0, Guest.POOL, 64)
    guest.device_used((0, 64), flags=1)
    guest.queue().relay()
    assert guest.guest_used()[0] == 1


def test_no_interrupt_flag_suppresses_the_signal(guest):
    guest.set_desc(0, Guest.POOL, 64)
    guest.set_avail(flags=1)
    guest.device_used((0, 64))
    assert guest.queue().relay().signal is False


def test_event_idx(guest):
    for i in range(4):
        guest.set_desc(i, Guest.POOL + i * PAGE, 64)
    q = guest.queue(event_idx=True, last_idx=10)
    guest.mediated.used_idx = 10
    assert guest.mediated.used_event == 10, "init arms the device for its first entry"
    guest.set_avail(used_event=11)                 # wants an interrupt once idx passes 11
    guest.device_used((0, 1), (1, 1), avail_event=0x1234)
    batch = q.relay()                              # 10 -> 12: passes 11
    assert batch.signal
    assert guest.mediated.used_event == 12         # device: interrupt us at the next one
    assert guest.guest_used()[3] == 0x1234         # the device's kick hint reaches the guest
    guest.set_avail(used_event=20)
    guest.device_used((2, 1), (3, 1))
    assert not q.relay().signal                    # 12 -> 14 does not pass 20


def test_used_ring_is_logged_at_its_log_address(guest):
    guest.set_desc(0, Guest.POOL, 64)
    log_gpa = 0x50000 - 6                          # element 0 straddles pages 0x4f / 0x50
    guest.device_used((0, 64))
    guest.queue(log_used_gpa=log_gpa).relay()
    assert guest.pages() == sorted({Guest.POOL // PAGE, 0x4F, 0x50})


def test_capacity_and_max_entries_split_batches(guest):
    # capacity = size writable descriptors per call; each chain has two.
    for i in range(0, 8, 2):
        guest.set_desc(i, Guest.POOL + i * PAGE, 64, flags=W | N, nxt=i + 1)
        guest.set_desc(i + 1, Guest.POOL + (i + 1) * PAGE, 64)
    guest.device_used(*[(i, 1) for i in range(0, 8, 2)] * 2)   # 8 entries, 16 writes
    q = guest.queue(capacity=8)
    first = q.relay()
    assert (first.count, first.more) == (4, True)
    assert guest.guest_used()[1] == 4
    assert q.relay(max_entries=3) == (3, True, True, 4, 7)
    assert q.relay_all().count == 1
    assert guest.guest_used()[1] == 8


# --- errors touch nothing -----------------------------------------------------------

def hostile(guest: Guest, case: str) -> None:
    """Entry 0 (valid) then entry 1 broken as named; both published by the device."""
    guest.set_desc(0, Guest.POOL, 2048)
    table = 0x30000
    bad = {
        "DESC_ID": lambda: guest.device_used((0, 1), (guest.size, 1)),
        "NEXT": lambda: guest.set_desc(1, Guest.POOL, 64, flags=W | N, nxt=guest.size),
        "LOOP": lambda: (guest.set_desc(1, Guest.POOL, 64, flags=W | N, nxt=2),
                         guest.set_desc(2, Guest.POOL, 64, flags=W | N, nxt=1)),
        "INDIRECT_NEXT": lambda: guest.set_desc(1, table, 32, flags=I | N, nxt=2),
        "INDIRECT_NESTED": lambda: (guest.set_desc(0, table, 32, flags=I, table=table),
                                    guest.set_desc(1, table, 16, flags=I)),
        "INDIRECT_POS": lambda: (guest.set_desc(1, Guest.POOL, 64, flags=W | N, nxt=2),
                                 guest.set_desc(2, table, 16, flags=I)),
        "INDIRECT_LEN": lambda: guest.set_desc(1, table, 24, flags=I),
        "INDIRECT_ADDR": lambda: guest.set_desc(1, 0x40000 - 16, 32, flags=I),
        "BUF_ADDR": lambda: guest.set_desc(1, 0x40000 - 8, 16),     # crosses the end of memory
        "BUF_LOG": lambda: guest.set_desc(1, 64 * 8 * PAGE - 8, 8 + 1),  # 64-byte log: 512 pages
        "USED_IDX": lambda: setattr(guest.mediated, "used_idx", guest.size + 1),
    }
    if case != "DESC_ID":
        guest.device_used((0, 1), (1, 1))
    bad[case]()


ERROR_CASES = {
    "DESC_ID": ("RING", 1, 0, 8), "NEXT": ("RING", 1, 1, 8), "LOOP": ("RING", 1, 1, 8),
    "INDIRECT_NEXT": ("RING", 1, 1, I | N), "INDIRECT_NESTED": ("RING", 1, 0, I),
    "INDIRECT_POS": ("RING", 1, 2, I), "INDIRECT_LEN": ("RING", 1, 1, 24),
    "INDIRECT_ADDR": ("MEM", 1, 1, 0x40000 - 16), "BUF_ADDR": ("MEM", 1, 1, 0x40000 - 8),
    "BUF_LOG": ("RANGE", 1, 1, 64 * 8 * PAGE - 8), "USED_IDX": ("RING", 0, 0, 9),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_an_error_anywhere_in_the_batch_touches_nothing(case):
    guest = Guest(regions=((0, 0x40000), (0x100000, 0x10000)) if case != "BUF_LOG"
                  else ((0, 0x40000), (64 * 8 * PAGE - PAGE, 2 * PAGE)))
    try:
        hostile(guest, case)
        q = guest.queue(event_idx=True, log_used_gpa=Guest.USED)
        before = guest.state()
        with pytest.raises(RelayError) as info:
            q.relay()
        err = info.value
        code, used_idx, desc, value = ERROR_CASES[case]
        assert (err.reason_name, err.used_idx, err.desc, err.value) == (case, used_idx, desc, value)
        assert str(err).startswith(f"{code}/{case}: {err.reason_text}")
        assert guest.state() == before, "the valid entry 0 must not have been relayed either"
        assert q.last_idx == 0 and q.broken is err
        with pytest.raises(RelayError) as again:   # broken: refused without calling C
            q.relay()
        assert again.value is err
    finally:
        guest.close()


def test_a_buffer_crossing_into_an_adjacent_region_is_refused():
    guest = Guest(regions=((0, 0x20000), (0x20000, 0x20000)))
    try:
        guest.set_desc(0, 0x1FF00, 0x200)   # both bytes are memory, but in two regions
        guest.device_used((0, 1))
        with pytest.raises(RelayError, match="BUF_ADDR"):
            guest.queue().relay()
    finally:
        guest.close()


def test_relay_error_pickles_and_names_its_reason():
    err = RelayError(-3, 4, used_idx=7, desc=2, value=8)
    assert pickle.loads(pickle.dumps(err)).__dict__ == err.__dict__
    assert "loop" in reason_text(4) and err.reason_name == "LOOP"
    assert "used entry 7, ring descriptor 2" in str(err)


# --- set-up ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, reason", [
    (dict(size=3), "SIZE"),
    (dict(size=65536), "SIZE"),
    (dict(desc=0x1008), "ALIGN"),
    (dict(avail=0x2001), "ALIGN"),
    (dict(used=0x3002), "ALIGN"),
    (dict(desc=0x40000 - 64), "DESC_ADDR"),
    (dict(avail=0x50000), "AVAIL_ADDR"),
    (dict(used=0x40000 - 16), "USED_ADDR"),
    (dict(capacity=7), "CAPACITY"),
    (dict(log_used_gpa=64 * 8 * PAGE - 8), "USED_LOG"),
])
def test_set_up_refusals(guest, kwargs, reason):
    args = dict(size=8, desc=Guest.DESC, avail=Guest.AVAIL, used=Guest.USED)
    extra = {k: v for k, v in kwargs.items() if k not in args}
    args.update({k: v for k, v in kwargs.items() if k in args})
    with pytest.raises(RelayError) as info:
        RelayQueue(guest.table, args["size"], args["desc"], args["avail"], args["used"],
                   guest.mediated, log=guest.log, **extra)
    assert info.value.reason_name == reason


@pytest.mark.parametrize("regions, match", [
    ([(0, 0x1000, 1), (0x800, 0x1000, 2)], "overlaps"),
    ([(0, 0, 1)], "not a 64-bit range"),
    ([(2**64 - 0x800, 0x1000, 1)], "not a 64-bit range"),
    ([(i * 0x1000, 0x1000, 1) for i in range(9)], "at most 8"),
])
def test_memory_table_refusals(regions, match):
    with pytest.raises(ValueError, match=match):
        MemoryTable(regions)


def test_memory_table_translates_inside_one_region_only():
    table = MemoryTable([(0, 0x1000, 0x7000_0000), (0x1000, 0x1000, 0x9000_0000)])
    assert table.translate(0xFF0, 0x10) == 0x7000_0FF0
    assert table.translate(0xFF0, 0x11) is None
    assert table.translate(0x1800, 0x10) == 0x9000_0800


def test_set_log_swaps_and_refusal_keeps_the_old_log(guest):
    for i in range(3):
        guest.set_desc(i, Guest.POOL + i * PAGE, 64)
    q = guest.queue(log_used_gpa=Guest.USED)
    small = bytearray(1)                                  # 8 pages: too small for 0x9000
    with pytest.raises(RelayError, match="USED_LOG"):
        q.set_log(small, log_used_gpa=0x9000)
    guest.device_used((0, 1))
    q.relay()
    assert Guest.POOL // PAGE in guest.pages()            # still the old log
    other = bytearray(64)
    q.set_log(other)                                      # new log, used ring not logged
    guest.device_used((1, 1))
    q.relay()
    assert bitmap_pages(other) == [Guest.POOL // PAGE + 1]
    q.set_log(None)                                       # logging off
    guest.device_used((2, 1))
    assert q.relay().count == 1
    assert bitmap_pages(other) == [Guest.POOL // PAGE + 1]


# --- the bench command (format only: speed is never asserted by tests) ----------------

def test_bench_relay_writes_the_json_keys(tmp_path, capsys):
    from ifcvf.tools.cli import main

    out = tmp_path / "relay.json"
    assert main(["bench", "relay", "--sizes", "256", "--chains", "1,2", "--repeat", "1",
                 "--seconds", "0.01", "--json", str(out)]) == 0
    import json
    data = json.loads(out.read_text())
    assert data["c_entries_per_s"] > 0 and data["python_entries_per_s"] > 0
    assert (data["ring"], data["chain"], data["batch"]) == (1024, 1, 64)
    assert {(r["ring"], r["chain"]) for r in data["matrix"]} == {(256, 1), (256, 2), (1024, 1)}
    assert "C M entries/s" in capsys.readouterr().out


def test_a_dirtylog_stays_mapped_while_a_queue_logs_into_it(guest):
    log_mem = HostMemory(4096, "log")
    log = DirtyLog(log_mem.mmap)
    guest.set_desc(0, Guest.POOL, 64)
    q = guest.queue(log=log)
    log.release()
    log_mem.close()            # refused quietly: the queue still holds an export
    guest.device_used((0, 1))
    q.relay()
    assert bitmap_pages(log_mem.mmap) == [Guest.POOL // PAGE]
    q.close()
