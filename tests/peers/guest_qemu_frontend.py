"""Runs INSIDE the test guest for test_qemu_frontend.py: the guest's own virtio-net over our back-end.

    python guest_qemu_frontend.py RESULTS_JSON TOKEN TX_COUNT RX_COUNT

The guest's NIC is QEMU's virtio-net-pci on a vhost-user netdev served by
`ifcvf serve --device sim --wire udp:...`, so every frame here crosses the
simulated VF's rings in QEMU's guest memory.  The script loads the kernel's
virtio_net driver, brings the interface up and talks raw Ethernet
(AF_PACKET, ethertype ``ETHERTYPE``) with the host at the far end of the
VF's UDP wire:

1. prints ``QEMU-PEER READY <iface> <mac>`` and sends TX_COUNT frames
   (``frame("tx", ...)``, sizes from ``TX_SIZES``) to the host;
2. keeps every ``rx`` frame it receives, byte for byte, and prints
   ``QEMU-PEER RX-DONE <n>`` once RX_COUNT arrived;
3. reflects every ``ping`` frame back to its sender (MACs swapped, kind
   ``pong``) until a ``stop`` frame comes or the deadline passes;
4. writes RESULTS_JSON (received frames in hex, counters, the NIC's
   interrupt line) and exits 0.

It also gives the interface GUEST_IP, with a permanent neighbour entry for
HOST_IP: the test boots with ``ifcvf_hold=1`` so that, after this script,
the guest's init unmounts the 9p shares (QEMU refuses to migrate a guest
that has a VirtFS share mounted) and the guest keeps running on its kernel
alone, which answers ICMP echoes while QEMU migrates it.

The frame builders below are imported by the host test too, so both sides
agree on every byte.
"""
from __future__ import annotations

import glob
import json
import os
import select
import socket
import subprocess
import sys
import time

ETHERTYPE = 0x88B5                       # IEEE local experimental: nothing else uses it
HOST_MAC = bytes.fromhex("020000000001")  # the host end of the wire (a locally administered MAC)
GUEST_IP, HOST_IP = "10.11.12.2", "10.11.12.1"
TX_SIZES = (60, 128, 1514, 64, 777, 1000, 61, 1500)
RX_SIZES = (60, 1514, 333, 64, 1200, 90)
DEADLINE_S = 400.0
PACKET_OUTGOING = 4


def frame(kind: str, token: str, index: int, dst: bytes, src: bytes, size: int) -> bytes:
    """An Ethernet frame (no FCS) of exactly ``size`` bytes: tag, then a pattern both sides can recompute."""
    head = dst + src + ETHERTYPE.to_bytes(2, "big")
    tag = f"IFCVF-QEMU {kind} {token} {index} ".encode()
    fill = size - len(head) - len(tag)
    if fill < 0:
        raise ValueError(f"{size} bytes cannot hold the tag {tag!r}")
    return head + tag + bytes((index * 31 + j * 7) & 0xFF for j in range(fill))


def parse_tag(data: bytes) -> tuple[str, str, int] | None:
    """(kind, token, index) of one of our frames, or None."""
    if len(data) < 14 or int.from_bytes(data[12:14], "big") != ETHERTYPE:
        return None
    words = data[14:14 + 64].split(b" ", 4)
    if len(words) < 5 or words[0] != b"IFCVF-QEMU":
        return None
    try:
        return words[1].decode(), words[2].decode(), int(words[3])
    except (UnicodeDecodeError, ValueError):
        return None


def reflect(data: bytes, mac: bytes) -> bytes:
    """The reply to a ``ping``: back to its sender, kind ``pong``, everything else unchanged."""
    assert data[14:30].startswith(b"IFCVF-QEMU ping ")
    return data[6:12] + mac + data[12:14] + data[14:25] + b"pong" + data[29:]


def interrupt_lines(name_part: str) -> list[str]:
    with open("/proc/interrupts") as f:
        return [line.strip() for line in f if name_part in line]


def main() -> int:
    results, token, tx_count, rx_count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    subprocess.run(["modprobe", "virtio_net"], check=True)
    ifaces = sorted(glob.glob("/sys/bus/pci/devices/*/virtio*/net/*"))
    assert len(ifaces) == 1, ifaces
    iface = os.path.basename(ifaces[0])
    subprocess.run(["ip", "link", "set", "dev", iface, "up"], check=True)
    # For later, when this script is gone and the 9p shares are unmounted (so
    # QEMU may migrate): the kernel alone answers the host's ICMP echoes.  A
    # permanent neighbour entry, because the host end does not answer ARP.
    subprocess.run(["ip", "addr", "add", f"{GUEST_IP}/24", "dev", iface], check=True)
    subprocess.run(["ip", "neigh", "replace", HOST_IP, "lladdr", HOST_MAC.hex(":"), "dev", iface,
                    "nud", "permanent"], check=True)
    mac = bytes.fromhex(open(f"/sys/class/net/{iface}/address").read().strip().replace(":", ""))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    sock.bind((iface, ETHERTYPE))
    print(f"QEMU-PEER READY {iface} {mac.hex(':')}", flush=True)

    for i in range(tx_count):
        sock.send(frame("tx", token, i, HOST_MAC, mac, TX_SIZES[i % len(TX_SIZES)]))

    received: list[str] = []
    echoed = 0
    stopped = False
    other = 0
    deadline = time.monotonic() + DEADLINE_S
    while not stopped:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            break
        data, addr = sock.recvfrom(65536)
        if addr[2] == PACKET_OUTGOING:
            continue
        tag = parse_tag(data)
        if tag is None or tag[1] != token:
            other += 1
        elif tag[0] == "rx":
            received.append(data.hex())
            if len(received) == rx_count:
                print(f"QEMU-PEER RX-DONE {len(received)}", flush=True)
        elif tag[0] == "ping":
            sock.send(reflect(data, mac))
            echoed += 1
        elif tag[0] == "stop":
            stopped = True
        else:
            other += 1

    stats = {name: int(open(f"/sys/class/net/{iface}/statistics/{name}").read())
             for name in ("rx_packets", "tx_packets", "rx_dropped", "tx_dropped", "rx_errors")}
    driver = os.path.basename(os.path.realpath(f"/sys/class/net/{iface}/device/driver"))
    virtio_dev = os.path.basename(os.path.realpath(f"/sys/class/net/{iface}/device"))
    with open(results, "w") as f:
        json.dump({"iface": iface, "mac": mac.hex(), "received": received, "echoed": echoed,
                   "other": other, "stopped": stopped, "stats": stats, "driver": driver,
                   "virtio_device": virtio_dev,
                   # With vectors=0 the NIC has no MSI-X: its interrupt is an INTx line.
                   "interrupts": interrupt_lines(virtio_dev)}, f)
    print(f"QEMU-PEER DONE rx={len(received)} echoed={echoed} stopped={stopped}", flush=True)
    return 0 if stopped else 3


if __name__ == "__main__":
    sys.exit(main())
