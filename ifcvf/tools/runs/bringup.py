"""Bring a simulated VF up through the HAL and the register layer, stop it, report.

This is the smallest whole path: model -> hal.sim -> ifcvf.hw.  Rings live in
real guest memory (memfd) mapped into the VF's IOMMU domain with IOVA = GPA,
every queue gets its MSI-X vector wired to an eventfd, and the saved ring
state must come back as it was restored.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from hal.memory import HostMemory
from ifcvf import ids
from ifcvf.hw import IfcvfHw, QueueConfig
from ifcvf.tools.functions import SIM, open_function
from ifcvf.vring import split_ring_layout
from sim.scenario import Scenario, device_config
from sim.world import World

# What a virtio-net guest driver typically accepts from IFCVF.
GUEST_FEATURES = (ids.bit(ids.Feature.VERSION_1) | ids.bit(ids.Feature.NET_MAC)
                  | ids.bit(ids.Feature.NET_STATUS) | ids.bit(ids.Feature.NET_MRG_RXBUF)
                  | ids.bit(ids.Feature.NET_MQ) | ids.bit(ids.Feature.NET_CTRL_VQ)
                  | ids.bit(ids.Feature.RING_EVENT_IDX) | ids.bit(ids.Feature.RING_INDIRECT_DESC)
                  | ids.bit(ids.Feature.NET_MTU))


@dataclass
class BringupResult:
    features: int
    offered: int
    queues: list[dict]
    lm_block: bool
    mac: str
    elapsed_ns: int
    trace_digest: str
    trace_events: int

    def to_json(self) -> dict:
        return {
            "features": f"{self.features:#x}",
            "feature_names": ids.feature_names(self.features),
            "device_features": f"{self.offered:#x}",
            "queues": self.queues,
            "lm_block": self.lm_block,
            "mac": self.mac,
            "simulated_ns": self.elapsed_ns,
            "trace_digest": self.trace_digest,
            "trace_events": self.trace_events,
        }


def run(scenario: Scenario, progress=None) -> BringupResult:
    drv = scenario.section("driver")
    world = World(scenario.seed)
    fn = open_function(SIM, world=world, config=device_config(scenario.device))
    memory = HostMemory(drv["guest_memory_mib"] << 20, "guest-ram")
    eventfds: list[int] = []
    try:
        hw = IfcvfHw(fn)
        pairs = min(drv["queue_pairs"], hw.queue_pairs)
        nqueues = 2 * pairs
        fn.dma_map(0, memory, 0, memory.size)
        eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(nqueues + 1)]
        fn.set_msix(eventfds)
        queues, base = [], 0x10_0000
        for q in range(nqueues):
            desc, avail, used, base = split_ring_layout(base, drv["queue_size"])
            queues.append(QueueConfig(q, drv["queue_size"], desc, avail, used,
                                      last_avail=drv["ring_base"], last_used=drv["ring_base"],
                                      vector=ids.MSIX_QUEUE_VECTOR_BASE + q))
        start = world.now_ns()
        if progress:
            progress("start")
        features = hw.start(GUEST_FEATURES, queues, mq_pairs=pairs)
        mac = hw.net_config().mac_str
        world.advance_ns(10_000)
        if progress:
            progress("stop")
        states = hw.stop([q.index for q in queues])
        elapsed = world.now_ns() - start
        rows = []
        for q in queues:
            st = states[q.index]
            rows.append({"index": q.index, "size": q.size, "vector": q.vector,
                         "last_avail": st.last_avail if st else None,
                         "last_used": st.last_used if st else None})
        return BringupResult(features, hw.device_features(), rows, hw.has_lm_block, mac, elapsed,
                             world.digest(), world.trace.count)
    finally:
        fn.close()
        for fd in eventfds:
            os.close(fd)
        memory.close()
