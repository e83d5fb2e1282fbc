"""Test frames with flows in them: UDP over IPv4/IPv6 between a guest and its peer.

``out4(port)`` is what the guest transmits from its UDP port ``port``;
``in4(port)`` is the peer's answer to it (addresses and ports swapped), the
pair the receive steering (sim/steering.py) must match.
"""
from __future__ import annotations

import struct

GUEST, PEER = bytes.fromhex("525400123456"), bytes.fromhex("020000000001")
GUEST_IP4, PEER_IP4 = bytes((10, 0, 0, 2)), bytes((10, 0, 0, 1))
GUEST_IP6, PEER_IP6 = bytes(15) + b"\x02", bytes(15) + b"\x01"


def udp4(src_mac: bytes, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, sport: int, dport: int,
         *, frag: int = 0, ihl: int = 5, payload: bytes = b"x" * 18) -> bytes:
    """An Ethernet frame holding a UDP/IPv4 datagram (checksums left 0: nothing checks them)."""
    options = bytes(4 * (ihl - 5))
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + 8 + len(payload), 1,
                     frag, 64, 17, 0, src_ip, dst_ip) + options
    return dst_mac + src_mac + b"\x08\x00" + ip + struct.pack("!HHHH", sport, dport, 8, 0) + payload


def udp6(src_mac: bytes, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, sport: int, dport: int,
         payload: bytes = b"y" * 10) -> bytes:
    """An Ethernet frame holding a UDP/IPv6 datagram."""
    ip = struct.pack("!IHBB16s16s", 6 << 28, 8 + len(payload), 17, 64, src_ip, dst_ip)
    return dst_mac + src_mac + b"\x86\xdd" + ip + struct.pack("!HHHH", sport, dport, 8, 0) + payload


def out4(sport: int, dport: int = 9) -> bytes:
    """What the guest transmits: a UDP datagram from its port ``sport``."""
    return udp4(GUEST, PEER, GUEST_IP4, PEER_IP4, sport, dport)


def in4(sport: int, dport: int = 9) -> bytes:
    """The peer's answer to ``out4(sport, dport)``."""
    return udp4(PEER, GUEST, PEER_IP4, GUEST_IP4, dport, sport)
