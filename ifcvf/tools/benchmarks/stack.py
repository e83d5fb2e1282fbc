"""The stack `ifcvf bench sim` measures: a simulated VF brought up through the driver's
register layer, with the guest model on its rings.

``build_stack`` starts a VF through ``ifcvf.hw`` over ``hal.sim`` (as `ifcvf sim
run` does) and puts a ``sim.guest.GuestNet`` on its queues; ``BenchStack`` holds
the pieces and closes them.  (Not ``sim.engines.Datapath``, the device's own
queue engines, which ``stack.model.datapath`` is.)  Frame sizes are given as
labels: "1500" means an MTU of 1500, i.e. 1518-byte frames.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

SIZE_LABELS = {1500: 1518}     # "1500 B traffic" = MTU 1500 = 1518-byte frames


def frame_size(label: int) -> int:
    return SIZE_LABELS.get(label, label)


@dataclass
class BenchStack:
    """A VF started through ifcvf.hw over hal.sim, with a guest on its rings."""

    world: object
    model: object
    fn: object
    hw: object
    memory: object
    guest: object
    features: int
    fds: list

    def close(self) -> None:
        self.guest.detach()
        self.fn.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.memory.close()


def build_stack(world, *, pairs: int, queue_size: int, burst: int = 64,
                   engine_factory=None, config=None, wanted: int | None = None,
                   **guest_kw) -> BenchStack:
    """Bring a VF up the way the driver does and put a GuestNet on its queues.

    The guest's rings are programmed into the VF (IOVA = GPA, guest RAM mapped
    whole), queue q's MSI-X vector 1 + q is the guest's call eventfd for q, and
    the guest's kicks reach the VF's doorbells through a host notifier (the
    guest's MMIO write lands in the notify page: no eventfd or relay thread on
    the path; the kick eventfds exist but are not signalled).
    ``wanted`` limits the features the guest accepts (default: all it supports).
    """
    from hal.memory import HostMemory
    from ifcvf import ids
    from ifcvf.hw import IfcvfHw, QueueConfig
    from ifcvf.tools.functions import SIM, open_function
    from sim.config import IfcvfConfig
    from sim.guest import GuestNet, negotiate, plan_layout

    config = config or IfcvfConfig(queue_pairs=pairs, max_queue_size=max(1024, queue_size))
    fn = open_function(SIM, world=world, config=config, engine_factory=engine_factory)
    model = fn.model
    fds: list[int] = []
    memory = None
    try:
        hw = IfcvfHw(fn)
        offered = hw.device_features()
        features = negotiate(offered) if wanted is None else negotiate(offered, wanted)
        guest_kw.setdefault("rx_buffer_size", 2048)
        guest_kw.setdefault("tx_buffer_size", 2048)
        _, end = plan_layout(pairs, queue_size, rx_buffer_size=guest_kw["rx_buffer_size"],
                             tx_buffer_size=guest_kw["tx_buffer_size"],
                             tx_chain=guest_kw.get("tx_chain", "single"),
                             tx_flows=guest_kw.get("tx_flows", 1))
        memory = HostMemory(((end >> 20) + 2) << 20, "guest-ram")
        guest = GuestNet(world, memory, features=features, queue_pairs=pairs,
                         queue_size=queue_size, napi_budget=burst, tx_batch=burst, **guest_kw)
        fn.dma_map(0, memory, 0, memory.size)
        nq = 2 * pairs
        calls = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(nq + 1)]
        kicks = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(nq)]
        fds += calls + kicks
        fn.set_msix(calls)
        queues = []
        for q in range(nq):
            desc, avail, used = guest.queue_addresses(q)
            queues.append(QueueConfig(q, queue_size, desc, avail, used,
                                      vector=ids.MSIX_QUEUE_VECTOR_BASE + q))
        hw.start(features, queues, mq_pairs=pairs)
        offsets = [hw.notify_offset(q) for q in range(nq)]
        region = fn.region(hw.caps.notify.bar)
        for q in range(nq):
            # A host notifier: the guest's kick is its MMIO write landing in
            # the VF's notify page (no eventfd, no relay thread on the path).
            def notify(q=q, offset=offsets[q], write16=region.write16):
                write16(offset, q)
            guest.attach(q, kicks[q], calls[ids.MSIX_QUEUE_VECTOR_BASE + q], notify=notify)
        return BenchStack(world, model, fn, hw, memory, guest, features, fds)
    except BaseException:
        fn.close()
        for fd in fds:
            os.close(fd)
        if memory is not None:
            memory.close()
        raise
