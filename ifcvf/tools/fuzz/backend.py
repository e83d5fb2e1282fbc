"""Fuzz target ``backend``: the vhost-user back-end state machine on a simulated VF.

A case builds a host (one simulated VF with a driver and a back-end behind
the server), optionally brings the VF up the way QEMU 7.2 or DPDK does, then
sends a drawn sequence of messages over the real socket: well-formed requests
with drawn values (features with and without LOG_ALL, memory tables over a real
memfd, or a sparse one too large to map, with drawn gpa/size/uva/offset, ring
sizes, ring addresses inside and outside the table, bases, kick/call/err
eventfds or none, logs of drawn sizes in either memfd, statuses, a back-end
channel), the same requests out of order, raw headers with random payloads,
and wrong fd counts.  Replies are read and dropped.

Properties: the server never raises and logs no unexpected error (a
contained bug is still a bug); a bystander VF on the same server still
answers afterwards; after the front-end goes away every fd the
case created is closed (no fd leaks, including eventfds and memfds), the
VF's IOMMU domain holds no mapping and the VF is stopped.
"""
from __future__ import annotations

import os
import socket
import struct

from hypothesis import HealthCheck, given, settings, strategies as st

from hal.memory import HostMemory
from ifcvf.tools.fuzz.common import ErrorLog, open_fds
from ifcvf.tools.runs.bringup import GUEST_FEATURES, split_ring_layout
from ifcvf.tools.runs.stack import SimHost
from ifcvf.vhost import protocol as p
from ifcvf.vhost.channel import close_fds, send_message
from sim.config import IfcvfConfig
from sim.frontend import DPDK_VIRTIO_USER, QEMU_7_2, Region, RingAddresses

R = p.Request
MiB = 1 << 20
RAM_SIZE = 4 * MiB
U64_MAX = (1 << 64) - 1

_ram: HostMemory | None = None
_log: HostMemory | None = None
_sparse: int | None = None
SPARSE_SIZE = 1 << 62      # holds whatever size a table or log asks; a large one maps nowhere


def sparse_fd() -> int:
    """A memfd as large as a file can claim, made once per process: a table or
    log may ask it for any size a file holds, and a large one fails to map."""
    global _sparse
    if _sparse is None:
        _sparse = os.memfd_create("fuzz-sparse", os.MFD_CLOEXEC)
        os.ftruncate(_sparse, SPARSE_SIZE)
    return _sparse


def shared_memory() -> tuple[HostMemory, HostMemory]:
    """Guest RAM and a log memfd, made once per process (the case's fds are dups),
    and the sparse memfd, so that none of them counts as a case's leak."""
    global _ram, _log
    if _ram is None:
        _ram = HostMemory(RAM_SIZE, "fuzz-guest")
        _log = HostMemory(64 * 1024, "fuzz-log")
        sparse_fd()
    return _ram, _log


def rings_for(pairs: int, size: int = 64, base: int = 0x10_0000) -> list[RingAddresses]:
    rings = []
    for q in range(2 * pairs):
        desc, avail, used, base = split_ring_layout(base, size)
        rings.append(RingAddresses(q, size, desc, avail, used))
    return rings


u64 = st.integers(0, U64_MAX)
index = st.sampled_from([0, 1, 2, 3, 4, 255, 256]) | st.integers(0, 0xFFFF_FFFF)
ring_num = st.sampled_from([0, 1, 2, 3, 64, 255, 256, 1024, 32768, 65535, 65536]) | st.integers(0, 0xFFFF_FFFF)
gpa = st.sampled_from([0, 0x1000, 0x10_0000, RAM_SIZE - 0x1000, RAM_SIZE, 1 << 40, U64_MAX - 0xFFF]) | u64
size = st.sampled_from([0, 1, 0x1000, RAM_SIZE // 2, RAM_SIZE, RAM_SIZE + 0x1000, 1 << 40,
                        1 << 50, U64_MAX]) | u64     # (1 << 50: fits the sparse memfd, maps nowhere)
offset = st.sampled_from([0, 0x1000, RAM_SIZE, U64_MAX]) | u64
UVA = 0x7F00_0000_0000
memory_fd = st.sampled_from(["ram", "ram", "ram", "sparse"])   # guest RAM, or a file too big to map


@st.composite
def uvas(draw):
    return draw(st.sampled_from([UVA, UVA + 0x10_0000, UVA + 0x11_0000, UVA + RAM_SIZE - 8, 0]) | u64)


@st.composite
def mem_region(draw):
    return p.MemoryRegion(draw(gpa), draw(size), draw(uvas()), draw(offset))


@st.composite
def well_formed(draw):
    """(request, payload, fd kinds, need_reply)."""
    r = draw(st.sampled_from([R.GET_FEATURES, R.SET_FEATURES, R.GET_PROTOCOL_FEATURES,
                              R.SET_PROTOCOL_FEATURES, R.SET_OWNER, R.RESET_OWNER, R.SET_MEM_TABLE,
                              R.SET_LOG_BASE, R.SET_LOG_FD, R.SET_VRING_NUM, R.SET_VRING_ADDR,
                              R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_KICK, R.SET_VRING_CALL,
                              R.SET_VRING_ERR, R.GET_QUEUE_NUM, R.SET_VRING_ENABLE, R.SEND_RARP,
                              R.SET_BACKEND_REQ_FD, R.SET_STATUS, R.GET_STATUS, R.ADD_MEM_REG,
                              R.REM_MEM_REG, R.GET_CONFIG, R.SET_CONFIG, R.GET_MAX_MEM_SLOTS]))
    need_reply = draw(st.booleans())
    fds: list[str] = []
    payload = None
    if r in (R.SET_FEATURES,):
        payload = p.U64(draw(st.sampled_from([GUEST_FEATURES | 1 << p.F_PROTOCOL_FEATURES,
                                              GUEST_FEATURES | 1 << p.F_PROTOCOL_FEATURES | 1 << p.F_LOG_ALL,
                                              0, 1 << p.F_LOG_ALL]) | u64))
    elif r is R.SET_PROTOCOL_FEATURES:
        payload = p.U64(draw(st.sampled_from([p.QEMU_7_2_PROTOCOL_FEATURES, 0]) | u64))
    elif r is R.SET_MEM_TABLE:
        regions = draw(st.lists(mem_region(), min_size=0, max_size=p.MAX_REGIONS))
        if regions and draw(st.booleans()):
            regions[0] = p.MemoryRegion(0, RAM_SIZE, UVA, 0)
        payload = p.MemoryTable(tuple(regions))
        fds = [draw(memory_fd)] * draw(st.sampled_from([len(regions), len(regions),
                                                        max(0, len(regions) - 1), len(regions) + 1]))
    elif r in (R.ADD_MEM_REG, R.REM_MEM_REG):
        payload = p.SingleRegion(draw(mem_region()))
        fds = [draw(memory_fd)] * draw(st.sampled_from([1, 1, 0, 2]))
    elif r is R.SET_LOG_BASE:
        payload = p.Log(draw(st.sampled_from([0, 8, 64, RAM_SIZE // 4096 // 8, 64 * 1024, 64 * 1024 + 8,
                                              1 << 40]) | u64), draw(offset))
        fds = [draw(st.sampled_from(["log", "log", "sparse"]))] * draw(st.sampled_from([1, 1, 0, 2]))
    elif r is R.SET_LOG_FD:
        fds = ["event"]
    elif r in (R.SET_VRING_NUM, R.SET_VRING_BASE):
        payload = p.VringState(draw(index), draw(ring_num))
    elif r is R.GET_VRING_BASE:
        payload = p.VringState(draw(index), 0)
    elif r is R.SET_VRING_ENABLE:
        payload = p.VringState(draw(index), draw(st.sampled_from([0, 1])))
    elif r is R.SET_VRING_ADDR:
        payload = p.VringAddr(draw(index), draw(st.sampled_from([0, 1])), draw(uvas()), draw(uvas()),
                              draw(uvas()), draw(gpa))
    elif r in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        nofd = draw(st.booleans())
        payload = p.VringFd(draw(index) & 0xFF, nofd)
        fds = [] if nofd and draw(st.integers(0, 3)) else ["event"]
    elif r is R.SET_STATUS:
        payload = p.U64(draw(st.sampled_from([0, 1, 3, 0xB, 0xF, 0x4F, 0x80]) | st.integers(0, 0xFF)))
    elif r is R.SEND_RARP:
        payload = p.U64(draw(u64))
    elif r is R.SET_BACKEND_REQ_FD:
        fds = ["socket"]
    elif r in (R.GET_CONFIG, R.SET_CONFIG):
        payload = draw(st.binary(max_size=40))
    return ("msg", r, payload, fds, need_reply)


@st.composite
def raw(draw):
    code = draw(st.sampled_from(sorted(R)) | st.integers(0, 0xFFFF_FFFF))
    flags = draw(st.sampled_from([p.VERSION, p.VERSION | p.FLAG_NEED_REPLY]) | st.integers(0, 0xFFFF_FFFF))
    body = draw(st.binary(max_size=120))
    fds = draw(st.lists(st.sampled_from(["event", "ram", "log", "sparse"]), max_size=9))
    return ("raw", code, flags, body, fds)


ops = st.one_of(well_formed(), well_formed(), raw())


class Case:
    def __init__(self):
        self.ram, self.log = shared_memory()
        self.extra: list[int] = []     # fds of ours to close at the end (channel peers)

    def fds(self, kinds: list[str]) -> list[int]:
        out = []
        for k in kinds:
            if k == "ram":
                out.append(os.dup(self.ram.fd))
            elif k == "log":
                out.append(os.dup(self.log.fd))
            elif k == "sparse":
                out.append(os.dup(sparse_fd()))
            elif k == "event":
                out.append(os.eventfd(0, os.EFD_CLOEXEC))
            else:
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                self.extra.append(a.detach())
                out.append(b.detach())
        return out


def drain(sock: socket.socket) -> bool:
    """Read and drop what the back-end answered; False when it closed the connection."""
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(64), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                close_fds(struct.unpack(f"{len(blob) // 4}i", blob[:len(blob) // 4 * 4]))
        if not data:
            return False


@settings(database=None, deadline=None, suppress_health_check=list(HealthCheck), max_examples=100)
@given(prefix=st.sampled_from(["none", "qemu", "dpdk", "qemu-log"]), pairs=st.sampled_from([1, 2]),
       sequence=st.lists(ops, max_size=24))
def PROPERTY(prefix, pairs, sequence):
    ram, log = shared_memory()
    before = open_fds()
    with ErrorLog() as errors:
        host = SimHost(seed=7)
        case = Case()
        closed = False
        try:
            vf = host.add_vf(IfcvfConfig(queue_pairs=2))
            fe = host.connect(vf, style=DPDK_VIRTIO_USER if prefix == "dpdk" else QEMU_7_2)
            other = host.connect(host.add_vf(IfcvfConfig(queue_pairs=1)))   # a bystander VF
            if prefix != "none":
                rings = rings_for(pairs)
                fe.connect(len(rings))
                features = fe.features & (GUEST_FEATURES | 1 << p.F_PROTOCOL_FEATURES)
                fe.start(features, [Region(0, RAM_SIZE, ram.fd, UVA)], rings)
                if prefix == "qemu-log":
                    fe.set_log_base(log.fd, RAM_SIZE // 4096 // 8)
                    fe.set_log_all(True, rings)
            for op in sequence:
                if op[0] == "msg":
                    _, r, payload, kinds, need_reply = op
                    body = payload if isinstance(payload, bytes) else payload.pack() if payload else None
                    data = p.encode_request(r, body, need_reply=need_reply)
                else:
                    _, code, flags, body, kinds = op
                    data = struct.pack("<III", code, flags, len(body)) + body
                fds = case.fds(kinds)
                try:
                    send_message(fe.sock, data, fds[:p.MAX_FDS])
                except (OSError, ValueError):
                    closed = True
                finally:
                    close_fds(fds)
                host.pump()
                if not drain(fe.sock):
                    closed = True
                if closed:
                    break
            # Whatever happened to the fuzzed connection, the other VF still serves.
            assert other.get_u64(R.GET_FEATURES) == host.vfs[1].backend.offered_features
        finally:
            host.close()
            close_fds(case.extra)
        assert not errors.unexpected(), errors.unexpected()[0]
        assert vf.model.iommu.mappings() == [], f"mappings left: {vf.model.iommu.mappings()}"
    leaked = open_fds() - before
    assert not leaked, f"fds leaked: {sorted(leaked)} " + ", ".join(
        os.readlink(f"/proc/self/fd/{fd}") for fd in sorted(leaked) if os.path.exists(f"/proc/self/fd/{fd}"))
