"""One vhost-user connection: the back-end state machine in front of one VF.

Messages come in validated by the codec; each handler (one per request, in
the ``HANDLERS`` table) checks everything the front-end controls *before*
changing any state, so a refused message leaves the connection exactly as it
was.  The state machine does no socket I/O: replies, the back-end channel fd
the front-end hands over, and the requests to send on it are all returned
to the transport (``Outcome``, ``take_backend_requests``).  The VF is configured (``dev_conf``) when the
device becomes ready as DPDK defines it (the first queue pair's rings have
translated addresses, kick and call fds and are enabled; with STATUS, the
driver set DRIVER_OK), and only after the reply to the message that made it
ready has gone out: ``handle`` returns the replies, the transport sends them,
then calls ``after_reply``.

The object is transport-neutral: the socket server and the simulator's QEMU
role both feed it frames and send what it returns.
"""
from __future__ import annotations

import logging
import mmap
import os
import stat
import threading
from dataclasses import dataclass, field
from typing import Callable

from hal.memory import HostMemory
from ifcvf import ids, vring
from ifcvf.dirtylog import DirtyLog
from ifcvf.vdpa import DeviceSetup, VdpaDevice, VdpaError, Vring
from ifcvf.vhost import protocol as p
from ifcvf.vhost.channel import Frame, close_fds
from ifcvf.vhost.memory import GuestMemory, GuestMemoryError

log = logging.getLogger("ifcvf.vhost")

R = p.Request
PF = p.ProtocolFeature
MAX_RING_SIZE = 32768
#: What this back-end offers: the vDPA set DPDK's IFCVF driver offers.  Not
#: PROTOCOL_F_RARP: the VF cannot send the RARP QEMU's SEND_RARP asks for; the
#: guest announces itself (GUEST_ANNOUNCE, always offered with CTRL_VQ), and a
#: guest that does not is found again when it transmits (README, "The network
#: around the VF"; tests/sim/test_announce.py).
OFFERED_PROTOCOL = p.protocol_mask(PF.MQ, PF.LOG_SHMFD, PF.REPLY_ACK, PF.BACKEND_REQ,
                                   PF.BACKEND_SEND_FD, PF.HOST_NOTIFIER, PF.STATUS)


class Refused(Exception):
    """A request that is well formed but cannot be honoured now; nothing changed."""


@dataclass
class VringSetup:
    """What the front-end told us about one vring."""

    index: int
    num: int = 0
    last_avail: int = 0
    last_used: int = 0
    addr: p.VringAddr | None = None
    gpas: tuple[int, int, int] | None = None   # desc, avail, used (translated)
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    kick_set: bool = False
    call_set: bool = False
    enabled: bool = False

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
            setattr(self, name, -1)




@dataclass
class LogMapping:
    """The dirty log from SET_LOG_BASE (the driver's LogArea).

    ``memory`` spans whole pages, because the driver DMA-maps the log in pages
    for the VF's own logging; ``log`` covers exactly ``size`` bytes from
    ``offset``, so nothing past the front-end's log is ever written through it.
    """

    memory: HostMemory
    offset: int
    size: int
    log: DirtyLog = field(init=False)

    def __post_init__(self):
        self.log = DirtyLog(self.memory.view[self.offset:self.offset + self.size])

    @classmethod
    def map(cls, fd: int, offset: int, size: int) -> "LogMapping":
        """Map ``size`` bytes of the log at ``offset`` in ``fd``, which must hold them.

        On success the mapping owns a duplicate of ``fd``; the caller keeps
        (and closes) ``fd`` itself either way.
        """
        start = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets are page aligned
        # QEMU's log file is exactly ``size`` bytes, usually not whole pages:
        # map exactly the file's bytes, in the pages that hold them.
        memory = HostMemory.duplicate(fd, offset + size - start, "vhost-log", offset=start,
                                      whole_pages=True)
        try:
            return cls(memory, offset - start, size)
        except BaseException:
            memory.close()
            raise

    def close(self) -> None:
        self.log.release()
        self.memory.close()


@dataclass
class Outcome:
    """What the transport must do after ``handle``: adopt a back-end channel, send, maybe close."""

    replies: list[tuple[bytes, list[int]]] = field(default_factory=list)
    close: bool = False
    #: SET_BACKEND_REQ_FD: the transport owns this socket fd from now on
    #: (replacing any earlier channel) and sends take_backend_requests() on it.
    backend_channel: int | None = None


class VhostBackend:
    """The state of one front-end connection, in front of one ``VdpaDevice``."""

    def __init__(self, driver: VdpaDevice, *, name: str = "vhost", status_feature: bool = True):
        self.driver = driver
        self.name = name
        self.offered_features = driver.get_features()
        self.offered_protocol = OFFERED_PROTOCOL
        if not status_feature:
            self.offered_protocol &= ~(1 << PF.STATUS)
        self.features = 0
        self.features_set = False
        self.protocol_features = 0
        self.owner = False
        self.status = 0
        self.memory: GuestMemory | None = None
        self.log_mapping: LogMapping | None = None
        # (fd, offset, size) of a log larger than the memory table, held for the
        # table QEMU sends right after it (see _hold_pending_log).
        self._pending_log: tuple[int, int, int] | None = None
        self.vrings = [VringSetup(i) for i in range(driver.max_vrings)]
        self.has_backend_channel = False
        self._new_channel: int | None = None
        self.configured = False
        self._backend_requests: list[tuple[bytes, list[int]]] = []
        # config_changed runs on the VF's interrupt poller, possibly another
        # thread: it queues under this lock and wakes the transport's loop.
        self._pending_lock = threading.Lock()
        self.wake: Callable[[], None] = lambda: None  # set by the transport
        self.broken_reason = ""
        self.stats = {"messages": 0, "refused": 0}

    # --- what the driver is given -------------------------------------------------
    def vring_views(self) -> list[Vring]:
        out = []
        for v in self.vrings:
            if v.gpas is None or v.addr is None:
                continue
            desc, avail, used = v.gpas
            out.append(Vring(v.index, v.num, desc, avail, used, v.addr.log, v.last_avail,
                             v.last_used, v.kick_fd, v.call_fd, v.enabled))
        return out

    def _device_setup(self) -> DeviceSetup:
        return DeviceSetup(self.features, self.memory, self.vring_views(), self.log_mapping)

    def _save_states(self, states) -> None:
        """Ring states the driver reports (stopped queues): where each vring resumes."""
        for index, state in states.items():
            self.vrings[index].last_avail = state.last_avail
            self.vrings[index].last_used = state.last_used

    def config_changed(self) -> None:
        """The VF raised its config interrupt: tell the front-end (BACKEND_CONFIG_CHANGE).

        Safe from any thread.  The transport's loop may be asleep waiting for
        a socket, so it is woken to send the message now.
        """
        if not self.has_backend_channel:
            return
        self._queue_backend_request(
            p.encode_backend_request(p.BackendRequest.CONFIG_CHANGE_MSG, need_reply=self._reply_ack), [])
        self.wake()

    # --- the back-end channel (the transport owns the socket) ----------------------
    def _queue_backend_request(self, data: bytes, fds: list[int]) -> None:
        with self._pending_lock:
            self._backend_requests.append((data, fds))

    def take_backend_requests(self) -> list[tuple[bytes, list[int]]]:
        """The requests to send on the back-end channel, in order (each once)."""
        with self._pending_lock:
            out, self._backend_requests = self._backend_requests, []
        return out

    def backend_channel_lost(self) -> None:
        """The transport's back-end channel failed or closed: stop queueing for it."""
        self.has_backend_channel = False
        with self._pending_lock:
            self._backend_requests.clear()

    # --- message handling --------------------------------------------------------------
    @property
    def _reply_ack(self) -> bool:
        return bool(self.protocol_features >> PF.REPLY_ACK & 1)

    @property
    def _log_shmfd(self) -> bool:
        return bool(self.protocol_features >> PF.LOG_SHMFD & 1)

    def handle(self, frame: Frame) -> Outcome:
        """Handle one framed message; the caller sends ``replies`` in order."""
        self.stats["messages"] += 1
        header = frame.header
        try:
            msg = p.parse(header, frame.payload, frame.fds)
        except p.ProtocolError as err:
            close_fds(frame.fds)
            return self._refuse(header.request, header.flags, f"malformed: {err.reason}")
        close_fds(msg.stray_fds)
        name = msg.request.name
        if not self._gate_allows(msg):
            close_fds(msg.fds)
            return self._refuse(msg.request, msg.flags,
                                f"not negotiated ({msg.spec.gate.describe()})")
        handler = HANDLERS.get(msg.request)
        if handler is None:
            close_fds(msg.fds)
            return self._refuse(msg.request, msg.flags, "not supported by this back-end")
        try:
            body = handler(self, msg)
        except Refused as err:
            close_fds(msg.fds)
            return self._refuse(msg.request, msg.flags, str(err))
        except Exception:
            return self._failed(name)
        action = p.reply_action(msg.request, msg.flags, reply_ack=self._reply_ack,
                                log_shmfd=self._log_shmfd)
        log.debug("%s: %s handled -> %s", self.name, name, action.name)
        out = self._send(msg.request, action, body)
        out.backend_channel, self._new_channel = self._new_channel, None
        return out

    def _failed(self, name: str) -> Outcome:
        """A handler raised something it does not promise to raise: a bug, or a
        resource failure in the middle of a change.  Only a refusal guarantees
        that nothing changed, so nothing is answered: the connection is closed
        (which stops the VF), and every other connection keeps being served.
        The message's fds are not closed here: the handler may already own
        some of them, and a double close could hit another connection's fd.
        """
        self.broken_reason = f"{name} failed unexpectedly"
        log.error("%s: %s raised an unexpected error; closing this connection",
                  self.name, name, exc_info=True)
        return Outcome(close=True)

    def _gate_allows(self, msg: p.Message) -> bool:
        if msg.request is R.SEND_RARP:
            return True  # harmless whatever was negotiated: accepted and logged
        return msg.spec.gate.allows(offered_features=self.offered_features,
                                    acked_protocol_features=self.protocol_features,
                                    acked_features=self.features)

    def _send(self, request, action: p.ReplyAction, body) -> Outcome:
        out = Outcome()
        if action is p.ReplyAction.BODY:
            out.replies.append((p.encode_reply(request, body), []))
        elif action is p.ReplyAction.ACK_SUCCESS:
            out.replies.append((p.encode_ack(request, True), []))
        elif action is p.ReplyAction.ACK_FAILURE:
            out.replies.append((p.encode_ack(request, False), []))
        elif action is p.ReplyAction.FAILURE_BODY:
            out.replies.append((p.encode_failure_reply(request), []))
        elif action is p.ReplyAction.CLOSE:
            out.close = True
        return out

    def _refuse(self, request, flags: int, reason: str) -> Outcome:
        self.stats["refused"] += 1
        name = p.request_name(request)
        action = p.reply_action(request, flags, reply_ack=self._reply_ack,
                                log_shmfd=self._log_shmfd, ok=False)
        if request == R.SET_LOG_BASE and action is p.ReplyAction.CLOSE:
            # Its reply cannot say "failed", but closing would cut the guest's
            # network over a log: answer, and keep no log (below).
            action = p.ReplyAction.BODY
        log.warning("%s: refused %s: %s%s", self.name, name, reason,
                    " (closing: no reply can carry the failure)" if action is p.ReplyAction.CLOSE else "")
        if request == R.SET_LOG_BASE:
            self._forget_log(reason)
        if action is p.ReplyAction.CLOSE:
            self.broken_reason = f"{name}: {reason}"
        return self._send(request, action, None)

    # --- readiness and the driver ---------------------------------------------------
    def _translate(self, v: VringSetup, addr: p.VringAddr, num: int) -> tuple[int, int, int]:
        """UVAs -> GPAs for a ring of ``num`` entries, checking sizes and alignment."""
        assert self.memory is not None
        if addr.desc % 16 or addr.avail % 2 or addr.used % 4:
            raise Refused(f"vring {v.index}: ring addresses are misaligned "
                          f"(desc {addr.desc:#x} needs 16, avail {addr.avail:#x} 2, used {addr.used:#x} 4)")
        try:
            return (self.memory.uva_to_gpa(addr.desc, vring.desc_table_bytes(num)),
                    self.memory.uva_to_gpa(addr.avail, vring.avail_ring_bytes(num)),
                    self.memory.uva_to_gpa(addr.used, vring.used_ring_bytes(num)))
        except GuestMemoryError as err:
            raise Refused(f"vring {v.index}: {err}") from None

    @staticmethod
    def _ready(v: VringSetup, *, if_enabled: bool = False) -> bool:
        """DPDK's vq_is_ready: translated, kick and call fds given, enabled."""
        return (v.gpas is not None and v.num > 0 and v.kick_set and v.call_set
                and (v.enabled or if_enabled))

    def device_ready(self) -> bool:
        if self.memory is None or not self.features_set:
            return False
        if self.protocol_features >> PF.STATUS & 1 and not self.status & ids.Status.DRIVER_OK:
            return False
        # DPDK's rule is "the first queue pair is ready"; its IFCVF driver then
        # fails dev_conf (and retries) while any *enabled* vring lacks its
        # set-up, which is what QEMU 7.2 without STATUS produces between queue
        # pairs.  Waiting for every enabled vring says the same thing directly.
        return (all(self._ready(v) for v in self.vrings[:2])
                and all(self._ready(v) for v in self.vrings if v.enabled))

    def after_reply(self) -> None:
        """Called once the replies to a message are sent: configure the VF if now ready."""
        if self.configured:
            self._start_late_vrings()
            return
        if not self.device_ready():
            return
        try:
            self.driver.dev_conf(self._device_setup(), self.config_changed)
        except VdpaError as err:
            log.error("%s: dev_conf failed: %s", self.name, err)
            return
        self.configured = True
        log.info("%s: VF configured (features %#x, vrings %s)", self.name, self.features,
                 [v.index for v in self.vrings if self._ready(v)])
        self._offer_host_notifiers()

    def _close_device(self) -> None:
        if self.configured:
            self.configured = False
            self._save_states(self.driver.dev_close())

    def _offer_host_notifiers(self) -> None:
        need = (1 << PF.BACKEND_REQ) | (1 << PF.BACKEND_SEND_FD) | (1 << PF.HOST_NOTIFIER)
        if (not self.has_backend_channel or self.protocol_features & need != need
                or not self.features >> ids.Feature.VERSION_1 & 1):
            return
        for v in self.vrings:
            if not v.enabled:
                continue
            area = self.driver.get_notify_area(v.index)
            if area is None:
                continue
            payload = p.VringArea(v.index, size=area.size, offset=area.offset)
            self._queue_backend_request(p.encode_backend_request(
                p.BackendRequest.VRING_HOST_NOTIFIER_MSG, payload, need_reply=self._reply_ack), [area.fd])

    # --- handlers: negotiation -------------------------------------------------------
    def _on_get_features(self, msg):
        return p.U64(self.offered_features)

    def _on_set_features(self, msg):
        features = msg.payload.value
        extra = features & ~self.offered_features
        if extra:
            raise Refused(f"features {extra:#x} were never offered")
        if self.configured and (features ^ self.features) & ~ids.bit(ids.Feature.LOG_ALL):
            raise Refused("only LOG_ALL may change while the VF runs")
        # LOG_ALL without a usable log is accepted: QEMU 7.2 aborts the VM when
        # LOG_ALL is refused at migration start, so the driver stops the VF
        # instead until a usable log comes (VdpaDevice.set_features).
        try:
            self.driver.set_features(features, self.log_mapping)  # changes nothing when it fails
        except VdpaError as err:
            raise Refused(str(err)) from None
        self.features = features
        self.features_set = True
        if not features >> p.F_PROTOCOL_FEATURES & 1:
            for v in self.vrings:  # without protocol features rings start enabled
                v.enabled = True
        return None

    def _on_get_protocol_features(self, msg):
        return p.U64(self.offered_protocol)

    def _on_set_protocol_features(self, msg):
        extra = msg.payload.value & ~self.offered_protocol
        if extra:
            raise Refused(f"protocol features {extra:#x} were never offered")
        self.protocol_features = msg.payload.value
        return None

    def _on_get_queue_num(self, msg):
        return p.U64(self.driver.get_queue_num())

    def _on_set_owner(self, msg):
        self.owner = True
        return None

    def _on_reset_owner(self, msg):
        self._close_device()
        self.features = 0
        self.features_set = False
        return None

    def _on_set_backend_req_fd(self, msg):
        fd = msg.fds[0]
        try:
            mode = os.fstat(fd).st_mode
        except OSError as err:
            raise Refused(f"the back-end channel fd is not usable: {err}") from None
        if not stat.S_ISSOCK(mode):
            raise Refused(f"the back-end channel fd is not a socket (mode {mode:o})")
        if self._new_channel is not None:
            os.close(self._new_channel)
        self._new_channel = fd          # handed to the transport with this reply
        self.has_backend_channel = True
        return None

    def _on_set_status(self, msg):
        # QEMU 7.2 sends SET_STATUS(0) *before* GET_VRING_BASE: the ring state
        # must survive it, so status changes never stop the VF by themselves.
        self.status = msg.payload.value
        return None

    def _on_get_status(self, msg):
        return p.U64(self.status)

    def _on_send_rarp(self, msg):
        mac = msg.payload.value.to_bytes(8, "little")[:6]
        log.info("%s: SEND_RARP %s: the VF cannot send RARP; the guest announces itself "
                 "(GUEST_ANNOUNCE)", self.name, mac.hex(":"))
        return None

    # --- handlers: memory and log -----------------------------------------------------
    def _on_set_mem_table(self, msg):
        regions = [(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                   for r in msg.payload.regions]
        if not regions:
            raise Refused("empty memory table")
        # Every vring's addresses must still translate in the new table.
        try:
            memory = GuestMemory.map(regions, list(msg.fds))
        except GuestMemoryError as err:
            raise Refused(str(err)) from None
        if self.memory is not None and memory.layout() == self.memory.layout():
            memory.close()
            log.info("%s: memory table unchanged", self.name)
            return None
        was_configured = self.configured
        self._close_device()
        old, self.memory = self.memory, memory
        for v in self.vrings:
            v.gpas = None
            if v.addr is not None and v.num:
                try:
                    v.gpas = self._translate(v, v.addr, v.num)
                except Refused as err:
                    log.warning("%s: %s (vring not ready until its address is set again)", self.name, err)
        if old is not None:
            old.close()
        self._take_pending_log()
        log.info("%s: memory table: %s%s", self.name,
                 ", ".join(f"{r.gpa:#x}+{r.size:#x}" for r in memory.regions),
                 " (VF stopped; reconfigures when ready)" if was_configured else "")
        return None

    def _check_log_fd(self, size: int, offset: int, fd: int) -> None:
        """Refuse a log QEMU would never send: any multiple of 8 bytes is legal
        (one 64-bit word per 256 KiB of guest address space, never page-rounded),
        in a memory file that holds it."""
        if size == 0 or size % p.LOG_WORD:
            raise Refused(f"log size {size} is not a positive multiple of {p.LOG_WORD} bytes")
        try:
            st = os.fstat(fd)
        except OSError as err:
            raise Refused(f"log fd is not usable: {err}") from None
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"log fd is not a memory file (mode {st.st_mode:o})")
        if offset + size > st.st_size:
            raise Refused(f"log of {size} bytes at offset {offset} ends past its fd, "
                          f"which holds {st.st_size} bytes")

    @staticmethod
    def _log_size_error(size: int, memory: GuestMemory) -> str | None:
        """Why a log of ``size`` bytes does not fit ``memory``, or None: from the
        exact size QEMU computes for the table up to LOG_SLACK more."""
        need = p.log_size(memory.end)
        if size < need:
            return f"log of {size} bytes covers less than the memory table (needs {need} bytes)"
        if size > need + p.LOG_SLACK:
            return (f"log of {size} bytes is larger than the memory table needs "
                    f"({need} bytes, at most {p.LOG_SLACK} more accepted)")
        return None

    def _on_set_log_base(self, msg):
        size, offset, fd = msg.payload.mmap_size, msg.payload.mmap_offset, msg.fds[0]
        self._check_log_fd(size, offset, fd)
        too_big = self.memory is not None and size > p.log_size(self.memory.end) + p.LOG_SLACK
        if self.memory is None or (too_big and self.features & ids.bit(ids.Feature.LOG_ALL)):
            # No table to size it against yet, or QEMU's vhost_commit growing the
            # log *before* it sends a larger memory table (legal: logging is on):
            # the log waits for its table (_take_pending_log).
            self._hold_pending_log(fd, offset, size)
            return None
        why = self._log_size_error(size, self.memory)
        if why:
            raise Refused(why)
        self._install_log(fd, offset, size)
        return None

    def _install_log(self, fd: int, offset: int, size: int) -> None:
        try:
            mapping = LogMapping.map(fd, offset, size)
        except (OSError, ValueError, OverflowError) as err:
            raise Refused(f"cannot map the log of {size} bytes at offset {offset}: {err}") from None
        os.close(fd)  # the mapping holds its own duplicate
        self._drop_pending_log()
        old, self.log_mapping = self.log_mapping, mapping
        self.driver.set_log(mapping)
        if old is not None:
            old.close()
        log.info("%s: dirty log of %d bytes mapped", self.name, size)

    # --- a log sent ahead of its memory table --------------------------------------------
    def _hold_pending_log(self, fd: int, offset: int, size: int) -> None:
        """Keep the log's fd, unmapped, until a memory table it fits.  QEMU reads
        only this log from now on, so the old one must not get another mark:
        it is dropped, and a VF that logs stops until the table comes."""
        reason = f"a log of {size} bytes waits for the memory table it was sized for"
        self._forget_log(reason)
        self._pending_log = (fd, offset, size)
        log.warning("%s: %s", self.name, reason)

    def _take_pending_log(self) -> None:
        """A new memory table: the log waiting for it is mapped if it fits, dropped if not."""
        if self._pending_log is None:
            return
        (fd, offset, size), self._pending_log = self._pending_log, None
        why = self._log_size_error(size, self.memory)
        if why is None:
            try:
                self._install_log(fd, offset, size)
                return
            except Refused as err:
                why = str(err)
        os.close(fd)
        log.error("%s: the log sent ahead of the memory table is dropped: %s", self.name, why)

    def _drop_pending_log(self) -> None:
        if self._pending_log is not None:
            os.close(self._pending_log[0])
            self._pending_log = None

    def _forget_log(self, reason: str) -> None:
        """A refused SET_LOG_BASE: QEMU ignores the reply and from now on reads
        only the log it just sent, so the old one must not receive a single
        mark more.  The driver stops a VF that logs (VdpaDevice.set_log(None)),
        and with no log a later LOG_ALL keeps the VF stopped until a usable
        log comes: the guest loses its network, never a dirty page."""
        self._drop_pending_log()
        self.driver.set_log(None, reason)
        old, self.log_mapping = self.log_mapping, None
        if old is not None:
            old.close()
            log.error("%s: the previous dirty log is dropped: %s", self.name, reason)

    def _on_set_log_fd(self, msg):
        # QEMU 7.2 never sends it for net; we have no use for a "log changed" signal.
        close_fds(msg.fds)
        return None

    # --- handlers: vrings -------------------------------------------------------------------
    def _vring(self, index: int) -> VringSetup:
        if not 0 <= index < len(self.vrings):
            raise Refused(f"vring {index} out of range (this VF has {len(self.vrings)})")
        return self.vrings[index]

    def _runs(self, v: VringSetup) -> bool:
        return self.configured and v.index in self.driver.running_vrings()

    def _not_while_running(self, v: VringSetup, what: str) -> None:
        if self._runs(v):
            raise Refused(f"vring {v.index}: {what} while the VF runs it")

    def _on_set_vring_num(self, msg):
        v = self._vring(msg.payload.index)
        num = msg.payload.num
        if num == 0 or num & (num - 1) or num > MAX_RING_SIZE:
            raise Refused(f"vring {v.index}: size {num} is not a power of two in 1..{MAX_RING_SIZE}")
        if num > self.driver.max_queue_size:
            raise Refused(f"vring {v.index}: size {num} exceeds the VF's maximum {self.driver.max_queue_size}")
        self._not_while_running(v, "resize")
        v.num = num
        v.gpas = None  # addresses are re-checked against the new size
        if v.addr is not None and self.memory is not None:
            try:
                v.gpas = self._translate(v, v.addr, num)
            except Refused:
                pass
        return None

    def _on_set_vring_addr(self, msg):
        addr = msg.payload
        v = self._vring(addr.index)
        if self._runs(v):
            # QEMU re-sends addresses with the LOG flag when migration starts:
            # the rings do not move, only the logging of the used ring changes.
            if v.addr is not None and (addr.desc, addr.avail, addr.used) == (v.addr.desc, v.addr.avail, v.addr.used):
                v.addr = addr
                return None
            raise Refused(f"vring {v.index}: ring addresses change while the VF runs it")
        gpas = None
        if self.memory is not None and v.num:
            gpas = self._translate(v, addr, v.num)
        if addr.flags & p.VRING_F_LOG and self.log_mapping is not None and v.num:
            end = addr.log + vring.used_ring_bytes(v.num)
            if end > self.log_mapping.log.pages * 4096:
                raise Refused(f"vring {v.index}: used-ring log address {addr.log:#x} lies past the log")
        v.addr, v.gpas = addr, gpas
        return None

    def _on_set_vring_base(self, msg):
        v = self._vring(msg.payload.index)
        base = msg.payload.num
        if base > 0xFFFF:
            raise Refused(f"vring {v.index}: base {base:#x} does not fit a split ring's 16-bit index")
        self._not_while_running(v, "set base")
        v.last_avail = v.last_used = base
        log.info("%s: SET_VRING_BASE %d <- %d", self.name, v.index, base)
        return None

    def _on_get_vring_base(self, msg):
        v = self._vring(msg.payload.index)
        # Stopping the VF saves every ring's state into self.vrings.
        self._close_device()
        for fd_name in ("kick_fd", "call_fd"):
            fd = getattr(v, fd_name)
            if fd >= 0:
                os.close(fd)
            setattr(v, fd_name, -1)
        v.kick_set = v.call_set = False
        log.info("%s: GET_VRING_BASE %d -> %d", self.name, v.index, v.last_avail)
        return p.VringState(v.index, v.last_avail)

    def _set_vring_fd(self, msg, attr: str, flag: str | None):
        v = self._vring(msg.payload.index)
        new_fd = msg.fds[0] if msg.fds else -1
        old = getattr(v, attr)
        setattr(v, attr, new_fd)
        if flag:
            setattr(v, flag, True)
        if old >= 0:
            os.close(old)
        return v

    def _on_set_vring_kick(self, msg):
        v = self._set_vring_fd(msg, "kick_fd", "kick_set")
        if not self.features >> p.F_PROTOCOL_FEATURES & 1:
            v.enabled = True  # "a kick starts the ring" without protocol features
        if self.configured:
            self._refresh(v)
        return None

    def _on_set_vring_call(self, msg):
        v = self._set_vring_fd(msg, "call_fd", "call_set")
        if self.configured:
            self._refresh(v)
        return None

    def _on_set_vring_err(self, msg):
        self._set_vring_fd(msg, "err_fd", None)
        return None

    def _refresh(self, v: VringSetup) -> None:
        """A kick or call fd changed under a running VF: re-route it."""
        if not self._runs(v):
            return
        try:
            self.driver.vring_fds_changed(self.vring_views())
        except VdpaError as err:
            log.error("%s: vring %d: %s", self.name, v.index, err)

    def _start_late_vrings(self) -> None:
        """Enabled vrings whose set-up completed after dev_conf join the running VF."""
        if not self.configured:
            return
        for v in self.vrings:
            if v.enabled and self._ready(v) and not self._runs(v):
                try:
                    self.driver.set_vring_state(v.index, True, self.vring_views())
                except VdpaError as err:
                    log.error("%s: vring %d: %s", self.name, v.index, err)

    def _on_set_vring_enable(self, msg):
        v = self._vring(msg.payload.index)
        enable = bool(msg.payload.num)
        if self.configured and enable != self._runs(v) and (self._ready(v, if_enabled=True) or not enable):
            views = [w if w.index != v.index else _with_enabled(w, enable) for w in self.vring_views()]
            try:
                state = self.driver.set_vring_state(v.index, enable, views)
            except VdpaError as err:
                raise Refused(str(err)) from None
            if state is not None:
                self._save_states({v.index: state})
        v.enabled = enable
        return None

    # --- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        """The connection is gone: stop the VF, release everything.  The fds, the
        memory table and the log belong to the connection: they are released even
        when stopping the VF fails (the error still reaches the caller)."""
        try:
            self._close_device()
        finally:
            self._release_connection()

    def _release_connection(self) -> None:
        for v in self.vrings:
            v.close_fds()
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.log_mapping is not None:
            self.log_mapping.close()
            self.log_mapping = None
        self._drop_pending_log()
        if self._new_channel is not None:
            os.close(self._new_channel)
            self._new_channel = None
        self.backend_channel_lost()


def _with_enabled(v: Vring, enabled: bool) -> Vring:
    return Vring(v.index, v.size, v.desc, v.avail, v.used, v.log_gpa, v.last_avail, v.last_used,
                 v.kick_fd, v.call_fd, enabled)


#: Request -> handler: every request this back-end serves (the rest are refused).
HANDLERS: dict[p.Request, Callable[[VhostBackend, p.Message], object]] = {
    R.GET_FEATURES: VhostBackend._on_get_features,
    R.SET_FEATURES: VhostBackend._on_set_features,
    R.GET_PROTOCOL_FEATURES: VhostBackend._on_get_protocol_features,
    R.SET_PROTOCOL_FEATURES: VhostBackend._on_set_protocol_features,
    R.GET_QUEUE_NUM: VhostBackend._on_get_queue_num,
    R.SET_OWNER: VhostBackend._on_set_owner,
    R.RESET_OWNER: VhostBackend._on_reset_owner,
    R.SET_BACKEND_REQ_FD: VhostBackend._on_set_backend_req_fd,
    R.SET_STATUS: VhostBackend._on_set_status,
    R.GET_STATUS: VhostBackend._on_get_status,
    R.SEND_RARP: VhostBackend._on_send_rarp,
    R.SET_MEM_TABLE: VhostBackend._on_set_mem_table,
    R.SET_LOG_BASE: VhostBackend._on_set_log_base,
    R.SET_LOG_FD: VhostBackend._on_set_log_fd,
    R.SET_VRING_NUM: VhostBackend._on_set_vring_num,
    R.SET_VRING_ADDR: VhostBackend._on_set_vring_addr,
    R.SET_VRING_BASE: VhostBackend._on_set_vring_base,
    R.GET_VRING_BASE: VhostBackend._on_get_vring_base,
    R.SET_VRING_KICK: VhostBackend._on_set_vring_kick,
    R.SET_VRING_CALL: VhostBackend._on_set_vring_call,
    R.SET_VRING_ERR: VhostBackend._on_set_vring_err,
    R.SET_VRING_ENABLE: VhostBackend._on_set_vring_enable,
}
