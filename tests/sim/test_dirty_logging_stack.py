"""Hardware dirty logging through the whole stack: QEMU role -> back-end -> driver -> VF.

The front-end sends SET_LOG_BASE (a memfd) and turns LOG_ALL on; the driver
maps the log at its IOVA and programs BAR 4; frames arrive on the VF's port
and the device sets the bits of the RX buffer pages in that very memfd.  At
GET_VRING_BASE the driver marks the used rings (the device never does).
"""
from __future__ import annotations

from hal.memory import HostMemory
from ifcvf.tools.runs.bringup import GUEST_FEATURES
from ifcvf.vring import split_ring_layout
from ifcvf.tools.runs.stack import SimHost
from ifcvf.vhost import protocol as p
from sim.config import IfcvfConfig
from sim.frames import FrameBatch
from sim.frontend import Region, RingAddresses
from sim.testing.splitring import DESC_F_WRITE, SplitRing
from sim.wire import Port, connect

MiB = 1 << 20
PAGE = 4096
BUFS = 4 * MiB


def log_pages(log: HostMemory, size: int) -> set[int]:
    data = bytes(log.view[:size])
    return {8 * i + b for i, byte in enumerate(data) if byte for b in range(8) if byte >> b & 1}


def test_the_device_logs_rx_buffer_pages_into_the_front_ends_log():
    host = SimHost(seed=5)
    ram = HostMemory(16 * MiB, "guest")
    log_size = (16 * MiB // PAGE + 7) // 8
    log = HostMemory(PAGE, "log")
    try:
        vf = host.add_vf(IfcvfConfig(queue_pairs=1))
        fe = host.connect(vf)
        rings, base = [], 0x10_0000
        for q in range(2):
            desc, avail, used, base = split_ring_layout(base, 256)
            rings.append(RingAddresses(q, 256, desc, avail, used))
        fe.connect(2)
        features = fe.features & (GUEST_FEATURES | 1 << p.F_PROTOCOL_FEATURES)
        fe.start(features, [Region(0, ram.size, ram.fd, ram.address)], rings)
        assert vf.backend.configured
        # the guest posts 32 RX buffers of 3000 bytes, some straddling pages
        rx = SplitRing(ram.view, rings[0].desc, 256)
        for i in range(32):
            rx.set_desc(i, BUFS + i * 3000, 3000, DESC_F_WRITE)
            rx.post(i)
        rx.publish()
        # migration starts: the log, then LOG_ALL
        fe.set_log_base(log.fd, log_size)
        fe.set_log_all(True, rings)
        assert vf.model.lm.logging_enabled
        tester = Port(host.world, "tester")
        connect(tester, vf.model.port)
        batch = FrameBatch()
        for i in range(20):
            batch.append(bytes([i]) * (1000 + 20 * i))
        tester.transmit(batch, host.world.now)
        host.world.advance_ns(50_000)
        used = rx.take_used()
        assert len(used) == 20
        written = set()
        for head, length in used:
            addr = BUFS + head * 3000
            written.update(range(addr // PAGE, (addr + length - 1) // PAGE + 1))
        assert log_pages(log, log_size) == written           # the device's marks only
        used_ring_pages = set(range(rings[0].used // PAGE, (rings[0].used + 6 + 8 * 256) // PAGE + 1))
        assert not used_ring_pages & log_pages(log, log_size)
        # the VM stops: the driver marks the used rings itself
        fe.stop(rings)
        assert used_ring_pages <= log_pages(log, log_size)
    finally:
        host.close()
        ram.close()
        log.close()
