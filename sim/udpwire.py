"""A simulated VF's wire port carried over UDP on loopback, for real frames.

``ifcvf serve --device sim --wire udp:LOCAL:REMOTE`` joins the VF's 100G port
(``sim.wire.Port``) to a UDP socket bound to 127.0.0.1:LOCAL that sends to
127.0.0.1:REMOTE: one datagram per Ethernet frame, no FCS, no header, which is
what QEMU's ``-netdev socket,udp=...,localaddr=...`` speaks, so a simulated VF
can sit across a wire from a QEMU NIC, a packet tool, or a test's own socket.

The far end of the link is a ``Port`` of our own (``UdpWire.port``), so the
wire timing of the model is kept: frames the VF transmits reach it at their
simulated arrival cycle and leave as datagrams then (in real-time mode the
world follows the wall clock, so that is about when they would arrive).
Datagrams that come in are transmitted into the VF at the current simulated
time.  The socket is non-blocking and registered with ``world.watch_fd``, so
the real-time loop (``sim.realtime``), which polls every watched fd each time
round, drains it without ever blocking; at most ``RX_BURST`` datagrams are
taken per wake-up so a flood cannot starve the vhost-user socket.

Loopback only, on purpose: the simulated VF is a development tool, not a
network service.  Frames that cannot be sent (a full socket buffer, nobody
listening is *not* an error for an unconnected UDP socket) are counted, never
raised: a lossy wire is a wire.
"""
from __future__ import annotations

import errno
import socket

from sim.frames import FrameBatch
from sim.wire import Port, connect, disconnect
from sim.world import World

LOOPBACK = "127.0.0.1"
MAX_DATAGRAM = 65535
RX_BURST = 256          # datagrams per wake-up: bounded work per loop iteration


class WireSpecError(ValueError):
    """A ``--wire`` value that cannot be used; the message says why."""


def parse_wire(spec: str) -> tuple[int, int]:
    """``udp:LOCAL_PORT:REMOTE_PORT`` -> (local, remote).  LOCAL 0 lets the kernel pick."""
    kind, _, rest = spec.partition(":")
    if kind != "udp":
        raise WireSpecError(f"--wire {spec!r}: only udp:LOCAL_PORT:REMOTE_PORT is supported")
    parts = rest.split(":")
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        raise WireSpecError(f"--wire {spec!r}: expected udp:LOCAL_PORT:REMOTE_PORT (two numbers)")
    local, remote = (int(part) for part in parts)
    if not 0 <= local <= 65535 or not 1 <= remote <= 65535:
        raise WireSpecError(f"--wire {spec!r}: ports are 1-65535 (LOCAL may be 0: any free port)")
    return local, remote


class UdpWire:
    """The far end of ``vf_port``'s link: a UDP socket on loopback."""

    def __init__(self, world: World, vf_port: Port, local_port: int, remote_port: int,
                 *, name: str = "udp"):
        self.world = world
        self.name = name
        self.remote = (LOOPBACK, remote_port)
        self.tx_datagrams = 0        # VF -> socket
        self.tx_errors = 0
        self.rx_datagrams = 0        # socket -> VF
        self.rx_empty = 0
        self.rx_errors = 0
        self.closed = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.bind((LOOPBACK, local_port))
            self.port = Port(world, name, vf_port.rate_gbps)
            self.port.on_receive(self._to_socket)
            connect(vf_port, self.port)      # refuses a VF port that is already cabled
        except (OSError, ValueError):
            self.sock.close()
            raise
        self.local = self.sock.getsockname()
        self._fd = self.sock.fileno()
        world.watch_fd(self._fd, self._from_socket)

    # --- VF -> socket -----------------------------------------------------------
    def _to_socket(self, batch: FrameBatch) -> None:
        data = memoryview(batch.data)
        for offset, length, _ in batch.frames():
            try:
                self.sock.sendto(data[offset:offset + length], self.remote)
                self.tx_datagrams += 1
            except OSError as err:
                # EAGAIN (socket buffer full), EMSGSIZE, ECONNREFUSED reported
                # late by the kernel: the frame is lost, as on a congested link.
                self.tx_errors += 1
                self.world.record(self.name, "udp_tx_error", errno=err.errno or 0)

    # --- socket -> VF -----------------------------------------------------------
    def _from_socket(self, _fd: int) -> None:
        """Watcher of the socket: may be called when nothing is there (watchers must be idempotent)."""
        if self.closed:
            return
        batch = FrameBatch()
        for _ in range(RX_BURST):
            try:
                frame = self.sock.recv(MAX_DATAGRAM)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno == errno.ECONNREFUSED:   # an ICMP error from an earlier send
                    continue
                # Anything else is the host's trouble, not the VF's: count it and
                # keep the back-end serving (the next round tries again).
                self.rx_errors += 1
                self.world.record(self.name, "udp_rx_error", errno=err.errno or 0)
                break
            if not frame:
                self.rx_empty += 1      # a zero-length datagram carries no frame
                continue
            batch.append(frame)
            self.rx_datagrams += 1
        if len(batch):
            self.port.transmit(batch, self.world.now)

    def counters(self) -> dict:
        return {"tx_datagrams": self.tx_datagrams, "tx_errors": self.tx_errors,
                "rx_datagrams": self.rx_datagrams, "rx_empty": self.rx_empty,
                "rx_errors": self.rx_errors,
                "port": self.port.counters()}

    def describe(self) -> str:
        return f"udp {self.local[0]}:{self.local[1]} -> {self.remote[0]}:{self.remote[1]}"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.world.unwatch_fd(self._fd, self._from_socket)
        disconnect(self.port)
        self.sock.close()


__all__ = ["UdpWire", "WireSpecError", "parse_wire"]
