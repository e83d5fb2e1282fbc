"""The QEMU role: a vhost-user front-end that drives a back-end over a real socket.

It reproduces the message orders recorded from real front-ends
(reference/real-peers.md): QEMU 7.2 with and without the STATUS protocol
feature, and DPDK virtio-user.  Guest RAM is handed over as memfd regions, as
QEMU's memory-backend-memfd does; front-end addresses (UVAs) are the host
addresses of our own mapping, so the back-end must translate them.

In a simulation the back-end runs in this process without threads: after each
message ``pump()`` lets it handle what is pending (the server's
``poll_once``), then the reply is already in the socket.  Against a back-end
in another process ``pump`` is a no-op and replies are awaited with a timeout.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Callable

from ifcvf.vhost import protocol as p
from ifcvf.vhost.channel import Frame, MessageReader, close_fds, recv_message, send_message

R = p.Request
PF = p.ProtocolFeature

QEMU_7_2 = "qemu-7.2"
DPDK_VIRTIO_USER = "dpdk-virtio-user"
STYLES = (QEMU_7_2, DPDK_VIRTIO_USER)

STATUS_ACK, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK = 1, 2, 4, 8

# What QEMU 7.2's vhost-user net front-end can take of what a back-end offers.
QEMU_PROTOCOL = p.protocol_mask(PF.MQ, PF.LOG_SHMFD, PF.RARP, PF.REPLY_ACK, PF.NET_MTU,
                                PF.BACKEND_REQ, PF.BACKEND_SEND_FD, PF.HOST_NOTIFIER,
                                PF.CONFIGURE_MEM_SLOTS, PF.STATUS)
# virtio-user takes MQ and REPLY_ACK (and STATUS against DPDK's vhost), not LOG_SHMFD.
DPDK_PROTOCOL = p.protocol_mask(PF.MQ, PF.REPLY_ACK, PF.STATUS)


class FrontEndError(Exception):
    """The back-end answered wrongly, failed a request, or went away."""


@dataclass
class Region:
    """One guest RAM region handed to the back-end."""

    gpa: int
    size: int
    fd: int
    uva: int
    mmap_offset: int = 0


@dataclass
class RingAddresses:
    """A vring as the guest laid it out, in guest-physical addresses."""

    index: int
    size: int
    desc: int
    avail: int
    used: int


@dataclass
class FrontEnd:
    sock: socket.socket
    pump: Callable[[], None] = lambda: None
    style: str = QEMU_7_2
    use_status: bool = True
    timeout: float = 5.0
    name: str = "frontend"
    features: int = 0                 # what the back-end offered
    protocol_features: int = 0        # what we acked
    queue_num: int = 1
    acked_features: int = 0
    regions: list[Region] = field(default_factory=list)
    backend_channel: socket.socket | None = None
    log: list[str] = field(default_factory=list)
    backend_requests: list[p.BackendMessage] = field(default_factory=list)
    kick_fds: dict[int, int] = field(default_factory=dict)
    call_fds: dict[int, int] = field(default_factory=dict)
    status: int = 0

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"front-end style {self.style!r}; known: {', '.join(STYLES)}")
        self._reader = MessageReader()

    # --- messages ------------------------------------------------------------------
    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features >> PF.REPLY_ACK & 1)

    def send(self, request: p.Request, payload=None, fds=(), *, need_reply: bool = False) -> p.Reply | None:
        """Send one request; return its reply (own reply, or the ack if one was asked)."""
        need_reply = need_reply and self.reply_ack
        self.log.append(request.name)
        send_message(self.sock, p.encode_request(request, payload, need_reply=need_reply), fds)
        self.pump()
        expects = p.REQUEST_SPECS[request].reply is not None
        if request is R.SET_LOG_BASE and not self.protocol_features >> PF.LOG_SHMFD & 1:
            expects = False
        if not expects and not need_reply:
            return None
        reply = self._read_reply(request)
        if need_reply and not expects and reply.failed:
            raise FrontEndError(f"{self.name}: back-end failed {request.name}")
        return reply

    def _read_reply(self, request: p.Request) -> p.Reply:
        try:
            frame: Frame = recv_message(self.sock, self.timeout)
        except (OSError, p.ProtocolError) as err:
            raise FrontEndError(f"{self.name}: no reply to {request.name}: {err}") from None
        try:
            return p.parse_reply(frame.header, frame.payload, request, frame.fds)
        except p.ProtocolError as err:
            close_fds(frame.fds)
            raise FrontEndError(f"{self.name}: bad reply to {request.name}: {err}") from None

    def get_u64(self, request: p.Request) -> int:
        reply = self.send(request)
        return reply.payload.value

    def service_backend_channel(self) -> list[p.BackendMessage]:
        """Handle back-end requests (host notifiers, config changes): ack each as QEMU would."""
        if self.backend_channel is None:
            return []
        try:
            frames = self._reader.read_from(self.backend_channel)
        except (OSError, p.ProtocolError):
            return []
        handled = []
        for frame in frames:
            msg = p.parse_backend_request(frame.header, frame.payload, frame.fds)
            close_fds(msg.fds)
            self.backend_requests.append(msg)
            handled.append(msg)
            if msg.need_reply:
                # No page-per-vq mapping here: host notifiers are refused, as
                # QEMU refuses them when it cannot map the area.
                ok = msg.request is not p.BackendRequest.VRING_HOST_NOTIFIER_MSG
                send_message(self.backend_channel, p.encode_ack(msg.request, ok))
        if handled:
            self.pump()
        return handled

    # --- the sequences -----------------------------------------------------------
    def connect(self, vrings: int) -> None:
        """Negotiate as the front-end does when the device is created."""
        if self.style == DPDK_VIRTIO_USER:
            self.send(R.SET_OWNER)
        self.features = self.get_u64(R.GET_FEATURES)
        if self.features >> p.F_PROTOCOL_FEATURES & 1:
            offered = self.get_u64(R.GET_PROTOCOL_FEATURES)
            mine = QEMU_PROTOCOL if self.style == QEMU_7_2 else DPDK_PROTOCOL
            if not self.use_status:
                mine &= ~(1 << PF.STATUS)
            self.protocol_features = offered & mine
            self.send(R.SET_PROTOCOL_FEATURES, p.U64(self.protocol_features))
        if self.protocol_features >> PF.MQ & 1:
            self.queue_num = self.get_u64(R.GET_QUEUE_NUM)
        if self.style == QEMU_7_2:
            if self.protocol_features >> PF.BACKEND_REQ & 1:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                self.backend_channel = ours
                self.send(R.SET_BACKEND_REQ_FD, fds=[theirs.fileno()], need_reply=True)
                theirs.close()
            self.send(R.SET_OWNER)
            self.get_u64(R.GET_FEATURES)
            for i in range(vrings):
                self._set_call(i)
                self._send_fd(R.SET_VRING_ERR, i)
            if self.protocol_features:
                for i in range(vrings):
                    self.send(R.SET_VRING_ENABLE, p.VringState(i, 1))
        else:
            for i in range(vrings):
                self._set_call(i)

    def _send_fd(self, request: p.Request, index: int) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.send(request, p.VringFd(index), fds=[fd])
        finally:
            os.close(fd)  # the back-end has its own copy now
        return fd

    def _set_kept_fd(self, request: p.Request, index: int, kept: dict[int, int]) -> None:
        """A fresh eventfd for a vring; we keep our end (to kick, or to see interrupts)."""
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.send(request, p.VringFd(index), fds=[fd])
        old = kept.pop(index, None)
        if old is not None:
            os.close(old)
        kept[index] = fd

    def _set_call(self, index: int) -> None:
        self._set_kept_fd(R.SET_VRING_CALL, index, self.call_fds)

    def _set_kick(self, index: int) -> None:
        self._set_kept_fd(R.SET_VRING_KICK, index, self.kick_fds)

    def set_memory(self, regions: list[Region]) -> None:
        self.regions = list(regions)
        table = p.MemoryTable(tuple(p.MemoryRegion(r.gpa, r.size, r.uva, r.mmap_offset) for r in regions))
        self.send(R.SET_MEM_TABLE, table, fds=[r.fd for r in regions], need_reply=True)

    def uva(self, gpa: int) -> int:
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r.uva + gpa - r.gpa
        raise FrontEndError(f"GPA {gpa:#x} is not in guest memory")

    def _add_status(self, bits: int) -> None:
        if self.protocol_features >> PF.STATUS & 1:
            current = self.get_u64(R.GET_STATUS)
            self.status = current | bits
            self.send(R.SET_STATUS, p.U64(self.status))

    def _setup_ring(self, ring: RingAddresses, base: int, log_gpa: int, log: bool) -> None:
        self.send(R.SET_VRING_NUM, p.VringState(ring.index, ring.size))
        self.send(R.SET_VRING_BASE, p.VringState(ring.index, base))
        self.send_vring_addr(ring, log_gpa, log)
        self._set_kick(ring.index)
        if self.style == QEMU_7_2:
            self._set_call(ring.index)

    def send_vring_addr(self, ring: RingAddresses, log_gpa: int, log: bool) -> None:
        addr = p.VringAddr(ring.index, p.VRING_F_LOG if log else 0, self.uva(ring.desc),
                           self.uva(ring.used), self.uva(ring.avail), log_gpa)
        # QEMU waits for the back-end when the log flag changes (enforce_reply).
        self.send(R.SET_VRING_ADDR, addr, need_reply=log)

    def start(self, features: int, regions: list[Region], rings: list[RingAddresses], *,
              bases: dict[int, int] | None = None, enabled_pairs: int | None = None,
              log_all: bool = False) -> None:
        """What the front-end sends when the guest driver sets DRIVER_OK."""
        bases = bases or {}
        self.acked_features = features
        pairs = (len(rings) + 1) // 2
        enabled_pairs = pairs if enabled_pairs is None else enabled_pairs
        if self.style == QEMU_7_2:
            # One vhost_dev per queue pair: SET_FEATURES each time, the memory
            # table only on the first, STATUS DRIVER_OK after the last.
            for pair in range(pairs):
                self.send(R.SET_FEATURES, p.U64(features), need_reply=log_all)
                self._add_status(STATUS_FEATURES_OK)
                if pair == 0:
                    self.set_memory(regions)
                for ring in rings[2 * pair:2 * pair + 2]:
                    self._setup_ring(ring, bases.get(ring.index, 0), ring.used, log_all)
            self._add_status(STATUS_ACK | STATUS_DRIVER | STATUS_DRIVER_OK)
            for ring in rings:
                self.send(R.SET_VRING_ENABLE, p.VringState(ring.index, int(ring.index // 2 < enabled_pairs)))
        else:
            self.send(R.SET_FEATURES, p.U64(features))
            self.set_memory(regions)
            for ring in rings:
                self._setup_ring(ring, bases.get(ring.index, 0), ring.used, log_all)
            for ring in rings:
                if ring.index // 2 < enabled_pairs:
                    self.send(R.SET_VRING_ENABLE, p.VringState(ring.index, 1))
            self._add_status(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
        self.service_backend_channel()

    def set_queue_pairs(self, rings: list[RingAddresses], pairs: int) -> None:
        """The guest's ``ethtool -L combined N``: enable the first N pairs, disable the rest."""
        for ring in rings:
            self.send(R.SET_VRING_ENABLE, p.VringState(ring.index, int(ring.index // 2 < pairs)),
                      need_reply=True)

    def stop(self, rings: list[RingAddresses]) -> dict[int, int]:
        """What the front-end sends when the VM stops: returns each ring's base."""
        if self.style == QEMU_7_2:
            if self.protocol_features >> PF.STATUS & 1:
                self.status = 0
                self.send(R.SET_STATUS, p.U64(0))  # 7.2 sends it *before* GET_VRING_BASE
        else:
            for ring in rings:
                self.send(R.SET_VRING_ENABLE, p.VringState(ring.index, 0))
        bases = {}
        for ring in rings:
            reply = self.send(R.GET_VRING_BASE, p.VringState(ring.index, 0))
            if reply.payload.index != ring.index:
                raise FrontEndError(f"GET_VRING_BASE {ring.index} answered for ring {reply.payload.index}")
            bases[ring.index] = reply.payload.num
        return bases

    # --- migration ---------------------------------------------------------------
    def set_log_base(self, fd: int, size: int, offset: int = 0) -> None:
        self.send(R.SET_LOG_BASE, p.Log(size, offset), fds=[fd])

    def set_log_all(self, on: bool, rings: list[RingAddresses]) -> None:
        """QEMU's vhost_dev_set_log: SET_FEATURES, then each ring's address with the log flag."""
        features = self.acked_features | (1 << p.F_LOG_ALL) if on else self.acked_features & ~(1 << p.F_LOG_ALL)
        self.acked_features = features
        self.send(R.SET_FEATURES, p.U64(features), need_reply=True)
        for ring in rings:
            self.send_vring_addr(ring, ring.used, on)

    def close(self) -> None:
        for fd in list(self.kick_fds.values()) + list(self.call_fds.values()):
            os.close(fd)
        self.kick_fds.clear()
        self.call_fds.clear()
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        self._reader.close()
        self.sock.close()
