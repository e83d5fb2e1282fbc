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
  use), print ``QEMU-MQ SENT <P>``;
- ``ping``: reflected back as ``pong``;
- ``stop``: exit 0.
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

from guest_qemu_frontend import HOST_MAC, frame, parse_tag, reflect, ETHERTYPE

SIOCETHTOOL = 0x8946
ETHTOOL_GCHANNELS, ETHTOOL_SCHANNELS = 0x3C, 0x3D
PACKET_OUTGOING = 4
DEADLINE_S = 300.0


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
    chans = channels(sock, iface)
    print(f"QEMU-MQ READY {iface} cpus={os.cpu_count()} channels={','.join(map(str, chans))}",
          flush=True)
    deadline = time.monotonic() + DEADLINE_S
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return 3
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
                    sock.send(frame("tx", token, index * 1000 + cpu * 100 + i, HOST_MAC, mac, 128))
            os.sched_setaffinity(0, {0, 1})
            print(f"QEMU-MQ SENT {index}", flush=True)
        elif kind == "ping":
            sock.send(reflect(data, mac))
        elif kind == "stop":
            print("QEMU-MQ STOPPED", flush=True)
            return 0


if __name__ == "__main__":
    sys.exit(main())
