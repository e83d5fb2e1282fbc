"""Frames as the simulated datapath carries them: batches, not objects.

The contract between the device engines (``sim.engines``), the wire
(``sim.wire``) and the guest driver model (``sim.guest``).  A batch holds
frames back to back in one buffer with their lengths and one timestamp each,
so a wake-up of any actor moves many frames with a handful of Python calls.

Sizes: a frame's ``length`` is what sits in a virtio buffer after the
virtio-net header: the Ethernet frame *without* its FCS.  On the wire each
frame also costs its FCS (4 B), preamble + SFD (8 B) and the minimum
inter-frame gap (12 B).  Traffic sizes are quoted as Ethernet frame sizes
*with* FCS, as line-rate tables do: "64 B" frames hold 60 bytes in a buffer
and take 84 byte times on the wire (148.81 Mpps at 100 Gb/s); "1500 B"
traffic means an MTU of 1500, i.e. 1518 B frames holding 1514 bytes
(8.127 Mpps at 100 Gb/s).
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from sim._native import ffi

FCS_BYTES = 4
PREAMBLE_BYTES = 8
IFG_BYTES = 12
WIRE_OVERHEAD = FCS_BYTES + PREAMBLE_BYTES + IFG_BYTES  # 24 bytes per frame beyond its buffer bytes


# cffi array types for wrapping a batch's buffers (``ffi.from_buffer(U32S, lengths)``):
# a type, not its name, so the datapath's wraps skip cffi's type-name lookup.
U8S = ffi.typeof("uint8_t[]")
U32S = ffi.typeof("uint32_t[]")
I64S = ffi.typeof("int64_t[]")


def buffer_length(frame_size: int) -> int:
    """Bytes in a virtio buffer for an Ethernet frame of ``frame_size`` (with FCS)."""
    return frame_size - FCS_BYTES


def wire_bytes(length: int) -> int:
    """Byte times a frame of ``length`` buffer bytes occupies on the wire."""
    return length + WIRE_OVERHEAD


@dataclass
class FrameBatch:
    """Frames back to back in ``data``; ``times[i]`` is when frame i's last bit passes.

    The producer of a batch fills ``times`` (departure for a transmitter,
    arrival for a receiver); consumers never mutate a batch they were given.
    """

    data: bytearray = field(default_factory=bytearray)
    lengths: array = field(default_factory=lambda: array("I"))
    times: array = field(default_factory=lambda: array("q"))

    def __len__(self) -> int:
        return len(self.lengths)

    def append(self, frame: bytes | memoryview, time: int = 0) -> None:
        self.data += frame
        self.lengths.append(len(frame))
        self.times.append(time)

    def frames(self):
        """(offset, length, time) per frame, in order."""
        off = 0
        for length, t in zip(self.lengths, self.times):
            yield off, length, t
            off += length

    def total_bytes(self) -> int:
        return len(self.data)
