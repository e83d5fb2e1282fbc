"""Runs INSIDE the test guest for test_qemu_multiqueue.py: virtio_net with 2 queue pairs.

    python guest_qemu_multiqueue.py TOKEN TX_PER_CPU

The guest (2 vCPUs) has QEMU's virtio-net-pci (``mq=on``) on a vhost-user
netdev with 2 queue pairs served by `ifcvf serve --device sim --wire udp:...`.
The guest has no ethtool binary: ``set_combined`` is ``ethtool -L IFACE
combined N`` done with the SIOCETHTOOL ioctl (ETHTOOL_SCHANNELS).

Commands come from the host as frames (``frame(kind, token, index, ...)``):

- ``set N``: switch to N combined channels, print ``QEMU-MQ COMBINED <asked> <now>``;
- ``send P``: transmit TX_PER_CPU frames pinned on CPU 0, then as many on
  CPU 1 (virtio_net's XPS maps CPU i to TX queue i while i < the pairs in
  use), print ``QEMU-MQ SENT <P>``.  Each CPU's frames are one flow: UDP
  over IPv4 from GUEST_IP port ``flow_port(cpu)`` to HOST_IP port
  PEER_PORT (``udp_frame``), tag ``tx`` in the payload, so the VF's receive
  steering can tell the two CPUs' flows apart;
- the host answers those flows (``udp_frame`` the other way, tag ``rx``,
  index = phase * 1000 + ...): counted per phase;
- ``report P N``: once N answers of phase P arrived (or a deadline passed),
  print ``QEMU-MQ RECEIVED <P> <count>``;
- ``ping``: reflected back as ``pong``;
- ``stop``: exit 0.

The UDP helpers are imported by the host test too.  The guest's interface
has no address: its kernel drops the UDP frames after the packet socket
saw them.
"""
from __future__ import annotations

import array
import fcntl
import glob
import os
import select
import socket
import struct
import subprocess
import sys
import time

from guest_qemu_frontend import HOST_MAC, parse_tag, reflect, ETHERTYPE

SIOCETHTOOL = 0x8946
ETH_P_IP = 0x0800
GUEST_IP, HOST_IP = bytes((10, 11, 13, 2)), bytes((10, 11, 13, 1))
PEER_PORT = 7777
REPORT_WAIT_S = 20.0
ETHTOOL_GCHANNELS, ETHTOOL_SCHANNELS = 0x3C, 0x3D
PACKET_OUTGOING = 4
DEADLINE_S = 300.0


def flow_port(cpu: int) -> int:
    """The guest's UDP port of CPU ``cpu``'s flow: the same in every phase."""
    return 40000 + cpu


def udp_frame(dst: bytes, src: bytes, src_ip: bytes, dst_ip: bytes, sport: int, dport: int,
              kind: str, token: str, index: int, size: int = 128) -> bytes:
    """An Ethernet frame of ``size`` bytes holding UDP/IPv4 with our tag as its payload."""
    payload = f"IFCVF-QEMU {kind} {token} {index} ".encode()
    payload += bytes(size - 14 - 20 - 8 - len(payload))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), index & 0xFFFF, 0, 64, 17,
                     0, src_ip, dst_ip)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)    # checksum 0: none
    return dst + src + ETH_P_IP.to_bytes(2, "big") + ip + udp + payload


def parse_udp(data: bytes) -> tuple[int, int, str, str, int] | None:
    """(source port, destination port, kind, token, index) of a ``udp_frame``, or None."""
    if len(data) < 14 + 20 + 8 or data[12:14] != b"\x08\x00" or data[14] != 0x45 or data[23] != 17:
        return None
    sport, dport = struct.unpack_from("!HH", data, 34)
    words = data[42:42 + 64].split(b" ", 4)
    if len(words) < 5 or words[0] != b"IFCVF-QEMU":
        return None
    try:
        return sport, dport, words[1].decode(), words[2].decode(), int(words[3])
    except (UnicodeDecodeError, ValueError):
        return None


def channels(sock: socket.socket, iface: str, combined: int | None = None) -> list[int]:
    """ETHTOOL_GCHANNELS, or ETHTOOL_SCHANNELS with ``combined``: struct ethtool_channels as 9 u32."""
    buf = array.array("I", [ETHTOOL_GCHANNELS] + [0] * 8)
    ifreq = struct.pack("16sP", iface.encode(), buf.buffer_info()[0])
    fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
    if combined is not None:
        buf[0], buf[8] = ETHTOOL_SCHANNELS, combined
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
        buf[0] = ETHTOOL_GCHANNELS
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
    return list(buf[1:])   # max_rx, max_tx, max_other, max_combined, rx, tx, other, combined


def main() -> int:
    token, per_cpu = sys.argv[1], int(sys.argv[2])
    subprocess.run(["modprobe", "virtio_net"], check=True)
    ifaces = sorted(glob.glob("/sys/bus/pci/devices/*/virtio*/net/*"))
    assert len(ifaces) == 1, ifaces
    iface = os.path.basename(ifaces[0])
    subprocess.run(["ip", "link", "set", "dev", iface, "up"], check=True)
    mac = bytes.fromhex(open(f"/sys/class/net/{iface}/address").read().strip().replace(":", ""))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    sock.bind((iface, ETHERTYPE))
    ip_sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    ip_sock.bind((iface, ETH_P_IP))
    chans = channels(sock, iface)
    print(f"QEMU-MQ READY {iface} cpus={os.cpu_count()} channels={','.join(map(str, chans))}",
          flush=True)
    answers: dict[int, int] = {}      # phase -> answers received
    deadline = time.monotonic() + DEADLINE_S

    def take_answers(wait: float) -> None:
        """Count the host's answers that are there (waiting at most ``wait`` s for one)."""
        while select.select([ip_sock], [], [], wait)[0]:
            data, addr = ip_sock.recvfrom(65536)
            got = parse_udp(data) if addr[2] != PACKET_OUTGOING else None
            if got and got[2] == "rx" and got[3] == token:
                answers[got[4] // 1000] = answers.get(got[4] // 1000, 0) + 1
            wait = 0

    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return 3
        ready = select.select([sock, ip_sock], [], [], left)[0]
        if ip_sock in ready:
            take_answers(0)
        if sock not in ready:
            continue
        data, addr = sock.recvfrom(65536)
        if addr[2] == PACKET_OUTGOING:
            continue
        tag = parse_tag(data)
        if tag is None or tag[1] != token:
            continue
        kind, _, index = tag
        if kind == "set":
            now = channels(sock, iface, index)[7]
            print(f"QEMU-MQ COMBINED {index} {now}", flush=True)
        elif kind == "send":
            for cpu in (0, 1):
                os.sched_setaffinity(0, {cpu})
                for i in range(per_cpu):
                    ip_sock.send(udp_frame(HOST_MAC, mac, GUEST_IP, HOST_IP, flow_port(cpu),
                                           PEER_PORT, "tx", token, index * 1000 + cpu * 100 + i))
            os.sched_setaffinity(0, {0, 1})
            print(f"QEMU-MQ SENT {index}", flush=True)
        elif kind == "report":
            # index = phase * 10000 + answers expected: the answers may still be
            # in another RX queue's NAPI, so wait for them (bounded).
            phase, want = divmod(index, 10000)
            until = time.monotonic() + REPORT_WAIT_S
            while answers.get(phase, 0) < want and time.monotonic() < until:
                take_answers(until - time.monotonic())
            print(f"QEMU-MQ RECEIVED {phase} {answers.get(phase, 0)}", flush=True)
        elif kind == "ping":
            sock.send(reflect(data, mac))
        elif kind == "stop":
            print("QEMU-MQ STOPPED", flush=True)
            return 0


if __name__ == "__main__":
    sys.exit(main())
