"""A pure-Python statement of the used-ring relay (csrc/driver/relay.c), for differential tests.

Written from the semantics in csrc/driver/ifcvf_native.h, not from the C: small, slow and
obviously correct.  Guest memory is a list of regions (gpa, buffer, host address); the
host address is only used for the alignment rule on ring pointers.  Constants are
restated here on purpose; a test checks they equal the C ones.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

PAGE_SHIFT = 12
TOP = 1 << 64

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
MAX_SIZE = 32768
MAX_REGIONS = 8

OK, ERR_RANGE, ERR_ARG, ERR_RING, ERR_MEM = 0, -1, -2, -3, -4

(E_NONE, E_USED_IDX, E_DESC_ID, E_NEXT, E_LOOP, E_INDIRECT_NEXT, E_INDIRECT_NESTED,
 E_INDIRECT_POS, E_INDIRECT_LEN, E_INDIRECT_ADDR, E_BUF_ADDR, E_BUF_LOG, E_SIZE,
 E_MEM_TABLE, E_DESC_ADDR, E_AVAIL_ADDR, E_USED_ADDR, E_ALIGN, E_USED_LOG, E_CAPACITY,
 E_MEDIATED, E_NOT_READY) = range(22)

CODE = {
    E_USED_IDX: ERR_RING, E_DESC_ID: ERR_RING, E_NEXT: ERR_RING, E_LOOP: ERR_RING,
    E_INDIRECT_NEXT: ERR_RING, E_INDIRECT_NESTED: ERR_RING, E_INDIRECT_POS: ERR_RING,
    E_INDIRECT_LEN: ERR_RING, E_INDIRECT_ADDR: ERR_MEM, E_BUF_ADDR: ERR_MEM,
    E_BUF_LOG: ERR_RANGE, E_SIZE: ERR_ARG, E_MEM_TABLE: ERR_ARG, E_DESC_ADDR: ERR_MEM,
    E_AVAIL_ADDR: ERR_MEM, E_USED_ADDR: ERR_MEM, E_ALIGN: ERR_ARG, E_USED_LOG: ERR_RANGE,
    E_CAPACITY: ERR_ARG, E_MEDIATED: ERR_ARG, E_NOT_READY: ERR_ARG,
}


class Refused(Exception):
    """The oracle's error: the fields of ifc_relay_result that describe it."""

    def __init__(self, reason, idx=0, desc=0, indirect=0, value=0, length=0):
        super().__init__(reason)
        self.code = CODE[reason]
        self.reason, self.idx, self.desc, self.indirect = reason, idx, desc, indirect
        self.value, self.length = value, length & 0xFFFF_FFFF


@dataclass
class Result:
    """Mirrors struct ifc_relay_result."""
    rc: int = 0
    count: int = 0
    old_idx: int = 0
    new_idx: int = 0
    signal: int = 0
    more: int = 0
    reason: int = 0
    err_idx: int = 0
    err_desc: int = 0
    err_indirect: int = 0
    err_value: int = 0
    err_len: int = 0


def u16(buf, off):
    return struct.unpack_from("<H", buf, off)[0]


def put16(buf, off, value):
    struct.pack_into("<H", buf, off, value & 0xFFFF)


def desc_at(buf, off):
    """(addr, len, flags, next) of the 16-byte descriptor at buf[off]."""
    return struct.unpack_from("<QIHH", buf, off)


class Memory:
    """Guest memory: regions of (gpa, buffer, host address)."""

    def __init__(self, regions):
        self.regions = [(gpa, memoryview(buf).cast("B"), hva) for gpa, buf, hva in regions]

    def valid(self):
        if len(self.regions) > MAX_REGIONS:
            return False
        for i, (gpa, buf, hva) in enumerate(self.regions):
            if len(buf) == 0 or hva == 0 or gpa + len(buf) > TOP or hva + len(buf) > TOP:
                return False
            for ogpa, obuf, _ in self.regions[:i]:
                if gpa < ogpa + len(obuf) and ogpa < gpa + len(buf):
                    return False
        return True

    def find(self, gpa, length):
        """(buffer, offset, host address) of [gpa, gpa+length) inside one region, or None."""
        for rgpa, buf, hva in self.regions:
            if rgpa <= gpa and gpa + length <= rgpa + len(buf):
                return buf, gpa - rgpa, hva + gpa - rgpa
        return None


def set_pages(log, first, last):
    for page in range(first, last + 1):
        log[page >> 3] |= 1 << (page & 7)


class OracleQueue:
    """One queue: __init__ is ifc_relay_queue_init (raises Refused), relay() is ifc_relay_used.

    mediated = (buffer, avail offset, used offset, host address of the buffer).
    """

    def __init__(self, memory: Memory, size, desc_gpa, avail_gpa, used_gpa, mediated, *,
                 last_idx=0, event_idx=False, log=None, log_used_gpa=None, capacity=None):
        self.mem = memory
        self.size = size
        self.event_idx = event_idx
        self.log = log
        self.log_used_gpa = log_used_gpa
        self.capacity = 4 * size if capacity is None else capacity
        if not (1 <= size <= MAX_SIZE and size & (size - 1) == 0):
            raise Refused(E_SIZE, value=size)
        if not memory.valid():
            raise Refused(E_MEM_TABLE, value=len(memory.regions))
        self.desc = self._ring(desc_gpa, 16 * size, 16, E_DESC_ADDR)
        self.avail = self._ring(avail_gpa, 6 + 2 * size, 2, E_AVAIL_ADDR)
        self.used = self._ring(used_gpa, 6 + 8 * size, 4, E_USED_ADDR)
        self.mbuf, m_avail, m_used, m_host = mediated
        if m_host + m_avail == 0 or (m_host + m_avail) % 2:
            raise Refused(E_MEDIATED, value=m_host + m_avail)
        if m_host + m_used == 0 or (m_host + m_used) % 4:
            raise Refused(E_MEDIATED, value=m_host + m_used)
        self.m_avail, self.m_used = m_avail, m_used
        if self.capacity < size:
            raise Refused(E_CAPACITY, value=self.capacity)
        self._check_used_log(log, log_used_gpa)
        self.last = last_idx & 0xFFFF
        if event_idx:
            put16(self.mbuf, self.m_avail + 4 + 2 * size, self.last)

    def _ring(self, gpa, length, align, reason):
        if gpa % align:
            raise Refused(E_ALIGN, value=gpa, length=length)
        found = self.mem.find(gpa, length)
        if found is None:
            raise Refused(reason, value=gpa, length=length)
        buf, off, host = found
        if host % align:
            raise Refused(E_ALIGN, value=gpa, length=length)
        return buf, off

    def _check_used_log(self, log, gpa):
        if log is None or gpa is None:
            return
        length = 6 + 8 * self.size
        last = gpa + length - 1
        if last >= TOP or (last >> PAGE_SHIFT) >> 3 >= len(log):
            raise Refused(E_USED_LOG, value=gpa, length=length)

    def set_log(self, log, log_used_gpa=None):
        self._check_used_log(log, log_used_gpa)
        self.log, self.log_used_gpa = log, log_used_gpa

    # --- the relay ------------------------------------------------------------
    def relay(self, max_entries=0) -> Result:
        try:
            return self._relay(max_entries)
        except Refused as err:
            return Result(err.code, 0, self.last, self.last, 0, 0, err.reason, err.idx, err.desc,
                          err.indirect, err.value, err.length)

    def _relay(self, max_entries):
        size, last, mbuf = self.size, self.last, self.mbuf
        m_idx = u16(mbuf, self.m_used + 2)
        pending = (m_idx - last) & 0xFFFF
        if pending > size:
            raise Refused(E_USED_IDX, idx=last, value=m_idx)
        n = min(pending, max_entries) if max_entries else pending
        pages, writes, count = set(), 0, 0
        for k in range(n):
            idx = (last + k) & 0xFFFF
            desc_id = struct.unpack_from("<I", mbuf, self.m_used + 4 + 8 * (idx % size))[0]
            if desc_id >= size:
                raise Refused(E_DESC_ID, idx=idx, value=desc_id)
            entry = []   # (first_page, last_page) of each writable descriptor
            dbuf, doff = self.desc
            self._walk(idx, dbuf, doff, size, desc_id, 0, entry)
            if writes + len(entry) > self.capacity:
                break    # valid, but does not fit: the next call starts here
            writes += len(entry)
            for first, lastp in entry:
                pages.update(range(first, lastp + 1))
            count += 1
        new = (last + count) & 0xFFFF
        res = Result(count, count, last, new)
        if count:
            self._commit(last, count, new, pages, res)
        elif self._mirror_header() and self.log is not None and self.log_used_gpa is not None:
            self._log_used(self._header_bytes())
        res.more = int(u16(mbuf, self.m_used + 2) != new)
        return res

    def _header_bytes(self):
        """(offset, length) of used->flags+idx and, with EVENT_IDX, avail_event."""
        return [(0, 4)] + ([(4 + 8 * self.size, 2)] if self.event_idx else [])

    def _mirror_header(self):
        """Guest used->flags and avail_event follow the mediated ones; True if either changed."""
        ubuf, uoff = self.used
        changed = False
        for off in [0] + ([4 + 8 * self.size] if self.event_idx else []):
            value = u16(self.mbuf, self.m_used + off)
            if u16(ubuf, uoff + off) != value:
                put16(ubuf, uoff + off, value)
                changed = True
        return changed

    def _log_used(self, written):
        base = self.log_used_gpa
        for off, length in written:
            set_pages(self.log, (base + off) >> PAGE_SHIFT, (base + off + length - 1) >> PAGE_SHIFT)

    def _walk(self, idx, buf, off, n_max, i, level, entry):
        count = 0
        while True:
            if count == n_max:
                raise Refused(E_LOOP, idx, i, level, n_max)
            count += 1
            addr, length, flags, nxt = desc_at(buf, off + 16 * i)
            if flags & F_INDIRECT:
                fail = dict(idx=idx, desc=i, indirect=level, value=flags, length=length)
                if level:
                    raise Refused(E_INDIRECT_NESTED, **fail)
                if count > 1:
                    raise Refused(E_INDIRECT_POS, **fail)
                if flags & F_NEXT:
                    raise Refused(E_INDIRECT_NEXT, **fail)
                if length == 0 or length % 16 or length // 16 > self.size:
                    raise Refused(E_INDIRECT_LEN, idx, i, level, length, length)
                table = self.mem.find(addr, length)
                if table is None:
                    raise Refused(E_INDIRECT_ADDR, idx, i, level, addr, length)
                self._walk(idx, table[0], table[1], length // 16, 0, 1, entry)
                return
            if flags & F_WRITE and length:
                if self.mem.find(addr, length) is None:
                    raise Refused(E_BUF_ADDR, idx, i, level, addr, length)
                first, lastp = addr >> PAGE_SHIFT, (addr + length - 1) >> PAGE_SHIFT
                if self.log is not None and lastp >> 3 >= len(self.log):
                    raise Refused(E_BUF_LOG, idx, i, level, addr, length)
                entry.append((first, lastp))
            if not flags & F_NEXT:
                return
            if nxt >= n_max:
                raise Refused(E_NEXT, idx, i, level, nxt, length)
            i = nxt

    def _commit(self, last, count, new, pages, res):
        size, mbuf, m_used = self.size, self.mbuf, self.m_used
        ubuf, uoff = self.used
        abuf, aoff = self.avail
        log = self.log
        if log is not None:
            for page in pages:
                set_pages(log, page, page)
        for k in range(count):
            slot = (last + k) % size
            src = m_used + 4 + 8 * slot
            ubuf[uoff + 4 + 8 * slot:uoff + 12 + 8 * slot] = mbuf[src:src + 8]
        self._mirror_header()                                                # flags, avail_event
        put16(ubuf, uoff + 2, new)                                           # idx
        if log is not None and self.log_used_gpa is not None:
            self._log_used(self._header_bytes()
                           + [(4 + 8 * ((last + k) % size), 8) for k in range(count)])
        if self.event_idx:
            put16(mbuf, self.m_avail + 4 + 2 * size, new)                    # used_event
            used_event = u16(abuf, aoff + 4 + 2 * size)
            res.signal = int((new - used_event - 1) & 0xFFFF < (new - last) & 0xFFFF)
        else:
            res.signal = int(not u16(abuf, aoff) & AVAIL_F_NO_INTERRUPT)
        self.last = new
