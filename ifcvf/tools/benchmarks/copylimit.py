"""The memory-copy ceiling of the simulated pipeline, measured on this machine.

Every frame the full pipeline delivers is moved through memory by the
simulator itself, whichever direction it takes: it is written once when it is
made (the generator's or the guest's fill), read and written once by the
device's DMA (wire batch <-> guest buffer, the 12-byte virtio-net header
with it), and read once when it is checked (the guest's RX consumer or the
sink).  That is about 4 x L + 12 bytes of memory traffic for an L-byte frame
(without FCS), the traffic of two memcpy's of L bytes.  No simulator of this
design can deliver frames faster than the machine's memcpy bandwidth allows
for those bytes; at large frames that is what binds, so the bench measures it
in the same run and reports the pipeline against it.
"""
from __future__ import annotations

import statistics
import time

VIRTIO_NET_HDR = 12
BLOCK = 32 << 10          # about one wire batch of the bench's generator
POOL = 8 << 20            # larger than the last-level cache of a small machine


def traffic_bytes_per_frame(frame_len: int) -> int:
    """Bytes read plus written for one delivered frame of frame_len bytes (no FCS)."""
    return 4 * frame_len + VIRTIO_NET_HDR


def memcpy_bytes_per_s(rounds: int = 5, seconds: float = 0.04) -> float:
    """Median memcpy bandwidth (bytes copied per second) over ``rounds`` timings,
    copying BLOCK-sized blocks across a POOL-sized buffer as the pipeline does."""
    src = bytearray(b"\x5a" * POOL)
    dst = bytearray(POOL)
    s, d = memoryview(src), memoryview(dst)
    offsets = range(0, POOL - BLOCK + 1, BLOCK)
    rates = []
    for _ in range(rounds):
        copied = 0
        t0 = time.perf_counter()
        while True:
            for off in offsets:
                d[off:off + BLOCK] = s[off:off + BLOCK]
            copied += len(offsets) * BLOCK
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
        rates.append(copied / elapsed)
    return statistics.median(rates)


def copy_limit_frames_per_s(frame_len: int, copy_bytes_per_s: float) -> float:
    """Frames per second that memcpy bandwidth allows: a memcpy of N bytes is 2N
    bytes of traffic, each frame traffic_bytes_per_frame of it."""
    return 2 * copy_bytes_per_s / traffic_bytes_per_frame(frame_len)
